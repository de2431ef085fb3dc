import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest

REPO = Path(__file__).resolve().parents[1]

# A fast variant of the default recipe, train stage only: digits (1,797 real 8×8 digits) trains in a second or two.
FAST = ["data.name=digits", "stages=[{kind: train, epochs: 1}]", "bench.runs=20", "bench.warmup=2",
        "export.exporter=torchscript", "export.opset=17", "budget.max_accuracy_drop=null"]
# The default recipe's compression stages, shortened.
FAST_COMPRESSION = FAST + ["stages=[{kind: train, epochs: 2}, {kind: prune, ratio: 0.5, finetune: {epochs: 1, "
                           "distill: true}}, {kind: qat, epochs: 1, distill: true}]"]


def chosen(rows: list[dict], target: str) -> dict:
    """The results row of the candidate a target's bundle was made from."""
    return next(r for r in rows if r["target"] == target and r.get("status", "").startswith("chosen"))


@pytest.fixture
def cache_dir(tmp_path) -> Path:
    return tmp_path / "cache"


def edgesmith(*args: str, cwd: Path | None = None, check: bool = False) -> subprocess.CompletedProcess:
    """The CLI as a user runs it, in a fresh process."""
    proc = subprocess.run([sys.executable, "-m", "edgesmith", *args], capture_output=True, text=True,
                          cwd=cwd or REPO, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"edgesmith {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def rpc_device(key: str, server_command: Callable[[str], list[str]], ready_s: float = 180):
    """A real TVM RPC tracker on this host and a device server registered with it under `key`; yields the tracker's
    HOST:PORT. `server_command(tracker)` starts the server (each in its own process group, killed afterwards)."""
    import tvm.rpc

    port = free_port()
    tracker_address = f"127.0.0.1:{port}"
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "start_new_session": True}
    processes = [subprocess.Popen([sys.executable, "-m", "tvm.exec.rpc_tracker", "--host=127.0.0.1",
                                   f"--port={port}", f"--port-end={port + 1}"], **quiet)]
    try:
        time.sleep(1)
        processes.append(subprocess.Popen(server_command(tracker_address), **quiet))
        deadline = time.time() + ready_s
        while time.time() < deadline:
            time.sleep(1)
            try:
                if key in tvm.rpc.connect_tracker("127.0.0.1", port).summary()["queue_info"]:
                    break
            except (OSError, RuntimeError):   # still starting
                continue
        else:
            raise AssertionError(f"no RPC server registered under '{key}' within {ready_s} s")
        yield tracker_address
    finally:
        for proc in reversed(processes):
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)
