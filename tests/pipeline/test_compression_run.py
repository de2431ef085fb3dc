"""The compression stages inside the pipeline: per-stage rows, the per-scheme branch, the budget and failures."""
import json

import pytest

from edgesmith.errors import BudgetError, TrainingError
from edgesmith.pipeline.recipe import load_recipe
from edgesmith.pipeline.run import run
from tests.conftest import FAST, FAST_COMPRESSION, edgesmith


def test_every_stage_reports_onnx_size_and_host_latency(tmp_path, cache_dir):
    result = run(load_recipe(None, FAST_COMPRESSION), tmp_path / "run", cache_dir)
    rows = {(r["stage"], r["target"], r.get("backend")): r for r in result.rows}
    assert list(rows) == [("train", None, None), ("prune", None, None), ("export", None, None),
                          ("qat:ort-x86", None, None), ("qat:ort-x86", "x86-host", "onnxruntime"),
                          ("export", "x86-host", "onnxruntime"), ("export", "x86-host", "tvm")]
    for row in result.rows:
        assert row["onnx_bytes"] > 0 and row["onnx_zipped_bytes"] > 0 and row["latency_ms"]["p50"] > 0
    train, pruned, qat = rows[("train", None, None)], rows[("prune", None, None)], rows[("qat:ort-x86", None, None)]
    assert pruned["params"] < train["params"] / 2 and pruned["macs"] < train["macs"] / 2
    assert qat["precision"] == "int8" and qat["onnx_bytes"] < pruned["onnx_bytes"] / 1.5
    assert rows[("qat:ort-x86", "x86-host", "onnxruntime")]["precision"] == "int8"
    # fidelity to the trained model on every row; QAT trains on, so its gate also accepts moving towards the reference
    assert all(r["fidelity"]["cosine"] is not None for r in result.rows) and qat["int8_vs_fp32"]["passed"]
    out = tmp_path / "run"
    for path in ("stages/01-train/onnx/model.onnx", "stages/02-prune/onnx/model.onnx",
                 "stages/03-qat-ort-x86/model.onnx", "stages/03-qat-ort-x86/io.json"):
        assert (out / path).is_file(), path
    assert (out / "targets/x86-host/onnxruntime-int8/model.onnx").read_bytes() == \
        (out / "stages/03-qat-ort-x86/model.onnx").read_bytes()   # the target gets its scheme's INT8 file


def test_quantization_branches_per_scheme_and_shares_the_stages_before(tmp_path, cache_dir):
    run(load_recipe(None, FAST_COMPRESSION), tmp_path / "a", cache_dir)
    more = run(load_recipe(None, FAST_COMPRESSION + ["stages.2.schemes=[ort-x86, tensorrt]"]), tmp_path / "b",
               cache_dir)
    # only the new scheme's QAT, its outputs (the INT8 gate, fidelity) and its host latency run
    assert more.executed == ["qat", "outputs", "latency"]
    assert [r["stage"] for r in more.rows if r["target"] is None][-2:] == ["qat:ort-x86", "qat:tensorrt"]
    assert (tmp_path / "b/stages/03-qat-tensorrt/model.onnx").is_file()


def test_ptq_runs_on_the_exported_model(tmp_path, cache_dir):
    stages = "stages=[{kind: train, epochs: 2}, {kind: ptq, calibration: percentile, calibration_samples: 64}]"
    result = run(load_recipe(None, FAST + [stages]), tmp_path / "run", cache_dir)
    assert [r["stage"] for r in result.rows] == ["train", "export", "ptq:ort-x86", "ptq:ort-x86", "export", "export"]
    ptq_on_host = result.rows[3]   # the x86-host candidates: ORT INT8 (the PTQ file), ORT FP32, TVM FP32
    assert (ptq_on_host["target"], ptq_on_host["precision"]) == ("x86-host", "int8") and ptq_on_host["accuracy"] > 50


def test_magnitude_sparsity_shows_in_the_zipped_size_and_survives_qat(tmp_path, cache_dir):
    stages = ("stages=[{kind: train, epochs: 2}, {kind: prune, method: magnitude, final_sparsity: 0.8, "
              "finetune: {epochs: 2}}, {kind: qat, epochs: 1}]")
    rows = {r["stage"]: r for r in run(load_recipe(None, FAST + [stages]), tmp_path / "run", cache_dir).rows
            if r["target"] is None}
    train, sparse = rows["train"], rows["prune"]
    assert sparse["sparsity"] > 0.7 and train["sparsity"] < 0.01
    assert sparse["params"] == train["params"] and sparse["onnx_bytes"] == pytest.approx(train["onnx_bytes"], rel=0.01)
    assert sparse["onnx_zipped_bytes"] < 0.5 * train["onnx_zipped_bytes"]
    assert rows["qat:ort-x86"]["sparsity"] > 0.7
    assert rows["qat:ort-x86"]["onnx_zipped_bytes"] < 0.6 * rows["qat:ort-x86"]["onnx_bytes"]  # int8 zeros compress


def test_budget_stops_at_the_stage_that_overspends_and_keeps_what_finished(tmp_path, cache_dir):
    stages = "stages=[{kind: train, epochs: 3}, {kind: prune, ratio: 0.9}, {kind: qat}]"
    with pytest.raises(BudgetError, match=r"stage 'prune' dropped accuracy .* budget.max_accuracy_drop 1.0"):
        run(load_recipe(None, FAST + [stages, "budget.max_accuracy_drop=1.0"]), tmp_path / "run", cache_dir)
    rows = json.loads((tmp_path / "run/results.json").read_text())
    assert [r["stage"] for r in rows] == ["train", "prune"]
    assert (tmp_path / "run/stages/01-train/model.safetensors").is_file()
    assert not (tmp_path / "run/export").exists()


def test_nan_loss_stops_the_run_and_keeps_the_last_good_artifact(tmp_path, cache_dir):
    stages = "stages=[{kind: train, epochs: 1}, {kind: prune, ratio: 0.5, finetune: {epochs: 1, lr: 1.0e+30}}]"
    proc = edgesmith("run", *[a for item in FAST + [stages] for a in ("--set", item)], "--out", str(tmp_path / "r"),
                     "--cache-dir", str(cache_dir))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "loss became nan" in proc.stderr and "lower its lr" in proc.stderr
    assert (tmp_path / "r/stages/01-train/model.safetensors").is_file()
    assert [r["stage"] for r in json.loads((tmp_path / "r/results.json").read_text())] == ["train"]
    with pytest.raises(TrainingError):
        run(load_recipe(None, FAST + [stages]), tmp_path / "again", cache_dir)
