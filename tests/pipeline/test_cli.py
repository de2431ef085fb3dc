import json
from pathlib import Path

import onnx
import pytest

from tests.conftest import FAST, chosen, edgesmith
from tests.targets.conftest import tiny_cnn


@pytest.mark.parametrize("command", [[], ["run"], ["models"], ["targets"], ["targets", "show"], ["bundle", "verify"],
                                     ["board", "emulate"]])
def test_help_on_every_command(command):
    proc = edgesmith(*command, "--help", check=True)
    assert "Usage" in proc.stdout


def test_models_and_targets_listings():
    assert all(n in edgesmith("models", check=True).stdout
               for n in ("mnist_cnn", "resnet18", "mobilenet_v2", "tiny_transformer"))
    assert "x86-host" in edgesmith("targets", check=True).stdout
    shown = edgesmith("targets", "show", "x86-host", check=True).stdout
    assert "arch: x86_64" in shown and "backends:" in shown and "cpu:" in shown


def test_bad_input_is_one_line_without_traceback():
    proc = edgesmith("run", "--set", "stages.0.epochs=-3")
    assert proc.returncode == 2
    assert "stages.0.epochs" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert edgesmith("targets", "show", "nope").returncode == 2
    debug = edgesmith("run", "--set", "stages.0.epochs=-3", "--debug")
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_dry_run_prints_the_resolved_recipe(tmp_path):
    proc = edgesmith("run", "--dry-run", "--set", "stages.0.epochs=2", "--out", str(tmp_path / "r"), check=True)
    assert "epochs: 2" in proc.stdout and not (tmp_path / "r").exists()


def test_targets_option_replaces_the_recipes_targets_and_profiles_print_unicode():
    proc = edgesmith("run", "--dry-run", "--targets", "x86-host, raspberry-pi-4", check=True)
    assert "targets:\n- x86-host\n- raspberry-pi-4\n" in proc.stdout
    wrong = edgesmith("run", "--dry-run", "--targets", "x86-hots")
    assert wrong.returncode == 2 and "did you mean 'x86-host'" in wrong.stderr
    assert "4× Cortex-A57" in edgesmith("targets", "show", "jetson-nano", check=True).stdout


SHORT_DEFAULT = ("--set", "stages.0.epochs=2", "--set", "stages.1.finetune.epochs=1", "--set", "stages.2.epochs=1",
                 "--set", "bench.runs=20", "--set", "budget.max_accuracy_drop=null")


def test_default_recipe_end_to_end(tmp_path):
    out = tmp_path / "run"
    proc = edgesmith("run", *SHORT_DEFAULT, "--out", str(out), "--cache-dir", str(tmp_path / "cache"), check=True)
    for column in ("stage", "metric", "cosine", "PSNR", "params", "MACs", "ONNX", "zipped", "p50", "p99"):
        assert column in proc.stdout
    rows = json.loads((out / "results.json").read_text())
    assert [r["stage"] for r in rows if r["target"] is None] == ["train", "prune", "export", "qat:ort-x86"]
    export = next(r for r in rows if r["stage"] == "export")
    assert export["parity"]["top1_agreement"] >= 0.99 and export["parity"]["max_abs_diff"] < 1e-3
    assert export["accuracy"] > 80  # two epochs on the real MNIST-5k digits, pruned, one epoch of fine-tuning
    candidates = [r for r in rows if r["target"] == "x86-host"]
    assert [(r["backend"], r["precision"]) for r in candidates] == [("onnxruntime", "int8"), ("onnxruntime", "fp32"),
                                                                    ("tvm", "fp32")]
    host = chosen(rows, "x86-host")   # every candidate runs here, so the choice is the fastest measured
    assert host["latency_ms"]["p50"] == min(r["latency_ms"]["p50"] for r in candidates)
    assert all(r["parity"]["max_abs_diff"] < 1e-3 for r in candidates) and host["accuracy"] > 80
    # fidelity to the trained model (the reference) on every row after it; INT8 gated against the FP32 model
    assert all(r["fidelity"]["cosine"] > 0.9 and r["fidelity"]["psnr_db"] > 10 for r in rows)
    assert next(r for r in rows if r["stage"] == "train")["fidelity"]["cosine"] == pytest.approx(1.0)
    qat = next(r for r in rows if r["stage"] == "qat:ort-x86" and r["target"] is None)
    assert qat["int8_vs_fp32"]["passed"] and qat["int8_vs_fp32"]["top1_agreement"] >= 0.97
    assert (out / "bundles/x86-host/manifest.json").is_file()
    again = edgesmith("run", *SHORT_DEFAULT, "--out", str(out), "--cache-dir", str(tmp_path / "cache"), check=True)
    assert "nothing, all cached" in again.stdout


def test_fast_recipe_cli_variant_runs(tmp_path):
    args = [a for item in FAST for a in ("--set", item)]
    edgesmith("run", *args, "--out", str(tmp_path / "r"), "--cache-dir", str(tmp_path / "c"), check=True)
    assert (tmp_path / "r/results.md").is_file()


def test_evaluate_scores_any_onnx_file_on_the_validation_split(tmp_path):
    args = [a for item in FAST for a in ("--set", item)]
    edgesmith("run", *args, "--out", str(tmp_path / "r"), "--cache-dir", str(tmp_path / "c"), check=True)
    rows = json.loads((tmp_path / "r/results.json").read_text())
    proc = edgesmith("evaluate", str(tmp_path / "r/export/model.onnx"), str(tmp_path / "r/recipe.yaml"), check=True)
    scored = json.loads(proc.stdout)
    assert scored["accuracy"] == next(r for r in rows if r["stage"] == "export")["accuracy"]
    missing = edgesmith("evaluate", str(tmp_path / "nope.onnx"), str(tmp_path / "r/recipe.yaml"))
    assert missing.returncode == 2 and "nope.onnx' does not exist" in missing.stderr


USER_MODELS = '''
import torch.nn as nn

def raising():
    raise RuntimeError("weights server unreachable: connection refused")

def linear():
    return nn.Sequential(nn.Flatten(), nn.Linear(10, 2))

class DataDependent(nn.Module):
    def forward(self, x):
        return x * 2 if x.sum() > 0 else x[:, :2]

def data_dependent():
    return DataDependent()
'''
IMAGE_8 = "inputs: [{name: input, shape: [1, 3, 8, 8]}]"


def _one_line_cases(tmp: Path) -> dict:
    (tmp / "mine.py").write_text(USER_MODELS)
    (tmp / "latin1.yaml").write_bytes("name: caf\xe9\n".encode("latin-1"))
    (tmp / "broken.yaml").write_text("name: x\nmodel: {name: mnist_cnn\ndata: {name: digits}\n")
    (tmp / "garbage.onnx").write_bytes(b"\x08\x07not a protobuf at all")
    onnx.save(tiny_cnn(), str(tmp / "other_model.onnx"))   # input [batch, 1, 12, 12]; the default model takes 28×28
    def model(factory: str) -> str:
        return f"model={{factory: '{tmp / 'mine.py'}:{factory}', {IMAGE_8}}}"
    synthetic = ("--set", "data.name=synthetic", "--set", "stages=[]", "--out", str(tmp / "run"),
                 "--cache-dir", str(tmp / "cache"))
    return {   # case: (arguments, what the one line must say)
        "bad --set YAML": (("run", "--set", "stages=[{kind: train"), "not valid YAML"),
        "recipe not UTF-8": (("run", str(tmp / "latin1.yaml")), "not UTF-8"),
        "YAML syntax error": (("run", str(tmp / "broken.yaml")), "line 3, column"),
        "factory raises": (("run", "--set", model("raising"), *synthetic),
                           "raised RuntimeError: weights server unreachable: connection refused"),
        "forward fails on the shape": (("run", "--set", model("linear"), *synthetic),
                                       "'input' float32[2, 3, 8, 8] (rank 4): RuntimeError: mat1 and mat2"),
        "inputs rank mismatch": (("run", "--set", "model.inputs=[{name: input, shape: [1, 28, 28]}]", *synthetic),
                                 "'input' float32[2, 28, 28] (rank 3)"),
        "evaluate a corrupt ONNX": (("evaluate", str(tmp / "garbage.onnx"), "--set", "data.name=digits"),
                                    "cannot be loaded by ONNX Runtime"),
        "evaluate another model's ONNX": (("evaluate", str(tmp / "other_model.onnx"), "--set", "data.name=digits"),
                                          r"'input' has shape [1, 1, 28, 28]; the model takes 'input' "
                                          "float32[batch, 1, 12, 12]"),
        "dynamo data-dependent branch": (("run", "--set", model("data_dependent"), *synthetic),
                                         "branches on a tensor's value"),
    }


CASES = ["bad --set YAML", "recipe not UTF-8", "YAML syntax error", "factory raises", "forward fails on the shape",
         "inputs rank mismatch", "evaluate a corrupt ONNX", "evaluate another model's ONNX",
         "dynamo data-dependent branch"]


@pytest.mark.parametrize("case", CASES)
def test_user_errors_are_one_line_with_exit_code_2(case, tmp_path):
    arguments, says = _one_line_cases(tmp_path)[case]
    proc = edgesmith(*arguments)
    lines = proc.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
    assert says in errors[0], errors[0]
    assert "Traceback" not in proc.stderr and "\x1b" not in proc.stderr
    if case in ("factory raises", "dynamo data-dependent branch"):   # --debug keeps the user's traceback
        debug = edgesmith(*arguments, "--debug")
        assert debug.returncode != 0 and "Traceback" in debug.stderr
        assert ("weights server unreachable" if case == "factory raises" else "x.sum() > 0") in debug.stderr
