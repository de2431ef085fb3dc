import importlib.util
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from edgesmith.targets import load_profile
from edgesmith.targets.backends import BackendError, CompileOptions
from edgesmith.targets.backends import onnxruntime as ort_backend
from edgesmith.targets.backends import tensorrt as trt_backend
from tests.targets.conftest import example_inputs, tiny_cnn

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None


def test_op_coverage_names_unsupported_nodes_per_tensorrt_version():
    model = tiny_cnn([helper.make_node("NonZero", ["logits"], ["nz"], name="find_nonzero")])
    orin, xavier = load_profile("jetson-orin-nano"), load_profile("jetson-xavier-nx")
    assert trt_backend.coverage(model, orin, "fp16") == []      # TensorRT 10 imports NonZero
    problems = trt_backend.coverage(model, xavier, "fp16")      # TensorRT 8 does not
    assert problems == ["op NonZero unsupported by TensorRT 8 (nodes find_nonzero)"]


def test_opset_beyond_the_devices_parser_is_reported():
    problems = trt_backend.coverage(tiny_cnn(opset=17), load_profile("jetson-nano"), "fp16")
    assert problems == ["opset 17 > 13, the newest TensorRT 8 on this device imports (export with exporter "
                        "torchscript and opset 13)"]


def test_int8_needs_tensorrt_qdq_rules_and_an_int8_capable_gpu():
    quantize = [helper.make_node("QuantizeLinear", ["logits", "s", "zp"], ["q"], name="q_logits"),
                helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["dq"], name="dq_logits")]
    model = tiny_cnn(quantize, extra_initializers=[helper.make_tensor("s", TensorProto.FLOAT, [], [0.1]),
                                                   helper.make_tensor("zp", TensorProto.UINT8, [], [128])])  # x86
    problems = trt_backend.coverage(model, load_profile("jetson-orin-nano"), "int8")
    assert any("q_logits: activation zero point is uint8, scheme tensorrt needs int8" in p for p in problems)
    assert any("non-zero zero point" in p for p in problems)
    nano = trt_backend.coverage(tiny_cnn(opset=13), load_profile("jetson-nano"), "int8")
    assert any("sm_53 has no INT8 kernels" in p for p in nano)


def test_without_tensorrt_compile_prepares_the_build_on_the_device(tiny_onnx, tmp_path):
    facts = trt_backend.compile(tiny_onnx, load_profile("jetson-agx-orin"), tmp_path, CompileOptions(precision="fp16"))
    if not HAS_TENSORRT:
        assert facts["status"] == "build on device" and not (tmp_path / "model.engine").exists()
    assert (tmp_path / "model.onnx").read_bytes() == tiny_onnx.read_bytes()   # TensorRT 10: FP16 is a builder flag
    assert (tmp_path / "build_tensorrt_engine.py").is_file()
    line = facts["trtexec"]
    for flag in ("--fp16", "--useDLACore=0", "--allowGPUFallback", "--memPoolSize=workspace:4096M",
                 "--minShapes=input:1x1x12x12", "--optShapes=input:1x1x12x12", "--maxShapes=input:8x1x12x12",
                 "--timingCacheFile=timing-jetson-agx-orin-trt10.cache"):
        assert flag in line, flag
    assert "--int8" not in line and line in (tmp_path / "trtexec.sh").read_text()
    assert facts["tensorrt_build"]["dla_core"] == 0 and facts["tensorrt_build"]["max_batch"] == 8


def test_trtexec_flags_follow_the_tensorrt_version(tiny_onnx, tmp_path):
    nano = trt_backend.trtexec_command(onnx.load(str(tiny_onnx)), load_profile("jetson-nano"),
                                       trt_backend.build_settings(load_profile("jetson-nano"), "fp16"))
    assert "--workspace=512" in nano and "--memPoolSize" not in nano   # TensorRT 8.2
    xavier = trt_backend.build_settings(load_profile("jetson-xavier-nx"), "int8")
    assert "--int8" in trt_backend.trtexec_command(onnx.load(str(tiny_onnx)), load_profile("jetson-xavier-nx"), xavier)


def test_tensorrt_11_fp16_ships_an_fp16_onnx_that_still_computes_the_same(tiny_onnx, tmp_path):
    """Strongly typed: no FP16 flag exists, so the FP16 network is an FP16 ONNX (float32 inputs/outputs kept)."""
    facts = trt_backend.compile(tiny_onnx, load_profile("rtx-4090"), tmp_path, CompileOptions(precision="fp16"))
    assert "--stronglyTyped" in facts["trtexec"] and "--fp16" not in facts["trtexec"]
    model = onnx.load(str(tmp_path / "model.onnx"))
    assert {i.data_type for i in model.graph.initializer} == {TensorProto.FLOAT16}
    assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    feeds = example_inputs(8)
    fp16 = ort_backend.load(tmp_path / "model.onnx")(feeds)[0]
    fp32 = ort_backend.load(tiny_onnx)(feeds)[0]
    assert np.max(np.abs(fp16 - fp32)) / np.max(np.abs(fp32)) < 1e-2


def test_a_model_tensorrt_cannot_build_is_refused_with_the_reasons(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(tiny_cnn(opset=17), str(path))
    with pytest.raises(BackendError, match="TensorRT 8 cannot build this model for 'jetson-nano': opset 17 > 13"):
        trt_backend.compile(path, load_profile("jetson-nano"), tmp_path / "out", CompileOptions(precision="fp16"))
    with pytest.raises(BackendError, match=r"allows TensorRT precisions \['int8', 'fp16'\], not 'fp32'"):
        trt_backend.compile(path, load_profile("jetson-orin-nano"), tmp_path / "o", CompileOptions(precision="fp32"))


@pytest.mark.skipif(HAS_TENSORRT, reason="checks the message shown where tensorrt is absent")
def test_builder_script_without_tensorrt_exits_non_zero_with_the_reason(tiny_onnx, tmp_path):
    trt_backend.compile(tiny_onnx, load_profile("jetson-orin-nano"), tmp_path, CompileOptions(precision="fp16"))
    proc = subprocess.run([sys.executable, str(tmp_path / "build_tensorrt_engine.py"), "--onnx", str(tiny_onnx)],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "tensorrt Python package is not installed" in proc.stderr
    assert "--dla-core" in subprocess.run([sys.executable, str(tmp_path / "build_tensorrt_engine.py"), "--help"],
                                          capture_output=True, text=True, check=True).stdout


@pytest.mark.skipif(not HAS_TENSORRT, reason="tensorrt is not installed (CPU build host): engines build on the device")
def test_engine_builds_and_matches_onnxruntime_on_a_gpu(tiny_onnx, tmp_path):
    import torch

    sm = torch.cuda.get_device_capability()
    base = load_profile("rtx-3060")
    profile = base.model_copy(update={"gpu_sm": sm[0] * 10 + sm[1]})
    facts = trt_backend.compile(tiny_onnx, profile, tmp_path, CompileOptions(precision="fp16"))
    assert facts["status"] == "built" and (tmp_path / "model.engine").is_file()
    feeds = example_inputs(4)
    actual = trt_backend.load(tmp_path, profile)(feeds)[0]
    np.testing.assert_allclose(actual, ort_backend.load(tiny_onnx)(feeds)[0], rtol=2e-2, atol=2e-2)
