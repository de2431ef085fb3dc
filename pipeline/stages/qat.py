"""Quantization-aware training with NNCF, once per quantization scheme; the output is a Q/DQ INT8 ONNX.

Order (DESIGN.md §3): fold BatchNorm into the convolutions, insert NNCF's quantizers (calibrated on training
data), fix their signedness for the scheme, train (quantizer scales train too), export as standard
QuantizeLinear/DequantizeLinear pairs with the TorchScript exporter (fake-quant graphs do not export with
dynamo), store the weights as int8, and check the file against the scheme's rules.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
from pydantic import Field
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from edgesmith.errors import ModelError, first_line
from edgesmith.pipeline.config import DistillConfig, ExportConfig, QuantScheme, TrainingConfig
from edgesmith.pipeline.data import Dataset
from edgesmith.pipeline.export import check_parity, export_onnx
from edgesmith.pipeline.model_source import output_tensors
from edgesmith.pipeline.progress import quiet
from edgesmith.pipeline.stages import QUANTIZED_ONNX, StageContext, StageResult, stage
from edgesmith.pipeline.stages.distill import finetune_objective
from edgesmith.pipeline.stages.layers import WEIGHT_LAYERS, has_attention
from edgesmith.pipeline.stages.nncf_extension import ensure_built
from edgesmith.pipeline.stages.qdq import check_scheme, requantize_concats, store_weights_int8
from edgesmith.pipeline.stages.train import fit

QAT_OPSET = 17   # the TorchScript exporter's best-tested opset; per-channel Q/DQ needs ≥ 13


class QATStage(TrainingConfig):
    """NNCF quantization-aware training; one Q/DQ ONNX per quantization scheme the targets need."""
    kind: Literal["qat"]
    epochs: int = Field(default=1, ge=1)
    lr: float = Field(default=1e-4, gt=0)
    augment: bool = False
    schemes: list[QuantScheme] | None = None   # None: the recipe's targets' quant_scheme
    calibration_samples: int = Field(default=300, ge=1)
    distill: bool = False                      # teacher: the model as it entered the first compression stage
    distillation: DistillConfig = DistillConfig()


@stage("qat", QATStage, quantizes=True)
def run(cfg: QATStage, model: nn.Module, data: Dataset, ctx: StageContext) -> StageResult:
    out_path = ctx.out_dir / QUANTIZED_ONNX
    example = tuple(spec.example(2, torch.Generator().manual_seed(0)) for spec in ctx.specs)
    folded = fold_batchnorm(model, example)
    quantized = _insert_quantizers(model, data, cfg, ctx.scheme)
    objective = finetune_objective(ctx, data, cfg, distill=cfg.distill, distillation=cfg.distillation)
    history = fit(quantized, data, cfg, ctx, label=f"qat ({ctx.scheme})", objective=objective)
    _export_as_qdq_pairs(quantized)
    integer = _disable_integer_quantizers(quantized, example)
    export_onnx(quantized.eval(), ctx.specs, ExportConfig(exporter="torchscript", opset=QAT_OPSET,
                                                          slim=ctx.export.slim), out_path)
    int8_weights = store_weights_int8(out_path)
    requantized = requantize_concats(out_path)
    check_scheme(out_path, ctx.scheme)
    parity = check_parity(quantized, out_path, data, ctx.specs, ctx.export.parity, ctx.eval_batch_size, int8=True,
                          top1=ctx.metric.is_top1(output_tensors(quantized(*example))[0], data))
    return StageResult(None, {"scheme": ctx.scheme, "batchnorms_folded": folded,
                              "quantizers": len(_quantizers(quantized)), "int8_weights": int8_weights,
                              "quantizers_off_integer_tensors": integer, "concats_requantized": requantized,
                              "history": history, "parity": parity})


def fold_batchnorm(model: nn.Module, example: tuple[torch.Tensor, ...]) -> int:
    """Folds every BatchNorm fed directly by a convolution or linear layer into that layer (found by running
    the model with hooks, so any architecture works). Each fold is kept only if the outputs stay the same, which
    catches a layer whose output is also used elsewhere. Returns how many were folded."""
    model.eval()
    pairs = _conv_bn_pairs(model, example)
    with torch.no_grad():
        reference = model(*example)
    folded = 0
    for layer_name, bn_name in pairs:
        layer, bn = model.get_submodule(layer_name), model.get_submodule(bn_name)
        fuse = fuse_linear_bn_eval if isinstance(layer, nn.Linear) else fuse_conv_bn_eval
        _replace(model, layer_name, fuse(layer, bn))
        _replace(model, bn_name, nn.Identity())
        with torch.no_grad():
            same = torch.allclose(model(*example), reference, rtol=1e-3, atol=1e-4)
        if same:
            folded += 1
        else:  # undo: the layer's output feeds something besides the BatchNorm
            _replace(model, layer_name, layer)
            _replace(model, bn_name, bn)
    return folded


def _conv_bn_pairs(model: nn.Module, example) -> list[tuple[str, str]]:
    names = {id(m): n for n, m in model.named_modules()}
    produced_by: dict[int, str] = {}
    pairs = []

    def record_output(module, inputs, output):
        produced_by[id(output)] = names[id(module)]

    def match_input(module, inputs, output):
        source = produced_by.get(id(inputs[0]))
        if source is not None:
            pairs.append((source, names[id(module)]))

    norms = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
    hooks = [m.register_forward_hook(record_output) for m in model.modules() if isinstance(m, WEIGHT_LAYERS)]
    hooks += [m.register_forward_hook(match_input) for m in model.modules() if isinstance(m, norms)]
    try:
        with torch.no_grad():
            model(*example)
    finally:
        for h in hooks:
            h.remove()
    return list(dict.fromkeys(pairs))  # a module called twice would repeat its pair


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent_name), leaf, module)


def _insert_quantizers(model: nn.Module, data: Dataset, cfg: QATStage, scheme: str) -> nn.Module:
    """NNCF's min-max calibration on training inputs. The `ort-x86` scheme takes NNCF's MIXED preset
    (asymmetric uint8 activations, symmetric int8 weights); the int8-everywhere schemes take PERFORMANCE
    (symmetric) and have every activation quantizer made signed before training."""
    ensure_built()   # before nncf.quantize: its first use would build the extension under a 60-s limit
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, QuantizationParameters

    samples = [xs for xs, _ in data.batches(data.train, 32)]
    preset = nncf.QuantizationPreset.MIXED if scheme == "ort-x86" else nncf.QuantizationPreset.PERFORMANCE
    # Per-tensor activations: NNCF would quantize depthwise convolutions' inputs per channel, which neither
    # ONNX Runtime's QLinearConv nor TensorRT accepts (ORT then runs those convolutions in float: slower).
    per_tensor = AdvancedQuantizationParameters(activations_quantization_params=QuantizationParameters(
        per_channel=False))
    try:
        with quiet("nncf"):
            quantized = nncf.quantize(model, nncf.Dataset(samples, lambda xs: xs if len(xs) > 1 else xs[0]),
                                      preset=preset, subset_size=max(1, cfg.calibration_samples // 32),
                                      advanced_parameters=per_tensor, ignored_scope=_float_ops(model))
    except (RuntimeError, ValueError, TypeError, nncf.ValidationError) as exc:
        raise ModelError(f"qat: NNCF cannot quantize the model ({first_line(exc, 200)})") from None
    if scheme != "ort-x86":
        for quantizer in _quantizers(quantized):
            if hasattr(quantizer, "signed") and not quantizer.signed:
                quantizer.signed = True
    _disable_mask_quantizers(quantized, samples[0])
    return quantized


_MASK_MAGNITUDE = 1e30   # additive attention masks hold the float minimum (-3.4e38) where a token is masked


def _disable_mask_quantizers(model: nn.Module, example: tuple[torch.Tensor, ...]) -> int:
    """A quantizer on an additive attention mask turns its -3.4e38 entries into NaN, and quantizing a mask means
    nothing: such quantizers are found by running the model once and turned off."""
    def run():
        with torch.no_grad():
            model.eval()(*example)
    return _disable_quantizers_where(model, run, lambda x: bool(x.is_floating_point() and x.numel()
                                                                and x.detach().abs().max() >= _MASK_MAGNITUDE))


def _disable_integer_quantizers(model: nn.Module, example: tuple[torch.Tensor, ...]) -> int:
    """NNCF names its quantizers' places by call order. Tracing for the ONNX export records size arithmetic as int64
    tensor ops that eager runs never made (a transformer's `seq_length + past_length`), so a quantizer can land on
    an int64 tensor, and a QuantizeLinear of int64 is not valid ONNX. Such quantizers are found by tracing the model
    once, as the export will, and turned off."""
    def trace():
        with torch.no_grad(), quiet("torch", "nncf", hide_warnings=True):
            torch.jit.trace(model.eval(), example if len(example) > 1 else example[0], check_trace=False)
    return _disable_quantizers_where(model, trace, lambda x: not torch.is_floating_point(x))


def _disable_quantizers_where(model: nn.Module, run, refuses) -> int:
    """Runs `run` with every quantizer watching its input, and turns off those whose input `refuses`."""
    refused = []
    hooks = [q.register_forward_pre_hook(lambda module, args: refused.append(module) if refuses(args[0]) else None)
             for q in _quantizers(model)]
    try:
        run()
    finally:
        for hook in hooks:
            hook.remove()
    for quantizer in dict.fromkeys(refused):
        quantizer.disable_quantization()
    return len(set(refused))


def _float_ops(model: nn.Module):
    """Ops NNCF must leave in float: a LayerNorm's weight would get an activation quantizer (uint8 for ort-x86, which
    no runtime takes as a weight), and its normalisation is precision-sensitive anyway. NNCF's TRANSFORMER model type
    would skip it too, but quantizes attention's MatMul inputs as signed int8, which the ort-x86 scheme does not
    take."""
    import nncf

    return nncf.IgnoredScope(types=["layer_norm"], validate=False) if has_attention(model) else None


def _quantizers(model: nn.Module) -> list[nn.Module]:
    from nncf.torch.quantization.layers import BaseQuantizer

    return [m for m in model.modules() if isinstance(m, BaseQuantizer)]


def _export_as_qdq_pairs(model: nn.Module) -> None:
    """NNCF exports OpenVINO FakeQuantize by default, which neither ORT nor TensorRT runs."""
    from nncf.torch.quantization.layers import QuantizerExportMode

    for quantizer in _quantizers(model):
        quantizer.set_export_mode(QuantizerExportMode.ONNX_QUANTIZE_DEQUANTIZE_PAIRS)
