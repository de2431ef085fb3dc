"""Unstructured pruning: gradual magnitude pruning on Zhu & Gupta's cubic schedule (arXiv:1710.01878).

Single weights are zeroed through `torch.nn.utils.prune` masks, which hold during fine-tuning and are made
permanent at the end. The model keeps its shape, so dense runtimes (ONNX Runtime, TVM, TensorRT) run it no
faster: the gain is compressibility (zipped size), and it is reported as that only.
"""
from __future__ import annotations

import math

import torch.nn as nn
from torch.nn.utils import prune as torch_prune

from pipeline.data import Dataset
from pipeline.errors import ModelError
from pipeline.evaluate import model_sparsity
from pipeline.recipe import MagnitudePruneStage
from pipeline.stages import StageContext, StageResult
from pipeline.stages.distill import distillation_objective
from pipeline.stages.layers import WEIGHT_LAYERS, ignored_modules
from pipeline.stages.train import fit

def run(cfg: MagnitudePruneStage, model: nn.Module, data: Dataset, ctx: StageContext) -> StageResult:
    example = tuple(spec.example(2) for spec in ctx.specs)
    ignored = {id(m) for m in ignored_modules(model, example, cfg.ignored_layers, "prune.ignored_layers")}
    weights = [(m, "weight") for m in model.modules() if isinstance(m, WEIGHT_LAYERS) and id(m) not in ignored]
    if not weights:
        raise ModelError("prune (magnitude): the model has no convolution or linear weights outside ignored_layers")
    masks = _GlobalMasks(weights)
    history = []
    if cfg.finetune:
        steps_per_epoch = math.ceil(len(data.train) / cfg.finetune.batch_size)
        schedule = cubic_schedule(cfg, steps_per_epoch)
        objective = (distillation_objective(ctx.load_teacher(), cfg.finetune.distillation, cfg.finetune)
                     if cfg.finetune.distill else None)
        history = fit(model, data, cfg.finetune, ctx, label="prune (magnitude) finetune", objective=objective,
                      before_step=lambda step, _: masks.raise_to(schedule(step)))
    masks.raise_to(cfg.final_sparsity)  # one-shot pruning, or the schedule's last value if it ended early
    masks.make_permanent()
    return StageResult(model.eval(), {"target_sparsity": cfg.final_sparsity, "sparsity": weight_sparsity(weights),
                                      "model_sparsity": model_sparsity(model), "pruned_tensors": len(weights),
                                      "finetune_history": history})


def cubic_schedule(cfg: MagnitudePruneStage, steps_per_epoch: int):
    """s(t) = s_f + (s_i − s_f)·(1 − (t − t0)/(t1 − t0))³ between the start and end epochs, updated every
    `update_every` steps; s_i before the ramp, s_f after it."""
    start = cfg.start_epoch * steps_per_epoch
    end = (cfg.ramp_end_epoch + 1) * steps_per_epoch
    s_i, s_f = cfg.initial_sparsity, cfg.final_sparsity

    def sparsity(step: int) -> float:
        if step < start:
            return s_i
        if step >= end:
            return s_f
        held = start + (step - start) // cfg.update_every * cfg.update_every  # the value holds between updates
        progress = (held - start) / (end - start)
        return s_f + (s_i - s_f) * (1 - progress) ** 3

    return sparsity


class _GlobalMasks:
    """Masks ranked across all pruned layers at once (global magnitude), only ever growing."""

    def __init__(self, weights: list[tuple[nn.Module, str]]):
        self.weights = weights
        self.sparsity = 0.0

    def raise_to(self, target: float) -> None:
        if target <= self.sparsity:
            return
        # torch's pruning container prunes `amount` of the weights still alive: convert from the overall target.
        amount = (target - self.sparsity) / (1 - self.sparsity)
        torch_prune.global_unstructured(self.weights, pruning_method=torch_prune.L1Unstructured, amount=amount)
        self.sparsity = target

    def make_permanent(self) -> None:
        for module, name in self.weights:
            if torch_prune.is_pruned(module):
                torch_prune.remove(module, name)


def weight_sparsity(weights: list[tuple[nn.Module, str]]) -> float:
    tensors = [getattr(m, n) for m, n in weights]
    return sum(int((t == 0).sum()) for t in tensors) / sum(t.numel() for t in tensors)
