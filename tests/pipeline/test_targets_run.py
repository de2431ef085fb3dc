"""Per-device choice and bundles through the whole pipeline: one short compression run, five device profiles."""
import json
import shutil

import pytest

from edgesmith.errors import TargetError
from edgesmith.pipeline.bundle import verify
from edgesmith.pipeline.recipe import load_recipe
from edgesmith.pipeline.run import run
from tests.conftest import FAST_COMPRESSION, chosen, edgesmith

TARGETS = "targets=[x86-host, raspberry-pi-4, jetson-orin-nano, jetson-nano, rtx-4090]"
needs_cross_gcc = pytest.mark.skipif(shutil.which("aarch64-linux-gnu-gcc") is None,
                                     reason="aarch64-linux-gnu-gcc absent: apt-get install gcc-aarch64-linux-gnu")


@pytest.fixture(scope="module")
def device_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("devices")
    result = run(load_recipe(None, FAST_COMPRESSION + [TARGETS]), root / "run", root / "cache")
    return result, root / "run"


def _candidates(rows, target):
    return {(r["backend"], r["precision"]): r for r in rows if r["target"] == target}


def test_host_tries_every_candidate_and_keeps_the_fastest_measured(device_run):
    result, _ = device_run
    host = _candidates(result.rows, "x86-host")
    assert set(host) == {("onnxruntime", "int8"), ("onnxruntime", "fp32"), ("tvm", "fp32")}
    assert all(r["latency_ms"]["p50"] > 0 and r["parity"]["max_abs_diff"] < 1e-3 for r in host.values())
    best = chosen(result.rows, "x86-host")
    fastest = min(r["latency_ms"]["p50"] for r in host.values())
    assert best["status"] == "chosen" and best["latency_ms"]["p50"] == fastest


def test_a_file_is_timed_once_and_a_host_ort_candidate_shows_its_stage_rows_figure(device_run):
    """ONNX Runtime on a host profile runs its source's bytes in the host-latency session: one figure, not two."""
    result, out = device_run
    host = _candidates(result.rows, "x86-host")
    stage_rows = {r["stage"]: r for r in result.rows if r["target"] is None}
    for (backend, precision), row in host.items():
        if backend == "onnxruntime":
            assert row["latency_ms"] == stage_rows[row["stage"]]["latency_ms"], (precision, row["stage"])
    assert host[("tvm", "fp32")]["latency_ms"] != stage_rows[host[("tvm", "fp32")]["stage"]]["latency_ms"]
    steps = json.loads((out / "manifest.json").read_text())["steps"]
    timed = [s["key"] for s in steps if s["kind"] == "latency"]
    assert len(timed) > len(set(timed))   # the export row reuses its ONNX step's timing: same bytes, same key


@needs_cross_gcc
def test_arm_and_jetson_targets_are_chosen_by_preference_and_never_given_host_latency(device_run):
    result, out = device_run
    pi = chosen(result.rows, "raspberry-pi-4")
    assert (pi["backend"], pi["precision"], pi["stage"]) == ("onnxruntime", "int8", "qat:ort-arm")  # its own scheme
    assert "not measured" in pi["status"] and pi["latency_ms"] is None
    assert all(r["latency_ms"] is None for r in _candidates(result.rows, "raspberry-pi-4").values())
    orin = chosen(result.rows, "jetson-orin-nano")
    assert (orin["backend"], orin["precision"], orin["stage"]) == ("tensorrt", "int8", "qat:tensorrt")
    assert "build on device" in orin["status"]
    manifest = json.loads((out / "bundles/jetson-orin-nano/manifest.json").read_text())
    assert manifest["tensorrt_build"]["precision"] == "int8" and "--int8" in (out / "bundles/jetson-orin-nano/"
                                                                              "trtexec.sh").read_text()
    # Jetson Nano's TensorRT 8.2 stops at opset 13: both TensorRT candidates fail with the reason, TVM takes over.
    nano = _candidates(result.rows, "jetson-nano")
    assert "opset 17 > 13" in nano[("tensorrt", "fp16")]["status"]
    assert chosen(result.rows, "jetson-nano")["backend"] == "tvm"
    assert json.loads((out / "bundles/jetson-nano/compile.json").read_text())["elf_arch"] == "aarch64"


def test_bundles_carry_manifest_hashes_loader_and_parity_data(device_run):
    _, out = device_run
    bundle = out / "bundles/x86-host"
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["profile"]["name"] == "x86-host" and manifest["inputs"][0]["name"] == "input"
    assert manifest["inputs"][0]["mean"] and manifest["outputs"][0]["name"]
    assert manifest["versions"]["onnxruntime"] and manifest["parity"]["host"]["passed"]
    assert set(manifest["files"]) == {p.name for p in bundle.iterdir()} - {"manifest.json"}
    assert {"edgesmith_runtime.py", "parity_inputs.npz", "parity_reference.npz", manifest["artifact"]} <= \
        set(manifest["files"])
    report = verify(bundle)
    assert report["hashes"] == "ok" and report["parity"]["passed"]
    if (out / "bundles/jetson-nano").is_dir():   # an aarch64 TVM library: hashes here, parity on the device
        assert verify(out / "bundles/jetson-nano")["parity"].startswith("not run here")


def test_bundle_verify_cli_catches_a_changed_file(device_run, tmp_path):
    _, out = device_run
    copy = tmp_path / "bundle"
    shutil.copytree(out / "bundles/raspberry-pi-4", copy)
    assert json.loads(edgesmith("bundle", "verify", str(copy), check=True).stdout)["parity"]["passed"]
    with open(copy / "model.onnx", "ab") as handle:
        handle.write(b"\0")
    proc = edgesmith("bundle", "verify", str(copy))
    assert proc.returncode == 2 and "missing or changed since the bundle was written: model.onnx" in proc.stderr
    assert edgesmith("bundle", "verify", str(tmp_path)).returncode == 2   # no manifest

    shutil.rmtree(copy)
    shutil.copytree(out / "bundles/raspberry-pi-4", copy)
    (copy / "passwd").symlink_to("/etc/passwd")
    (copy / "notes.txt").write_text("added after the build")
    proc = edgesmith("bundle", "verify", str(copy))
    assert proc.returncode == 2 and "hashes" not in proc.stdout
    assert "not in the manifest: notes.txt" in proc.stderr and "symbolic links: passwd" in proc.stderr


def test_the_bundled_runtime_runs_standalone(device_run):
    _, out = device_run
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, str(out / "bundles/x86-host/edgesmith_runtime.py"), "--check"],
                          capture_output=True, text=True, cwd="/")
    assert proc.returncode == 0 and json.loads(proc.stdout)["passed"]


def test_a_target_with_no_usable_candidate_fails_after_the_others_are_bundled(tmp_path, monkeypatch):
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles/old-jetson.yaml").write_text(
        "arch: aarch64\ngpu_sm: 53\nbackends: [tensorrt]\nquant_scheme: tensorrt\n"
        "tensorrt: {major: 8, max_opset: 11, precisions: [fp16]}\n")
    monkeypatch.setenv("EDGESMITH_PROFILES", str(tmp_path / "profiles"))
    recipe = load_recipe(None, ["data.name=digits", "stages=[{kind: train, epochs: 1}]", "bench.runs=5",
                                "targets=[old-jetson, x86-host]"])
    with pytest.raises(TargetError, match=r"target 'old-jetson': no backend × precision passed \(tensorrt/fp16: "
                                          r"TensorRT 8 cannot build this model for 'old-jetson': opset 18 > 11"):
        run(recipe, tmp_path / "run", tmp_path / "cache")
    assert (tmp_path / "run/bundles/x86-host/manifest.json").is_file()   # the other target still got its bundle
    rows = json.loads((tmp_path / "run/results.json").read_text())
    assert any(r["target"] == "old-jetson" and r["status"].startswith("failed") for r in rows)
