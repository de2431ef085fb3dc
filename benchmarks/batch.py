"""Batch benchmark: one matrix of 3 models × 2 recipes × 2 targets, run sequentially, in the local process pool, and
on a local Ray instance, each from a cold cache; then a warm re-run.

    python -m edgesmith.benchmarks.batch [--epochs N] [--json FILE]

Each run is `edgesmith batch` in a fresh process (benchmarks never import the pipeline). Its wall time is compared
with its work: the build seconds of every distinct step it ran (a step two jobs share counts once: the cache builds
it once), divided by the cores used (`own ideal`): how well the executor keeps the cores busy with distinct work.
Beside it, `seq ideal` divides the sequential run's step seconds instead: parallel steps take longer than sequential
ones, because two jobs share the cores' caches and memory bandwidth, and because a build pauses while another job
times a model (host latency is measured with the host to itself), which no executor can remove.
Targets: parallel wall ≤ 1.15 × own ideal; a warm re-run of the whole matrix < 15 s.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MAX_OVERHEAD, WARM_LIMIT_S = 1.15, 15.0
MODELS = [{"name": "mnist_cnn"},
          {"name": "mobilenet_v2", "label": "mobilenet_v2", "kwargs": {"num_classes": 10, "in_chans": 1,
                                                                      "image_size": 28, "width_mult": 0.5}},
          {"name": "resnet18", "label": "resnet18", "kwargs": {"num_classes": 10, "in_chans": 1, "image_size": 28}}]
TARGETS = ["x86-host", "raspberry-pi-4"]   # timed here; cross-compiled for the board (never timed)


def write_matrix(folder: Path, executor: dict, epochs: int) -> Path:
    """Recipe `int8`: train, then PTQ per target scheme; recipe `pruned`: the same training (shared), 50 % channel
    pruning with a distilled fine-tune, then PTQ."""
    common = {"data": {"name": "mnist5k"}, "model": {"name": "mnist_cnn"}, "export": {"exporter": "torchscript",
              "opset": 17}, "bench": {"warmup": 5, "runs": 50}, "budget": {"max_accuracy_drop": None}}
    train = {"kind": "train", "epochs": epochs, "batch_size": 64, "augment": False}
    recipes = {"int8": [train, {"kind": "ptq"}],
               "pruned": [train, {"kind": "prune", "ratio": 0.5, "finetune": {"epochs": 1, "distill": True}},
                          {"kind": "ptq"}]}
    for name, stages in recipes.items():
        (folder / f"{name}.yaml").write_text(json.dumps({"name": name, **common, "stages": stages}))
    matrix = folder / "matrix.yaml"
    matrix.write_text(json.dumps({"name": "bench", "recipes": ["int8.yaml", "pruned.yaml"], "models": MODELS,
                                  "targets": TARGETS, "executor": executor}))
    return matrix


def run(folder: Path, executor: dict, cache: Path, epochs: int) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    matrix = write_matrix(folder, executor, epochs)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "edgesmith", "batch", str(matrix), "--out", str(folder / "out"),
                           "--cache-dir", str(cache), "--quiet"], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"edgesmith batch failed ({executor}):\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    batch = json.loads((folder / "out" / "batch.json").read_text())
    built = {}   # distinct steps this run built: key → build seconds
    for job in batch["jobs"]:
        manifest = json.loads((folder / "out" / job["folder"] / "manifest.json").read_text())
        built.update({s["key"]: s["build_seconds"] for s in manifest["steps"] if not s["cached"]})
    cores = min(batch["parallel"], len(os.sched_getaffinity(0))) if batch["parallel"] > 1 else \
        len(os.sched_getaffinity(0))   # one job at a time still uses every core (torch threads)
    return {"executor": batch["executor"], "parallel": batch["parallel"], "wall_s": wall,
            "distinct_steps": len(built), "step_s": sum(built.values()), "cores": cores,
            "own_ideal_s": sum(built.values()) / cores, "jobs": len(batch["jobs"])}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=1, help="training epochs per model (default 1)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="edgesmith-batch-bench-"))
    cores = len(os.sched_getaffinity(0))
    modes = {"sequential": {"kind": "local", "max_parallel": 1}, "local pool": {"kind": "local"},
             "ray (local)": {"kind": "ray"}}
    results = {}
    for label, executor in modes.items():
        print(f"· {label}: cold cache", flush=True)
        results[label] = run(work / label.split()[0], executor, work / f"cache-{label.split()[0]}", args.epochs)
    print("· local pool: warm re-run", flush=True)
    results["warm re-run"] = run(work / "local", modes["local pool"], work / "cache-local", args.epochs)
    sequential = results["sequential"]
    print(f"\nBatch: 3 models × 2 recipes × {len(TARGETS)} targets ({', '.join(TARGETS)}), {cores} cores here")
    print(f"{'run':<14}{'parallel':>9}{'wall s':>9}{'steps':>7}{'step s':>9}{'own ideal':>11}{'wall/own':>10}"
          f"{'seq ideal':>11}{'wall/seq':>10}{'vs seq':>8}")
    for label, r in results.items():
        r["seq_ideal_s"] = sequential["step_s"] / r["cores"] if r["distinct_steps"] else 0.0
        r["own_overhead"] = r["wall_s"] / r["own_ideal_s"] if r["own_ideal_s"] else None
        r["seq_overhead"] = r["wall_s"] / r["seq_ideal_s"] if r["seq_ideal_s"] else None
        r["speedup_vs_sequential"] = sequential["wall_s"] / r["wall_s"]
        own, seq = (f"{r[k]:.2f}" if r[k] else "—" for k in ("own_overhead", "seq_overhead"))
        print(f"{label:<14}{r['parallel']:>9}{r['wall_s']:>9.1f}{r['distinct_steps']:>7}{r['step_s']:>9.1f}"
              f"{r['own_ideal_s']:>11.1f}{own:>10}{r['seq_ideal_s']:>11.1f}{seq:>10}{r['speedup_vs_sequential']:>7.2f}×")
    verdict = {f"{label} wall ≤ {MAX_OVERHEAD} × own ideal": results[label]["own_overhead"] <= MAX_OVERHEAD
               for label in ("local pool", "ray (local)")}
    verdict[f"warm re-run < {WARM_LIMIT_S:.0f} s"] = results["warm re-run"]["wall_s"] < WARM_LIMIT_S
    for name, ok in verdict.items():
        print(f"target: {name} → {'PASS' if ok else 'MISS'}")
    if args.json:
        args.json.write_text(json.dumps({"results": results, "pass": verdict}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
