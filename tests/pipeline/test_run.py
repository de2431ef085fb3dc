import json
import os
import signal
import subprocess
import sys
import time

import pytest

from edgesmith.errors import BudgetError, ModelError
from edgesmith.pipeline.config import BudgetConfig
from edgesmith.pipeline.recipe import load_recipe
from edgesmith.pipeline.report import check_budget
from edgesmith.pipeline.run import run
from tests.conftest import FAST, REPO, chosen

ROW_KEYS = {"stage", "target", "accuracy", "params", "macs", "onnx_bytes", "latency_ms"}


def test_run_writes_every_artifact_and_rerun_executes_nothing(tmp_path, cache_dir):
    recipe = load_recipe(None, FAST)
    first = run(recipe, tmp_path / "run", cache_dir)
    # x86-host: no INT8 model (no qat/ptq stage), so ONNX Runtime FP32 and TVM FP32 are compiled, checked, timed
    # outputs: the reference (the trained model) and the export on the validation inputs, for fidelity
    assert first.executed == ["model", "train", "outputs", "onnx", "latency", "export", "outputs", "compile", "check",
                              "compile", "check", "bundle"]
    out = tmp_path / "run"
    for path in ("recipe.yaml", "manifest.json", "results.json", "results.md", "stages/01-train/model.safetensors",
                 "stages/01-train/sidecar.json", "export/model.onnx", "export/io.json", "export/sidecar.json",
                 "targets/x86-host/onnxruntime-fp32/model.onnx", "targets/x86-host/tvm-fp32/model.so",
                 "bundles/x86-host/manifest.json"):
        assert (out / path).is_file(), path
    rows = json.loads((out / "results.json").read_text())
    assert all(ROW_KEYS <= set(r) for r in rows)
    host = chosen(rows, "x86-host")
    assert host["latency_ms"]["p50"] <= host["latency_ms"]["p90"] <= host["latency_ms"]["p99"]
    assert host["accuracy"] > 30 and host["onnx_bytes"] > 1000  # one epoch on real digits beats chance (10%)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["versions"]["torch"].startswith("2.") and manifest["recipe"]["name"] == recipe.name
    assert "export/model.onnx" in manifest["hashes"]

    second = run(recipe, tmp_path / "run2", cache_dir)
    assert second.executed == []
    assert second.rows == first.rows


def test_changing_one_stage_recomputes_from_that_stage_on(tmp_path, cache_dir):
    run(load_recipe(None, FAST), tmp_path / "a", cache_dir)
    export_changed = run(load_recipe(None, FAST + ["export.slim=false"]), tmp_path / "b", cache_dir)
    per_target = ["compile", "check", "compile", "check", "bundle"]   # ORT FP32 and TVM FP32 on x86-host
    assert export_changed.executed == ["onnx", "latency", "export", "outputs", *per_target]
    train_changed = run(load_recipe(None, FAST + ["stages.0.lr=0.001"]), tmp_path / "c", cache_dir)
    assert train_changed.executed == ["train", "outputs", "onnx", "latency", "export", "outputs", *per_target]


def test_training_is_deterministic_for_a_seed(tmp_path):
    a = run(load_recipe(None, FAST), tmp_path / "a", tmp_path / "cache-a")
    b = run(load_recipe(None, FAST), tmp_path / "b", tmp_path / "cache-b")
    assert (tmp_path / "a/stages/01-train/model.safetensors").read_bytes() == \
        (tmp_path / "b/stages/01-train/model.safetensors").read_bytes()
    assert a.rows[0]["accuracy"] == b.rows[0]["accuracy"]


def test_sigkill_mid_stage_resumes_with_the_same_results(tmp_path):
    args = [sys.executable, "-m", "edgesmith", "run", "--set", "data.name=digits", "--set",
            "stages=[{kind: train, epochs: 6}]", "--set", "bench.runs=10"]
    reference = subprocess.run(args + ["--out", str(tmp_path / "ref"), "--cache-dir", str(tmp_path / "c-ref")],
                               capture_output=True, text=True, cwd=REPO, timeout=300)
    assert reference.returncode == 0, reference.stderr[-2000:]

    cache = tmp_path / "c"
    victim = subprocess.Popen(args + ["--out", str(tmp_path / "run"), "--cache-dir", str(cache)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    deadline = time.time() + 120
    while not list(cache.glob(".tmp-train-*")) and time.time() < deadline:  # wait until training is under way
        time.sleep(0.05)
    time.sleep(0.5)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    assert list(cache.glob("model-*")) and not list(cache.glob("train-*")), "the kill must land mid-train"

    resumed = subprocess.run(args + ["--out", str(tmp_path / "run"), "--cache-dir", str(cache)],
                             capture_output=True, text=True, cwd=REPO, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    manifest = json.loads((tmp_path / "run/manifest.json").read_text())
    assert {s["kind"]: s["cached"] for s in manifest["steps"]}["model"] is True
    assert {s["kind"]: s["cached"] for s in manifest["steps"]}["train"] is False
    assert not list(cache.glob(".tmp-*"))
    strip = lambda rows: [{k: v for k, v in r.items() if k != "latency_ms"} for r in rows]  # noqa: E731
    assert strip(json.loads((tmp_path / "run/results.json").read_text())) == \
        strip(json.loads((tmp_path / "ref/results.json").read_text()))


USER_MODEL = '''
import torch.nn as nn


class Odd(nn.Module):
    """An architecture the registry has never seen: grouped convs, SiLU, a residual, no input_spec."""
    def __init__(self, width):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.SiLU())
        self.body = nn.Sequential(nn.Conv2d(width, width, 3, padding=1, groups=4), nn.SiLU())
        self.pool = nn.AdaptiveAvgPool2d(3)
        self.head = nn.Linear(width * 9, 10)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.body(x)
        return self.head(self.pool(x).flatten(1))


def build(width=16):
    return Odd(width)
'''


def test_users_own_model_from_a_file(tmp_path, cache_dir):
    (tmp_path / "mine.py").write_text(USER_MODEL)
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(f"""
name: user-model
model:
  factory: {tmp_path / 'mine.py'}:build
  kwargs: {{width: 16}}
  inputs: [{{name: pixels, shape: [1, 1, 12, 12], mean: [0.5], std: [0.5]}}]
data: {{name: digits}}
stages: [{{kind: train, epochs: 3}}]
bench: {{runs: 10, warmup: 1}}
""")
    result = run(load_recipe(recipe_file), tmp_path / "run", cache_dir)
    io = json.loads((tmp_path / "run/export/io.json").read_text())
    assert io["inputs"][0]["name"] == "pixels" and io["inputs"][0]["shape"] == [1, 1, 12, 12]
    assert result.rows[-1]["target"] == "x86-host" and result.rows[-1]["accuracy"] > 50

    (tmp_path / "mine.py").write_text(USER_MODEL.replace("nn.SiLU()", "nn.GELU()"))  # edited code: no stale cache
    assert run(load_recipe(recipe_file), tmp_path / "run", cache_dir).executed[0] == "model"


def test_model_without_input_spec_asks_for_one(tmp_path, cache_dir):
    (tmp_path / "mine.py").write_text(USER_MODEL)
    recipe = load_recipe(None, [f"model={{factory: '{tmp_path / 'mine.py'}:build'}}", "data.name=synthetic",
                                "stages=[]"])
    with pytest.raises(ModelError, match="add model.inputs"):
        run(recipe, tmp_path / "run", cache_dir)


def test_synthetic_data_reports_accuracy_as_not_available(tmp_path, cache_dir):
    recipe = load_recipe(None, ["data.name=synthetic", "stages=[]", "bench.runs=5"])
    result = run(recipe, tmp_path / "run", cache_dir)
    assert [r["accuracy"] for r in result.rows] == [None] * len(result.rows) and len(result.rows) >= 3
    assert "n/a" in (tmp_path / "run/results.md").read_text()


def test_checkpoint_from_an_earlier_run_is_evaluated_and_deployed(tmp_path, cache_dir):
    trained = run(load_recipe(None, FAST), tmp_path / "a", cache_dir)
    checkpoint = tmp_path / "a/stages/01-train/model.safetensors"
    reused = run(load_recipe(None, FAST + [f"model.checkpoint={checkpoint}", "stages=[]"]), tmp_path / "b", cache_dir)
    assert reused.rows[0]["stage"] == "model"
    assert reused.rows[0]["accuracy"] == trained.rows[0]["accuracy"]
    assert reused.rows[-1]["target"] == "x86-host"


def test_budget_names_the_stage_that_overspent():
    rows = [{"stage": "train", "target": None, "accuracy": 99.0},
            {"stage": "export", "target": None, "accuracy": 97.5},
            {"stage": "export", "target": "x86-host", "accuracy": 97.5}]
    check_budget(rows, BudgetConfig(max_accuracy_drop=2.0))
    check_budget(rows, BudgetConfig())
    with pytest.raises(BudgetError, match=r"stage 'export' dropped accuracy 99.00% → 97.50% \(1.50 points"):
        check_budget(rows, BudgetConfig(max_accuracy_drop=1.0))
    iou = [{**r, "metric": "tasks.py:iou", "accuracy": r["accuracy"] / 100} for r in rows]
    with pytest.raises(BudgetError, match=r"dropped metric tasks.py:iou 0.99 → 0.975 \(0.015 points"):
        check_budget(iou, BudgetConfig(max_accuracy_drop=0.01))
