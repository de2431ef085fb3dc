"""The emulated aarch64 board: a model cross-compiled for raspberry-pi-4 runs under qemu-user and matches ONNX Runtime
on the host. Slow (downloads ~60 MB of Debian packages and wheels once, then emulates)."""
import json
import shutil
import sys

import pytest

from edgesmith.targets import board
from tests.conftest import chosen, edgesmith, rpc_device

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


def test_candidates_measured_through_rpc_on_the_emulated_board_get_parity_but_never_latency(board_root, tmp_path):
    def server(tracker):
        return [sys.executable, "-m", "edgesmith", "board", "emulate", "aarch64", "--root", str(board_root),
                "--rpc-tracker", tracker, "--rpc-key", "rpi4"]

    with rpc_device("rpi4", server) as tracker:   # raspberry-pi-4's rpc_key
        edgesmith("run", "--set", "data.name=digits", "--set", "stages=[{kind: train, epochs: 2}, {kind: qat, "
                  "epochs: 1}]", "--set", "targets=[raspberry-pi-4]", "--set", "bench.runs=5", "--set",
                  f"compile.rpc_tracker={tracker}", "--out", str(tmp_path / "run"), "--cache-dir",
                  str(tmp_path / "cache"), check=True)
    rows = [r for r in json.loads((tmp_path / "run/results.json").read_text()) if r["target"] == "raspberry-pi-4"]
    ran = {(r["backend"], r["precision"]): r for r in rows if r["measured_on"]}
    # The ORT-ARM QAT model, the FP32 export on ONNX Runtime, and the cross-compiled TVM library.
    assert set(ran) == {("onnxruntime", "int8"), ("onnxruntime", "fp32"), ("tvm", "fp32")}
    for r in ran.values():
        assert r["measured_on"].startswith("emulated") and "aarch64" in r["measured_on"]
        assert r["latency_ms"] is None and r["parity"]["top1_agreement"] >= 0.97
    assert "not measured" in chosen(rows, "raspberry-pi-4")["status"]
    manifest = json.loads((tmp_path / "run/bundles/raspberry-pi-4/manifest.json").read_text())
    assert manifest["parity"]["device"]["passed"] and manifest["latency_ms"] is None
    assert manifest["device"]["emulated"] == "qemu-aarch64-static"


def test_a_latency_budget_on_the_emulated_board_stops_before_pruning_with_what_to_do(board_root, tmp_path):
    def server(tracker):
        return [sys.executable, "-m", "edgesmith", "board", "emulate", "aarch64", "--root", str(board_root),
                "--rpc-tracker", tracker, "--rpc-key", "rpi4"]

    with rpc_device("rpi4", server) as tracker:
        proc = edgesmith("run", "--set", "data.name=digits", "--set", "stages=[{kind: train, epochs: 1}, {kind: prune, "
                         "latency: {target: raspberry-pi-4, p50_ms: 1.0}}]", "--set", "targets=[raspberry-pi-4]",
                         "--set", "bench.runs=5", "--set", f"compile.rpc_tracker={tracker}", "--out",
                         str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache"))
    assert proc.returncode == 2, proc.stderr[-2000:]
    error = proc.stderr.strip().splitlines()[-1]
    assert "is emulated" in error and "not latency" in error and "register the real board" in error
    rows = json.loads((tmp_path / "run/results.json").read_text())
    assert [r["stage"] for r in rows] == ["train"]   # the finished training is kept
