"""Unstructured pruning: gradual magnitude pruning on Zhu & Gupta's cubic schedule (arXiv:1710.01878).

Single weights are zeroed through `torch.nn.utils.prune` masks, which hold during fine-tuning and are made
permanent at the end. The model keeps its shape, so dense runtimes (ONNX Runtime, TVM, TensorRT) run it no
faster: the gain is compressibility (zipped size), and it is reported as that only.
"""
from __future__ import annotations

import math
from typing import Literal

import torch.nn as nn
from pydantic import Field, model_validator
from torch.nn.utils import prune as torch_prune

from edgesmith.errors import ModelError
from edgesmith.pipeline.config import FinetuneConfig, Strict
from edgesmith.pipeline.data import Dataset
from edgesmith.pipeline.evaluate import model_sparsity
from edgesmith.pipeline.stages import StageContext, StageResult, stage
from edgesmith.pipeline.stages.distill import finetune_objective
from edgesmith.pipeline.stages.layers import WEIGHT_LAYERS, ignored_modules
from edgesmith.pipeline.stages.train import fit


class MagnitudePruneStage(Strict):
    """Unstructured pruning: single weights are zeroed on Zhu & Gupta's cubic schedule while fine-tuning.
    The model keeps its shape: smaller when compressed, never faster on dense runtimes."""
    kind: Literal["prune"]
    method: Literal["magnitude"]
    final_sparsity: float = Field(gt=0, lt=1)
    initial_sparsity: float = Field(default=0.0, ge=0, lt=1)
    start_epoch: int = Field(default=0, ge=0)
    end_epoch: int | None = Field(default=None, ge=0)   # ramp ends with this epoch; None: the one before the last
    update_every: int = Field(default=10, ge=1)          # optimizer steps between sparsity updates
    ignored_layers: list[str] | None = None              # None: the classifier
    finetune: FinetuneConfig | None = None               # None: one-shot pruning to final_sparsity

    @model_validator(mode="after")
    def _schedule(self):
        if self.initial_sparsity > self.final_sparsity:
            raise ValueError(f"initial_sparsity {self.initial_sparsity} exceeds final_sparsity {self.final_sparsity}")
        epochs = self.finetune.epochs if self.finetune else 1
        if not self.start_epoch <= self.ramp_end_epoch < epochs:
            raise ValueError(f"the schedule needs start_epoch ≤ end_epoch < finetune.epochs ({epochs}); "
                             f"got start_epoch {self.start_epoch}, end_epoch {self.ramp_end_epoch}")
        return self

    @property
    def ramp_end_epoch(self) -> int:
        """By default the last epoch fine-tunes at the final sparsity (recovery), when there is more than one."""
        epochs = self.finetune.epochs if self.finetune else 1
        return self.end_epoch if self.end_epoch is not None else max(self.start_epoch, epochs - 2)


@stage("prune-magnitude", MagnitudePruneStage)
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
        objective = finetune_objective(ctx, data, cfg.finetune, distill=cfg.finetune.distill,
                                       distillation=cfg.finetune.distillation)
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
