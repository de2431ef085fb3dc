"""Batch matrices: expansion into jobs, and every mistake refused before any work with one line."""
from pathlib import Path

import pytest
import yaml

from edgesmith.errors import RecipeError
from edgesmith.pipeline.matrix import expand, load_matrix
from tests.conftest import edgesmith

RECIPE = {"name": "fast", "model": {"name": "mnist_cnn"}, "data": {"name": "digits"},
          "stages": [{"kind": "train", "epochs": 1}], "targets": ["x86-host"]}


def _write(folder: Path, name: str, data: dict) -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(data))
    return path


def _matrix(tmp_path: Path, **fields) -> Path:
    _write(tmp_path, "a.yaml", RECIPE)
    _write(tmp_path, "b.yaml", {**RECIPE, "name": "other", "bench": {"runs": 30}})
    return _write(tmp_path, "fleet.yaml", {"name": "fleet", **fields})


def test_every_model_meets_every_recipe_with_the_matrix_targets_and_overrides(tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "mine.py").write_text("def build():\n    raise NotImplementedError\n")
    path = _matrix(tmp_path, recipes=["a.yaml", "b.yaml"], targets=["x86-host", "raspberry-pi-4"],
                   set=["stages.0.epochs=2"],
                   models=[{"name": "mnist_cnn"}, {"name": "mnist_cnn", "kwargs": {"width": 16}},
                           {"factory": "models/mine.py:build", "label": "mine", "set": ["data.name=mnist5k"]}])
    jobs = expand(load_matrix(path), path, cwd=tmp_path.parent)
    # recipe by recipe, each over every model: parallel workers start on different models
    assert [j.label for j in jobs] == ["mnist_cnn__fast", "mnist_cnn-width16__fast", "mine__fast",
                                       "mnist_cnn__other", "mnist_cnn-width16__other", "mine__other"]
    assert [j.model for j in jobs[:3]] == ["mnist_cnn", "mnist_cnn-width16", "mine"]
    first, mine = jobs[0].resolved(), jobs[2].resolved()
    assert first.targets == ["x86-host", "raspberry-pi-4"] and first.stages[0].epochs == 2
    assert jobs[1].resolved().model.kwargs == {"width": 16}
    assert mine.data.name == "mnist5k" and first.data.name == "digits"   # a model's own overrides are its own
    # the factory file is relative to the matrix file; recipes resolve paths from the working folder
    assert mine.model.factory == f"{tmp_path.name}/models/mine.py:build"
    assert jobs[3].resolved().bench.runs == 30 and jobs[3].recipe_name == "other"
    assert [j.label for j in expand(load_matrix(path), path, only="*width16*", cwd=tmp_path.parent)] == \
        ["mnist_cnn-width16__fast", "mnist_cnn-width16__other"]


def test_one_recipe_gives_jobs_named_by_model_and_no_models_keeps_the_recipes_model(tmp_path):
    path = _matrix(tmp_path, recipe="a.yaml")
    assert [(j.label, j.recipe_name) for j in expand(load_matrix(path), path)] == [("mnist_cnn", "fast")]
    default = _write(tmp_path, "default.yaml", {"name": "d"})   # neither recipe nor recipes: the built-in one
    assert [j.recipe_name for j in expand(load_matrix(default), default)] == ["mnist-cnn-edge"]


@pytest.mark.parametrize("fields, says", [
    ({"recipe": "a.yaml", "models": [{"name": "resnet_18"}]}, "unknown model 'resnet_18' (did you mean 'resnet18'?)"),
    ({"recipe": "a.yaml", "targets": ["jetson-orin-nan"]}, "unknown target 'jetson-orin-nan'"),
    ({"recipe": "a.yaml", "set": ["stages.0.epochs=-1"]}, "stages.0.epochs"),
    ({"recipe": "missing.yaml"}, "missing.yaml' cannot be read"),
    ({"recipe": "a.yaml", "recipes": ["b.yaml"]}, "not both"),
    ({"recipe": "a.yaml", "models": [{"name": "mnist_cnn"}, {"name": "mnist_cnn", "kwargs": {}}]},
     "two jobs are both labelled 'mnist_cnn'"),
    ({"recipe": "a.yaml", "executor": {"kind": "local", "address": "auto"}}, "set executor.kind: ray"),
    ({"recipe": "a.yaml", "executr": {"kind": "ray"}}, "field 'executr' is not allowed (did you mean 'executor'?)"),
])
def test_a_bad_matrix_is_refused_before_any_work(tmp_path, fields, says):
    path = _matrix(tmp_path, **fields)
    with pytest.raises(RecipeError, match=None) as raised:
        expand(load_matrix(path), path)
    assert says in str(raised.value) and "\n" not in str(raised.value)


def test_the_cli_refuses_a_bad_matrix_in_one_line_with_exit_code_2(tmp_path):
    path = _matrix(tmp_path, recipe="a.yaml", models=[{"name": "mnist_cnn", "kwargs": {"widht": 8}}])
    proc = edgesmith("batch", str(path), "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "widht" in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()   # nothing started
    good = _matrix(tmp_path, recipe="a.yaml")
    only = edgesmith("batch", str(good), "--only", "nothing*")
    assert only.returncode == 2 and "matches no job" in only.stderr
