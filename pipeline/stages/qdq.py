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
    stored = _stored(graph)
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


def requantize_concats(path: Path) -> int:
    """NNCF gives a Concat's inputs one shared scale and leaves its output unquantized: in Q/DQ form the next layer
    then takes a float input and runs in float (a U-Net's decoder convolutions). Where every input of a Concat is
    dequantized with the same scale and zero point, its output lies on that grid already: a Q/DQ pair with them
    is exact and lets runtimes fuse the Concat and the layers after it into INT8. Returns how many were added."""
    proto = onnx.load(str(path))
    graph = proto.graph
    stored = {name: numpy_helper.to_array(t) for name, t in _stored(graph).items()}
    producers = {out: n for n in graph.node for out in n.output}
    graph_outputs = {o.name for o in graph.output}
    added = 0
    for node in list(graph.node):
        sources = [producers.get(name) for name in node.input]
        if node.op_type != "Concat" or node.output[0] in graph_outputs or not all(
                s is not None and s.op_type == "DequantizeLinear" for s in sources):
            continue
        grids = {_grid(source, stored) for source in sources}
        if len(grids) != 1 or None in grids:
            continue
        scale, zero_point = sources[0].input[1], sources[0].input[2] if len(sources[0].input) > 2 else ""
        quantized, dequantized = f"{node.output[0]}_requantized", f"{node.output[0]}_dequantized"
        for consumer in graph.node:
            consumer.input[:] = [dequantized if name == node.output[0] else name for name in consumer.input]
        position = list(graph.node).index(node) + 1
        graph.node.insert(position, helper.make_node("QuantizeLinear", [node.output[0], scale, zero_point],
                                                     [quantized], name=f"{node.name}_requantize"))
        graph.node.insert(position + 1, helper.make_node("DequantizeLinear", [quantized, scale, zero_point],
                                                         [dequantized], name=f"{node.name}_dequantize"))
        added += 1
    if added:
        onnx.save(proto, str(path))
    return added


def _grid(dequantize: onnx.NodeProto, stored: dict) -> tuple | None:
    """A per-tensor DequantizeLinear's (scale, zero point) as values, or None (per-channel, or not stored)."""
    names = list(dequantize.input[1:3])
    if not all(name in stored for name in names) or any(stored[name].size != 1 for name in names):
        return None
    return tuple((float(stored[name]), str(stored[name].dtype)) for name in names)


def check_scheme(path: Path, scheme: str) -> None:
    """Raises naming every node that breaks the scheme's rules: such a file must not reach a target."""
    violations = qdq_rules.validate(Path(path), scheme)
    if violations:
        shown = "; ".join(str(v) for v in violations[:5])
        raise ExportError(f"the INT8 ONNX breaks the '{scheme}' Q/DQ rules at {len(violations)} node(s): {shown}")


def _stored(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    """Every tensor the file stores: initializers and Constant nodes' values, by name."""
    stored = {t.name: t for t in graph.initializer}
    stored.update({n.output[0]: n.attribute[0].t for n in graph.node if n.op_type == "Constant" and n.attribute
                   and n.attribute[0].name == "value"})
    return stored


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
