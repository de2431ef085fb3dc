"""Choosing by latency measured on the device: a real TVM RPC tracker, and a device server (the bundles' own
`edgesmith_runtime.py --rpc-server`) registered with it. The "device" is this machine under its own profile, so every
candidate (ONNX Runtime and TVM) is uploaded, checked and timed over RPC exactly as on a board."""
import json
import sys

import pytest

from edgesmith.pipeline.deploy import describe
from edgesmith.targets.backends import BUNDLE_FILES
from edgesmith.targets.bundle_files.edgesmith_runtime import device_facts
from tests.conftest import FAST, chosen, edgesmith, free_port, rpc_device

LAB_PROFILE = """description: an x86-64 machine in the lab, reached through the RPC tracker
arch: x86_64
backends: [onnxruntime, tvm]
quant_scheme: ort-x86
threads: 1
rpc_key: {key}
tvm:
  target: {{kind: llvm}}
"""


# A GPU box whose RPC server has no TensorRT (this machine): its TensorRT candidate is built on the device, fails
# there with the builder's message, and the ONNX Runtime candidate is measured and chosen.
LAB_GPU_PROFILE = """description: a desktop GPU in the lab, reached through the RPC tracker
arch: x86_64
gpu_sm: 86
backends: [tensorrt, onnxruntime]
quant_scheme: tensorrt
threads: 1
rpc_key: {key}
tensorrt: {{major: 10, precisions: [fp16]}}
"""


def _profiles(tmp_path, template=LAB_PROFILE, **keys):
    folder = tmp_path / "profiles"
    folder.mkdir()
    for name, key in keys.items():
        (folder / f"{name}.yaml").write_text(template.format(key=key))
    return ["--profiles-dir", str(folder)]


def _run(tmp_path, profiles, targets, tracker):
    proc = edgesmith(*profiles, "run", *[a for s in FAST for a in ("--set", s)], "--set", f"targets=[{targets}]",
                     "--set", f"compile.rpc_tracker={tracker}", "--out", str(tmp_path / "run"),
                     "--cache-dir", str(tmp_path / "cache"), check=True)
    return proc, json.loads((tmp_path / "run/results.json").read_text())


@pytest.fixture(scope="module")
def lab_tracker():
    def server(tracker):
        return [sys.executable, str(BUNDLE_FILES / "edgesmith_runtime.py"), "--rpc-server", f"--tracker={tracker}",
                "--key=lab-x86", "--host=127.0.0.1", f"--port={free_port()}"]

    with rpc_device("lab-x86", server) as tracker:
        yield tracker


def test_every_candidate_is_checked_and_timed_on_the_device_and_the_fastest_wins(lab_tracker, tmp_path):
    profiles = _profiles(tmp_path, **{"lab-x86": "lab-x86", "lab-offline": "not-registered"})
    proc, rows = _run(tmp_path, profiles, "lab-x86, lab-offline", lab_tracker)
    lab = [r for r in rows if r["target"] == "lab-x86" and r["precision"] == "fp32"]
    assert {r["backend"] for r in lab} == {"onnxruntime", "tvm"}
    here = describe(device_facts())
    for r in lab:
        assert r["measured_on"] == here and r["latency_ms"]["p50"] > 0 and r["latency_ms"]["runs"] == 20
        assert r["parity"]["max_abs_diff"] < 1e-3
    best = chosen(rows, "lab-x86")
    assert best["status"] == "chosen" and best["latency_ms"]["p50"] == min(r["latency_ms"]["p50"] for r in lab)
    manifest = json.loads((tmp_path / "run/bundles/lab-x86/manifest.json").read_text())
    assert manifest["latency_measured_on"] == here and manifest["parity"]["device"]["passed"]
    assert manifest["latency_ms"]["p50"] == best["latency_ms"]["p50"] and manifest["device"]["cpu_count"] >= 1
    # fidelity to the trained model, measured on the device by the bundle against its fidelity_reference.npz
    device_fidelity = manifest["parity"]["device"]["fidelity"]
    assert device_fidelity["cosine"] > 0.999 and manifest["fidelity"] == device_fidelity
    assert all(r["fidelity"]["cosine"] > 0.999 for r in lab)
    # The same tracker has no device for the other profile's key: chosen by preference, the reason shown, no failure.
    offline = chosen(rows, "lab-offline")
    assert "not measured" in offline["status"] and offline["latency_ms"] is None
    assert "no device with RPC key 'not-registered'" in " ".join(proc.stderr.split())


def test_an_unreachable_tracker_leaves_the_choice_to_the_profile_and_says_why(tmp_path):
    proc, rows = _run(tmp_path, _profiles(tmp_path, lab="lab-x86"), "lab", f"127.0.0.1:{free_port()}")
    assert "not measured" in chosen(rows, "lab")["status"]
    assert all(r["latency_ms"] is None for r in rows if r["target"] == "lab")
    said = " ".join(proc.stderr.split())
    assert "RPC tracker 127.0.0.1:" in said and "unreachable" in said


def test_a_bad_tracker_address_is_refused_with_the_field(tmp_path):
    proc = edgesmith("run", "--set", "compile.rpc_tracker=localhost", "--out", str(tmp_path / "run"))
    assert proc.returncode == 2 and "compile.rpc_tracker" in proc.stderr


def test_a_tensorrt_candidate_is_built_on_the_device_and_fails_there_with_the_builders_message(lab_tracker, tmp_path):
    _, rows = _run(tmp_path, _profiles(tmp_path, LAB_GPU_PROFILE, **{"lab-gpu": "lab-x86"}), "lab-gpu", lab_tracker)
    trt = next(r for r in rows if r["target"] == "lab-gpu" and r["backend"] == "tensorrt")
    assert trt["status"].startswith("failed: on the device with RPC key 'lab-x86': TensorRT engine build failed")
    assert "tensorrt Python package is not installed" in trt["status"]
    best = chosen(rows, "lab-gpu")
    assert (best["backend"], best["status"]) == ("onnxruntime", "chosen") and best["latency_ms"]["p50"] > 0


@pytest.mark.slow
def test_a_latency_budget_on_a_board_is_searched_with_timings_taken_on_the_board(lab_tracker, tmp_path):
    """The lab machine is a board to edgesmith (its profile is no host profile): every candidate of the search goes
    to it as a bundle through the tracker and is timed there."""
    profiles = _profiles(tmp_path, **{"lab-x86": "lab-x86"})
    latency = "{target: lab-x86, speedup: 1.1, backend: onnxruntime, levels: [0.5]}"
    stages = (f"stages=[{{kind: train, epochs: 1}}, {{kind: prune, latency: {latency}, finetune: {{epochs: 1}}}}]")
    proc = edgesmith(*profiles, "run", *[a for s in FAST for a in ("--set", s)], "--set", stages,
                     "--set", "model.kwargs={width: 48}", "--set", "targets=[lab-x86]", "--set",
                     "compile.precisions=[fp32]", "--set", f"compile.rpc_tracker={lab_tracker}", "--out",
                     str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache"), check=True)
    assert f"latency budget lab-x86 (onnxruntime/fp32, rpc {lab_tracker} key lab-x86): p50" in proc.stdout
    prune = next(r for r in json.loads((tmp_path / "run/results.json").read_text()) if r["stage"] == "prune")
    budget = prune["latency_budget"]
    assert budget["measured_on"] == f"rpc {lab_tracker} key lab-x86"
    assert budget["measured_p50_ms"] <= budget["budget_ms"] and budget["layer_ratios"]
    assert budget["search"]["measurements"] >= 4 and all(c["measured_ms"] > 0 for c in budget["trace"])
