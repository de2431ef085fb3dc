"""The latency table of a model's dependency groups on one device, and the knapsack that reads it.

A group's latency share is fitted from the group measured alone at a few pruning levels; groups' latency ratios
multiply; the knapsack picks each group's level for the least summed damage within a latency target
(latency_search.py says why this formulation, and how the search corrects its misses by measuring).
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

STEP = 0.002                # the knapsack's grid: 0.2 % steps of latency (in log ratio)
MAX_SHARE = 0.95            # of the latency one group can scale (the rest is per-call overhead and other groups)


@dataclass(frozen=True)
class Group:
    """A dependency group: channels that must be pruned together, keyed by its root module's name (the key
    `prune.layer_ratios` takes, so a search's result can be pasted into a ratio recipe). `levels`: the pruning
    ratios it is measured at, those of the stage's levels that leave a different, non-zero channel count once
    rounded to the targets' channel multiple (`kept`, per level)."""
    name: str
    channels: int
    levels: tuple[float, ...]
    kept: tuple[int, ...]


def kept_channels(channels: int, ratio: float, round_to: int) -> int:
    """The channels Torch-Pruning keeps of a group at `ratio`, rounded down to a multiple of `round_to`."""
    kept = int(channels * (1 - ratio))
    return kept - kept % round_to


def capped(groups: list[Group], cap: float | None) -> list[Group]:
    """The groups with their levels up to `cap` (None: all); a group with none left stays whole."""
    return [Group(g.name, g.channels, g.levels[:n], g.kept[:n]) for g in groups
            if (n := sum(level <= cap for level in g.levels) if cap is not None else len(g.levels))]


def most_pruned(groups: list[Group]) -> dict[str, float]:
    return {g.name: g.levels[-1] for g in groups}


def group_levels(name: str, channels: int, levels: list[float], round_to: int) -> Group | None:
    """The group with the levels that change it (None: none does, the group stays whole)."""
    chosen, kept = [], []
    for level in levels:
        count = kept_channels(channels, level, round_to)
        if 0 < count < (kept[-1] if kept else channels):
            chosen.append(level)
            kept.append(count)
    return Group(name, channels, tuple(chosen), tuple(kept)) if chosen else None


@dataclass
class Tables:
    unpruned_ms: float
    most_pruned_ms: float
    latency_ms: dict[str, list[float]]      # group → p50 with only that group pruned, per level of the group
    damage: dict[str, list[float]] = field(default_factory=dict)   # group → distillation loss, per level
    scale: float = 1.0                      # on every fitted share: see calibrate

    def calibrate(self, groups: list[Group]) -> None:
        """Scales every group's share so that the model predicts what the most pruned model measured. Noise makes
        the fitted shares of many small groups too large together (a share is never below 0, so noise only adds),
        and the layers between two groups make them too small for a few wide ones; one measured point of the
        whole model anchors their sum."""
        most = most_pruned(groups)
        low, high = 0.0, 20.0
        for _ in range(60):   # predicted latency falls as the scale grows: bisection
            self.scale = (low + high) / 2
            low, high = (self.scale, high) if self.predicted_ms(most, groups) > self.most_pruned_ms else \
                (low, self.scale)

    def fitted_share(self, group: Group) -> float:
        """The fraction of the latency that scales with the group's width: a layer's cost is proportional to its
        input and output widths, so with one group pruned alone the latency is `1 − share × pruned fraction` of the
        unpruned model's. The median of the estimates its levels give: one group of mobilenet_v2's 25 moves the
        latency by about as much as this host's timing noise (±5 %, and an ONNX Runtime session here now and then
        runs 1.5× slower for its whole life), so each level's measurement taken as it is would sum 25 groups' noise
        into savings that do not exist."""
        estimates = [(1 - ms / self.unpruned_ms) / (1 - kept / group.channels)
                     for ms, kept in zip(self.latency_ms[group.name], group.kept)]
        return min(max(statistics.median(estimates), 0.0), MAX_SHARE)

    def share(self, group: Group) -> float:
        return min(self.fitted_share(group) * self.scale, MAX_SHARE)

    def savings(self, group: Group) -> list[float]:
        """−log of the latency ratio at each of the group's levels. Groups' ratios multiply (their logs add): two
        groups pruned to half make a layer between them take a quarter, where adding the milliseconds each saves
        alone would promise all of it (on resnet18 here, the additive model's solutions measured 1.5–3× the
        latency it predicted)."""
        share = self.share(group)
        return [-math.log(1 - share * (1 - kept / group.channels)) for kept in group.kept]

    def predicted_ms(self, ratios: dict[str, float], groups: list[Group]) -> float:
        by_name = {g.name: g for g in groups}
        return self.unpruned_ms * math.exp(-sum(self.savings(by_name[g])[by_name[g].levels.index(r)]
                                                for g, r in ratios.items()))


def solve(groups: list[Group], tables: Tables, target_ms: float) -> dict[str, float] | None:
    """The levels (group → ratio; unpruned groups left out) with the least summed damage whose predicted latency is
    at most `target_ms`: a multiple-choice knapsack by dynamic programming over a grid of log-latency steps. None:
    the table says no choice reaches it."""
    need = round(math.log(tables.unpruned_ms / target_ms) / STEP) if target_ms > 0 else math.inf
    if need == math.inf or need > round(sum(tables.savings(g)[-1] for g in groups) / STEP):
        return None
    if need <= 0:
        return {}
    best = [0.0] + [math.inf] * need           # best[j]: least damage saving at least j grid units so far
    choices: list[list[int]] = []
    for group in groups:
        options = [(0, 0.0)] + [(round(s / STEP), d)
                                for s, d in zip(tables.savings(group), tables.damage[group.name])]
        new, picked = [math.inf] * (need + 1), [0] * (need + 1)
        for j, damage in enumerate(best):
            if damage == math.inf:
                continue
            for option, (units, cost) in enumerate(options):
                k = min(need, j + units)
                if damage + cost < new[k]:
                    new[k], picked[k] = damage + cost, option * (need + 1) + j
        best = new
        choices.append(picked)
    if best[need] == math.inf:
        return None
    ratios, j = {}, need
    for group, picked in zip(reversed(groups), reversed(choices)):
        option, j = divmod(picked[j], need + 1)
        if option:
            ratios[group.name] = group.levels[option - 1]
    return ratios
