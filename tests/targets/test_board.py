"""The emulated aarch64 board: a model cross-compiled for raspberry-pi-4 runs under qemu-user and matches ONNX Runtime
on the host. Slow (downloads ~60 MB of Debian packages and wheels once, then emulates)."""
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

from targets import board
from tests.conftest import edgesmith

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    shutil.which("qemu-aarch64-static") is None or shutil.which("aarch64-linux-gnu-gcc") is None,
    reason="needs qemu-user-static and gcc-aarch64-linux-gnu (apt-get install qemu-user-static gcc-aarch64-linux-gnu)")]


@pytest.fixture(scope="module")
def board_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("board") / "aarch64"
    proc = edgesmith("board", "emulate", "aarch64", "--prepare", "--root", str(root), check=True)
    assert "board ready" in proc.stdout and board.is_ready(root)
    return root


def test_cross_compiled_raspberry_pi_model_matches_host_onnxruntime_on_the_emulated_board(board_root, tmp_path):
    # A user profile: the Raspberry Pi 4 with TVM only, so its bundle is the cross-compiled library.
    pi = (board.Path(__file__).resolve().parents[2] / "targets/profiles/raspberry-pi-4.yaml").read_text()
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles/rpi4-tvm.yaml").write_text(pi.replace("backends: [onnxruntime, tvm]", "backends: [tvm]"))
    env_profiles = ["--profiles-dir", str(tmp_path / "profiles")]
    edgesmith(*env_profiles, "run", "--set", "data.name=digits", "--set", "stages=[{kind: train, epochs: 2}]",
              "--set", "targets=[rpi4-tvm]", "--set", "bench.runs=5", "--out", str(tmp_path / "run"),
              "--cache-dir", str(tmp_path / "cache"), check=True)
    bundle = tmp_path / "run/bundles/rpi4-tvm"
    assert json.loads((bundle / "compile.json").read_text())["elf_arch"] == "aarch64"
    host = json.loads(edgesmith(*env_profiles, "bundle", "verify", str(bundle), check=True).stdout)
    assert host["hashes"] == "ok" and host["parity"].startswith("not run here")
    proc = edgesmith("board", "emulate", "aarch64", "--root", str(board_root), "--", "python3",
                     str(bundle / "edgesmith_runtime.py"), "--check")
    assert proc.returncode == 0, proc.stderr[-2000:]
    parity = json.loads(proc.stdout.strip().splitlines()[-1])
    assert parity["passed"] and parity["max_rel_diff"] < 1e-4 and parity["top1_agreement"] == 1.0


def test_board_python_is_aarch64_and_has_the_runtimes(board_root):
    proc = board.run(board_root, ["python3", "-c", "import platform, tvm, onnxruntime; print(platform.machine())"],
                     capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "aarch64"


def test_rpc_server_on_the_board_registers_with_a_host_tracker(board_root):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tracker = subprocess.Popen([sys.executable, "-m", "tvm.exec.rpc_tracker", "--host=127.0.0.1", f"--port={port}",
                                "--port-end", str(port + 1)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = subprocess.Popen([sys.executable, "-m", "pipeline", "board", "emulate", "aarch64", "--root",
                               str(board_root), "--rpc-tracker", f"127.0.0.1:{port}", "--rpc-key", "emu"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        import tvm.rpc

        deadline, summary = time.time() + 120, ""
        while time.time() < deadline and "emu" not in summary:
            time.sleep(2)
            try:
                summary = json.dumps(tvm.rpc.connect_tracker("127.0.0.1", port).summary())
            except Exception:   # the tracker may still be starting
                continue
        assert "emu" in summary
    finally:
        os.killpg(server.pid, 15)
        tracker.terminate()
        server.wait(30)
        tracker.wait(30)
