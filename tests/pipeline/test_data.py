import numpy as np
import pytest
import torch
from PIL import Image

from edgesmith.errors import DataError
from edgesmith.models import InputSpec
from edgesmith.pipeline.config import DataConfig
from edgesmith.pipeline.data import load_dataset, prepare

MNIST_SPEC = (InputSpec("input", (1, 1, 28, 28), mean=(0.1307,), std=(0.3081,)),)


def test_mnist5k_is_real_and_split_deterministically():
    a = load_dataset(DataConfig(name="mnist5k", val_fraction=0.2, seed=0), MNIST_SPEC)
    b = load_dataset(DataConfig(name="mnist5k", val_fraction=0.2, seed=0), MNIST_SPEC)
    assert len(a.train) == 4000 and len(a.val) == 1000
    assert torch.equal(a.val.y, b.val.y) and torch.equal(a.val.x[0], b.val.x[0])
    assert set(a.val.y.tolist()) == set(range(10))  # shuffled: every digit in validation
    c = load_dataset(DataConfig(name="mnist5k", val_fraction=0.2, seed=1), MNIST_SPEC)
    assert not torch.equal(a.val.y, c.val.y)


def test_prepare_resizes_matches_channels_and_normalises():
    spec = InputSpec("input", (1, 3, 64, 64), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    x = torch.full((2, 1, 28, 28), 0.75)
    out = prepare(x, spec)
    assert out.shape == (2, 3, 64, 64)
    assert torch.allclose(out, torch.ones_like(out))  # (0.75 - 0.5) / 0.25


def test_digits_feed_a_96px_rgb_model():
    spec = (InputSpec("input", (1, 3, 96, 96)),)
    data = load_dataset(DataConfig(name="digits"), spec)
    xs, y = next(data.batches(data.val, 8))
    assert xs[0].shape == (8, 3, 96, 96) and y.shape == (8,)


def test_image_folder(tmp_path):
    for label, value in (("cat", 30), ("dog", 220)):
        (tmp_path / label).mkdir()
        for i in range(5):
            Image.fromarray(np.full((10, 12, 3), value + i, dtype=np.uint8)).save(tmp_path / label / f"{i}.png")
    data = load_dataset(DataConfig(name="image_folder", path=tmp_path, val_fraction=0.2),
                        (InputSpec("input", (1, 3, 16, 16)),))
    assert len(data.train) + len(data.val) == 10
    all_y = torch.cat([data.train.y, data.val.y])
    assert sorted(all_y.tolist()) == [0] * 5 + [1] * 5
    assert data.train.x[0].shape[1:] == (3, 16, 16)


def test_image_folder_without_classes_is_an_error(tmp_path):
    with pytest.raises(DataError, match="one sub-folder per class"):
        load_dataset(DataConfig(name="image_folder", path=tmp_path), (InputSpec("input", (1, 3, 8, 8)),))


def test_npz_uint8_and_missing_arrays(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.full((20, 1, 8, 8), 255, np.uint8), y=np.arange(20) % 2)
    data = load_dataset(DataConfig(name="npz", path=tmp_path / "d.npz"), (InputSpec("input", (1, 1, 8, 8)),))
    assert float(data.train.x[0].max()) == 1.0
    np.savez(tmp_path / "bad.npz", images=np.zeros((2, 3)))
    with pytest.raises(DataError, match=r"lacks array\(s\) \['x', 'y'\]"):
        load_dataset(DataConfig(name="npz", path=tmp_path / "bad.npz"), (InputSpec("input", (1, 1, 8, 8)),))


def test_synthetic_is_unlabelled_and_follows_the_spec():
    spec = (InputSpec("input_ids", (1, 16), dtype="int64", dynamic_axes={0: "batch", 1: "seq"}, value_range=(0, 50)),)
    data = load_dataset(DataConfig(name="synthetic", samples=40), spec)
    assert not data.labelled and data.val.y is None
    xs, y = next(data.batches(data.val, 4))
    assert xs[0].dtype == torch.int64 and xs[0].shape == (4, 16) and int(xs[0].max()) < 50 and y is None
