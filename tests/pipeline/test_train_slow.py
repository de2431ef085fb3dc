"""Slow: the registry's ImageNet-class models train on MNIST through the spec-driven transforms."""
import pytest

from pipeline.recipe import load_recipe
from pipeline.run import run

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("model, kwargs, minimum", [
    ("resnet18", "{num_classes: 10, image_size: 64}", 90.0),
    ("mobilenet_v2", "{num_classes: 10, image_size: 96, pretrained: true}", 90.0),
])
def test_imagenet_models_train_on_mnist(tmp_path, model, kwargs, minimum):
    recipe = load_recipe(None, [f"model.name={model}", f"model.kwargs={kwargs}", "stages.0.epochs=1",
                                "stages.0.batch_size=32", "stages.0.lr=0.001", "bench.runs=20", "data.eval_batch_size=64"])
    result = run(recipe, tmp_path / "run", tmp_path / "cache")
    host = next(r for r in result.rows if r["target"] == "x86-host")
    assert host["accuracy"] >= minimum
    assert host["latency_ms"]["p50"] > 0
