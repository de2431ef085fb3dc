import json
import shutil
import subprocess
import sys
import time

import numpy as np
import onnx
import pytest
from onnx import helper

from edgesmith.targets import load_profile
from edgesmith.targets.backends import BackendError, CompileOptions
from edgesmith.targets.backends import onnxruntime as ort_backend
from edgesmith.targets.backends import tvm as tvm_backend
from tests.targets.conftest import example_inputs, tiny_cnn

pytest.importorskip("tvm", reason="apache-tvm is a dependency of edgesmith; this environment lacks it")
needs_cross_gcc = pytest.mark.skipif(shutil.which("aarch64-linux-gnu-gcc") is None,
                                     reason="aarch64-linux-gnu-gcc absent: apt-get install gcc-aarch64-linux-gnu")


def _write_compile_json(folder, facts):
    (folder / "compile.json").write_text(json.dumps(facts))   # what the pipeline's compile step writes


def test_host_build_runs_in_process_and_matches_onnxruntime(tiny_onnx, tmp_path):
    profile = load_profile("x86-host")
    facts = tvm_backend.compile(tiny_onnx, profile, tmp_path / "out", CompileOptions(batch_size=2))
    assert facts["elf_arch"] == "x86_64" and facts["target"]["mcpu"] != "native"   # resolved to this CPU
    _write_compile_json(tmp_path / "out", facts)
    feeds = example_inputs(5)   # not a multiple of the compiled batch: the runner pads the last chunk
    actual = tvm_backend.load(tmp_path / "out", profile)(feeds)[0]
    expected = ort_backend.load(tiny_onnx)(feeds)[0]
    assert actual.shape == (5, 10)
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-5)


@needs_cross_gcc
def test_cross_compile_for_raspberry_pi_gives_an_aarch64_shared_object(tiny_onnx, tmp_path):
    profile = load_profile("raspberry-pi-4")
    assert not tvm_backend.runs_here(profile)
    facts = tvm_backend.compile(tiny_onnx, profile, tmp_path, CompileOptions())
    assert facts["elf_arch"] == "aarch64" and tvm_backend.elf_arch(tmp_path / "model.so") == "aarch64"
    assert facts["target"]["mcpu"] == "cortex-a72" and facts["cc"] == "aarch64-linux-gnu-gcc"


def test_missing_cross_compiler_is_a_clear_error(tiny_onnx, tmp_path):
    base = load_profile("raspberry-pi-4")
    profile = base.model_copy(update={"tvm": base.tvm.model_copy(update={"cc": "aarch64-none-such-gcc"})})
    assert "cross compiler 'aarch64-none-such-gcc' not found" in tvm_backend.unavailable_reason(profile)
    with pytest.raises(BackendError, match="aarch64-none-such-gcc.*not found"):
        tvm_backend.compile(tiny_onnx, profile, tmp_path, CompileOptions())


def test_ops_tvm_cannot_import_are_named(tmp_path):
    extra = [helper.make_node("Bernoulli", ["logits"], ["noise"], name="dropout_noise")]
    model = tiny_cnn(extra)
    model.graph.output.append(helper.make_tensor_value_info("noise", onnx.TensorProto.FLOAT, ["batch", 10]))
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    with pytest.raises(BackendError, match=r"TVM cannot import these ONNX ops: Bernoulli \(dropout_noise\)"):
        tvm_backend.compile(path, load_profile("x86-host"), tmp_path / "out", CompileOptions())


def test_int8_is_refused_tvm_runs_qdq_as_float(tiny_onnx, tmp_path):
    assert tvm_backend.precisions(load_profile("x86-host")) == ["fp32"]
    with pytest.raises(BackendError, match="fp32 only"):
        tvm_backend.compile(tiny_onnx, load_profile("x86-host"), tmp_path, CompileOptions(precision="int8"))


@pytest.mark.slow   # ~70 s: MetaSchedule builds and times every candidate here
def test_metaschedule_database_is_kept_and_reused(tiny_onnx, tmp_path):
    profile = load_profile("x86-host")
    options = CompileOptions(tuning_trials=4, tuning_dir=tmp_path / "tuning")
    first = tvm_backend.compile(tiny_onnx, profile, tmp_path / "a", options)["tuning"]
    assert first["reused"] is False and first["trials"] == 4
    assert (tmp_path / "tuning").is_dir() and len(list((tmp_path / "tuning").iterdir())) == 1
    start = time.time()
    second = tvm_backend.compile(tiny_onnx, profile, tmp_path / "b", options)["tuning"]
    assert second["reused"] is True and second["database"] == first["database"]
    assert time.time() - start < first["seconds"]   # applying a database costs less than tuning
    facts = tvm_backend.compile(tiny_onnx, profile, tmp_path / "b", options)
    _write_compile_json(tmp_path / "b", facts)
    np.testing.assert_allclose(tvm_backend.load(tmp_path / "b", profile)(example_inputs(2))[0],
                               ort_backend.load(tiny_onnx)(example_inputs(2))[0], rtol=1e-4, atol=1e-5)


def test_tuning_a_cross_target_is_refused(tiny_onnx, tmp_path):
    if tvm_backend.unavailable_reason(load_profile("raspberry-pi-4")):
        pytest.skip("aarch64-linux-gnu-gcc absent")
    with pytest.raises(BackendError, match="MetaSchedule measures candidates on the device"):
        tvm_backend.compile(tiny_onnx, load_profile("raspberry-pi-4"), tmp_path, CompileOptions(tuning_trials=4))


@pytest.mark.skipif(shutil.which("cmake") is None or shutil.which("g++") is None, reason="cmake and g++ needed")
def test_cpp_example_builds_against_the_tvm_runtime_and_matches(tiny_onnx, tmp_path):
    from edgesmith.targets.backends import BUNDLE_FILES

    tvm_backend.compile(tiny_onnx, load_profile("x86-host"), tmp_path, CompileOptions())
    for name in tvm_backend.loader_files(load_profile("x86-host")):
        shutil.copy(BUNDLE_FILES / name, tmp_path / name)
    subprocess.run(["cmake", "-S", str(tmp_path), "-B", str(tmp_path / "build"),
                    f"-DPython3_EXECUTABLE={sys.executable}"],
                   check=True, capture_output=True)
    subprocess.run(["cmake", "--build", str(tmp_path / "build")], check=True, capture_output=True)
    x = example_inputs(1)["input"]
    x.tofile(tmp_path / "x.bin")
    out = subprocess.run([str(tmp_path / "build" / "tvm_main"), str(tmp_path / "model.so"), str(tmp_path / "x.bin"),
                          "1", "1", "12", "12"], check=True, capture_output=True, text=True).stdout.split()
    np.testing.assert_allclose(np.array(out, dtype=np.float32), ort_backend.load(tiny_onnx)({"input": x})[0][0],
                               rtol=1e-4, atol=1e-5)
