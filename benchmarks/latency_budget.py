"""Latency-budget pruning against uniform pruning at the same measured latency, on this host.

    python -m edgesmith.benchmarks.latency_budget [resnet18 mobilenet_v2 | all] [--quick] [--json FILE]
                                                  [--cache-dir DIR]

For each model (the compression benchmarks' settings: resnet18 trained on MNIST-5k at 3×64×64, mobilenet_v2 from
the ImageNet weights fine-tuned at 3×96×96) and each budget (50 % and 30 % of the FP32 model's p50, i.e. a speedup
of 2 and 3.33 on x86-host with ONNX Runtime FP32, one thread):
1. `prune: {latency: {target, speedup}}` runs the measured search and fine-tunes (distilled) — the stage records
   its own final measurement against the budget;
2. uniform pruning is tuned to the same measured p50: prune-only runs over a grid of ratios, their ONNX files timed
   side by side with the latency-budget model's, the ratio whose p50 on a non-increasing fit over the grid is
   closest is fine-tuned the same way;
3. FP32, both pruned models are timed side by side (15 interleaved rounds) and their accuracies read from the runs,
   after the fine-tuning and before it ("before ft": the pruned model with re-estimated BatchNorm statistics —
   what the search chose from; MNIST after fine-tuning sits near its ceiling).
Every pipeline run goes through `edgesmith batch` in a subprocess (see compression.py). The host profile used has
ONNX Runtime alone (TVM's untuned FP32 code is 100× slower here and never ships). The last part shows the one-line
error for a board without an RPC tracker. Targets: every budget met as measured; latency-budget pruning ≥ 0.5 point
more accurate than uniform at equal measured latency on at least one model at 30 %, where "equal" is checked: the
matched uniform model's p50 in step 3 within ±10 % of the latency-budget model's (a pair further apart is printed,
not counted).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from sklearn.isotonic import IsotonicRegression

from edgesmith.benchmarks.compression import main, pipeline_runs, side_by_side

PROFILE = "latency-bench-host"
BUDGETS = (0.5, 0.3)                 # of the FP32 p50
UNIFORM_GRID = tuple(np.round(np.arange(0.2, 0.91, 0.05), 2))
LEVELS = [0.2, 0.4, 0.6, 0.8, 0.9, 0.95]   # 0.95: mobilenet_v2 at 96 px keeps some groups there at 30 %
MIN_GAIN_POINTS = 0.5
EQUAL_LATENCY = 0.10   # the matched uniform model's final p50 within ±10 % of the latency-budget model's
ROUND_TO = 8
# one ONNX Runtime thread, in the stage's searches and in every timing here: with two on this 2-vCPU shared host, one
# file timed twice in the same interleaved rounds read 0.38 and 0.28 of the FP32 p50 (mobilenet_v2) where one thread
# reads the two within 3 %; the models that the comparison rests on are a fraction of a millisecond
THREADS = 1
TIMING_ROUNDS = 15


def _host_profile(work: Path) -> None:
    """x86-host with ONNX Runtime alone on one thread, found by the subprocesses through EDGESMITH_PROFILES."""
    folder = work / "profiles"
    folder.mkdir(exist_ok=True)
    (folder / f"{PROFILE}.yaml").write_text(
        "description: this host, ONNX Runtime only (benchmarks.latency_budget)\narch: x86_64\ndetect_host: true\n"
        f"backends: [onnxruntime]\nquant_scheme: ort-x86\nchannel_multiple: 8\nthreads: {THREADS}\n")
    os.environ["EDGESMITH_PROFILES"] = os.pathsep.join(
        p for p in (os.environ.get("EDGESMITH_PROFILES"), str(folder)) if p)


def _settings(model: str, quick: bool) -> tuple[list[str], dict]:
    if model == "resnet18":
        size, epochs, finetune, lr, extra = (32, 1, 1, 0.002, {}) if quick else (64, 3, 3, 0.002, {})
    else:
        size, epochs, finetune, lr, extra = (64, 1, 1, 0.001, {"pretrained": True}) if quick else \
            (96, 2, 3, 0.001, {"pretrained": True})
    kwargs = json.dumps({"num_classes": 10, "image_size": size, **extra})
    common = [f"model={{name: {model}, kwargs: {kwargs}}}", f"targets=[{PROFILE}]", "compile.precisions=[fp32]",
              "budget.max_accuracy_drop=null", "bench.runs=100"]
    return common, {"train": {"kind": "train", "epochs": epochs, "lr": lr}, "finetune_epochs": finetune,
                    "size": size}


def _prune(**fields) -> dict:
    return {"kind": "prune", "round_to": ROUND_TO, **fields}


def compare(model: str, work: Path, cache: Path, quick: bool) -> dict:
    common, s = _settings(model, quick)
    finetune = {"epochs": s["finetune_epochs"], "distill": True}
    stages = lambda prune: f"stages={json.dumps([s['train'], prune])}"   # noqa: E731
    budget_runs = {f"{model}-lb{int(f * 100)}": [*common, stages(_prune(
        latency={"target": PROFILE, "speedup": round(1 / f, 4), "levels": LEVELS}, finetune=finetune))]
        for f in BUDGETS}
    print(f"\n{model}: latency-budget pruning at {', '.join(f'{f:.0%}' for f in BUDGETS)} of the FP32 p50", flush=True)
    failed: dict[str, str] = {}
    budgeted = pipeline_runs(budget_runs, work, cache, failures=failed)
    for label, reason in failed.items():
        print(f"{label}: {reason}")
    budgets = [f for f in BUDGETS if f"{model}-lb{int(f * 100)}" in budgeted]
    if not budgets:
        return {"failed": failed}
    grid = {f"{model}-u{int(r * 100)}": [*common, "targets=[]", stages(_prune(ratio=float(r)))]
            for r in UNIFORM_GRID}
    print(f"{model}: uniform ratios {UNIFORM_GRID[0]}–{UNIFORM_GRID[-1]} without fine-tuning, to match the latency",
          flush=True)
    uniform_grid = pipeline_runs(grid, work, cache)
    files = {label: out / "stages/02-prune/onnx/model.onnx" for label, (out, _) in {**budgeted, **uniform_grid}.items()}
    p50 = side_by_side(files, batch=1, runs=300, threads=THREADS, rounds=TIMING_ROUNDS)
    # more pruning is never slower: a non-increasing fit over the whole grid averages out one point's noisy timing,
    # which alone moved the matched ratio between 0.70 and 0.85 for one mobilenet_v2 model on this host
    fitted = IsotonicRegression(increasing=False).fit_transform(UNIFORM_GRID, [p50[u] for u in grid])
    print(f"{model}: uniform p50 (ms, fitted): " + ", ".join(f"{r:.2f}: {t:.3f}" for r, t in zip(UNIFORM_GRID, fitted)))
    matched = {f: float(UNIFORM_GRID[int(np.argmin(np.abs(fitted - p50[f"{model}-lb{int(f * 100)}"])))])
               for f in budgets}
    tuned = pipeline_runs({f"{model}-uniform{int(f * 100)}": [*common, stages(_prune(ratio=matched[f],
                                                                                      finetune=finetune))]
                           for f in budgets}, work, cache)
    pruned_only = {f: _prune_row(uniform_grid[f"{model}-u{int(matched[f] * 100)}"][1])["accuracy"] for f in budgets}
    return {**_table(model, budgeted, tuned, matched, pruned_only, budgets), "failed": failed}


def _prune_row(rows: list[dict]) -> dict:
    return next(r for r in rows if r["stage"] == "prune" and r["target"] is None)


def _before_finetuning(search: dict) -> float | None:
    """The accuracy of the searched model before its fine-tuning: its candidate's, in the search trace."""
    return next((t["accuracy"] for t in search["trace"] if t["ratios"] == search["layer_ratios"]), None)


def _table(model: str, budgeted: dict, tuned: dict, matched: dict, pruned_only: dict, budgets: list[float]) -> dict:
    first = next(iter(budgeted.values()))
    fp32 = first[0] / "stages/01-train/onnx/model.onnx"
    files = {"fp32": fp32}
    for f in budgets:
        files[f"latency budget {f:.0%}"] = budgeted[f"{model}-lb{int(f * 100)}"][0] / "stages/02-prune/onnx/model.onnx"
        files[f"uniform {f:.0%}"] = tuned[f"{model}-uniform{int(f * 100)}"][0] / "stages/02-prune/onnx/model.onnx"
    p50 = side_by_side(files, batch=1, runs=450, threads=THREADS, rounds=TIMING_ROUNDS)
    train_accuracy = next(r for r in first[1] if r["stage"] == "train" and r["target"] is None)["accuracy"]
    rows, verdict = [], {"budget_met": True, "budget_met_again": True, "gain_at_30": []}
    print(f"\n{model}: side by side on this host (ONNX Runtime FP32, one thread, batch 1, interleaved rounds)")
    print(f"{'model':<22}{'ratio':>14}{'p50 ms':>9}{'of fp32':>9}{'budget':>8}{'stage p50':>11}{'acc %':>8}"
          f"{'before ft':>10}{'search s':>10}{'cands':>7}")
    print(f"{'fp32':<22}{'—':>14}{p50['fp32']:>9.3f}{1:>9.2f}{'':>8}{'':>11}{train_accuracy:>8.2f}")
    for f in budgets:
        lb_rows = budgeted[f"{model}-lb{int(f * 100)}"][1]
        lb, un = _prune_row(lb_rows), _prune_row(tuned[f"{model}-uniform{int(f * 100)}"][1])
        search = lb["latency_budget"]
        before = {"lb": _before_finetuning(search), "uniform": pruned_only[f]}
        met = search["measured_p50_ms"] <= search["budget_ms"]
        verdict["budget_met"] &= met
        # timed again here, beside the FP32 model: the budget is a fraction of the FP32 p50
        again = p50[f"latency budget {f:.0%}"] / p50["fp32"]
        met_again = again <= f
        verdict["budget_met_again"] &= met_again
        gain = lb["accuracy"] - un["accuracy"]
        # the grid's match, timed again beside it: on a noisy host the two can end far apart, and a gain against a
        # slower (or faster) uniform model is not a gain at equal latency
        gap = p50[f"uniform {f:.0%}"] / p50[f"latency budget {f:.0%}"] - 1
        equal = abs(gap) <= EQUAL_LATENCY
        if f == 0.3 and equal:
            verdict["gain_at_30"].append(gain)
        for label, row, ratio in ((f"latency budget {f:.0%}", lb, "per layer"), (f"uniform {f:.0%}", un,
                                                                                f"{matched[f]:.2f}")):
            is_lb = row is lb
            stage_p50 = f"{search['measured_p50_ms']:.3f}" if is_lb else ""
            before_ft = before["lb" if is_lb else "uniform"]
            print(f"{label:<22}{ratio:>14}{p50[label]:>9.3f}{p50[label] / p50['fp32']:>9.2f}{f:>8.2f}"
                  f"{stage_p50:>11}{row['accuracy']:>8.2f}{'' if before_ft is None else f'{before_ft:.2f}':>10}" +
                  (f"{search['search']['seconds']:>10.0f}{search['search']['candidates']:>7}" if is_lb else ""))
        stage = {k: search[k] for k in ("measured_p50_ms", "budget_ms", "unpruned_p50_ms", "speedup",
                                        "layer_ratios", "search")}
        budget_row = {"accuracy": lb["accuracy"], "accuracy_before_finetuning": before["lb"], "stage": stage,
                      "trace": search["trace"], "choice": search.get("choice", []),
                      "p50_ms": p50[f"latency budget {f:.0%}"]}
        rows.append({"budget": f, "latency_budget": budget_row,
                     "uniform": {"ratio": matched[f], "accuracy": un["accuracy"],
                                 "accuracy_before_finetuning": before["uniform"], "p50_ms": p50[f"uniform {f:.0%}"]},
                     "budget_met": met, "budget_met_again": met_again, "accuracy_gain": gain,
                     "uniform_p50_gap": gap, "equal_latency": equal})
        print(f"  budget {f:.0%}: stage measured {search['measured_p50_ms']:.3f} ms ≤ {search['budget_ms']:.3f} ms "
              f"→ {'met' if met else 'MISSED'}, timed again here {again:.2f} of FP32 → "
              f"{'met' if met_again else 'MISSED'}; latency budget − uniform = {gain:+.2f} points; uniform's p50 "
              f"{gap:+.0%} of the latency budget model's → " +
              ("equal latency" if equal else f"not equal latency (beyond ±{EQUAL_LATENCY:.0%}): gain not counted"))
        for c in search.get("choice", []):   # the allocations the stage compared after a short fine-tune
            print(f"    {'kept ' if c.get('chosen') else 'tried'} levels ≤ {c['cap'] or 'any':<5} "
                  f"{c['measured_p50_ms']:.3f} ms, accuracy {c['finetuned_accuracy']:.2f} after a short fine-tune")
    return {"fp32": {"p50_ms": p50["fp32"], "accuracy": train_accuracy}, "rows": rows, "verdict": verdict}


def board_without_tracker(work: Path) -> str:
    """The emulated-board path: a latency budget on a board with no RPC tracker is refused before any work."""
    proc = subprocess.run([sys.executable, "-m", "edgesmith", "run", "--out", str(work / "board"),
                           "--set", "targets=[raspberry-pi-4]",
                           "--set", "stages.1.ratio=null",
                           "--set", "stages.1.latency={target: raspberry-pi-4, p50_ms: 5}"],
                          capture_output=True, text=True)
    line = (proc.stderr.strip().splitlines() or ["(nothing)"])[-1]
    print(f"\nboard without a tracker (exit {proc.returncode}): {line}")
    return line


def resnet18(work: Path, cache: Path, quick: bool) -> dict:
    _host_profile(work)
    return compare("resnet18", work, cache, quick)


def mobilenet_v2(work: Path, cache: Path, quick: bool) -> dict:
    _host_profile(work)
    return compare("mobilenet_v2", work, cache, quick)


def board(work: Path, cache: Path, quick: bool) -> dict:
    return {"error": board_without_tracker(work)}


def summary(results: dict) -> None:
    models = {k: r for k, r in results.items() if k != "board"}
    met = all(r.get("verdict", {}).get("budget_met", False) for r in models.values())
    gains = [g for r in models.values() for g in r.get("verdict", {}).get("gain_at_30", [])]
    for r in models.values():
        for label, reason in r["failed"].items():
            print(f"{label}: failed: {reason}")
    met = met and not any(r["failed"] for r in models.values())
    again = met and all(r.get("verdict", {}).get("budget_met_again", False) for r in models.values())
    print(f"\ntarget: every budget met as measured by the stage → {'PASS' if met else 'MISS'}")
    print(f"target: every budget met again in the side-by-side timing (p50 ÷ FP32 p50) → {'PASS' if again else 'MISS'}")
    target = f"target: latency budget ≥ {MIN_GAIN_POINTS} point more accurate than uniform at 30 % on one model"
    if gains:
        verdict = "PASS" if max(gains) >= MIN_GAIN_POINTS else "MISS"
        print(f"{target} (gains {', '.join(f'{g:+.2f}' for g in gains)}) → {verdict}")
    elif models:
        print(f"{target} → NOT MEASURED (no uniform model timed within ±{EQUAL_LATENCY:.0%} of its match)")


if __name__ == "__main__":
    main({"resnet18": resnet18, "mobilenet_v2": mobilenet_v2, "board": board}, __doc__,
         "edgesmith-latency-budget-", on_done=summary)
