"""Which allocation a latency-budget search keeps when the stage fine-tunes: of a few that meet the budget on the
device, the one that fine-tunes best.

Why: the knapsack (latency_search.py) minimises the damage pruning does before fine-tuning, and that is what it
predicts. Measured on MNIST: resnet18 at 30 % of its latency kept 94.1 % accuracy before fine-tuning against uniform
pruning's 92.3 %, and ended 98.1 against 98.5 after one distilled epoch; mobilenet_v2 at 50 % ended 0.8 point below
uniform after three. The least damage came from cutting a few groups to their deepest level, capacity fine-tuning
does not bring back. So, like NetAdapt with its short fine-tunes, the stage compares candidates after fine-tuning:
the knapsack's allocation and the same knapsack with every group held to at most a lower level (a cap: the lowest
cap that still reaches the budget is close to uniform pruning), each found and confirmed on the device by the same
measured search, each fine-tuned briefly (prune.latency.search_epochs, the stage's fine-tuning) and scored on the
validation split: by the task metric where the data has one, else by the distillation loss against the unpruned
model (no labels needed). The loss alone misled on a barely trained mnist_cnn (the allocation it preferred was
3 points less accurate), so a metric, when there is one, decides.
"""
from __future__ import annotations

from typing import Callable

from edgesmith.errors import BudgetError
from edgesmith.pipeline.latency_search import Candidate, LatencySearch
from edgesmith.pipeline.latency_table import Group, Tables, capped, most_pruned
from edgesmith.pipeline.progress import info

Found = tuple[list[Candidate], Candidate, dict]   # a search's trace, its chosen candidate, that one's final timing


def caps_to_try(groups: list[Group], tables: Tables, budget_ms: float, ratios: dict[str, float],
                count: int) -> list[float]:
    """Up to `count` caps below the deepest level in `ratios` that the table predicts still reach the budget: the
    lowest (nearest to uniform) always, the rest spread between it and the knapsack's own."""
    deepest = max(ratios.values(), default=0.0)
    reachable = [cap for cap in sorted({level for g in groups for level in g.levels}) if cap < deepest and
                 (held := capped(groups, cap)) and tables.predicted_ms(most_pruned(held), groups) <= budget_ms]
    if len(reachable) <= count:
        return reachable
    picks = {round(i * (len(reachable) - 1) / max(count - 1, 1)) for i in range(count)}
    return [reachable[i] for i in sorted(picks)]


def choose_after_finetuning(search: LatencySearch, tables: Tables, budget_of: Callable[[float], float],
                            iterations: int, knapsack: Found, choices: int,
                            score: Callable[[dict[str, float]], tuple[float, float | None]]) -> tuple[Found, list]:
    """The knapsack's search result and up to `choices − 1` capped ones, each scored by `score(ratios)` (after a
    short fine-tune: the distillation loss, and the task metric or None); returns the best one (its trace holding
    every search's candidates) and the comparison, for search.json."""
    trace, chosen, final = knapsack
    options = [(None, chosen, final)]
    for cap in caps_to_try(search.groups, tables, budget_of(tables.unpruned_ms), chosen.ratios, choices - 1):
        try:
            more, best, measured = search.search(tables, budget_of, iterations, cap=cap)
        except BudgetError as exc:   # the table said reachable; the device did not
            info(f"  levels up to {cap}: {exc}")
            continue
        trace = trace + more
        if all(best.ratios != c.ratios for _, c, _ in options):
            options.append((cap, best, measured))
    if len(options) == 1:
        return (trace, chosen, final), []
    compared = []
    for number, (cap, candidate, measured) in enumerate(options, 1):
        loss, accuracy = score(candidate.ratios)
        compared.append({"cap": cap, "layer_ratios": candidate.ratios, "measured_p50_ms": measured["measured_p50_ms"],
                         "damage": candidate.damage, "finetuned_damage": loss, "finetuned_accuracy": accuracy})
        info(f"  choice {number}/{len(options)} (levels up to {cap or 'the last'}): {measured['measured_p50_ms']:.3g} "
             f"ms, distillation loss {candidate.damage:.4g} → {loss:.4g} after a short fine-tune" +
             (f", accuracy {accuracy:.4g}" if accuracy is not None else ""))
    by_metric = all(c["finetuned_accuracy"] is not None for c in compared)
    best = min(range(len(options)), key=lambda i: (-compared[i]["finetuned_accuracy"] if by_metric else 0,
                                                   compared[i]["finetuned_damage"]))
    compared[best]["chosen"] = True
    _, chosen, final = options[best]
    return (trace, chosen, final), compared
