"""One decorator registry for model factories (timm's idiom): names double as recipe values and result keys."""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

import torch.nn as nn

from edgesmith.errors import EdgesmithError
from edgesmith.models.spec import InputSpec


@dataclass(frozen=True)
class ModelEntry:
    name: str
    factory: Callable[..., nn.Module]
    summary: str

    def defaults(self) -> dict:
        return {k: p.default for k, p in inspect.signature(self.factory).parameters.items()
                if p.default is not inspect.Parameter.empty}


_REGISTRY: dict[str, ModelEntry] = {}


def register(name: str | None = None):
    def decorate(factory: Callable[..., nn.Module]):
        key = name or factory.__name__
        if key in _REGISTRY:
            raise ValueError(f"model '{key}' is registered twice")
        summary = (inspect.getdoc(factory) or "").splitlines()[0] if factory.__doc__ else ""
        _REGISTRY[key] = ModelEntry(key, factory, summary)
        return factory
    return decorate


class UnknownModelError(EdgesmithError, KeyError):
    def __str__(self):
        return self.args[0]


def get_entry(name: str) -> ModelEntry:
    _load_builtin_models()
    if name not in _REGISTRY:
        raise UnknownModelError(f"unknown model '{name}'; registered models: {', '.join(list_models())}")
    return _REGISTRY[name]


def create(name: str, **overrides) -> nn.Module:
    entry = get_entry(name)
    allowed = entry.defaults()
    unknown = sorted(set(overrides) - set(allowed))
    if unknown:
        raise TypeError(f"model '{name}' takes no argument {unknown[0]!r}; valid: {', '.join(sorted(allowed))}")
    return entry.factory(**overrides)


def list_models() -> list[str]:
    _load_builtin_models()
    return sorted(_REGISTRY)


def entries() -> list[ModelEntry]:
    return [_REGISTRY[n] for n in list_models()]


def input_spec_of(model: nn.Module) -> tuple[InputSpec, ...] | None:
    """The spec a module declares through an `input_spec` attribute, if any."""
    spec = getattr(model, "input_spec", None)
    if spec is None:
        return None
    return tuple(spec) if not isinstance(spec, InputSpec) else (spec,)


def _load_builtin_models() -> None:
    # Imported lazily so `models.registry` has no import cycle with the definitions that use `register`.
    from edgesmith.models import mnist_cnn, mobilenet_v2, resnet, tiny_transformer, unet  # noqa: F401
