"""Per-layer pruning ratios chosen for a latency budget measured on a device.

Why a table-driven knapsack with a measured correction loop, not NetAdapt's layer-by-layer iterations: NetAdapt
measures every layer's candidate and fine-tunes after each iteration, so its cost grows with iterations × layers ×
fine-tunes; on a 2-core host that is hours for mobilenet_v2. HALP's formulation needs each group measured at a few
pruning levels once (cached per model, device, backend and precision) and solves the global trade-off in one
multiple-choice knapsack. HALP adds up per-layer latencies; here the groups' latency ratios multiply instead (a
layer's cost is the product of its input and output widths: measured on resnet18, summed milliseconds promised
solutions a third of the latency they measured), and each group's effect is one fitted share (latency_table.py),
because on a shared host one group's effect is the size of the timing noise. What the model still gets wrong is
measured: the solution is built, timed on the device, and the knapsack's target moved by the ratio it missed by,
until a candidate is confirmed within the budget by a second measurement (NetAdapt's "measure, don't estimate").
Which of a few such results a fine-tuning stage keeps is latency_choice.py's part.

Importance is label-free and comparable across layers: the distillation loss of the pruned model's outputs against
the unpruned model's, on calibration inputs, with one group pruned at a time (channels within a group chosen by the
stage's criterion: l1, l2 or taylor).
"""
from __future__ import annotations

import json
import math
import shutil
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch.nn as nn

from edgesmith.errors import BudgetError
from edgesmith.models import InputSpec
from edgesmith.pipeline import host_lock
from edgesmith.pipeline.cache import atomic_write_json, content_key
from edgesmith.pipeline.latency_table import Group, Tables, capped, most_pruned, solve
from edgesmith.pipeline.progress import info, progress_bar, warn
from edgesmith.pipeline.versions import key_versions

SEARCH_VERSION = 5          # part of a latency-budget stage's cache key: a changed search re-runs it
CLOSE_ENOUGH = 0.95         # a candidate measuring within [95 %, 100 %] of the budget ends the search
TABLE_FORMAT = 2
TABLE_ROUNDS, SEARCH_ROUNDS = 3, 5   # interleaved rounds per measurement (median kept): a candidate's decides alone


@dataclass
class Candidate:
    """One measured candidate of the search: what the search.json trace and the stage's row list."""
    iteration: int
    target_ms: float          # the knapsack's latency target (the budget moved by earlier misses)
    ratios: dict[str, float]
    predicted_ms: float
    measured_ms: float
    budget_ms: float          # the budget at this measurement (a speedup budget follows the unpruned model's p50)
    damage: float             # distillation loss against the unpruned model, before fine-tuning
    accuracy: float | None    # the task metric before fine-tuning (None: no metric applies)
    cap: float | None = None  # the deepest level any group could take in this search (None: the last of the levels)
    final: dict | None = None   # measured again, exported as the run exports it (candidates within budget)

    @property
    def within(self) -> bool:
        return self.measured_ms <= self.budget_ms

    @property
    def confirmed(self) -> bool:
        """Within the budget, twice."""
        return self.within and self.final is not None and self.final["measured_p50_ms"] <= self.final["budget_ms"]


class LatencySearch:
    """The search over a model's groups for one device. `build(ratios)` returns a pruned copy of the model,
    `damage(model)` its distillation loss against the unpruned model, `accuracy(model)` its task metric (or None);
    `probe` measures ONNX files on the device (pipeline/latency_probe.py)."""

    def __init__(self, *, groups: list[Group], probe, specs: tuple[InputSpec, ...],
                 build: Callable[[dict[str, float]], nn.Module], damage: Callable[[nn.Module], float],
                 accuracy: Callable[[nn.Module], float | None], calibration: list[dict], work: Path,
                 fingerprint: str):
        self.groups, self.probe, self.specs = groups, probe, specs
        self.build, self.damage, self.accuracy, self.calibration = build, damage, accuracy, calibration
        self.work, self.fingerprint = work, fingerprint
        self.measurements = 0
        self.table_cached = False
        self._files = 0
        self._unpruned_files: dict[bool, Path] = {}

    def _file(self, model: nn.Module, fast: bool = True) -> Path:
        self._files += 1
        return self.probe.onnx(model, self.specs, self.work / f"m{self._files}" / "model.onnx", self.calibration,
                               fast=fast)

    def _measure(self, files: dict[str, Path], rounds: int = TABLE_ROUNDS) -> dict[str, float]:
        """Measures, then deletes the candidates' files (a resnet18's FP32 file is 45 MB; the table has dozens)."""
        self.measurements += len(files)
        try:
            return self.probe.measure(files, self.specs, rounds)
        finally:
            for path in files.values():
                if path not in self._unpruned_files.values():
                    shutil.rmtree(path.parent, ignore_errors=True)

    # -- tables -------------------------------------------------------------------------------------------------
    def tables(self, budget_of: Callable[[float], float] | None) -> Tables:
        """The latency table (cached by architecture and device) and the damage table (this model's weights).
        `budget_of(unpruned_ms)`: the budget, checked against the most pruned model before the per-group
        measurements, so an impossible budget costs two measurements."""
        path = self.probe.tables_dir / f"{self._table_key()}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        # parallel jobs on one model and device: one measures, the others read its table
        with host_lock.one_job_at_a_time(path, f"  [cyan]…[/] latency table {path.name[:16]}… being measured by "
                                         "another run; waiting for it"):
            tables = self._measured_or_cached(path, budget_of)
        tables.calibrate(self.groups)
        tables.damage = self._damage_table()
        return tables

    def _measured_or_cached(self, path: Path, budget_of: Callable[[float], float] | None) -> Tables:
        tables = self._cached(path)
        if tables is None:
            unpruned = self._unpruned(True)
            deepest = self._file(self.build(most_pruned(self.groups)))
            ends = self._measure({"unpruned": unpruned, "most pruned": deepest})
            tables = Tables(ends["unpruned"], ends["most pruned"], {})
            if budget_of:
                self.check_reachable(tables, budget_of)
            self._measure_groups(tables, unpruned)
            atomic_write_json(path, {"format": TABLE_FORMAT, "key": path.stem,
                                     "groups": [asdict(g) for g in self.groups], **asdict(tables)})
        elif budget_of:
            self.check_reachable(tables, budget_of)
        return tables

    def _table_key(self) -> str:
        return content_key("latency-table", {"format": TABLE_FORMAT, "model": self.fingerprint,
                                             "groups": [asdict(g) for g in self.groups],
                                             "device": self.probe.device_key(), "tools": key_versions()})

    def _cached(self, path: Path) -> Tables | None:
        """A table file is reused only when it is whole and says it is this table (its key and groups)."""
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
            tables = Tables(float(data["unpruned_ms"]), float(data["most_pruned_ms"]),
                            {g: [float(v) for v in values] for g, values in data["latency_ms"].items()})
            ok = (data["key"] == path.stem and set(tables.latency_ms) == {g.name for g in self.groups} and
                  all(len(tables.latency_ms[g.name]) == len(g.levels) for g in self.groups) and
                  all(math.isfinite(x) and x > 0 for v in tables.latency_ms.values() for x in v) and
                  math.isfinite(tables.unpruned_ms) and tables.unpruned_ms > 0)
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            ok = False
        if not ok:
            warn(f"latency table '{path}' is damaged or not this model's; measuring it again")
            path.unlink(missing_ok=True)
            return None
        self.table_cached = True
        info(f"  latency table for {self.probe.label}: cached ({path.name[:16]}…)")
        return tables

    def _measure_groups(self, tables: Tables, unpruned: Path) -> None:
        """Each group at each level, timed beside the unpruned model; the unpruned model's latency is then the
        median of all its measurements (one per group and the first)."""
        references = [tables.unpruned_ms]
        with progress_bar() as bar:
            task = bar.add_task(f"latency table {self.probe.label}", total=len(self.groups), status="")
            for group in self.groups:
                files = {"unpruned": unpruned, **{level: self._file(self.build({group.name: level}))
                                                  for level in group.levels}}
                measured = self._measure(files)
                references.append(measured["unpruned"])
                tables.latency_ms[group.name] = [measured[level] for level in group.levels]
                bar.update(task, advance=1, status=group.name)
        tables.unpruned_ms = statistics.median(references)

    def _damage_table(self) -> dict[str, list[float]]:
        return {g.name: [self.damage(self.build({g.name: level})) for level in g.levels] for g in self.groups}

    def check_reachable(self, tables: Tables, budget_of: Callable[[float], float]) -> None:
        """Refuses a budget below what the most pruned model allowed measures, measured twice (the table's, then
        now beside the unpruned model): one slow measurement, cached in a table, refused mobilenet_v2 at 30 % of its
        latency with a floor of 38 % that its searches then measured at 24–26 %. Where the second finds the budget
        within reach, it anchors the table's calibration instead (else the knapsack would see nothing but the most
        pruned model within the budget)."""
        if budget_of(tables.unpruned_ms) >= tables.most_pruned_ms:
            return
        again = self._measure({"most pruned": self._file(self.build(most_pruned(self.groups))),
                               "unpruned": self._unpruned(True)}, SEARCH_ROUNDS)
        budget_ms, floor = budget_of(again["unpruned"]), again["most pruned"]
        if budget_ms < floor:
            raise BudgetError(
                f"prune.latency: a p50 of {budget_ms:.3g} ms on {self.probe.label} is out of reach: the most pruned "
                f"model allowed (every layer group at its deepest prune.latency.levels) measures {floor:.3g} ms "
                f"(unpruned {again['unpruned']:.3g} ms); ask for at least {floor:.3g} ms, or allow deeper pruning "
                "with a larger last prune.latency.levels")
        tables.most_pruned_ms = tables.unpruned_ms * floor / again["unpruned"]
        if tables.latency_ms:   # a table being measured is calibrated once its groups are
            tables.calibrate(self.groups)

    # -- the measured search ------------------------------------------------------------------------------------
    def search(self, tables: Tables, budget_of: Callable[[float], float], iterations: int,
               cap: float | None = None) -> tuple[list[Candidate], Candidate, dict]:
        """Knapsack solutions measured on the device, the target moved by each miss (bisected once targets on both
        sides are known). A candidate within the budget is measured again, exported as the run exports it, to be
        confirmed (timing noise here: ±5 % between two measurements of one file). Stops at a confirmed candidate
        within [CLOSE_ENOUGH, 1] × budget, when the knapsack's answer stops changing, or after `iterations`.
        Returns the trace, the least damaged confirmed candidate and its final measurement. `cap`: no group pruned
        deeper than this level."""
        budget = budget_of(tables.unpruned_ms)
        self.check_reachable(tables, budget_of)
        groups = capped(self.groups, cap)
        target, below, above = budget, None, None   # knapsack targets whose candidate was confirmed / over budget
        trace: list[Candidate] = []
        previous, last = None, None
        for iteration in range(1, iterations + 1):
            ratios = self._solution(tables, target, groups)
            if ratios == previous and last.confirmed:
                break   # the target moved and the knapsack's answer did not: converged
            while ratios == previous and ratios != most_pruned(groups):   # over budget: ask for a little more
                target *= 0.98
                ratios = self._solution(tables, target, groups)
            if ratios == previous:
                break   # even the most pruned model measured over budget
            previous = ratios
            candidate = next((c for c in trace if c.ratios == ratios), None)
            if candidate is None:
                candidate = self._candidate(iteration, target, ratios, tables, budget_of)
                candidate.cap = cap
                trace.append(candidate)
            last = candidate
            if candidate.within and candidate.final is None:
                candidate.final = self.final(ratios, budget_of)
            info(f"  search {iteration}/{iterations}: target {target:.3g} ms → measured {candidate.measured_ms:.3g} "
                 f"ms (budget {candidate.budget_ms:.3g}" + (f", again {candidate.final['measured_p50_ms']:.3g} ms"
                                                           if candidate.final else "") +
                 f"), damage {candidate.damage:.4g}")
            if candidate.confirmed:
                below = target if below is None else max(below, target)
                if candidate.measured_ms >= CLOSE_ENOUGH * candidate.budget_ms:
                    break
            else:
                above = target if above is None else min(above, target)
            target = math.sqrt(below * above) if below is not None and above is not None else \
                target * _slack(candidate)   # moved by the ratio it missed (or beat) the budget by
        confirmed = [c for c in trace if c.confirmed]
        if confirmed:
            best = min(confirmed, key=lambda c: c.damage)
            return trace, best, best.final
        closest = min(trace, key=lambda c: c.measured_ms - c.budget_ms)
        raise BudgetError(f"prune.latency: no candidate measured within the budget on {self.probe.label} in "
                          f"{len(trace)} tries (closest {closest.measured_ms:.4g} ms for {closest.budget_ms:.4g} ms); "
                          "raise prune.latency.iterations or loosen the budget")

    def _solution(self, tables: Tables, target: float, groups: list[Group]) -> dict[str, float]:
        ratios = solve(groups, tables, target)
        return most_pruned(groups) if ratios is None else ratios

    def _unpruned(self, fast: bool) -> Path:
        if fast not in self._unpruned_files:
            self._unpruned_files[fast] = self._file(self.build({}), fast)
        return self._unpruned_files[fast]

    def _candidate(self, iteration: int, target: float, ratios: dict[str, float], tables: Tables,
                   budget_of: Callable[[float], float]) -> Candidate:
        model = self.build(ratios)
        measured = self._measure({"candidate": self._file(model), "unpruned": self._unpruned(True)}, SEARCH_ROUNDS)
        return Candidate(iteration, target, ratios, tables.predicted_ms(ratios, self.groups), measured["candidate"],
                         budget_of(measured["unpruned"]), self.damage(model), self.accuracy(model))

    def final(self, ratios: dict[str, float], budget_of: Callable[[float], float]) -> dict:
        """A model exported the way the run exports it and measured again, beside the unpruned model."""
        measured = self._measure({"pruned": self._file(self.build(ratios), fast=False),
                                  "unpruned": self._unpruned(False)}, SEARCH_ROUNDS)
        return {"measured_p50_ms": measured["pruned"], "unpruned_p50_ms": measured["unpruned"],
                "budget_ms": budget_of(measured["unpruned"]), "speedup": measured["unpruned"] / measured["pruned"]}


def _slack(candidate: Candidate) -> float:
    """Budget over p50 at the tightest of the candidate's timings, each against its own budget (a speedup budget
    follows the unpruned model timed beside it): below 1 once missed, so the target moves down, never back to a
    solution known to be over (two candidates once alternated to the end on a loaded CI host)."""
    timings = [(candidate.budget_ms, candidate.measured_ms)]
    if candidate.final:
        timings.append((candidate.final["budget_ms"], candidate.final["measured_p50_ms"]))
    return min(budget / measured for budget, measured in timings)


def trace_record(candidates: list[Candidate]) -> list[dict]:
    return [{**asdict(c), "within_budget": c.confirmed} for c in candidates]
