"""What QAT and PTQ outputs share: INT8 weight storage, the scheme check, and the targets' schemes."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from edgesmith.errors import ExportError
from edgesmith.targets import qdq_rules


def store_weights_int8(path: Path) -> int:
    """Replaces each QuantizeLinear of a stored FP32 weight by the int8 tensor it computes, so the file holds
    int8 weights under DequantizeLinear (¼ of the bytes; the form TensorRT and ORT's own quantizer use).
    NNCF's export keeps FP32 weights under a Q/DQ pair. Returns how many weights were converted."""
    proto = onnx.load(str(path))
    graph = proto.graph
    stored = {t.name: t for t in graph.initializer}
    stored.update({n.output[0]: n.attribute[0].t for n in graph.node if n.op_type == "Constant" and n.attribute})
    converted = []
    for node in graph.node:
        if node.op_type == "QuantizeLinear" and all(name in stored for name in node.input if name):
            quantized = _evaluate(node, stored, proto.opset_import)
            graph.initializer.append(numpy_helper.from_array(quantized, node.output[0]))
            converted.append(node)
    for node in converted:
        graph.node.remove(node)
    _drop_unused(graph)
    onnx.save(proto, str(path))
    return len(converted)


def check_scheme(path: Path, scheme: str) -> None:
    """Raises naming every node that breaks the scheme's rules: such a file must not reach a target."""
    violations = qdq_rules.validate(Path(path), scheme)
    if violations:
        shown = "; ".join(str(v) for v in violations[:5])
        raise ExportError(f"the INT8 ONNX breaks the '{scheme}' Q/DQ rules at {len(violations)} node(s): {shown}")


def _evaluate(node: onnx.NodeProto, stored: dict, opsets) -> np.ndarray:
    """Runs one QuantizeLinear on its stored inputs with ONNX's reference implementation."""
    inputs = [stored[name] for name in node.input if name]
    single = helper.make_graph([node], "quantize", [], [helper.make_tensor_value_info(node.output[0], 0, None)],
                               initializer=[_renamed(t, name) for t, name in zip(inputs, node.input)])
    return ReferenceEvaluator(helper.make_model(single, opset_imports=opsets)).run(None, {})[0]


def _renamed(tensor: onnx.TensorProto, name: str) -> onnx.TensorProto:
    copy = onnx.TensorProto()
    copy.CopyFrom(tensor)
    copy.name = name
    return copy


def _drop_unused(graph: onnx.GraphProto) -> None:
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    for tensor in [t for t in graph.initializer if t.name not in used]:
        graph.initializer.remove(tensor)
    for node in [n for n in graph.node if n.op_type == "Constant" and n.output[0] not in used]:
        graph.node.remove(node)
