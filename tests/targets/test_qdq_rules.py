"""The Q/DQ validator against hand-built ONNX files that follow or break each rule."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgesmith.targets.qdq_rules import validate


def qdq_conv(act_zp=np.int8(0), w_zp=np.zeros(4, np.int8), w_axis=0, act_scale=np.float32(0.1), opset=13,
             int32_bias=False) -> onnx.ModelProto:
    """input → Q → DQ → Conv(DQ(weight), [DQ(bias)]) → output, with the given quantization parameters."""
    inits = [numpy_helper.from_array(np.array(act_scale, np.float32), "a_scale"),
             numpy_helper.from_array(np.array(act_zp), "a_zp"),
             numpy_helper.from_array(np.ones((4, 3, 3, 3), np.int8), "w_q"),
             numpy_helper.from_array(np.full(4, 0.05, np.float32), "w_scale"),
             numpy_helper.from_array(np.array(w_zp), "w_zp")]
    nodes = [helper.make_node("QuantizeLinear", ["input", "a_scale", "a_zp"], ["xq"], name="act_q"),
             helper.make_node("DequantizeLinear", ["xq", "a_scale", "a_zp"], ["xd"], name="act_dq"),
             helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zp"], ["w"], name="weight_dq", axis=w_axis)]
    conv_inputs = ["xd", "w"]
    if int32_bias:
        inits += [numpy_helper.from_array(np.zeros(4, np.int32), "b_q"),
                  numpy_helper.from_array(np.full(4, 0.005, np.float32), "b_scale"),
                  numpy_helper.from_array(np.zeros(4, np.int32), "b_zp")]
        nodes.append(helper.make_node("DequantizeLinear", ["b_q", "b_scale", "b_zp"], ["b"], name="bias_dq"))
        conv_inputs.append("b")
    nodes.append(helper.make_node("Conv", conv_inputs, ["output"], name="conv"))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 4, 6, 6])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def rules(model, scheme):
    return [str(v) for v in validate(model, scheme)]


def test_legal_models_pass_their_scheme():
    assert rules(qdq_conv(), "tensorrt") == []
    assert rules(qdq_conv(), "ort-arm") == []
    assert rules(qdq_conv(act_zp=np.uint8(128)), "ort-x86") == []


def test_uint8_activation_named_for_tensorrt_and_arm():
    model = qdq_conv(act_zp=np.uint8(128))
    for scheme in ("tensorrt", "ort-arm"):
        found = rules(model, scheme)
        assert "act_q: activation zero point is uint8, scheme %s needs int8" % scheme in found


def test_int8_activation_named_for_ort_x86():
    assert "act_dq: activation zero point is int8, scheme ort-x86 needs uint8" in rules(qdq_conv(), "ort-x86")


def test_tensorrt_needs_zero_zero_points():
    found = rules(qdq_conv(act_zp=np.int8(3)), "tensorrt")
    assert any(f.startswith("act_q: non-zero zero point") for f in found)


def qdq_matmul(w_axis: int, op: str = "MatMul", trans_b: int = 0) -> onnx.ModelProto:
    """input (2, 8) → MatMul/Gemm with an int8 weight per channel on `w_axis`: (8, 4), or (4, 8) for transB."""
    shape = (4, 8) if trans_b else (8, 4)
    inits = [numpy_helper.from_array(np.ones(shape, np.int8), "w_q"),
             numpy_helper.from_array(np.full(shape[w_axis], 0.05, np.float32), "w_scale"),
             numpy_helper.from_array(np.zeros(shape[w_axis], np.int8), "w_zp")]
    nodes = [helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zp"], ["w"], name="weight_dq", axis=w_axis),
             helper.make_node(op, ["input", "w"], ["output"], name="mm",
                              **({"transB": trans_b} if op == "Gemm" else {}))]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [2, 8])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, [2, 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_tensorrt_weight_axis_and_per_channel_activations():
    assert "weight_dq: weight quantized per-channel on axis 1; TensorRT needs the output-channel axis of its Conv, " \
           "0" in rules(qdq_conv(w_axis=1), "tensorrt")
    per_channel_act = qdq_conv(act_scale=np.full(3, 0.1, np.float32), act_zp=np.zeros(3, np.int8))
    assert any("activation quantized per-channel" in f for f in rules(per_channel_act, "tensorrt"))


@pytest.mark.parametrize("op, trans_b, legal, illegal", [("MatMul", 0, 1, 0), ("Gemm", 0, 1, 0), ("Gemm", 1, 0, 1)])
def test_matmul_and_gemm_weights_are_per_output_channel(op, trans_b, legal, illegal):
    """NVIDIA's rule follows the output channels: a MatMul weight (K, N) on its last axis (what ONNX Runtime's
    quantizer writes for transformers), a Gemm weight on 0 only when it is transposed."""
    assert rules(qdq_matmul(legal, op, trans_b), "tensorrt") == []
    assert any(f"needs the output-channel axis of its {op}, {legal}" in f
               for f in rules(qdq_matmul(illegal, op, trans_b), "tensorrt"))


def test_uint8_weights_are_named():
    found = rules(qdq_conv(w_zp=np.zeros(4, np.uint8)), "ort-x86")
    assert "weight_dq: weight zero point is uint8, scheme ort-x86 needs int8" in found


def test_int32_bias_rejected_for_tensorrt_only():
    model = qdq_conv(int32_bias=True)
    assert "bias_dq: int32 bias DequantizeLinear: TensorRT needs biases in float" in rules(model, "tensorrt")
    assert rules(model, "ort-arm") == []


def test_old_opset_and_float_models():
    assert any(f.startswith("model: opset 12 < 13") for f in rules(qdq_conv(opset=12), "ort-arm"))
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    assert "model: no QuantizeLinear/DequantizeLinear nodes" in rules(helper.make_model(graph), "tensorrt")[0]


def test_unknown_scheme():
    with pytest.raises(ValueError, match="valid: tensorrt, ort-x86, ort-arm"):
        validate(qdq_conv(), "tflite")


def test_real_ort_static_quantization_output(tmp_path):
    """ONNX Runtime's own quantize_static: U8S8 is ort-x86-legal; its defaults (asymmetric int8, int32 biases in
    ORT 1.31) are not TensorRT-legal."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from edgesmith import models
    from edgesmith.pipeline.config import ExportConfig
    from edgesmith.pipeline.export import export_onnx

    model = models.create("mnist_cnn", width=8).eval()
    specs = models.input_spec_of(model)
    export_onnx(model, specs, ExportConfig(), tmp_path / "fp32.onnx")

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"input": specs[0].example(1).numpy()} for _ in range(4)])

        def get_next(self):
            return next(self.batches, None)

    quantize_static(str(tmp_path / "fp32.onnx"), str(tmp_path / "u8s8.onnx"), Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    assert rules(tmp_path / "u8s8.onnx", "ort-x86") == []
    assert any("activation zero point is uint8" in f for f in rules(tmp_path / "u8s8.onnx", "tensorrt"))
    quantize_static(str(tmp_path / "fp32.onnx"), str(tmp_path / "default.onnx"), Reader(), quant_format=QuantFormat.QDQ)
    trt = rules(tmp_path / "default.onnx", "tensorrt")
    assert any("int32 bias" in f for f in trt) and any("non-zero zero point" in f for f in trt)
