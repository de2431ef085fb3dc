"""What a model expects as input: names, shapes, dtypes, dynamic axes and normalisation.

Every downstream step (data preparation, ONNX export, benchmarking, bundles) reads this one description,
so a model the registry has never seen works as soon as it has a spec (declared on the module or given in
the recipe).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "int64": torch.int64, "int32": torch.int32}


@dataclass(frozen=True)
class InputSpec:
    name: str
    shape: tuple[int, ...]                       # nominal shape, batch axis included (usually 1)
    dtype: str = "float32"
    dynamic_axes: dict[int, str] = field(default_factory=lambda: {0: "batch"})
    mean: tuple[float, ...] | None = None        # per-channel normalisation applied by data preparation
    std: tuple[float, ...] | None = None
    value_range: tuple[int, int] | None = None   # [low, high) for integer inputs such as token ids

    def __post_init__(self):
        if self.dtype not in _DTYPES:
            raise ValueError(f"input '{self.name}': dtype '{self.dtype}' is not one of {sorted(_DTYPES)}")
        if any(axis >= len(self.shape) for axis in self.dynamic_axes):
            raise ValueError(f"input '{self.name}': dynamic axis beyond shape {list(self.shape)}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    @property
    def is_image(self) -> bool:
        return self.dtype.startswith("float") and len(self.shape) == 4

    def example(self, batch: int = 1, generator: torch.Generator | None = None) -> torch.Tensor:
        """A random tensor of this spec with the batch axis set to `batch`."""
        shape = (batch, *self.shape[1:])
        if self.dtype.startswith("int"):
            low, high = self.value_range or (0, 2)
            return torch.randint(low, high, shape, generator=generator, dtype=self.torch_dtype)
        return torch.randn(shape, generator=generator).to(self.torch_dtype)

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype,
                "dynamic_axes": {str(k): v for k, v in self.dynamic_axes.items()},
                "mean": list(self.mean) if self.mean else None, "std": list(self.std) if self.std else None,
                "value_range": list(self.value_range) if self.value_range else None}

    @classmethod
    def from_dict(cls, data: dict) -> "InputSpec":
        return cls(name=data["name"], shape=tuple(data["shape"]), dtype=data.get("dtype", "float32"),
                   dynamic_axes={int(k): v for k, v in (data.get("dynamic_axes") or {0: "batch"}).items()},
                   mean=tuple(data["mean"]) if data.get("mean") else None,
                   std=tuple(data["std"]) if data.get("std") else None,
                   value_range=tuple(data["value_range"]) if data.get("value_range") else None)


def image_input(channels: int, size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> tuple[InputSpec]:
    return (InputSpec("input", (1, channels, size, size), mean=mean, std=std),)


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def channel_stats(channels: int, mean: tuple[float, ...], std: tuple[float, ...]):
    """Per-channel stats for `channels`: 1-channel stats are broadcast, 3-channel stats averaged for grey."""
    if len(mean) == channels:
        return mean, std
    if len(mean) == 1:
        return mean * channels, std * channels
    return (sum(mean) / len(mean),) * channels, (sum(std) / len(std),) * channels
