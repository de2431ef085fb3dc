"""Fidelity to the reference model on every row, the INT8 fidelity gate, task metrics and the fidelity budget, on a
dense-output model (a U-Net segmenting real MNIST digits) with and without labels."""
import json

import numpy as np
import pytest

from edgesmith.errors import BudgetError, DataError, ModelError
from edgesmith.pipeline.recipe import load_recipe
from edgesmith.pipeline.run import run

SEGMENTER = {"name": "unet", "kwargs": {"width": 8}}
UNLABELLED = {"name": "mnist5k", "targets": "none", "val_fraction": 0.1}
QUICK = {"compile": {"precisions": ["int8", "fp32"]}, "bench": {"warmup": 2, "runs": 10},
         "export": {"parity": {"samples": 64}}, "targets": ["x86-host"]}


def _recipe(name: str, **fields) -> dict:
    return {"name": name, "model": SEGMENTER, "data": UNLABELLED, **QUICK, **fields}


@pytest.fixture(scope="module")
def trained_segmenter(tmp_path_factory):
    """A U-Net trained 1 epoch on real digits with masks made from the images (pixel > 0.5)."""
    root = tmp_path_factory.mktemp("segmenter")
    recipe = load_recipe(_recipe("train-unet", data={"name": "mnist5k", "targets": "masks", "val_fraction": 0.1},
                                 stages=[{"kind": "train", "epochs": 1, "lr": 1e-2, "augment": False}],
                                 metric={"fn": "edgesmith.benchmarks.tasks:mask_iou"}, targets=[]))
    result = run(recipe, root / "run", root / "cache")
    return root / "run" / "stages" / "01-train" / "model.safetensors", result, root / "cache"


def test_a_segmenter_trains_on_masks_and_reports_its_own_metric(trained_segmenter):
    _, result, _ = trained_segmenter
    train = next(r for r in result.rows if r["stage"] == "train")
    assert train["metric"] == "edgesmith.benchmarks.tasks:mask_iou"
    assert 0.5 < train["accuracy"] <= 1.0   # mask IoU of the digit class after one epoch
    assert train["fidelity"]["cosine"] == pytest.approx(1.0)   # the reference itself
    assert "top1_agreement" not in train["fidelity"]          # score maps have no top-1


def test_label_free_prune_distill_qat_keeps_fidelity_on_every_row(trained_segmenter, tmp_path):
    checkpoint, _, cache = trained_segmenter
    prune = {"kind": "prune", "ratio": 0.5}
    bare = run(load_recipe(_recipe("pruned", model={**SEGMENTER, "checkpoint": str(checkpoint)},
                                   stages=[prune], targets=[])), tmp_path / "bare", cache)
    recipe = load_recipe(_recipe("label-free", model={**SEGMENTER, "checkpoint": str(checkpoint)}, stages=[
        {**prune, "finetune": {"epochs": 2, "lr": 3e-3, "augment": False}},
        {"kind": "qat", "epochs": 1, "augment": False}]))
    result = run(recipe, tmp_path / "run", cache)
    rows = {r["stage"] if r["target"] is None else f"{r['target']} {r['backend']}/{r['precision']}": r
            for r in result.rows}
    pruned_bare = next(r for r in bare.rows if r["stage"] == "prune")["fidelity"]
    pruned = rows["prune"]["fidelity"]
    assert pruned["cosine"] > pruned_bare["cosine"] + 0.02    # distillation without labels recovers the pruned model
    assert pruned["psnr_db"] > pruned_bare["psnr_db"]
    assert rows["model"]["accuracy"] is None and rows["model"]["fidelity"]["cosine"] == pytest.approx(1.0)
    int8 = rows["qat:ort-x86"]
    assert int8["int8_vs_fp32"]["passed"] and int8["int8_vs_fp32"]["cosine"] >= 0.98
    qat = json.loads((tmp_path / "run/stages/02-qat-ort-x86/sidecar.json").read_text())["facts"]["stage_metrics"]
    assert qat["concats_requantized"] == 2   # the decoder's skip concatenations stay in INT8
    assert int8["fidelity"]["cosine"] > 0.9
    compiled = [r for r in result.rows if r["target"] == "x86-host"]
    assert compiled and all(r["fidelity"] and r["fidelity"]["cosine"] > 0.9 for r in compiled)
    manifest = json.loads((tmp_path / "run" / "bundles" / "x86-host" / "manifest.json").read_text())
    assert manifest["fidelity"]["cosine"] > 0.9 and "top1_agreement" not in manifest["fidelity"]
    assert (tmp_path / "run" / "bundles" / "x86-host" / "fidelity_reference.npz").is_file()


def test_an_int8_file_below_the_gate_is_reported_and_never_bundled(trained_segmenter, tmp_path):
    checkpoint, _, cache = trained_segmenter
    recipe = load_recipe(_recipe("strict-gate", model={**SEGMENTER, "checkpoint": str(checkpoint)},
                                 stages=[{"kind": "ptq", "calibration_samples": 64}],
                                 export={"parity": {"samples": 64, "int8_min_cosine": 0.999999}}))
    result = run(recipe, tmp_path / "run", cache)
    ptq = next(r for r in result.rows if r["stage"] == "ptq:ort-x86")
    assert ptq["status"].startswith("failed: ptq ort-x86 fails the INT8 fidelity gate")
    assert not ptq["int8_vs_fp32"]["passed"] and ptq["int8_vs_fp32"]["cosine"] < 0.999999
    int8_candidates = [r for r in result.rows if r["target"] and r["precision"] == "int8"]
    assert int8_candidates and all("fidelity gate" in r["status"] for r in int8_candidates)
    manifest = json.loads((tmp_path / "run" / "bundles" / "x86-host" / "manifest.json").read_text())
    assert manifest["precision"] == "fp32"
    assert (tmp_path / "run" / "stages" / "01-ptq-ort-x86" / "model.onnx").is_file()   # kept, for a look


def test_a_fidelity_budget_stops_the_run_after_the_stage_that_breaks_it(trained_segmenter, tmp_path):
    checkpoint, _, cache = trained_segmenter
    recipe = load_recipe(_recipe("budget", model={**SEGMENTER, "checkpoint": str(checkpoint)},
                                 stages=[{"kind": "prune", "ratio": 0.5}], budget={"min_fidelity": {"cosine": 0.999}}))
    with pytest.raises(BudgetError, match=r"stage 'prune' has cosine 0\.\d+ to the reference model "
                                          r"\(< budget.min_fidelity.cosine 0.999\)"):
        run(recipe, tmp_path / "run", cache)
    assert json.loads((tmp_path / "run" / "results.json").read_text())[-1]["stage"] == "prune"


def _write(path, text):
    path.write_text(text)
    return path


@pytest.mark.parametrize("body, message", [
    ("def metric(outputs, targets):\n    raise ValueError('no ground truth here')\n",
     r"metric.fn '.*metric.py:metric' raised ValueError: no ground truth here"),
    ("def metric(outputs, targets):\n    return 'good'\n",
     r"metric.fn '.*metric.py:metric' returned 'good' \(str\); it must return one finite number"),
    ("def metric(outputs, targets):\n    return float('nan')\n", r"returned nan \(float\)"),
])
def test_a_bad_metric_function_is_one_line_naming_it(tmp_path, body, message):
    file = _write(tmp_path / "metric.py", body)
    recipe = load_recipe(_recipe("bad-metric", data={"name": "digits"}, metric={
        "fn": f"{file}:metric"}, model={"name": "mnist_cnn", "kwargs": {"width": 4}},
        stages=[{"kind": "train", "epochs": 1}], targets=[]))
    with pytest.raises(DataError, match=message):
        run(recipe, tmp_path / "run", tmp_path / "cache")


def test_labels_that_do_not_fit_top1_are_one_line(tmp_path):
    recipe = load_recipe(_recipe("masks-top1", data={"name": "digits", "targets": "masks"}, metric="top1",
                                 model={"name": "unet", "kwargs": {"width": 4, "image_size": 8}},
                                 stages=[{"kind": "train", "epochs": 1, "augment": False}], targets=[]))
    with pytest.raises(DataError, match=r"metric top1 needs \(batch, classes\) outputs .* "
                                        r"outputs shape \[\d+, 2, 8, 8\] and the labels have shape \[\d+, 8, 8\]"):
        run(recipe, tmp_path / "run", tmp_path / "cache")


def test_outputs_that_are_not_tensors_say_how_to_wrap_them(tmp_path):
    file = _write(tmp_path / "dict_model.py", "import torch\n\n"
                  "class DictOut(torch.nn.Module):\n"
                  "    def __init__(self):\n        super().__init__()\n        self.fc = torch.nn.Linear(4, 3)\n"
                  "    def forward(self, x):\n        return {'logits': self.fc(x), 'hidden': x}\n\n"
                  "def build():\n    return DictOut()\n")
    recipe = load_recipe({"name": "dict-out", "model": {"factory": f"{file}:build", "inputs": [
        {"name": "x", "shape": [1, 4]}]}, "data": {"name": "synthetic"}, "targets": []})
    with pytest.raises(ModelError, match=r"returns a dict with keys \['logits', 'hidden'\]; edgesmith needs a tensor "
                                         r"or a tuple of tensors: wrap it"):
        run(recipe, tmp_path / "run", tmp_path / "cache")


def test_fidelity_figures_are_measured_not_assumed():
    from edgesmith.targets.bundle_files.edgesmith_runtime import fidelity

    rng = np.random.default_rng(0)
    maps = rng.normal(size=(16, 2, 8, 8)).astype(np.float32)
    same = fidelity([maps], [maps])
    assert same["cosine"] == pytest.approx(1.0) and same["max_abs_diff"] == 0 and "top1_agreement" not in same
    noisy = fidelity([maps + rng.normal(scale=0.1, size=maps.shape)], [maps])
    peak, mse = np.abs(maps).max(), 0.01
    assert noisy["psnr_db"] == pytest.approx(10 * np.log10(peak ** 2 / mse), abs=0.3)
    flipped = fidelity([-maps], [maps])
    assert flipped["cosine"] == pytest.approx(-1.0)
    logits = rng.normal(size=(10, 5))
    two = fidelity([logits, maps[:10]], [logits, -maps[:10]])   # the worst output decides
    assert two["cosine"] == pytest.approx(-1.0) and two["top1_agreement"] == 1.0


EMBEDDER = {"vocab_size": 17, "seq_len": 64, "dim": 32, "depth": 1, "num_heads": 4, "num_classes": 10,
            "pooling": "mean", "dropout": 0.0}
TOKENS = {"factory": "edgesmith.benchmarks.tasks:digit_tokens"}


def test_an_embedding_model_prunes_whole_heads_and_distils_without_labels(tmp_path):
    """Trained as a digit classifier on real digits (pixels as tokens), compressed as an embedding model."""
    cache = tmp_path / "cache"
    classifier = run(load_recipe({"name": "embedder", "model": {"name": "tiny_transformer", "kwargs": EMBEDDER},
                                  "data": TOKENS, "stages": [{"kind": "train", "epochs": 8, "lr": 0.01,
                                                              "augment": False}], "targets": []}),
                     tmp_path / "train", cache)
    assert classifier.rows[0]["accuracy"] > 25   # chance: 10 %; pixels as tokens are a hard task for 1 layer
    embedding = {"name": "tiny_transformer", "kwargs": {**EMBEDDER, "output": "embedding"},
                 "checkpoint": str(tmp_path / "train/stages/01-train/model.safetensors")}
    prune = {"kind": "prune", "ratio": 0.5}
    common = {"model": embedding, "data": {**TOKENS, "kwargs": {"targets": "none"}}, "targets": []}
    bare = run(load_recipe({"name": "bare", **common, "stages": [prune]}), tmp_path / "bare", cache)
    result = run(load_recipe({"name": "label-free", **common, "stages": [
        {**prune, "finetune": {"epochs": 4, "lr": 1e-3, "augment": False, "distillation": {"loss": "cosine"}}},
        {"kind": "qat", "epochs": 1, "augment": False, "distillation": {"loss": "cosine"}, "schemes": ["ort-x86"]}]}),
        tmp_path / "run", cache)
    rows = {r["stage"]: r for r in result.rows}
    assert rows["model"]["accuracy"] is None and rows["model"]["fidelity"]["cosine"] == pytest.approx(1.0)
    pruned_bare = next(r for r in bare.rows if r["stage"] == "prune")["fidelity"]["cosine"]
    assert rows["prune"]["fidelity"]["cosine"] > max(pruned_bare + 0.01, 0.9)   # recovered without labels
    facts = json.loads((tmp_path / "run/stages/01-prune/sidecar.json").read_text())["facts"]["stage_metrics"]
    assert facts["heads_after"] == {"layers.0.attention": 2}
    assert rows["qat:ort-x86"]["int8_vs_fp32"]["passed"] and rows["qat:ort-x86"]["fidelity"]["cosine"] > 0.9
