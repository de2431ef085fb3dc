"""Building the model a recipe names (registry or a user's factory) and moving models across stage files.

A model artifact is a folder: `model.safetensors` (weights, no pickle) and `arch.json` (how to rebuild the
module and its input spec). Files, not live objects, cross stage boundaries.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_model, save_model

from edgesmith import models
from edgesmith.errors import ModelError, first_line
from edgesmith.models import InputSpec, input_spec_of
from edgesmith.pipeline.attention import SPLIT, split_modules, split_multihead_attention
from edgesmith.pipeline.checkpoint import apply_state_dict, read_state_dict
from edgesmith.pipeline.config import ModelConfig
from edgesmith.pipeline.user_code import resolve_callable, source_sha256

WEIGHTS = "model.safetensors"
ARCH = "arch.json"


def build_model(cfg: ModelConfig) -> nn.Module:
    """The recipe's model with its checkpoint applied, in eval mode."""
    model = _construct(cfg)
    if cfg.checkpoint:
        apply_state_dict(model, read_state_dict(cfg.checkpoint), str(cfg.checkpoint))
    return model.eval()


def input_specs(model: nn.Module, cfg: ModelConfig) -> tuple[InputSpec, ...]:
    """The recipe's `model.inputs` wins over what the module declares; one of them must exist, and the model must
    run on it (checked with one forward pass, so a wrong shape is named here and not deep inside a stage)."""
    specs = tuple(cfg.inputs) if cfg.inputs else input_spec_of(model)
    if not specs:
        raise ModelError(f"model '{cfg.name or cfg.factory}' declares no input spec; add model.inputs to the recipe, "
                         "e.g. inputs: [{name: input, shape: [1, 3, 224, 224]}]")
    _check_forward(model, specs, "model.inputs" if cfg.inputs else "the model's declared input_spec")
    return specs


def _check_forward(model: nn.Module, specs: tuple[InputSpec, ...], source: str) -> None:
    examples = [spec.example(2, torch.Generator().manual_seed(0)) for spec in specs]
    try:
        with torch.inference_mode():
            out = model.eval()(*examples)
    except Exception as exc:   # the model's own error, whatever its type
        given = ", ".join(f"'{s.name}' {s.dtype}{list(x.shape)} (rank {x.ndim})" for s, x in zip(specs, examples))
        raise ModelError(f"the model's forward fails on {source}: {given}: {type(exc).__name__}: {first_line(exc)}; "
                         "give model.inputs the names, shapes and dtypes its forward takes") from exc
    output_tensors(out)


def output_tensors(out) -> tuple[torch.Tensor, ...]:
    """A model's outputs as a tuple of tensors: ONNX, fidelity and distillation need tensors, in a fixed order."""
    if isinstance(out, torch.Tensor):
        return (out,)
    if isinstance(out, (tuple, list)) and out and all(isinstance(o, torch.Tensor) for o in out):
        return tuple(out)
    what = (f"a {type(out).__name__} with keys {list(out)[:6]}" if isinstance(out, dict)
            else f"a {type(out).__name__}" + (f" holding {sorted({type(o).__name__ for o in out})}"
                                               if isinstance(out, (tuple, list)) else ""))
    raise ModelError(f"the model's forward returns {what}; edgesmith needs a tensor or a tuple of tensors: wrap it "
                     "in a module whose forward returns them, e.g. `return tuple(out[k] for k in KEYS)` (Hugging Face "
                     "models: call with return_dict=False, or return out.last_hidden_state)")


def source_fingerprint(cfg: ModelConfig) -> str:
    """Hash of the code that defines the model, so editing a user's model file invalidates the cache."""
    return source_sha256(models.get_entry(cfg.name).factory if cfg.name else _resolve_factory(cfg.factory))


def save_model_artifact(model: nn.Module, cfg: ModelConfig, specs: tuple[InputSpec, ...], out_dir: Path) -> None:
    """Weights plus, for structurally changed (pruned) models, the module attributes that differ from a fresh
    build (channel counts, head counts) as JSON: reloading needs no pickle and works for any architecture."""
    save_model(model, str(out_dir / WEIGHTS))  # handles tied weights; plain tensors only
    fresh = _rebuild(cfg)
    replaced = {SPLIT: split_multihead_attention(fresh, split_modules(model))}   # compared like for like
    arch = {"model": cfg.model_dump(mode="json"), "inputs": [s.to_dict() for s in specs],
            "replaced_modules": replaced if replaced[SPLIT] else {},
            "changed_attributes": _changed_attributes(model, fresh)}
    (out_dir / ARCH).write_text(json.dumps(arch, indent=2))


def load_model_artifact(artifact: Path) -> tuple[nn.Module, tuple[InputSpec, ...]]:
    arch = json.loads((artifact / ARCH).read_text())
    model = _rebuild(ModelConfig(**arch["model"]))
    split_multihead_attention(model, arch.get("replaced_modules", {}).get(SPLIT, []))
    modules = dict(model.named_modules())
    for name, attrs in arch.get("changed_attributes", {}).items():
        for attr, value in attrs.items():
            setattr(modules[name], attr, tuple(value) if isinstance(value, list) else value)
    _resize_tensors(model, _saved_shapes(artifact / WEIGHTS))
    load_model(model, str(artifact / WEIGHTS), strict=True)
    return model.eval(), tuple(InputSpec.from_dict(s) for s in arch["inputs"])


def _rebuild(cfg: ModelConfig) -> nn.Module:
    # The artifact's own weights replace any pretrained ones; skip loading those again.
    return _construct(cfg.model_copy(update={"kwargs": {**cfg.kwargs, **_no_download(cfg)}}))


_SIMPLE = (int, float, bool, str)


def _changed_attributes(model: nn.Module, fresh: nn.Module) -> dict:
    fresh_modules = dict(fresh.named_modules())
    changed = {}
    for name, module in model.named_modules():
        reference = fresh_modules.get(name)
        if reference is None:
            continue
        diff = {k: v for k, v in vars(module).items()
                if not k.startswith("_") and _is_simple(v) and vars(reference).get(k) != v}
        if diff:
            changed[name] = diff
    return changed


def _is_simple(value) -> bool:
    return isinstance(value, _SIMPLE) or (isinstance(value, tuple) and all(isinstance(v, _SIMPLE) for v in value))


def _saved_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes from the safetensors header alone; the data is read once, by load_model."""
    with safe_open(str(path), framework="pt") as fh:
        return {name: tuple(fh.get_slice(name).get_shape()) for name in fh.keys()}


def _resize_tensors(model: nn.Module, shapes: dict[str, tuple[int, ...]]) -> None:
    """Gives parameters and buffers the saved shapes, so a pruned state_dict loads strictly."""
    for name, shape in shapes.items():
        owner_name, _, leaf = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        current = owner._parameters.get(leaf, owner._buffers.get(leaf))
        if current is None or tuple(current.shape) == shape:
            continue
        if leaf in owner._parameters:
            owner._parameters[leaf] = nn.Parameter(current.new_empty(shape))
        else:
            owner._buffers[leaf] = current.new_empty(shape)


def _no_download(cfg: ModelConfig) -> dict:
    return {"pretrained": False} if cfg.kwargs.get("pretrained") else {}


def _construct(cfg: ModelConfig) -> nn.Module:
    with torch.random.fork_rng(devices=[]):  # seeded init without disturbing the caller's random stream
        torch.manual_seed(cfg.seed)
        return _call_factory(cfg)


def _call_factory(cfg: ModelConfig) -> nn.Module:
    if cfg.name:
        try:
            return models.create(cfg.name, **cfg.kwargs)
        except (TypeError, ValueError, FileNotFoundError) as exc:
            raise ModelError(f"model '{cfg.name}': {exc}") from None
    factory = _resolve_factory(cfg.factory)
    try:
        model = factory(**cfg.kwargs)
    except TypeError as exc:
        raise ModelError(f"model.factory '{cfg.factory}' rejected model.kwargs: {exc}") from exc
    except Exception as exc:   # the user's code: keep its own message
        raise ModelError(f"model.factory '{cfg.factory}' raised {type(exc).__name__}: {first_line(exc)}") from exc
    if not isinstance(model, nn.Module):
        raise ModelError(f"model.factory '{cfg.factory}' returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _resolve_factory(ref: str):
    return resolve_callable(ref, "model.factory", ModelError)
