"""`edgesmith bench`: the latency of an ONNX file the project did not make, with the pipeline's statistics."""
import json
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgesmith.pipeline.deploy import describe
from edgesmith.targets.backends import BUNDLE_FILES
from edgesmith.targets.bundle_files.edgesmith_runtime import device_facts
from tests.conftest import edgesmith, free_port, rpc_device
from tests.pipeline.test_device_measurement import LAB_PROFILE


def _foreign_model(path, width: int = 64) -> None:
    """Written with onnx.helper (no torch, no edgesmith): a token-id input and a float input, symbolic batch."""
    table = numpy_helper.from_array(np.random.default_rng(0).standard_normal((100, width)).astype(np.float32), "t")
    weight = numpy_helper.from_array(np.ones((width, 8), np.float32), "w")
    nodes = [helper.make_node("Gather", ["t", "ids"], ["e"]), helper.make_node("ReduceMean", ["e", "axes"], ["m"],
                                                                                keepdims=0),
             helper.make_node("Add", ["m", "x"], ["s"]), helper.make_node("MatMul", ["s", "w"], ["y"])]
    axes = numpy_helper.from_array(np.array([1], np.int64), "axes")
    graph = helper.make_graph(nodes, "foreign", [
        helper.make_tensor_value_info("ids", TensorProto.INT64, ["n", 16]),
        helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8])], [table, weight, axes])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8), str(path))


def test_bench_times_any_onnx_file_with_every_host_backend(tmp_path):
    _foreign_model(tmp_path / "foreign.onnx")
    proc = edgesmith("bench", str(tmp_path / "foreign.onnx"), "--batch", "4", "--runs", "30", "--json", check=True)
    rows = json.loads(proc.stdout)
    assert [r["backend"] for r in rows] == ["onnxruntime", "tvm"]
    for row in rows:
        assert row["status"] == "ok", row
        assert row["inputs"] == {"ids": [4, 16], "x": [4, 64]} and row["precision"] == "fp32"
        stats = row["latency_ms"]
        assert 0 < stats["p50"] <= stats["p90"] <= stats["p99"] and stats["runs"] == 30 and stats["batch_size"] == 4
    table = edgesmith("bench", str(tmp_path / "foreign.onnx"), "--runs", "10", check=True).stdout
    assert "p50 ms" in table and "onnxruntime" in table and "tvm" in table


def test_bench_on_a_device_profile_or_a_missing_file_is_one_line(tmp_path):
    _foreign_model(tmp_path / "foreign.onnx")
    board = edgesmith("bench", str(tmp_path / "foreign.onnx"), "--target", "raspberry-pi-4")
    assert board.returncode == 2 and "is a device, not this host: give --rpc-tracker" in board.stderr
    missing = edgesmith("bench", str(tmp_path / "nope.onnx"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr and "Traceback" not in missing.stderr
    (tmp_path / "garbage.onnx").write_bytes(b"not a model")
    garbage = edgesmith("bench", str(tmp_path / "garbage.onnx"))
    assert garbage.returncode == 2 and "cannot be loaded by ONNX Runtime" in garbage.stderr
    assert len(garbage.stderr.strip().splitlines()) == 1


def test_bench_times_a_foreign_onnx_on_a_board_through_the_rpc_tracker(tmp_path):
    """The "board" is this machine's bundle server under a lab profile, reached through a real TVM RPC tracker: each
    backend's build goes there as a bundle, is checked against ONNX Runtime on this host, and is timed there."""
    _foreign_model(tmp_path / "foreign.onnx")
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    (profiles / "lab-board.yaml").write_text(LAB_PROFILE.format(key="bench-board"))

    def server(tracker):
        return [sys.executable, str(BUNDLE_FILES / "edgesmith_runtime.py"), "--rpc-server", f"--tracker={tracker}",
                "--key=bench-board", "--host=127.0.0.1", f"--port={free_port()}"]

    with rpc_device("bench-board", server) as tracker:
        proc = edgesmith("--profiles-dir", str(profiles), "bench", str(tmp_path / "foreign.onnx"), "--target",
                         "lab-board", "--rpc-tracker", tracker, "--runs", "20", "--json", check=True)
    rows = json.loads(proc.stdout)
    assert [r["backend"] for r in rows] == ["onnxruntime", "tvm"]
    for row in rows:
        assert row["status"] == "ok" and row["parity"]["passed"], row
        assert row["latency_ms"]["runs"] == 20 and row["latency_ms"]["p50"] > 0
        assert row["measured_on"] == describe(device_facts())   # the device's own facts, sent back over RPC
    refused = edgesmith("--profiles-dir", str(profiles), "bench", str(tmp_path / "foreign.onnx"), "--target",
                        "lab-board")
    assert refused.returncode == 2 and "give --rpc-tracker HOST:PORT" in refused.stderr
