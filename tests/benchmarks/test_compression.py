import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgesmith.benchmarks.compression import BENCHMARKS, Target, side_by_side, table


def matmul_model(path, width: int) -> None:
    """x (batch, width) @ W: a heavier width is measurably slower."""
    weight = numpy_helper.from_array(np.ones((width, width), np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "mm",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])], [weight])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))


def test_side_by_side_times_every_model_and_ratios_follow(tmp_path, capsys):
    matmul_model(tmp_path / "big.onnx", 512)
    matmul_model(tmp_path / "small.onnx", 16)
    p50 = side_by_side({"big": tmp_path / "big.onnx", "small": tmp_path / "small.onnx"}, batch=8, runs=50)
    assert p50["big"] > p50["small"] > 0
    one_thread = side_by_side({"big": tmp_path / "big.onnx", "small": tmp_path / "small.onnx"}, batch=8, runs=50,
                              threads=1, rounds=2)
    assert one_thread["big"] > one_thread["small"] > 0
    result = table("T", "big", {"big": (tmp_path / "big.onnx", 90.0), "small": (tmp_path / "small.onnx", 89.0)},
                   Target(min_speedup=1.0, max_drop=0.5), runs=40)
    big, small = result["rows"]
    assert big["speedup_b1"] == 1.0 and small["speedup_b32"] > 1.0
    assert small["drop"] == pytest.approx(1.0) and result["pass"] == {"speedup": small["speedup_b1"] >= 1.0,
                                                                      "accuracy": False}
    assert "MISS" in capsys.readouterr().out


def test_every_issue_benchmark_is_registered():
    assert list(BENCHMARKS) == ["b1", "b2", "b3", "b4", "b5"]
