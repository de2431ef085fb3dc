"""Attention modules' heads, as channel pruning sees them: which modules have heads (a head count attribute and
separate q/k/v projections), how many and how wide, and the count to set after pruning narrowed the projections."""
from __future__ import annotations

import torch.nn as nn

from edgesmith.pipeline.stages.layers import HEAD_COUNTS

_PROJECTION_NAMES = (("query", "key", "value"), ("q_proj", "k_proj", "v_proj"))   # Hugging Face, most others


def attention_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if _head_count_name(m) and projections(m)]


def _head_count_name(module: nn.Module) -> str | None:
    return next((n for n in HEAD_COUNTS if isinstance(getattr(module, n, None), int)), None)


def head_count(module: nn.Module) -> int:
    return getattr(module, _head_count_name(module))


def head_size(module: nn.Module) -> int:
    for name in ("head_dim", "attention_head_size"):
        if isinstance(getattr(module, name, None), int):
            return getattr(module, name)
    return projections(module)[0].out_features // head_count(module)


def set_head_count(module: nn.Module, heads: int) -> None:
    setattr(module, _head_count_name(module), heads)
    if isinstance(getattr(module, "all_head_size", None), int):   # Hugging Face reshapes the context with it
        module.all_head_size = projections(module)[0].out_features


def projections(module: nn.Module) -> list[nn.Linear]:
    for names in _PROJECTION_NAMES:
        found = [getattr(module, n, None) for n in names]
        if all(isinstance(f, nn.Linear) for f in found):
            return found
    return []


def head_counts(model: nn.Module) -> dict[str, int]:
    attention = {id(m) for m in attention_modules(model)}
    return {name: head_count(m) for name, m in model.named_modules() if id(m) in attention}
