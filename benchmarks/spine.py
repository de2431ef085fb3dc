"""Spine benchmark: the default recipe end to end (cold cache), then a warm re-run, as a user runs them.

    python -m edgesmith.benchmarks.spine [--out DIR] [--json FILE]

Prints each step's wall time, the totals and the accuracy against the targets: cold run < 180 s,
warm re-run < 10 s, mnist_cnn validation accuracy ≥ 98 %. Runs the CLI in a subprocess (benchmarks never
import the pipeline), so interpreter start-up and imports are part of the figures.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGETS = {"cold_s": 180.0, "warm_s": 10.0, "accuracy": 98.0}   # default recipe: train → prune → QAT


def timed_run(out: Path, cache: Path) -> float:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "edgesmith", "run", "--out", str(out), "--cache-dir", str(cache)],
                          capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"edgesmith run failed:\n{proc.stderr[-3000:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="run folder (default: a temporary one)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="edgesmith-bench-"))
    out, cache = args.out or work / "run", work / "cache"

    cold = timed_run(out, cache)
    manifest = json.loads((out / "manifest.json").read_text())
    warm = timed_run(out, cache)
    warm_manifest = json.loads((out / "manifest.json").read_text())
    rows = json.loads((out / "results.json").read_text())
    accuracy = next(r["accuracy"] for r in rows if r["stage"] == "train")
    host = next(r for r in rows if r["target"] == "x86-host")

    print(f"{'step':<10}{'cold s':>10}{'warm s':>10}")
    for cold_step, warm_step in zip(manifest["steps"], warm_manifest["steps"]):
        print(f"{cold_step['kind']:<10}{cold_step['seconds']:>10.2f}{warm_step['seconds']:>10.2f}")
    figures = {"cold_s": cold, "warm_s": warm, "accuracy": accuracy, "onnx_accuracy": host["accuracy"],
               "host_p50_ms": host["latency_ms"]["p50"], "warm_executed": [s["kind"] for s in warm_manifest["steps"]
                                                                         if not s["cached"]]}
    verdicts = {"cold_s": cold < TARGETS["cold_s"], "warm_s": warm < TARGETS["warm_s"],
                "accuracy": accuracy >= TARGETS["accuracy"]}
    print(f"{'total (process wall)':<22}cold {cold:.1f} s (target < {TARGETS['cold_s']:.0f}) "
          f"{'PASS' if verdicts['cold_s'] else 'MISS'}; warm {warm:.1f} s (target < {TARGETS['warm_s']:.0f}) "
          f"{'PASS' if verdicts['warm_s'] else 'MISS'}")
    print(f"mnist_cnn val accuracy {accuracy:.2f}% torch, {host['accuracy']:.2f}% ONNX Runtime "
          f"(target ≥ {TARGETS['accuracy']:.0f}) {'PASS' if verdicts['accuracy'] else 'MISS'}; "
          f"host ORT p50 {host['latency_ms']['p50']:.3f} ms")
    if args.json:
        args.json.write_text(json.dumps({"figures": figures, "targets": TARGETS, "pass": verdicts}, indent=2))


if __name__ == "__main__":
    main()
