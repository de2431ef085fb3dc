"""TVM on this host, untuned and MetaSchedule-tuned with a stated trial budget, vs ONNX Runtime FP32; and the TVM
cross-compile time of every aarch64 profile.

    python -m edgesmith.benchmarks.tvm [--models mnist_cnn resnet18 mobilenet_v2] [--trials 32] [--json FILE]

Each figure comes from the pipeline itself (one `edgesmith batch` in a fresh process, where tuning runs alone on
the host; weights at random initialisation, which does not change latency): the x86-host target times ONNX Runtime
FP32 and TVM FP32 through the same harness, one after the other, and the aarch64 targets record their cross-compile
seconds. Ratios are ORT p50 / TVM p50: above 1 means TVM is faster. Emulated or cross-compiled artifacts are never
timed.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from edgesmith.benchmarks.compression import pipeline_runs

MODELS = {"mnist_cnn": "{}", "resnet18": "{num_classes: 10, image_size: 64}",
          "mobilenet_v2": "{num_classes: 10, image_size: 96}"}
ARM_PROFILES = ["raspberry-pi-4", "raspberry-pi-5", "android-arm64", "jetson-nano", "jetson-xavier-nx",
                "jetson-orin-nano", "jetson-agx-orin"]


def run_sets(model: str, kwargs: str, trials: int, targets: list[str]) -> list[str]:
    return [f"model.name={model}", f"model.kwargs={kwargs}", "data.name=synthetic", "stages=[]",
            "compile.precisions=[fp32]", f"compile.tvm.tuning_trials={trials}", "bench.runs=50", "bench.warmup=5",
            f"targets=[{', '.join(targets)}]", "budget.max_accuracy_drop=null"]


def host_p50(rows: list[dict], backend: str) -> float:
    return next(r for r in rows if r["target"] == "x86-host" and r["backend"] == backend)["latency_ms"]["p50"]


def bench_model(model: str, kwargs: str, trials: int, work: Path) -> dict:
    runs = pipeline_runs({f"{model}-untuned": run_sets(model, kwargs, 0, ["x86-host", *ARM_PROFILES]),
                          f"{model}-tuned": run_sets(model, kwargs, trials, ["x86-host"])}, work, work / "cache")
    (untuned_out, untuned), (tuned_out, tuned) = runs[f"{model}-untuned"], runs[f"{model}-tuned"]
    tuning = json.loads((tuned_out / "targets/x86-host/tvm-fp32/compile.json").read_text())["tuning"]
    cross = {}
    for profile in ARM_PROFILES:
        facts = untuned_out / f"targets/{profile}/tvm-fp32/compile.json"
        cross[profile] = json.loads(facts.read_text())["compile_seconds"] if facts.is_file() else None
    ort = host_p50(untuned, "onnxruntime")
    result = {"model": model, "ort_fp32_p50_ms": ort, "tvm_untuned_p50_ms": host_p50(untuned, "tvm"),
              "tvm_tuned_p50_ms": host_p50(tuned, "tvm"), "trials": trials, "tuning_seconds": tuning["seconds"],
              "cross_compile_seconds": cross}
    result["ratio_untuned"] = ort / result["tvm_untuned_p50_ms"]
    result["ratio_tuned"] = ort / result["tvm_tuned_p50_ms"]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--trials", type=int, default=32, help="MetaSchedule trial budget per model")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory(prefix="edgesmith-tvm-bench-") as work:
        print(f"{'model':<14}{'ORT p50':>10}{'TVM untuned':>13}{'ORT/TVM':>9}{'TVM tuned':>11}{'ORT/TVM':>9}"
              f"{'trials':>8}{'tuning s':>10}")
        for model in args.models:
            r = bench_model(model, MODELS[model], args.trials, Path(work))
            results.append(r)
            print(f"{model:<14}{r['ort_fp32_p50_ms']:>10.3f}{r['tvm_untuned_p50_ms']:>13.3f}{r['ratio_untuned']:>9.2f}"
                  f"{r['tvm_tuned_p50_ms']:>11.3f}{r['ratio_tuned']:>9.2f}{r['trials']:>8}{r['tuning_seconds']:>10.1f}")
        print("\ncross-compile seconds (TVM, untuned, aarch64 ELF .so):")
        for r in results:
            print(f"  {r['model']:<14}" + "  ".join(f"{p} {s:.1f}" if s is not None else f"{p} —"
                                                    for p, s in r["cross_compile_seconds"].items()))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
