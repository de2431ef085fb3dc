"""A small real CNN as ONNX (conv → relu → pool → gemm, dynamic batch), built with onnx.helper: backends are tested
on a file like the pipeline's exports without training anything."""
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper


def tiny_cnn(extra_nodes: list | None = None, opset: int = 17,
             extra_initializers: list | None = None) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    weights = {"w": rng.normal(0, 0.3, (8, 1, 3, 3)).astype(np.float32), "b": np.zeros(8, np.float32),
               "fc_w": rng.normal(0, 0.3, (10, 8)).astype(np.float32),
               "fc_b": rng.normal(0, 0.1, 10).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["input", "w", "b"], ["conv"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["conv"], ["relu"], name="relu"),
             helper.make_node("GlobalAveragePool", ["relu"], ["pool"], name="pool"),
             helper.make_node("Flatten", ["pool"], ["flat"], name="flatten"),
             helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], name="fc", transB=1),
             *(extra_nodes or [])]
    graph = helper.make_graph(
        nodes, "tiny_cnn", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, 12, 12])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        [numpy_helper.from_array(v, k) for k, v in weights.items()] + (extra_initializers or []))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8   # readable by every ONNX Runtime this project supports
    onnx.checker.check_model(model)
    return model


@pytest.fixture
def tiny_onnx(tmp_path) -> Path:
    path = tmp_path / "tiny.onnx"
    onnx.save(tiny_cnn(), str(path))
    return path


def example_inputs(batch: int = 4) -> dict[str, np.ndarray]:
    return {"input": np.random.default_rng(1).random((batch, 1, 12, 12), dtype=np.float32)}
