"""Slow: the registry's ImageNet-class models go through the whole compression flow on MNIST (spec-driven
transforms, channel pruning with distillation, QAT for two INT8 schemes)."""
import pytest

from edgesmith.pipeline.recipe import load_recipe
from edgesmith.pipeline.run import run
from edgesmith.targets.qdq_rules import validate

pytestmark = pytest.mark.slow

STAGES = ("stages=[{kind: train, epochs: 1, batch_size: 32, lr: 0.001}, {kind: prune, ratio: 0.5, finetune: "
          "{epochs: 1, distill: true}}, {kind: qat, epochs: 1, schemes: [ort-x86, tensorrt]}]")


@pytest.mark.parametrize("model, kwargs, minimum", [
    ("resnet18", "{num_classes: 10, image_size: 64}", 90.0),
    ("mobilenet_v2", "{num_classes: 10, image_size: 96, pretrained: true}", 90.0),
])
def test_imagenet_models_compress_on_mnist(tmp_path, model, kwargs, minimum):
    recipe = load_recipe(None, [f"model.name={model}", f"model.kwargs={kwargs}", STAGES, "bench.runs=20",
                                "data.eval_batch_size=64", "budget.max_accuracy_drop=null"])
    result = run(recipe, tmp_path / "run", tmp_path / "cache")
    host = next(r for r in result.rows if r["target"] == "x86-host" and r["precision"] == "int8")
    assert host["stage"] == "qat:ort-x86" and host["accuracy"] >= minimum
    assert host["latency_ms"]["p50"] > 0
    for scheme in ("ort-x86", "tensorrt"):   # depthwise convolutions included: per-tensor activations
        assert validate(tmp_path / f"run/stages/03-qat-{scheme}/model.onnx", scheme) == []
