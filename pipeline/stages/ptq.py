"""Post-training quantization: ONNX Runtime's calibrators (min-max, percentile, entropy) on the exported FP32
ONNX, with the quantization settings each scheme's runtime needs. The cheap baseline QAT is compared with."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
from onnx import TensorProto
from pydantic import Field

from edgesmith.errors import ExportError, first_line
from edgesmith.pipeline.config import QuantScheme, Strict
from edgesmith.pipeline.data import Dataset
from edgesmith.pipeline.evaluate import feeds
from edgesmith.pipeline.progress import quiet, warn
from edgesmith.pipeline.stages import QUANTIZED_ONNX, StageContext, StageResult, stage
from edgesmith.pipeline.stages.layers import has_attention
from edgesmith.pipeline.stages.qdq import check_scheme

_CALIBRATION_BATCH = 32


class PTQStage(Strict):
    """Post-training quantization (calibration only): ONNX Runtime's calibrators on the exported FP32 ONNX."""
    kind: Literal["ptq"]
    calibration: Literal["minmax", "percentile", "entropy"] = "minmax"
    percentile: float = Field(default=99.999, gt=90, le=100)
    calibration_samples: int = Field(default=300, ge=1)
    schemes: list[QuantScheme] | None = None
    # ONNX op types to quantize; None: every op ORT can quantize, or MatMul and Gemm only for a transformer (its
    # residual adds, softmax and GELU in INT8 cost more Q/DQ than they save: on B7 1.27× slower than FP32, where
    # MatMul-only runs on par)
    op_types: list[str] | None = None


@stage("ptq", PTQStage, quantizes=True)
def run(cfg: PTQStage, model, data: Dataset, ctx: StageContext) -> StageResult:
    """Calibrates `ctx.fp32_onnx` (the torch `model` is not needed: PTQ works on the exported graph)."""
    scheme, fp32_onnx, out_path = ctx.scheme, ctx.fp32_onnx, ctx.out_dir / QUANTIZED_ONNX
    if data.name == "synthetic":   # random inputs set the ranges: real activations may be clipped
        warn(f"ptq ({scheme}): calibrating on synthetic data; the INT8 model's fidelity on real inputs is unknown. "
             "Give data (image_folder, npz or a data.factory) for a calibration that matches use")
    extra = {"CalibPercentile": cfg.percentile} if cfg.calibration == "percentile" else {}
    excluded = quantize_file(fp32_onnx, out_path, scheme, _Calibration(data, ctx, cfg.calibration_samples),
                             calibration=cfg.calibration, op_types=_op_types(cfg, model), extra_options=extra)
    check_scheme(out_path, scheme)
    return StageResult(None, {"scheme": scheme, "calibration": cfg.calibration, "float_nodes": excluded,
                              "calibration_samples": cfg.calibration_samples})


def quantize_file(fp32_onnx: Path, out_path: Path, scheme: str, calibration_data, *, calibration: str = "minmax",
                  op_types: list[str] | None = None, extra_options: dict | None = None) -> int:
    """ONNX Runtime's static quantization of an FP32 ONNX file into the scheme's Q/DQ form, calibrated on
    `calibration_data` (ORT's CalibrationDataReader: `get_next()` gives input feeds, then None). Returns how many
    nodes stay in float (see constant_operand_nodes)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, quantize_static

    method = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
              "entropy": CalibrationMethod.Entropy}[calibration]
    activation, weight, extra = scheme_settings(scheme)
    with tempfile.TemporaryDirectory() as tmp, quiet("", hide_stderr=True):  # ORT's quantizer logs to the root logger
        prepared = _prepared(fp32_onnx, Path(tmp))
        excluded = constant_operand_nodes(prepared)
        try:
            quantize_static(str(prepared), str(out_path), calibration_data, quant_format=QuantFormat.QDQ,
                            per_channel=True, activation_type=activation, weight_type=weight,
                            calibrate_method=method, extra_options={**extra, **(extra_options or {})},
                            nodes_to_exclude=excluded, op_types_to_quantize=op_types,
                            calibration_cache_path=Path(tmp) / "calibration")
        except (RuntimeError, ValueError, KeyError) as exc:
            raise ExportError(f"ptq: ONNX Runtime cannot quantize the model ({first_line(exc, 200)})") \
                from None
    return len(excluded)


def _op_types(cfg: PTQStage, model) -> list[str] | None:
    if cfg.op_types is not None:
        return cfg.op_types
    return ["MatMul", "Gemm"] if model is not None and has_attention(model) else None


# Ops whose stored float input is a weight with an output-channel axis: quantized per channel as int8
WEIGHT_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")


def constant_operand_nodes(path: Path) -> list[str]:
    """Nodes other than weight ops that take a stored float tensor: an embedding table (Gather), a bias added
    after a MatMul (Add), a scale (Mul). ORT would quantize those constants with the activation type (uint8 on
    x86), which no scheme's runtime takes as weights; they stay in float, and the weight ops around them in INT8."""
    graph = onnx.load(str(path), load_external_data=False).graph
    floats = {t.name for t in graph.initializer if t.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16)}
    floats |= {n.output[0] for n in graph.node if n.op_type == "Constant" and n.attribute
               and n.attribute[0].t.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16) and n.attribute[0].t.dims}
    return [n.name for n in graph.node if n.op_type not in WEIGHT_OPS and any(i in floats for i in n.input)]


def _prepared(fp32_onnx: Path, tmp: Path) -> Path:
    """ORT's pre-processing (shape inference, graph fusions) before calibration. Its symbolic shape inference fails on
    some graphs (a Resize by scale factor, say) and then dumps files into the working directory: it runs inside
    `tmp`, and the graph goes on with ONNX's own shape inference."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared, cwd = tmp / "prepared.onnx", os.getcwd()
    os.chdir(tmp)   # contextlib.chdir needs Python 3.11
    try:
        quant_pre_process(str(fp32_onnx), str(prepared))
    except Exception:   # ORT raises a bare Exception("Incomplete symbolic shape inference")
        quant_pre_process(str(fp32_onnx), str(prepared), skip_symbolic_shape=True)
    finally:
        os.chdir(cwd)
    return prepared


def scheme_settings(scheme: str) -> tuple:
    """(activation type, weight type, extra options) for ORT's quantizer, per DESIGN.md §3: TensorRT takes
    symmetric int8 with zero points 0 and float biases; ORT on x86 its fast U8S8 path; ORT on ARM S8S8."""
    from onnxruntime.quantization import QuantType

    if scheme == "tensorrt":
        return QuantType.QInt8, QuantType.QInt8, {"ActivationSymmetric": True, "WeightSymmetric": True,
                                                  "QuantizeBias": False}
    activation = QuantType.QUInt8 if scheme == "ort-x86" else QuantType.QInt8
    return activation, QuantType.QInt8, {"WeightSymmetric": True}


class _Calibration:
    """ORT's CalibrationDataReader protocol over the first samples of the training split."""

    def __init__(self, data: Dataset, ctx: StageContext, samples: int):
        self._batches = self._feeds(data, ctx, samples)

    @staticmethod
    def _feeds(data: Dataset, ctx: StageContext, samples: int):
        """Batches of one size: ORT's histogram calibrators (percentile, entropy) stack them."""
        batch = min(_CALIBRATION_BATCH, samples, len(data.train))
        for count, (xs, _) in enumerate(data.batches(data.train, batch)):
            if count * batch >= samples or len(xs[0]) < batch:
                return
            yield feeds(xs, ctx.specs)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)
