import json
import os
import re
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from edgesmith.pipeline.openmp_wait import SPIN_COUNT, USER_CHOICES
from tests.conftest import FAST, REPO, chosen, edgesmith
from tests.targets.conftest import tiny_cnn


@pytest.mark.parametrize("command", [[], ["run"], ["batch"], ["bench"], ["runs"], ["report"], ["models"], ["targets"],
                                     ["targets", "show"], ["bundle", "verify"], ["board", "emulate"]])
def test_help_on_every_command(command):
    proc = edgesmith(*command, "--help", check=True)
    assert "Usage" in proc.stdout and "<bool>" not in proc.stdout   # flags are flags; options name what they take
    assert not [line for line in proc.stdout.splitlines() if re.match(r"\s+--[a-z-]+ <", line)]


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


@pytest.fixture(scope="module")
def fast_run(tmp_path_factory):
    """The fast recipe through the CLI with stdout and stderr piped, as in a CI log: (run folder, cache, process)."""
    root = tmp_path_factory.mktemp("fast")
    args = [a for item in FAST for a in ("--set", item)]
    proc = edgesmith("run", *args, "--out", str(root / "r"), "--cache-dir", str(root / "c"), check=True)
    return root / "r", root / "c", proc


def test_in_a_log_progress_is_plain_lines_and_tables_keep_their_natural_width(fast_run):
    out, _, proc = fast_run
    assert "\x1b" not in proc.stdout + proc.stderr and "━" not in proc.stderr   # no escapes, no redrawn bars
    # one line per step at its start and its end, named; the train stage's epoch lines with elapsed and remaining
    assert "▶ train (stage 1) running" in proc.stderr and "✔ train (stage 1) done in" in proc.stderr
    assert "▶ compile x86-host tvm/fp32 running" in proc.stderr
    epoch = next(line for line in proc.stderr.splitlines() if line.strip().startswith("train: "))
    assert "epoch 1/1" in epoch and "val " in epoch and "elapsed" in epoch
    # a table row is one line however long: the host description is never folded into the next lines
    timed = [line for line in proc.stdout.splitlines() if line.startswith(" x86-host") and "fp32" in line]
    assert len(timed) == 2 and all("(x86_64, " in line for line in timed)
    assert max(len(line) for line in proc.stdout.splitlines()) > 120
    # what to ship, and each step built named once
    assert f"ship x86-host: {out}/bundles/x86-host/" in proc.stdout and "open_bundle(" in proc.stdout
    executed = next(line for line in proc.stdout.splitlines() if line.startswith("executed: "))
    names = executed.removeprefix("executed: ").split(", ")
    assert "train (stage 1)" in names and len(names) == len(set(names))


def test_rows_name_their_artifact_and_the_bundle_has_a_readme(fast_run):
    out, _, _ = fast_run
    rows = json.loads((out / "results.json").read_text())
    for row in rows:
        assert row["artifact"] is None or (out / row["artifact"]).is_file(), row
    shipped = chosen(rows, "x86-host")
    assert shipped["bundle"] == "bundles/x86-host" and shipped["artifact"].startswith("targets/x86-host/")
    readme = (out / "bundles/x86-host/README.md").read_text()
    assert "open_bundle(" in readme and "edgesmith_runtime.py --check" in readme and "onnxruntime==" in readme
    assert edgesmith("bundle", "verify", str(out / "bundles/x86-host"), check=True).returncode == 0   # hashed too
    listed = edgesmith("runs", str(out.parent), check=True).stdout
    assert str(out) in listed and "mnist-cnn-edge" in listed and "x86-host: " in listed


def test_json_prints_only_the_rows_and_another_recipe_needs_force(fast_run, tmp_path):
    out, cache, _ = fast_run
    args = [a for item in FAST for a in ("--set", item)]
    same = edgesmith("run", *args, "--out", str(out), "--cache-dir", str(cache), "--json", check=True)
    assert json.loads(same.stdout) == json.loads((out / "results.json").read_text())   # stdout: JSON, nothing else
    other = [*args, "--set", "model.kwargs={width: 8}"]
    refused = edgesmith("run", *other, "--out", str(out), "--cache-dir", str(cache))
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert "holds another recipe's run (model.kwargs.width: — → 8)" in refused.stderr and "--force" in refused.stderr
    assert "width: 8" not in (out / "recipe.yaml").read_text()   # untouched
    copy = tmp_path / "copy"
    edgesmith("run", *args, "--out", str(copy), "--cache-dir", str(cache), "--quiet", check=True)
    (copy / "stages" / "07-left-over").mkdir()
    forced = edgesmith("run", *other, "--out", str(copy), "--cache-dir", str(cache), "--force", "--quiet",
                       check=True)
    assert forced.stderr == "" and "width: 8" in (copy / "recipe.yaml").read_text()
    assert not (copy / "stages" / "07-left-over").exists()   # the folder describes the new run only


def test_evaluate_scores_any_onnx_file_on_the_validation_split(fast_run, tmp_path):
    out, _, _ = fast_run
    rows = json.loads((out / "results.json").read_text())
    proc = edgesmith("evaluate", str(out / "export/model.onnx"), str(out / "recipe.yaml"), check=True)
    scored = json.loads(proc.stdout)
    assert scored["accuracy"] == next(r for r in rows if r["stage"] == "export")["accuracy"]
    missing = edgesmith("evaluate", str(tmp_path / "nope.onnx"), str(out / "recipe.yaml"))
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


def test_the_batch_command_reads_which_executor_to_start_before_validating(tmp_path):
    """`edgesmith batch` starts the local pool's worker server, or Ray, before validating (they start meanwhile):
    the command line's choice over the matrix's, and nothing for a file it cannot read (validation says what is
    wrong with it)."""
    from edgesmith.pipeline.cli import _executor_read_early as read

    local, ray, broken = tmp_path / "local.yaml", tmp_path / "ray.yaml", tmp_path / "broken.yaml"
    local.write_text("name: fleet\nrecipe: base.yaml\n")
    ray.write_text("name: fleet\nrecipe: base.yaml\nexecutor: {kind: ray, address: auto}\n")
    broken.write_text("name: fleet\nexecutor: ray\n")
    assert read(local, None, None) == ("local", None) and read(ray, None, None) == ("ray", "auto")
    assert read(ray, "local", None)[0] == "local" and read(local, "ray", None) == ("ray", None)
    assert read(local, None, "ray://head:10001") == ("ray", "ray://head:10001")   # an address means Ray
    for unreadable in (broken, tmp_path / "missing.yaml"):
        assert read(unreadable, None, None)[0] == "none"
    broken.write_text("name: [unclosed\n")
    assert read(broken, None, None)[0] == "none"


@pytest.mark.parametrize("user_setting, expected", [({}, SPIN_COUNT), ({"OMP_WAIT_POLICY": "PASSIVE"}, None),
                                                    ({"GOMP_SPINCOUNT": "300000"}, "300000")])
def test_the_command_sets_libgomps_spin_count_before_torch_loads_unless_the_user_chose(user_setting, expected):
    """libgomp reads GOMP_SPINCOUNT when torch loads it (openmp_wait.py): the command's process has it set by then."""
    probe = ("import json, os, sys\nfrom edgesmith.pipeline import cli\n"
             "cli.app = lambda: print(json.dumps([os.environ.get('GOMP_SPINCOUNT'), 'torch' in sys.modules])) or 0\n"
             "cli.entry()\n")
    env = {k: v for k, v in os.environ.items() if k not in USER_CHOICES}
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                          env={**env, "PYTHONPATH": str(REPO), **user_setting})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout) == [expected, False]
