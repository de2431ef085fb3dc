"""Structured (channel) pruning through Torch-Pruning's dependency graph.

Coupled layers (residual adds, concatenations, depthwise convolutions) are pruned together by the graph;
attention modules lose whole heads. Works on any architecture Torch-Pruning can trace.
"""
from __future__ import annotations

from typing import Annotated, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field

from edgesmith.errors import ModelError, first_line
from edgesmith.pipeline.attention import split_multihead_attention
from edgesmith.pipeline.config import FinetuneConfig, Strict
from edgesmith.pipeline.data import Dataset
from edgesmith.pipeline.evaluate import model_size, top1_applies
from edgesmith.pipeline.model_source import output_tensors
from edgesmith.pipeline.stages import StageContext, StageResult, stage
from edgesmith.pipeline.stages.distill import finetune_objective
from edgesmith.pipeline.stages.layers import HEAD_COUNTS, ignored_modules, module_named
from edgesmith.pipeline.stages.train import fit

_HEAD_PROJECTIONS = (("query", "key", "value"), ("q_proj", "k_proj", "v_proj"))
_TAYLOR_BATCHES = 4


class PruneStage(Strict):
    """Structured pruning: whole channels (and attention heads) leave the model, so it gets faster."""
    kind: Literal["prune"]
    method: Literal["channel"] = "channel"
    ratio: float = Field(gt=0, lt=1)                  # fraction of channels (and heads) removed
    importance: Literal["l1", "l2", "taylor", "bn_scale"] = "l2"
    global_pruning: bool = False                      # rank channels across layers instead of per layer
    layer_ratios: dict[str, Annotated[float, Field(gt=0, lt=1)]] = {}   # module name → its own ratio
    ignored_layers: list[str] | None = None           # None: the classifier (the layer producing the output)
    round_to: int | None = Field(default=None, ge=1)  # None: the targets' channel_multiple
    iterative_steps: int = Field(default=1, ge=1)     # fine-tuning runs after each step
    finetune: FinetuneConfig | None = None


@stage("prune-channel", PruneStage)
def run(cfg: PruneStage, model: nn.Module, data: Dataset, ctx: StageContext) -> StageResult:
    import torch_pruning as tp

    example = tuple(spec.example(2) for spec in ctx.specs)
    params_before, macs_before = model_size(model, ctx.specs)
    split = _split_multihead_attention(model, example)
    heads_before = _head_counts(model)
    attention = {m: _head_size(m) for m in _attention_modules(model)}   # the head size stays; the count shrinks
    num_heads = {proj: _heads(m) for m in attention for proj in _projections(m)}
    shapes_before = _output_shapes(model, example)
    try:
        pruner = tp.pruner.MetaPruner(
            model, example[0] if len(example) == 1 else example, importance=_importance(cfg.importance),
            pruning_ratio=cfg.ratio, pruning_ratio_dict={module_named(model, n, "prune.layer_ratios"): r
                                                         for n, r in cfg.layer_ratios.items()},
            global_pruning=cfg.global_pruning, iterative_steps=cfg.iterative_steps,
            ignored_layers=ignored_modules(model, example, cfg.ignored_layers, "prune.ignored_layers"),
            round_to=cfg.round_to or ctx.channel_multiple,
            num_heads=num_heads, prune_num_heads=bool(num_heads), prune_head_dims=False, head_pruning_ratio=cfg.ratio)
    except (RuntimeError, ValueError, TypeError, KeyError) as exc:
        raise ModelError(f"prune: Torch-Pruning cannot trace the model's graph ({first_line(exc, 200)}); "
                         "add the module it names to prune.ignored_layers") from None
    history = []
    for step in range(cfg.iterative_steps):
        if cfg.importance == "taylor":
            _accumulate_gradients(model, data)
        pruner.step()
        model.zero_grad(set_to_none=True)
        for m, head_size in attention.items():  # head counts are plain Python state the graph does not update
            _set_heads(m, _projections(m)[0].out_features // head_size)
        _check_outputs_kept(model, example, shapes_before)
        if cfg.finetune:
            objective = finetune_objective(ctx, data, cfg.finetune, distill=cfg.finetune.distill,
                                           distillation=cfg.finetune.distillation)
            history += fit(model, data, cfg.finetune, ctx, label=f"prune finetune {step + 1}/{cfg.iterative_steps}",
                           objective=objective)
    params, macs = model_size(model, ctx.specs)
    return StageResult(model.eval(), {
        "params_before": params_before, "macs_before": macs_before, "params_after": params, "macs_after": macs,
        "heads_before": heads_before, "heads_after": _head_counts(model), "multihead_attention_split": split,
        "finetune_history": history})


def _importance(name: str):
    import torch_pruning as tp

    return {"l1": lambda: tp.importance.GroupMagnitudeImportance(p=1),
            "l2": lambda: tp.importance.GroupMagnitudeImportance(p=2),
            "taylor": lambda: tp.importance.GroupTaylorImportance(),
            "bn_scale": lambda: tp.importance.BNScaleImportance()}[name]()


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if _head_count_name(m) and _projections(m)]


def _head_count_name(module: nn.Module) -> str | None:
    return next((n for n in HEAD_COUNTS if isinstance(getattr(module, n, None), int)), None)


def _heads(module: nn.Module) -> int:
    return getattr(module, _head_count_name(module))


def _head_size(module: nn.Module) -> int:
    for name in ("head_dim", "attention_head_size"):
        if isinstance(getattr(module, name, None), int):
            return getattr(module, name)
    return _projections(module)[0].out_features // _heads(module)


def _set_heads(module: nn.Module, heads: int) -> None:
    setattr(module, _head_count_name(module), heads)
    if isinstance(getattr(module, "all_head_size", None), int):   # Hugging Face reshapes the context with it
        module.all_head_size = _projections(module)[0].out_features


def _split_multihead_attention(model: nn.Module, example) -> list[str]:
    """nn.MultiheadAttention packs q/k/v and can only narrow every head; its split form loses whole heads. The
    replacement must compute the same outputs, or it is refused."""
    if not any(isinstance(m, nn.MultiheadAttention) for m in model.modules()):
        return []
    before = [o.clone() for o in output_tensors(_eval_outputs(model, example))]
    split = split_multihead_attention(model)
    after = output_tensors(_eval_outputs(model, example))
    if not all(torch.allclose(a, b, rtol=1e-4, atol=1e-5) for a, b in zip(after, before)):
        raise ModelError(f"prune: splitting nn.MultiheadAttention {split} changed the model's outputs; name them in "
                         "prune.ignored_layers")
    return split


def _eval_outputs(model: nn.Module, example):
    with torch.no_grad():
        return model.eval()(*example)


def _output_shapes(model: nn.Module, example) -> list[tuple[int, ...]]:
    return [tuple(o.shape) for o in output_tensors(_eval_outputs(model, example))]


def _check_outputs_kept(model: nn.Module, example, before: list[tuple[int, ...]]) -> None:
    """Pruning must never change what the model returns: a narrower embedding or fewer classes is another model."""
    after = _output_shapes(model, example)
    if after != before:
        raise ModelError(f"prune: the outputs' shapes changed from {before} to {after}: a layer that shapes an output "
                         "was pruned; name it in prune.ignored_layers")


def _projections(module: nn.Module) -> list[nn.Linear]:
    for names in _HEAD_PROJECTIONS:
        found = [getattr(module, n, None) for n in names]
        if all(isinstance(f, nn.Linear) for f in found):
            return found
    return []


def _head_counts(model: nn.Module) -> dict[str, int]:
    attention = {id(m) for m in _attention_modules(model)}
    return {name: _heads(m) for name, m in model.named_modules() if id(m) in attention}


def _accumulate_gradients(model: nn.Module, data: Dataset) -> None:
    """Taylor importance ranks channels by |weight × gradient|: gradients from a few training batches."""
    model.train()
    model.zero_grad(set_to_none=True)
    generator = torch.Generator().manual_seed(0)
    for i, (xs, y) in enumerate(data.batches(data.train, 64, shuffle=True, generator=generator)):
        if i == _TAYLOR_BATCHES:
            break
        outputs = output_tensors(model(*xs))
        if y is not None and top1_applies(outputs[0], y):
            F.cross_entropy(outputs[0], y).backward()
        else:   # no class labels: how strongly each channel drives the outputs (their energy's gradient)
            sum(o.float().pow(2).mean() for o in outputs).backward()
    model.eval()
