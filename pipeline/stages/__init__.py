"""Stages: one frozen config + one function each, keyed by the recipe's `kind`.

Contract: `run(cfg, model, data, ctx) -> StageResult`. A stage receives a freshly loaded model (files, not live
objects, cross stage boundaries), returns the model it produced and its metrics; the orchestrator saves,
measures and caches it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch.nn as nn

from models import InputSpec


@dataclass(frozen=True)
class StageContext:
    specs: tuple[InputSpec, ...]
    eval_batch_size: int
    channel_multiple: int = 1                        # the recipe's targets' need (Tensor Cores, SIMD widths)
    load_teacher: Callable[[], nn.Module] | None = None   # the model as it entered the first compression stage
    keep_sparsity: bool = False   # a magnitude-pruned model: later training must not regrow its zeroed weights


@dataclass
class StageResult:
    model: nn.Module
    metrics: dict = field(default_factory=dict)


def stage_functions() -> dict[str, Callable]:
    """Keyed by the recipe's stage tag (`kind`, and `prune-<method>` for the two kinds of pruning)."""
    from pipeline.stages import distill, magnitude, prune, train

    return {"train": train.run, "prune-channel": prune.run, "prune-magnitude": magnitude.run, "distill": distill.run}
