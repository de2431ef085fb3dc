"""Q/DQ validator: checks an INT8 ONNX file against a quantization scheme's rules and names each offending node.

Schemes (DESIGN.md §3):
  tensorrt  signed int8 activations and weights, every zero point 0, weights per-channel on their output-channel
            axis (Conv 0, ConvTranspose 1, MatMul's (K, N) weight its last, Gemm 0 with transB else 1),
            activations per-tensor, biases left in float (no int32 DequantizeLinear);
  ort-x86   uint8 activations, int8 weights (ONNX Runtime's fast U8S8 path on x86);
  ort-arm   int8 activations and weights.
All schemes need opset ≥ 13 (per-channel Q/DQ).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

SCHEMES = ("tensorrt", "ort-x86", "ort-arm")
_QDQ = ("QuantizeLinear", "DequantizeLinear")
_ACTIVATION_TYPE = {"tensorrt": TensorProto.INT8, "ort-x86": TensorProto.UINT8, "ort-arm": TensorProto.INT8}
_TYPE_NAME = {TensorProto.INT8: "int8", TensorProto.UINT8: "uint8", TensorProto.INT32: "int32"}


@dataclass(frozen=True)
class Violation:
    node: str
    rule: str

    def __str__(self) -> str:
        return f"{self.node}: {self.rule}"


def default_opset(model: onnx.ModelProto) -> int:
    """The version of the default ONNX domain the model imports (0 if none)."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def validate(model: onnx.ModelProto | Path, scheme: str) -> list[Violation]:
    """Every rule the model breaks for `scheme`; an empty list means it passes."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization scheme '{scheme}'; valid: {', '.join(SCHEMES)}")
    proto = onnx.load(str(model)) if isinstance(model, (str, Path)) else model
    graph = proto.graph
    inits = {i.name: i for i in graph.initializer}
    constants = {n.output[0]: n.attribute[0].t for n in graph.node if n.op_type == "Constant" and n.attribute}
    tensors = {**constants, **inits}
    producers = {out: n for n in graph.node for out in n.output}
    consumers = {}
    for n in graph.node:
        for name in n.input:
            consumers.setdefault(name, []).append(n)
    violations = []
    opset = default_opset(proto)
    if opset < 13:
        violations.append(Violation("model", f"opset {opset} < 13: per-channel Q/DQ needs opset ≥ 13"))
    qdq_nodes = [n for n in graph.node if n.op_type in _QDQ]
    if not qdq_nodes:
        violations.append(Violation("model", "no QuantizeLinear/DequantizeLinear nodes: not a Q/DQ INT8 model"))
    for index, node in enumerate(qdq_nodes):
        name = node.name or f"{node.op_type}#{index}"
        zero_point = tensors.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        zp_type = zero_point.data_type if zero_point is not None else TensorProto.UINT8  # ONNX default: uint8
        scale = tensors.get(node.input[1])
        is_weight = _is_weight(node, tensors, producers)
        if zp_type == TensorProto.INT32:  # a quantized bias
            if scheme == "tensorrt":
                violations.append(Violation(name, "int32 bias DequantizeLinear: TensorRT needs biases in float"))
            continue
        expected = TensorProto.INT8 if is_weight else _ACTIVATION_TYPE[scheme]
        role = "weight" if is_weight else "activation"
        if zp_type != expected:
            violations.append(Violation(name, f"{role} zero point is {_TYPE_NAME.get(zp_type, zp_type)}, "
                                              f"scheme {scheme} needs {_TYPE_NAME[expected]}"))
        if scheme == "tensorrt":
            violations += _tensorrt_rules(name, node, zero_point, scale, is_weight, tensors, consumers)
    return violations


def _tensorrt_rules(name, node, zero_point, scale, is_weight, tensors, consumers) -> list[Violation]:
    found = []
    if zero_point is not None and np.any(numpy_helper.to_array(zero_point) != 0):
        found.append(Violation(name, "non-zero zero point: TensorRT supports symmetric quantization only"))
    per_channel = scale is not None and numpy_helper.to_array(scale).size > 1
    axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
    if is_weight and per_channel and node.op_type == "DequantizeLinear":
        for consumer in consumers.get(node.output[0], []):
            expected = output_channel_axis(consumer, _rank(node, tensors))
            if expected is not None and axis % max(_rank(node, tensors), 1) != expected:
                found.append(Violation(name, f"weight quantized per-channel on axis {axis}; TensorRT needs the "
                                             f"output-channel axis of its {consumer.op_type}, {expected}"))
    if not is_weight and per_channel:
        found.append(Violation(name, "activation quantized per-channel; TensorRT needs per-tensor activations"))
    return found


def output_channel_axis(consumer: onnx.NodeProto, rank: int) -> int | None:
    """The axis of a weight that indexes its op's output channels, per NVIDIA's rule for per-channel Q/DQ weights
    (the scale must follow the output channels): Conv (K, C, ...) 0, ConvTranspose (C, K, ...) 1, MatMul's (…, K, N)
    second input its last axis, Gemm's B 0 when transB=1 else 1. None: an op with no such rule here."""
    if consumer.op_type == "Conv":
        return 0
    if consumer.op_type == "ConvTranspose":
        return 1
    if consumer.op_type == "MatMul":
        return rank - 1
    if consumer.op_type == "Gemm":
        return 0 if next((a.i for a in consumer.attribute if a.name == "transB"), 0) else 1
    return None


def _rank(node: onnx.NodeProto, tensors: dict) -> int:
    """Rank of the stored weight under a DequantizeLinear (its int8 tensor, or the float one a Q quantizes)."""
    source = tensors.get(node.input[0])
    return len(source.dims) if source is not None else 2


def _is_weight(node, tensors, producers) -> bool:
    """A Q/DQ whose data input is a stored tensor (or a Q of one) quantizes a weight."""
    source = node.input[0]
    if source in tensors:
        return True
    parent = producers.get(source)
    return bool(parent is not None and parent.op_type == "QuantizeLinear" and parent.input[0] in tensors)
