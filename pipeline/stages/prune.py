"""Structured (channel) pruning through Torch-Pruning's dependency graph.

Coupled layers (residual adds, concatenations, depthwise convolutions) are pruned together by the graph;
attention modules lose whole heads. Works on any architecture Torch-Pruning can trace.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import itertools
import tempfile
import time
from pathlib import Path
from typing import Annotated, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field, model_validator

from edgesmith.errors import BudgetError, ModelError, first_line
from edgesmith.pipeline.attention import split_multihead_attention
from edgesmith.pipeline.cache import atomic_write_json
from edgesmith.pipeline.config import DistillConfig, FinetuneConfig, Strict
from edgesmith.pipeline.data import Dataset
from edgesmith.pipeline.evaluate import feeds, model_size, top1_applies, torch_accuracy
from edgesmith.pipeline.latency_choice import choose_after_finetuning
from edgesmith.pipeline.latency_search import LatencySearch, trace_record
from edgesmith.pipeline.latency_table import Group, group_levels
from edgesmith.pipeline.model_source import output_tensors
from edgesmith.pipeline.progress import info, warn
from edgesmith.pipeline.stages import StageContext, StageResult, heads, stage
from edgesmith.pipeline.stages.distill import distillation_loss, finetune_objective
from edgesmith.pipeline.stages.layers import ignored_modules, module_named
from edgesmith.pipeline.stages.train import fit

_TAYLOR_BATCHES = 4
_CALIBRATION_BATCH, _CALIBRATION_BATCHES = 64, 4   # the latency search's damage and INT8 calibration inputs
SEARCH_FILE = "search.json"


class LatencyBudget(Strict):
    """Prune to a latency measured on a device instead of a ratio: per-group ratios found by measuring there
    (pipeline/latency_search.py). One of p50_ms, fps or speedup (against the unpruned model on that device), or
    `minimise: true` for the fastest model within the recipe's budget.max_accuracy_drop."""
    target: str                                       # one of the recipe's targets
    p50_ms: float | None = Field(default=None, gt=0)
    fps: float | None = Field(default=None, gt=0)     # samples per second at bench.batch_size
    speedup: float | None = Field(default=None, gt=1)
    minimise: bool = False
    backend: Literal["onnxruntime", "tvm", "tensorrt"] | None = None   # None: what the device ships (see deploy)
    # the pruning ratios each group is measured at; the search picks one of them (or none) per group
    levels: list[Annotated[float, Field(gt=0, lt=1)]] = Field(default=[0.25, 0.5, 0.75], min_length=1, max_length=8)
    iterations: int = Field(default=8, ge=1)          # measured candidates at most, per budget
    minimise_steps: int = Field(default=4, ge=1)      # minimise: bisection steps over the latency
    search_epochs: int = Field(default=1, ge=1)       # fine-tuning before a candidate is scored (choices, minimise)
    # with prune.finetune: allocations compared after a short fine-tune (pipeline/latency_choice.py); 1: the knapsack's
    choices: int = Field(default=3, ge=1)

    @model_validator(mode="after")
    def _one_budget(self):
        given = [k for k in ("p50_ms", "fps", "speedup") if getattr(self, k) is not None]
        if self.minimise and given:
            raise ValueError(f"latency.minimise finds the fastest model within budget.max_accuracy_drop; drop "
                             f"latency.{given[0]}")
        if not self.minimise and len(given) != 1:
            raise ValueError("give exactly one of latency.p50_ms, latency.fps or latency.speedup (or minimise: true)"
                             + (f"; got {', '.join(given)}" if given else ""))
        if self.levels != sorted(set(self.levels)):
            raise ValueError(f"latency.levels must rise without repeats, got {self.levels}")
        return self

    def budget_ms(self, unpruned_ms: float, batch_size: int) -> float:
        if self.p50_ms is not None:
            return self.p50_ms
        if self.fps is not None:
            return 1000.0 * batch_size / self.fps
        return unpruned_ms / self.speedup


class PruneStage(Strict):
    """Structured pruning: whole channels (and attention heads) leave the model, so it gets faster."""
    kind: Literal["prune"]
    method: Literal["channel"] = "channel"
    ratio: float | None = Field(default=None, gt=0, lt=1)   # fraction of channels (and heads) removed
    latency: LatencyBudget | None = None              # instead of ratio: a latency budget on a device
    importance: Literal["l1", "l2", "taylor", "bn_scale"] = "l2"
    global_pruning: bool = False                      # rank channels across layers instead of per layer
    layer_ratios: dict[str, Annotated[float, Field(gt=0, lt=1)]] = {}   # module name → its own ratio
    ignored_layers: list[str] | None = None           # None: the classifier (the layer producing the output)
    round_to: int | None = Field(default=None, ge=1)  # None: the targets' channel_multiple
    iterative_steps: int = Field(default=1, ge=1)     # fine-tuning runs after each step
    finetune: FinetuneConfig | None = None

    @model_validator(mode="after")
    def _ratio_or_latency(self):
        if (self.ratio is None) == (self.latency is None):
            raise ValueError("give prune.ratio (a fraction of channels) or prune.latency (a budget on a device), "
                             "not both or neither")
        if self.latency and (self.layer_ratios or self.iterative_steps > 1):
            raise ValueError("prune.latency chooses every layer's ratio itself in one step; drop layer_ratios and "
                             "iterative_steps")
        return self


@stage("prune-channel", PruneStage)
def run(cfg: PruneStage, model: nn.Module, data: Dataset, ctx: StageContext) -> StageResult:
    example = tuple(spec.example(2) for spec in ctx.specs)
    params_before, macs_before = model_size(model, ctx.specs)
    split = _split_multihead_attention(model, example)
    heads_before = heads.head_counts(model)
    attention = {m: heads.head_size(m) for m in heads.attention_modules(model)}   # the size stays; the count shrinks
    num_heads = {proj: heads.head_count(m) for m in attention for proj in heads.projections(m)}
    shapes_before = _output_shapes(model, example)
    calibration = _calibration_batches(data)
    searched = _latency_search(cfg, model, example, data, calibration, ctx) if cfg.latency else None
    layer_ratios = searched["layer_ratios"] if searched else cfg.layer_ratios
    pruner = _pruner(model, example, cfg, ctx, ratio=cfg.ratio or 0.0, layer_ratios=layer_ratios,
                     num_heads=num_heads if cfg.ratio else {}, global_pruning=cfg.global_pruning)
    history = []
    for step in range(cfg.iterative_steps):
        if cfg.importance == "taylor":
            _accumulate_gradients(model, data)
        pruner.step()
        model.zero_grad(set_to_none=True)
        recalibrate_batchnorm(model, calibration)
        for m, size in attention.items():   # head counts are plain Python state the graph does not update
            heads.set_head_count(m, heads.projections(m)[0].out_features // size)
        _check_outputs_kept(model, example, shapes_before)
        if cfg.finetune:
            history += _finetune(model, data, cfg.finetune, ctx, f"prune finetune {step + 1}/{cfg.iterative_steps}")
    params, macs = model_size(model, ctx.specs)
    return StageResult(model.eval(), {
        "params_before": params_before, "macs_before": macs_before, "params_after": params, "macs_after": macs,
        "heads_before": heads_before, "heads_after": heads.head_counts(model), "multihead_attention_split": split,
        "finetune_history": history, **({"latency_budget": searched} if searched else {})})


def _pruner(model: nn.Module, example, cfg: PruneStage, ctx: StageContext, *, ratio: float,
            layer_ratios: dict[str, float], num_heads: dict, global_pruning: bool):
    """Torch-Pruning's pruner for `ratio` everywhere but in `layer_ratios` (module name → ratio)."""
    import torch_pruning as tp

    try:
        return tp.pruner.MetaPruner(
            model, example[0] if len(example) == 1 else example, importance=_importance(cfg.importance),
            pruning_ratio=ratio, pruning_ratio_dict={module_named(model, n, "prune.layer_ratios"): r
                                                     for n, r in layer_ratios.items()},
            global_pruning=global_pruning, iterative_steps=cfg.iterative_steps,
            ignored_layers=ignored_modules(model, example, cfg.ignored_layers, "prune.ignored_layers"),
            round_to=cfg.round_to or ctx.channel_multiple,
            num_heads=num_heads, prune_num_heads=bool(num_heads), prune_head_dims=False, head_pruning_ratio=ratio)
    except (RuntimeError, ValueError, TypeError, KeyError) as exc:
        raise ModelError(f"prune: Torch-Pruning cannot trace the model's graph ({first_line(exc, 200)}); "
                         "add the module it names to prune.ignored_layers") from None


def _finetune(model: nn.Module, data: Dataset, finetune: FinetuneConfig, ctx: StageContext, label: str) -> list:
    objective = finetune_objective(ctx, data, finetune, distill=finetune.distill, distillation=finetune.distillation)
    return fit(model, data, finetune, ctx, label=label, objective=objective)


def _calibration_batches(data: Dataset) -> list:
    """The first training inputs (no labels needed): BatchNorm re-estimation, the latency search's damage, and
    INT8 calibration of its candidates."""
    return [xs for xs, _ in itertools.islice(data.batches(data.train, _CALIBRATION_BATCH), _CALIBRATION_BATCHES)]


def recalibrate_batchnorm(model: nn.Module, batches: list) -> None:
    """Re-estimates every BatchNorm's running statistics on `batches` (adaptive BN: Li et al., EagleEye, ECCV
    2020). After pruning, a BatchNorm's statistics describe channels its producers no longer compute; left stale,
    they wreck the pruned model's outputs (measured: resnet18 on MNIST pruned 40 %, before fine-tuning, 23.8 %
    accuracy stale vs 93.1 % re-estimated) and make candidates' damage and accuracy say more about stale
    statistics than about the channels lost. Label-free; only the norms leave eval mode, so dropout stays off."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    batches = [xs for xs in batches if len(xs[0]) > 1]   # one sample has no variance (BatchNorm1d refuses it)
    if not norms or not batches:
        return
    momenta = [m.momentum for m in norms]
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None   # a plain average over the batches, not a decayed one
        m.train()
    try:
        with torch.no_grad():
            for xs in batches:
                model(*xs)
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
            m.eval()


def _latency_search(cfg: PruneStage, model: nn.Module, example, data: Dataset, batches: list,
                    ctx: StageContext) -> dict:
    """Per-group ratios for the latency budget, measured on its device; writes search.json into the stage folder
    and returns the stage row's summary (layer_ratios: what to prune)."""
    budget, probe, start = cfg.latency, ctx.latency_probe, time.time()
    if probe is None:
        raise ModelError("prune.latency needs the run's device measurement; run it through edgesmith run")
    # validation inputs score the short fine-tunes (latency_choice.py); training inputs where there are none
    held_out = [xs for xs, _ in itertools.islice(data.batches(data.val, _CALIBRATION_BATCH), _CALIBRATION_BATCHES)] \
        or batches
    with torch.no_grad():
        reference = [output_tensors(model.eval()(*xs)) for xs in batches]
        held_out_reference = [output_tensors(model(*xs)) for xs in held_out]
    distillation = cfg.finetune.distillation if cfg.finetune else DistillConfig()

    def build(ratios: dict[str, float]) -> nn.Module:
        pruned = copy.deepcopy(model)
        if ratios:
            if cfg.importance == "taylor":
                _accumulate_gradients(pruned, data)
            _pruner(pruned, example, cfg, ctx, ratio=0.0, layer_ratios=ratios, num_heads={},
                    global_pruning=False).step()
            pruned.zero_grad(set_to_none=True)
            recalibrate_batchnorm(pruned, batches)
        return pruned.eval()

    def damage(pruned: nn.Module, inputs: list = batches, outputs: list = reference) -> float:
        with torch.no_grad():
            return float(torch.stack([distillation_loss(output_tensors(pruned(*xs)), target, distillation)
                                      for xs, target in zip(inputs, outputs)]).mean())

    def briefly_finetuned(ratios: dict[str, float], label: str) -> nn.Module:
        """A candidate as the search scores it: pruned, then fine-tuned `search_epochs` if the stage fine-tunes."""
        pruned = build(ratios)
        if cfg.finetune:
            _finetune(pruned, data, cfg.finetune.model_copy(update={"epochs": budget.search_epochs}), ctx, label)
        return pruned.eval()

    def finetuned_score(ratios: dict[str, float]) -> tuple[float, float | None]:
        pruned = briefly_finetuned(ratios, "prune choice fine-tune")
        return damage(pruned, held_out, held_out_reference), accuracy(pruned)

    def accuracy(pruned: nn.Module) -> float | None:
        return torch_accuracy(pruned, data, ctx.eval_batch_size, ctx.metric)

    round_to = cfg.round_to or ctx.channel_multiple
    groups = _prunable_groups(model, example, cfg, ctx, round_to)
    fingerprint = hashlib.sha256(f"{model!r}|{[s.to_dict() for s in ctx.specs]}|{round_to}".encode()).hexdigest()
    with tempfile.TemporaryDirectory(prefix="edgesmith-latency-") as work:
        search = LatencySearch(groups=groups, probe=probe, specs=ctx.specs, build=build,
                               damage=damage, accuracy=accuracy, work=Path(work), fingerprint=fingerprint,
                               calibration=[feeds(xs, ctx.specs) for xs in batches])
        batch = probe.bench.batch_size
        if budget.minimise:
            found = _minimise(search, budget, model, ctx, briefly_finetuned, accuracy)
        else:
            budget_of = functools.partial(budget.budget_ms, batch_size=batch)
            tables = search.tables(budget_of)
            found = search.search(tables, budget_of, budget.iterations)
            compared = []
            if cfg.finetune and budget.choices > 1:
                found, compared = choose_after_finetuning(search, tables, budget_of, budget.iterations, found,
                                                          budget.choices, finetuned_score)
            trace, chosen, final = found
            found = {"tables": tables, "trace": trace, "chosen": chosen, "final": final, "choice": compared}
    return _search_record(cfg, probe, search, found, ctx, start)


def _prunable_groups(model: nn.Module, example, cfg: PruneStage, ctx: StageContext, round_to: int) -> list[Group]:
    """The dependency groups the search sizes: every group Torch-Pruning would prune, but attention projections
    (a latency budget searches channel widths; heads stay) and groups no level changes once rounded."""
    pruner = _pruner(model, example, cfg, ctx, ratio=0.0, layer_ratios={}, num_heads={}, global_pruning=False)
    names = {m: n for n, m in model.named_modules()}
    projections = {id(p) for m in heads.attention_modules(model) for p in heads.projections(m)}
    found = []
    for group in pruner.DG.get_all_groups(ignored_layers=pruner.ignored_layers,
                                          root_module_types=pruner.root_module_types):
        if any(id(dep.target.module) in projections for dep, _ in group):
            continue
        root = group[0].dep.target.module
        group = group_levels(names.get(root, ""), pruner.DG.get_out_channels(root), cfg.latency.levels, round_to)
        if root in names and group is not None:
            found.append(group)
    if not found:
        raise ModelError("prune.latency: the model has no channel group to prune (all ignored, attention, or "
                         "narrower than round_to)")
    return found


def _minimise(search: LatencySearch, budget: LatencyBudget, model: nn.Module, ctx: StageContext,
              briefly_finetuned, accuracy) -> dict:
    """The fastest model within budget.max_accuracy_drop: a bisection over the latency (as a fraction of the
    unpruned model's), each step a latency-budget search whose result is fine-tuned briefly (search_epochs) and
    scored with the task metric."""
    reference = accuracy(model)
    if reference is None:
        raise ModelError("prune.latency.minimise scores each candidate with the task metric, and this data has none "
                         "(no class labels, no metric.fn); give a latency budget (p50_ms, fps or speedup) instead")
    tables = search.tables(None)
    low, high = tables.most_pruned_ms / tables.unpruned_ms, 1.0
    steps, best = [], None
    for step in range(1, budget.minimise_steps + 1):
        fraction = (low + high) / 2
        try:
            trace, chosen, final = search.search(tables, lambda unpruned, f=fraction: unpruned * f, budget.iterations)
        except BudgetError as exc:   # timing noise at the fast end: treat as too fast to reach
            steps.append({"fraction": fraction, "error": str(exc)})
            low = fraction
            continue
        score = accuracy(briefly_finetuned(chosen.ratios, f"prune search {step}/{budget.minimise_steps}"))
        within = reference - score <= ctx.max_accuracy_drop
        steps.append({"fraction": fraction, "layer_ratios": chosen.ratios, "measured_ms": final["measured_p50_ms"],
                      "accuracy": score, "within_accuracy_budget": within, "candidates": trace_record(trace)})
        info(f"  minimise {step}/{budget.minimise_steps}: {final['measured_p50_ms']:.3g} ms, accuracy {score:.4g} "
             f"({'within' if within else 'beyond'} the {ctx.max_accuracy_drop} point budget)")
        high, low, best = (fraction, low, (trace, chosen, final)) if within else (high, fraction, best)
    record = {"reference_accuracy": reference, "max_accuracy_drop": ctx.max_accuracy_drop, "steps": steps}
    if best is None:
        warn("prune.latency.minimise: no pruned model stayed within budget.max_accuracy_drop; the model is kept "
             "unpruned")
        return {"tables": tables, "trace": [], "chosen": None, "final": None, "minimise": record}
    trace, chosen, final = best
    return {"tables": tables, "trace": trace, "chosen": chosen, "final": final, "minimise": record}


def _search_record(cfg: PruneStage, probe, search: LatencySearch, found: dict, ctx: StageContext,
                   start: float) -> dict:
    """The stage row's summary of the search (also in search.json, with the tables)."""
    chosen, trace = found["chosen"], found["trace"]
    summary = {
        "target": cfg.latency.target, "backend": probe.backend, "precision": probe.precision,
        "batch": probe.bench.batch_size, "measured_on": probe.device_key()["device"],
        "budget": cfg.latency.model_dump(include={"p50_ms", "fps", "speedup", "minimise"}, exclude_none=True),
        **(found["final"] or {}), "layer_ratios": dict(chosen.ratios) if chosen else {},
        "search": {"file": SEARCH_FILE, "seconds": round(time.time() - start, 1), "groups": len(search.groups),
                   "levels": cfg.latency.levels, "table_cached": search.table_cached,
                   "measurements": search.measurements, "candidates": len(trace)},
        "trace": trace_record(trace), "choice": found.get("choice", [])}
    if ctx.out_dir is not None:
        atomic_write_json(ctx.out_dir / SEARCH_FILE, {
            **summary, "groups": [dataclasses.asdict(g) for g in search.groups],
            "tables": dataclasses.asdict(found["tables"]), "minimise": found.get("minimise")})
    return summary


def _importance(name: str):
    import torch_pruning as tp

    return {"l1": lambda: tp.importance.GroupMagnitudeImportance(p=1),
            "l2": lambda: tp.importance.GroupMagnitudeImportance(p=2),
            "taylor": lambda: tp.importance.GroupTaylorImportance(),
            "bn_scale": lambda: tp.importance.BNScaleImportance()}[name]()


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
