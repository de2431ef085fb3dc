import pytest

from edgesmith.errors import RecipeError
from edgesmith.pipeline.recipe import load_recipe


def error_for(*overrides: str) -> str:
    with pytest.raises(RecipeError) as info:
        load_recipe(None, list(overrides))
    message = str(info.value)
    assert "\n" not in message
    return message


def test_default_recipe_is_valid_and_embedded():
    recipe = load_recipe()
    assert recipe.model.name == "mnist_cnn" and recipe.data.name == "mnist5k"
    assert [s.kind for s in recipe.stages] == ["train", "prune", "qat"]
    assert recipe.stages[1].ratio == 0.5 and recipe.stages[1].finetune.distill
    assert recipe.quantization.kind == "qat"
    assert recipe.targets == ["x86-host"]


def test_set_overrides_keep_yaml_types():
    recipe = load_recipe(None, ["stages.0.epochs=2", "export.slim=false", "model.kwargs={width: 8}",
                                "data.val_fraction=0.25"])
    assert recipe.stages[0].epochs == 2 and recipe.export.slim is False
    assert recipe.model.kwargs == {"width": 8} and recipe.data.val_fraction == 0.25


def test_unknown_key_lists_valid_fields():
    message = error_for("model.nme=mnist_cnn")
    assert "model.nme" in message and "did you mean 'name'" in message and "checkpoint" in message


def test_unknown_model_lists_registered_models():
    message = error_for("model.name=resnet19")
    assert "resnet19" in message and "resnet18" in message and "mobilenet_v2" in message


def test_out_of_range_value_names_field_and_value():
    message = error_for("stages.0.epochs=0")
    assert "stages.0.epochs" in message and "got 0" in message


def test_unknown_stage_kind_lists_kinds():
    message = error_for("stages.0.kind=sharpen")
    assert "sharpen" in message and all(kind in message for kind in ("train", "prune", "distill", "qat", "ptq"))


def test_unknown_field_is_checked_against_the_right_stage_class():
    message = error_for("stages=[{kind: prune, method: magnitude, final_sparsity: 0.5, ratio: 0.5}]")
    assert "stages.0.ratio" in message and "final_sparsity" in message and "importance" not in message


def test_quantization_stage_must_come_last():
    message = error_for("stages=[{kind: qat}, {kind: train}]")
    assert "comes last" in message and "['qat', 'train']" in message


def test_magnitude_schedule_must_fit_the_finetuning_epochs():
    message = error_for("stages=[{kind: prune, method: magnitude, final_sparsity: 0.5, start_epoch: 3, "
                        "finetune: {epochs: 2}}]")
    assert "start_epoch" in message and "(2)" in message


def test_named_teacher_needs_weights():
    assert "teacher.checkpoint" in error_for("stages=[{kind: distill, teacher: {name: resnet18}}]")


def test_unknown_target_lists_profiles():
    message = error_for("targets=[x86-hots]")
    assert "x86-hots" in message and "x86-host" in message


def test_enum_value_lists_choices():
    message = error_for("export.exporter=tflite")
    assert "export.exporter" in message and "dynamo" in message and "torchscript" in message


def test_dynamo_rejects_old_opset():
    assert "torchscript" in error_for("export.opset=13")


def test_bad_override_syntax_and_index():
    assert "key.path=value" in error_for("stages.0.epochs")
    assert "stages.5" in error_for("stages.5.epochs=1")


def test_recipe_file_errors(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(RecipeError, match="nope.yaml"):
        load_recipe(missing)
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(broken)
    no_model = tmp_path / "no_model.yaml"
    no_model.write_text("name: x\ndata: {name: digits}\n")
    with pytest.raises(RecipeError, match="field 'model'"):
        load_recipe(no_model)


def test_factory_and_name_are_exclusive():
    assert "exactly one" in error_for("model.factory=pkg.mod:fn")


def test_numbers_are_finite_and_booleans_are_not_numbers():
    assert "'stages.0.lr': Input should be a finite number" in error_for("stages.0.lr=.inf")
    assert "'export.parity.max_abs_diff': Input should be a finite number" in error_for(
        "export.parity.max_abs_diff=.nan")
    assert "'stages.0.epochs': true is a boolean; give a number" in error_for("stages.0.epochs=true")
    assert "'bench.runs': false is a boolean" in error_for("bench.runs=false")
    assert "'model.inputs.0.shape.0'" in error_for("model.inputs=[{name: input, shape: [true, 1, 28, 28]}]")
    assert load_recipe(None, ["stages.0.lr=0.01", "export.slim=false"]).export.slim is False   # still accepted
