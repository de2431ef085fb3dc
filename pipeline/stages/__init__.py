"""Stages: one frozen config + one function each, in one file, registered once with `@stage(tag, Config)`.

Contract: `run(cfg, model, data, ctx) -> StageResult`. A stage receives a freshly loaded model (files, not live
objects, cross stage boundaries) and returns the model it produced with its metrics; the orchestrator saves,
measures and caches it. Quantization stages (`quantizes=True`: qat, ptq) come last and run once per INT8 scheme:
the scheme, the FP32 ONNX and the output folder travel in the context, and they write `ctx.out_dir/model.onnx`
instead of returning a model. The recipe's stage union is built from this registry, so a new stage is one new file
here and nothing else.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Callable

import torch.nn as nn

from edgesmith.models import InputSpec
from edgesmith.pipeline.config import ExportConfig
from edgesmith.pipeline.evaluate import TaskMetric

QUANTIZED_ONNX = "model.onnx"   # what a quantization stage writes into ctx.out_dir


@dataclass(frozen=True)
class StageContext:
    specs: tuple[InputSpec, ...]
    eval_batch_size: int
    channel_multiple: int = 1                        # the recipe's targets' need (Tensor Cores, SIMD widths)
    load_teacher: Callable[[], nn.Module] | None = None   # the model as it entered the first compression stage
    keep_sparsity: bool = False   # a magnitude-pruned model: later training must not regrow its zeroed weights
    metric: TaskMetric = TaskMetric("auto")   # the recipe's task metric (training history, teacher accuracy)
    max_accuracy_drop: float | None = None    # the recipe's budget (prune.latency.minimise)
    latency_probe: Any = None   # measures on a prune budget's device (pipeline/latency_probe.py); None: no budget
    # The folder the stage's files go to (a model stage's search.json; a quantization stage's Q/DQ ONNX).
    # Quantization stages only: the INT8 scheme of this run, the FP32 export it starts from (PTQ calibrates it),
    # and the export settings (parity bounds, onnxslim).
    scheme: str | None = None
    fp32_onnx: Path | None = None
    out_dir: Path | None = None
    export: ExportConfig = ExportConfig()


@dataclass
class StageResult:
    model: nn.Module | None          # None for quantization stages: their output is ctx.out_dir/model.onnx
    metrics: dict = field(default_factory=dict)


@dataclass(frozen=True)
class StageEntry:
    tag: str                  # the recipe's `kind`; prune stages are `prune-<method>`
    config: type              # the stage's frozen pydantic config
    run: Callable[..., StageResult]
    quantizes: bool = False   # last stage, once per INT8 scheme, writes an ONNX file


_REGISTRY: dict[str, StageEntry] = {}


def stage(tag: str, config: type, *, quantizes: bool = False) -> Callable:
    """Registers the decorated function as the stage `tag` with its config class."""
    def register(function: Callable[..., StageResult]) -> Callable[..., StageResult]:
        if tag in _REGISTRY:
            raise ValueError(f"stage '{tag}' is registered twice")
        _REGISTRY[tag] = StageEntry(tag, config, function, quantizes)
        return function
    return register


@cache
def stage_entries() -> dict[str, StageEntry]:
    """Every stage, found by file name in this package (tinygrad's idiom) and keyed by tag."""
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")
    return dict(_REGISTRY)


def stage_tag(value: Any) -> str | None:
    """Stages are told apart by `kind`, and prune stages also by `method` (a dict from YAML, or a config)."""
    get = value.get if isinstance(value, dict) else lambda k, d=None: getattr(value, k, d)
    kind = get("kind")
    return f"prune-{get('method', 'channel')}" if kind == "prune" else kind


def entry_for(config: Any) -> StageEntry:
    return stage_entries()[stage_tag(config)]
