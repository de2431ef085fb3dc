"""Measuring bundles on a device over a TVM RPC tracker (targets/device.py): the errors that say what to start, and
the device server that no one without its token can use."""
import contextlib
import os
import shutil
import subprocess
import sys

import pytest
import tvm.rpc

from edgesmith.targets.backends import BUNDLE_FILES, get_backend
from edgesmith.targets.bundle_files.edgesmith_rpc import TOKEN_ENV
from edgesmith.targets.device import DeviceUnreachable, measure_bundle
from tests.conftest import free_port, rpc_device
from tests.targets.bundle_files.test_edgesmith_runtime import _ort_bundle


def test_measuring_on_a_device_names_what_is_missing(tmp_path):
    def plain_tvm_server(tracker):
        port = free_port()
        return [sys.executable, "-m", "tvm.exec.rpc_server", f"--tracker={tracker}", "--key=plain", "--host=127.0.0.1",
                f"--port={port}", f"--port-end={port + 50}"]

    (tmp_path / "bundle").mkdir()
    options = {"warmup": 1, "runs": 1, "batch_size": 1, "threads": 1}
    closed = f"127.0.0.1:{free_port()}"
    with pytest.raises(DeviceUnreachable, match=f"RPC tracker {closed} unreachable.*rpc_tracker"):
        measure_bundle(closed, "any", tmp_path / "bundle", **options)
    with rpc_device("plain", plain_tvm_server) as tracker:
        with pytest.raises(DeviceUnreachable, match="no device with RPC key 'other'"):
            measure_bundle(tracker, "other", tmp_path / "bundle", **options)
        # A stock TVM RPC server runs TVM modules only: it cannot load an ONNX Runtime bundle, so it is refused.
        with pytest.raises(DeviceUnreachable, match="plain TVM RPC server.*edgesmith_runtime.py --rpc"):
            measure_bundle(tracker, "plain", tmp_path / "bundle", **options)


EVIL_LIBRARY = r"""
#include <stdio.h>
__attribute__((constructor)) static void on_load(void) {
    FILE *marker = fopen("%s", "w");
    if (marker) { fputs("loaded", marker); fclose(marker); }
}
"""


@pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler to build the test library")
def test_without_the_token_no_client_can_load_a_library_or_run_a_bundle(tiny_onnx, tmp_path, monkeypatch):
    marker, library = tmp_path / "loaded", tmp_path / "evil.so"
    (tmp_path / "evil.c").write_text(EVIL_LIBRARY % marker)
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(library), str(tmp_path / "evil.c")], check=True)
    bundle = _ort_bundle(tmp_path / "bundle", tiny_onnx)
    options = {"warmup": 1, "runs": 3, "batch_size": 1, "threads": 1}

    def locked_server(tracker):
        return [sys.executable, str(BUNDLE_FILES / "edgesmith_runtime.py"), "--rpc-server", f"--tracker={tracker}",
                "--key=locked", f"--port={free_port()}", "--token=s3cret"]   # default host: loopback

    with rpc_device("locked", locked_server) as tracker:
        host, port = tracker.split(":")
        for attempt in ("upload and load a library", "run a bundle"):   # a stranger with TVM's own client
            with pytest.raises(Exception, match="session refused"):
                session = tvm.rpc.connect_tracker(host, int(port)).request("locked", max_retry=1)
                if attempt == "run a bundle":
                    session.get_function("edgesmith.measure")("bundle.tar", 1, 1, 1, 1)
                session.upload(str(library))
                session.load_module(library.name)
        for token in (None, "wrong"):
            monkeypatch.setenv(TOKEN_ENV, token) if token else monkeypatch.delenv(TOKEN_ENV, raising=False)
            with pytest.raises(DeviceUnreachable, match="refused the session: missing or wrong token"):
                measure_bundle(tracker, "locked", bundle, **options)
        assert not marker.exists()

        monkeypatch.setenv(TOKEN_ENV, "s3cret")   # the host's side, set as the README says
        assert measure_bundle(tracker, "locked", bundle, **options)["parity"]["passed"]
        session = get_backend("tvm").rpc_session(tracker, "locked", 60, "s3cret")
        session.upload(str(library))
        with contextlib.suppress(Exception):   # not a TVM module: loading fails after the library ran
            session.load_module(library.name)
        assert marker.read_text() == "loaded"   # the same request with the token does reach the library


def test_the_server_listens_beyond_loopback_only_with_a_token():
    server = [sys.executable, str(BUNDLE_FILES / "edgesmith_runtime.py"), "--rpc-server", "--tracker=127.0.0.1:1",
              "--key=k", "--host=0.0.0.0"]
    env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
    proc = subprocess.run(server, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2 and "--token" in proc.stderr and "SSH tunnel" in proc.stderr
    assert "Traceback" not in proc.stderr
