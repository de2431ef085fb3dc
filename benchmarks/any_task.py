"""Benchmarks B6 (a dense-output segmenter) and B7 (an embedding model): label-free compression measured by fidelity.

    python -m edgesmith.benchmarks.any_task [b6 b7 | all] [--quick] [--json FILE] [--cache-dir DIR]

Each trains its reference model on real data (B6: a U-Net segmenting MNIST-5k digits from their background, masks
from the images; B7: the tiny transformer with a mean-pooled embedding head, trained on scikit-learn's digits as
pixel tokens, then used as an embedding model), then compresses it two ways with the pipeline's CLI: INT8 (PTQ)
of the FP32 model, and 50 % channel/head pruning with label-free distillation followed by QAT (distilled too).
Fidelity (cosine, PSNR against the FP32 reference, mask IoU for the segmenter) comes from each run's results.json;
latency is timed here with ONNX Runtime, interleaved round by round (see compression.py).
Targets: INT8 cosine ≥ 0.99 against FP32; pruned 50 % + QAT ≥ 2.5× lower p50 with cosine ≥ 0.97.
"""
from __future__ import annotations

import json
from pathlib import Path

from edgesmith.benchmarks.compression import main, pipeline_run, pipeline_runs, side_by_side

INT8_MIN_COSINE, PRUNED_MIN_COSINE, MIN_SPEEDUP = 0.99, 0.97, 2.5


def _yaml(value) -> str:
    return json.dumps(value)   # JSON is YAML: --set values keep their types


def _reference_and_compressed(name: str, train_model: dict, model: dict, train_data: dict, data: dict, train: dict,
                              prune: dict, qat: dict, metric, work: Path, cache: Path) -> dict:
    """Trains `train_model`, then runs PTQ and prune + distillation + QAT on `model` with those weights (the same
    module; an embedding model trains as a classifier); returns the figures."""
    common = [f"metric={_yaml(metric)}", "targets=[x86-host]", "compile.precisions=[int8, fp32]",
              "budget.max_accuracy_drop=null", "bench.runs=50", "bench.warmup=5"]
    trained, _ = pipeline_run(f"{name}-reference", [f"model={_yaml(train_model)}", f"data={_yaml(train_data)}",
                                                    f"stages=[{_yaml(train)}]", "targets=[]",
                                                    "budget.max_accuracy_drop=null"], work, cache)
    reference = {**model, "checkpoint": str(trained / "stages/01-train/model.safetensors")}
    on_reference = [f"model={_yaml(reference)}", f"data={_yaml(data)}", *common]
    runs = pipeline_runs({f"{name}-ptq": [*on_reference, "stages=[{kind: ptq}]"],
                          f"{name}-pruned": [*on_reference, f"stages=[{_yaml(prune)}, {_yaml(qat)}]"]}, work, cache)
    (ptq_out, ptq_rows), (pruned_out, pruned_rows) = runs[f"{name}-ptq"], runs[f"{name}-pruned"]
    rows = {"fp32": (_stage(ptq_rows, "export"), ptq_out / "export/model.onnx"),
            "int8 (ptq)": (_stage(ptq_rows, "ptq:ort-x86"), ptq_out / "stages/01-ptq-ort-x86/model.onnx"),
            "pruned 50% + distilled": (_stage(pruned_rows, "prune"), pruned_out / "stages/01-prune/onnx/model.onnx"),
            "pruned + qat int8": (_stage(pruned_rows, "qat:ort-x86"), pruned_out / "stages/02-qat-ort-x86/model.onnx")}
    latency = side_by_side({label: path for label, (_, path) in rows.items()}, batch=1, runs=200)
    table = [{"model": label, "metric": row["accuracy"], "cosine": row["fidelity"]["cosine"],
              "psnr_db": row["fidelity"]["psnr_db"],
              "int8_vs_fp32_cosine": (row.get("int8_vs_fp32") or {}).get("cosine"),
              "params": row["params"], "onnx_bytes": path.stat().st_size, "p50_ms": latency[label],
              "speedup": latency["fp32"] / latency[label]} for label, (row, path) in rows.items()]
    return _report(name, table)


def _stage(rows: list[dict], stage: str) -> dict:
    return next(r for r in rows if r["stage"] == stage and r["target"] is None)


def _report(name: str, table: list[dict]) -> dict:
    print(f"\n{name}")
    print(f"{'model':<24}{'metric':>8}{'cosine':>9}{'PSNR dB':>9}{'vs FP32':>9}{'params':>9}{'p50 ms':>9}{'×':>7}")
    for r in table:
        vs = "" if r["int8_vs_fp32_cosine"] is None else f"{r['int8_vs_fp32_cosine']:.4f}"
        metric = "n/a" if r["metric"] is None else f"{r['metric']:.4f}"
        print(f"{r['model']:<24}{metric:>8}{r['cosine']:>9.4f}{r['psnr_db']:>9.1f}{vs:>9}{r['params']:>9}"
              f"{r['p50_ms']:>9.3f}{r['speedup']:>6.2f}×")
    by = {r["model"]: r for r in table}
    verdict = {"int8_cosine": by["int8 (ptq)"]["int8_vs_fp32_cosine"] >= INT8_MIN_COSINE
               and by["pruned + qat int8"]["int8_vs_fp32_cosine"] >= INT8_MIN_COSINE,
               "pruned_qat_cosine": by["pruned + qat int8"]["cosine"] >= PRUNED_MIN_COSINE,
               "pruned_qat_speedup": by["pruned + qat int8"]["speedup"] >= MIN_SPEEDUP}
    print(f"targets: INT8 cosine ≥ {INT8_MIN_COSINE} vs FP32, pruned+QAT cosine ≥ {PRUNED_MIN_COSINE} and "
          f"≥ {MIN_SPEEDUP}× → " + ", ".join(f"{k} {'PASS' if v else 'MISS'}" for k, v in verdict.items()))
    return {"rows": table, "pass": verdict}


def b6(work: Path, cache: Path, quick: bool) -> dict:
    """U-Net on MNIST-5k masks; mask IoU is the task metric (the masks feed no loss after training)."""
    masks, unet = {"name": "mnist5k", "targets": "masks"}, {"name": "unet", "kwargs": {"width": 32}}
    return _reference_and_compressed(
        "B6 segmenter (U-Net, MNIST masks)", unet, unet, masks, masks,
        {"kind": "train", "epochs": 1 if quick else 4, "lr": 0.01, "augment": False},
        {"kind": "prune", "ratio": 0.5, "finetune": {"epochs": 1 if quick else 4, "lr": 0.003, "augment": False,
                                                     "distill": True}},
        {"kind": "qat", "epochs": 1, "augment": False, "distill": True},
        {"fn": "edgesmith.benchmarks.tasks:mask_iou"}, work, cache)


def b7(work: Path, cache: Path, quick: bool) -> dict:
    """Tiny transformer trained as a digit classifier, compressed as an embedding model without labels."""
    size = {"vocab_size": 17, "seq_len": 64, "dim": 384, "depth": 4, "num_heads": 12, "num_classes": 10,
            "pooling": "mean", "dropout": 0.0}   # a sentence encoder's width (MiniLM: 384, 12 heads)
    tokens = {"factory": "edgesmith.benchmarks.tasks:digit_tokens"}
    figures = _reference_and_compressed(
        "B7 embedding model (tiny transformer, mean-pooled)", {"name": "tiny_transformer", "kwargs": size},
        {"name": "tiny_transformer", "kwargs": {**size, "output": "embedding"}},
        tokens, {**tokens, "kwargs": {"targets": "none"}},
        {"kind": "train", "epochs": 2 if quick else 8, "lr": 0.0005, "augment": False},
        {"kind": "prune", "ratio": 0.5, "finetune": {"epochs": 1 if quick else 6, "lr": 0.0005, "augment": False,
                                                     "distillation": {"loss": "cosine"}}},
        {"kind": "qat", "epochs": 1 if quick else 2, "lr": 0.0001, "augment": False,
         "distillation": {"loss": "cosine"}},
        "none", work, cache)
    return {**figures, "int8_speed_at_minilm_size": _int8_speed_at_minilm_size(work, cache)}


def _int8_speed_at_minilm_size(work: Path, cache: Path) -> dict:
    """The same architecture at a sentence encoder's size (MiniLM: 384 wide, 12 heads, 128 tokens; 4 layers here),
    random weights, PTQ calibrated on random tokens: a latency figure only, FP32 vs INT8 (ort-x86)."""
    minilm = {"vocab_size": 1000, "seq_len": 128, "dim": 384, "depth": 4, "num_heads": 12, "num_classes": 2,
              "pooling": "mean", "output": "embedding", "dropout": 0.0}
    out, _ = pipeline_run("B7 int8 speed at MiniLM size", [
        f"model={_yaml({'name': 'tiny_transformer', 'kwargs': minilm})}", "data={name: synthetic, samples: 64}",
        "stages=[{kind: ptq, calibration_samples: 32, schemes: [ort-x86]}]", "targets=[]",
        "budget.max_accuracy_drop=null", "bench.runs=20", "bench.warmup=2"], work, cache)
    latency = side_by_side({"fp32": out / "export/model.onnx", "int8": out / "stages/01-ptq-ort-x86/model.onnx"},
                           batch=1, runs=100)
    speedup = latency["fp32"] / latency["int8"]
    print(f"INT8 at MiniLM size (384 wide, 4 layers, 128 tokens): FP32 {latency['fp32']:.3f} ms, INT8 "
          f"{latency['int8']:.3f} ms → {speedup:.2f}× ({'PASS' if speedup > 1 else 'MISS'}: INT8 faster than FP32)")
    return {"p50_ms": latency, "speedup": speedup, "pass": speedup > 1}


BENCHMARKS = {"b6": b6, "b7": b7}


if __name__ == "__main__":
    main(BENCHMARKS, __doc__, "edgesmith-any-task-")
