"""Measuring a bundle on a device: upload it through a TVM RPC tracker and let the device's
`edgesmith_runtime.py --rpc-server` run it with the bundle's own loader (parity, then latency samples).

Not a TVM concern: any backend's bundle (ONNX Runtime, TVM, TensorRT built on the device) is measured this way. TVM's
RPC is only the transport, reached through the tvm backend (the one module that imports tvm).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import tarfile
from pathlib import Path

from edgesmith.targets.backends import BackendError, DeviceUnreachable, get_backend
from edgesmith.targets.bundle_files.edgesmith_rpc import TOKEN_ENV

MEASURE_FUNCTION = "edgesmith.measure"   # registered by `edgesmith_runtime.py --rpc-server` on the device
SESSION_TIMEOUT_S = 600                  # one candidate's upload, parity and timing on a slow board
PROBE_TIMEOUT_S = 5

__all__ = ["DeviceUnreachable", "measure_bundle"]


def measure_bundle(tracker: str, key: str, bundle_dir: Path, *, warmup: int, runs: int, batch_size: int,
                   threads: int) -> dict:
    """Parity and latency samples of a bundle on the device registered at `tracker` under `key`: the JSON of the
    device's `edgesmith_runtime.measure`. Raises DeviceUnreachable when no such device answers, BackendError with the
    device's own message when the bundle fails there."""
    _probe(tracker)
    remote = get_backend("tvm").rpc_session(tracker, key, SESSION_TIMEOUT_S, os.environ.get(TOKEN_ENV))
    try:
        measure = remote.get_function(MEASURE_FUNCTION)
    except AttributeError:
        raise DeviceUnreachable(f"the device with RPC key '{key}' runs a plain TVM RPC server, which cannot measure "
                                "bundles; start it with `python3 edgesmith_runtime.py --rpc-server --tracker "
                                f"{tracker} --key {key}` (the script ships in every bundle)") from None
    archive = flat_tar(bundle_dir)
    name = f"edgesmith-{hashlib.sha256(archive).hexdigest()[:16]}.tar"
    try:
        remote.upload(bytearray(archive), target=name)
        return json.loads(measure(name, warmup, runs, batch_size, threads))
    except Exception as exc:   # the device's own error, sent back over RPC as any exception type
        lines = [line for line in str(exc).strip().splitlines() if line.strip()]
        raise BackendError(f"on the device with RPC key '{key}': {lines[-1] if lines else type(exc).__name__}") \
            from None


def _probe(tracker: str) -> None:
    """TVM's connect_tracker retries for a minute on a refused connection; one quick probe says it at once."""
    host, port = tracker.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=PROBE_TIMEOUT_S).close()
    except OSError as exc:
        raise DeviceUnreachable(f"RPC tracker {tracker} unreachable ({exc.strerror or exc}); start it with `python -m "
                                f"tvm.exec.rpc_tracker --port {port}` or unset compile.rpc_tracker") from None


def flat_tar(folder: Path) -> bytes:
    """A bundle as a tar of its plain files (the device refuses anything else)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for path in sorted(Path(folder).iterdir()):
            if path.is_file():
                archive.add(path, arcname=path.name)
    return buffer.getvalue()
