"""Structured (channel) pruning through Torch-Pruning's dependency graph.

Coupled layers (residual adds, concatenations, depthwise convolutions) are pruned together by the graph;
attention modules lose whole heads. Works on any architecture Torch-Pruning can trace.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.data import Dataset
from pipeline.errors import ModelError, RecipeError
from pipeline.evaluate import model_size
from pipeline.recipe import PruneStage
from pipeline.stages import StageContext, StageResult
from pipeline.stages.distill import distillation_objective
from pipeline.stages.train import fit

_HEAD_PROJECTIONS = (("query", "key", "value"), ("q_proj", "k_proj", "v_proj"))
_TAYLOR_BATCHES = 4


def run(cfg: PruneStage, model: nn.Module, data: Dataset, ctx: StageContext) -> StageResult:
    import torch_pruning as tp

    example = tuple(spec.example(2) for spec in ctx.specs)
    params_before, macs_before = model_size(model, ctx.specs)
    heads_before = _head_counts(model)
    attention = _attention_modules(model)
    modules = dict(model.named_modules())
    num_heads = {proj: m.num_heads for m in attention for proj in _projections(m)}
    try:
        pruner = tp.pruner.MetaPruner(
            model, example[0] if len(example) == 1 else example, importance=_importance(cfg.importance),
            pruning_ratio=cfg.ratio, pruning_ratio_dict={_module(modules, n, "layer_ratios"): r
                                                         for n, r in cfg.layer_ratios.items()},
            global_pruning=cfg.global_pruning, iterative_steps=cfg.iterative_steps,
            ignored_layers=_ignored(model, example, cfg, modules), round_to=cfg.round_to or ctx.channel_multiple,
            num_heads=num_heads, prune_num_heads=bool(num_heads), prune_head_dims=False, head_pruning_ratio=cfg.ratio)
    except (RuntimeError, ValueError, TypeError, KeyError) as exc:
        raise ModelError(f"prune: Torch-Pruning cannot trace the model's graph ({str(exc).splitlines()[0][:200]}); "
                         "add the module it names to prune.ignored_layers") from None
    history = []
    for step in range(cfg.iterative_steps):
        if cfg.importance == "taylor":
            _accumulate_gradients(model, data)
        pruner.step()
        model.zero_grad(set_to_none=True)
        for m in attention:  # the head count is plain Python state the graph does not update
            m.num_heads = _projections(m)[0].out_features // m.head_dim
        if cfg.finetune:
            objective = (distillation_objective(ctx.load_teacher(), cfg.finetune.distillation, cfg.finetune)
                         if cfg.finetune.distill else None)
            history += fit(model, data, cfg.finetune, ctx, label=f"prune finetune {step + 1}/{cfg.iterative_steps}",
                           objective=objective)
    params, macs = model_size(model, ctx.specs)
    return StageResult(model.eval(), {
        "params_before": params_before, "macs_before": macs_before, "params_after": params, "macs_after": macs,
        "heads_before": heads_before, "heads_after": _head_counts(model), "finetune_history": history})


def _importance(name: str):
    import torch_pruning as tp

    return {"l1": lambda: tp.importance.GroupMagnitudeImportance(p=1),
            "l2": lambda: tp.importance.GroupMagnitudeImportance(p=2),
            "taylor": lambda: tp.importance.GroupTaylorImportance(),
            "bn_scale": lambda: tp.importance.BNScaleImportance()}[name]()


def _module(modules: dict[str, nn.Module], name: str, field: str) -> nn.Module:
    if name not in modules or name == "":
        close = [n for n in modules if n and n.split(".")[-1] == name.split(".")[-1]][:5]
        raise RecipeError(f"prune.{field}: the model has no module '{name}'"
                          f"{'; similar: ' + ', '.join(close) if close else ''}")
    return modules[name]


def _ignored(model: nn.Module, example, cfg: PruneStage, modules: dict[str, nn.Module]) -> list[nn.Module]:
    if cfg.ignored_layers is not None:
        return [_module(modules, n, "ignored_layers") for n in cfg.ignored_layers]
    return [_output_layer(model, example)]


def _output_layer(model: nn.Module, example) -> nn.Module:
    """The layer whose output is the model's output (the classifier): pruning it would change the classes."""
    produced: dict[int, nn.Module] = {}
    hooks = [m.register_forward_hook(lambda mod, _, out: produced.__setitem__(id(out), mod))
             for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    try:
        with torch.no_grad():
            output = model.eval()(*example)
    finally:
        for h in hooks:
            h.remove()
    if id(output) in produced:
        return produced[id(output)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ModelError("prune: cannot find the classifier layer; name it in prune.ignored_layers")
    return linears[-1]


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(getattr(m, "num_heads", None), int) and _projections(m)]


def _projections(module: nn.Module) -> list[nn.Linear]:
    for names in _HEAD_PROJECTIONS:
        found = [getattr(module, n, None) for n in names]
        if all(isinstance(f, nn.Linear) for f in found):
            if not hasattr(module, "head_dim"):
                module.head_dim = found[0].out_features // module.num_heads
            return found
    return []


def _head_counts(model: nn.Module) -> dict[str, int]:
    attention = {id(m) for m in _attention_modules(model)}
    return {name: m.num_heads for name, m in model.named_modules() if id(m) in attention}


def _accumulate_gradients(model: nn.Module, data: Dataset) -> None:
    """Taylor importance ranks channels by |weight × gradient|: gradients from a few training batches."""
    model.train()
    model.zero_grad(set_to_none=True)
    generator = torch.Generator().manual_seed(0)
    for i, (xs, y) in enumerate(data.batches(data.train, 64, shuffle=True, generator=generator)):
        if i == _TAYLOR_BATCHES:
            break
        F.cross_entropy(model(*xs), y).backward()
    model.eval()
