"""What a model expects as input: names, shapes, dtypes, dynamic axes and normalisation.

Every downstream step (data preparation, ONNX export, benchmarking, bundles) reads this one description,
so a model the registry has never seen works as soon as it has a spec (declared on the module or given in
the recipe).
"""
from __future__ import annotations

from dataclasses import field
from typing import Annotated, Literal

import torch
from pydantic import ConfigDict, Field, Strict, TypeAdapter
from pydantic.dataclasses import dataclass

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "int64": torch.int64, "int32": torch.int32}


# A pydantic dataclass: positional like a dataclass in a model's `input_spec`, validated like any recipe field
# (`model.inputs` is a list of these), and the same dict in io.json, arch.json and bundle manifests.
@dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class InputSpec:
    name: str
    # nominal shape, batch axis included (usually 1); strict: YAML's `true` is not a size
    shape: Annotated[tuple[Annotated[int, Strict()], ...], Field(min_length=1)]
    dtype: Literal["float32", "float16", "int64", "int32"] = "float32"
    dynamic_axes: dict[int, str] = field(default_factory=lambda: {0: "batch"})
    mean: tuple[float, ...] | None = None        # per-channel normalisation applied by data preparation
    std: tuple[float, ...] | None = None
    value_range: tuple[int, int] | None = None   # [low, high) for integer inputs such as token ids

    def __post_init__(self):
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
        """The JSON form (io.json, arch.json, manifests); `from_dict` reads it back."""
        return _ADAPTER.dump_python(self, mode="json")

    @classmethod
    def from_dict(cls, data: dict) -> "InputSpec":
        return _ADAPTER.validate_python(data)


_ADAPTER = TypeAdapter(InputSpec)


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
