"""Generated from the registry (timm's idiom): every registered model runs forward, exports and passes parity."""
import numpy as np
import onnx
import pytest
import torch

from edgesmith import models
from edgesmith.models.mobilenet_v2 import imagenet_weights_path
from edgesmith.pipeline.config import DataConfig, ExportConfig, ParityConfig
from edgesmith.pipeline.data import load_dataset
from edgesmith.pipeline.export import check_parity, export_onnx
from edgesmith.targets.backends.onnxruntime import OrtRunner

# Small variants keep the suite fast; the architectures are the registered ones.
SMALL = {"mnist_cnn": {}, "resnet18": {"num_classes": 10, "image_size": 64},
         "mobilenet_v2": {"num_classes": 10, "image_size": 64}, "tiny_transformer": {}}


def test_registry_lists_the_required_models():
    assert set(models.list_models()) >= set(SMALL)


@pytest.mark.parametrize("name", models.list_models())
def test_forward_export_and_parity(name, tmp_path):
    model = models.create(name, **SMALL.get(name, {})).eval()
    specs = models.input_spec_of(model)
    assert specs, f"{name} declares no input spec"
    with torch.inference_mode():
        out = model(*(s.example(3) for s in specs))
    assert out.shape[0] == 3 and torch.isfinite(out).all()

    path = tmp_path / f"{name}.onnx"
    facts = export_onnx(model, specs, ExportConfig(exporter="dynamo"), path)
    proto = onnx.load(str(path))
    assert facts["onnx_bytes"] == path.stat().st_size and not proto.graph.initializer[0].data_location
    for spec, graph_input in zip(specs, proto.graph.input):
        dims = graph_input.type.tensor_type.shape.dim
        assert all(dims[axis].dim_param for axis in spec.dynamic_axes)

    data = load_dataset(DataConfig(name="synthetic", samples=20, val_fraction=0.5), specs)
    parity = check_parity(model, path, data, specs, ParityConfig(max_abs_diff=1e-3), batch_size=5)
    assert parity["samples"] == 10 and parity["cosine"] > 0.9999
    assert parity["top1_agreement"] == (1.0 if out.ndim == 2 else None)   # top-1 only for (batch, classes)

    runner = OrtRunner(path)  # a batch size the exporter never saw runs too
    feeds = {s.name: s.example(7).numpy() for s in specs}
    assert runner(feeds)[0].shape[0] == 7


def test_create_rejects_unknown_arguments():
    with pytest.raises(TypeError, match="valid:"):
        models.create("resnet18", num_clases=10)


def test_resnet18_any_input_size():
    model = models.create("resnet18", num_classes=5, in_chans=1, image_size=40).eval()
    assert model(torch.zeros(2, 1, 40, 40)).shape == (2, 5)


def test_mobilenet_v2_imagenet_weights_load_strictly_and_only_the_classifier_changes():
    reference = torch.load(imagenet_weights_path(), map_location="cpu", weights_only=True)
    model = models.create("mobilenet_v2", pretrained=True, num_classes=10)
    state = model.state_dict()
    assert model.classifier[1].out_features == 10
    for key, value in reference.items():
        if key.startswith("classifier."):
            assert state[key].shape != value.shape
        else:
            assert torch.equal(state[key], value), key


def test_mobilenet_v2_imagenet_weights_classify_like_imagenet():
    model = models.create("mobilenet_v2", pretrained=True).eval()
    # A flat grey image: an ImageNet model is confident of nothing, but logits are finite and well spread.
    logits = model(torch.zeros(1, 3, 224, 224))
    assert logits.shape == (1, 1000) and float(logits.std()) > 0.5


def test_tiny_transformer_is_bert_like_with_dynamic_sequence(tmp_path):
    model = models.create("tiny_transformer").eval()
    kinds = {type(m).__name__ for m in model.modules()}
    assert {"Embedding", "LayerNorm", "GELU", "SelfAttention"} <= kinds
    assert model.layers[0].attention.num_heads == 4
    path = tmp_path / "t.onnx"
    specs = models.input_spec_of(model)
    export_onnx(model, specs, ExportConfig(), path)
    ids = np.random.default_rng(0).integers(0, 1000, (2, 23), dtype=np.int64)  # shorter sequence than nominal
    expected = model(torch.from_numpy(ids)).detach().numpy()
    np.testing.assert_allclose(OrtRunner(path)({"input_ids": ids})[0], expected, atol=1e-4)
