"""Loading users' state_dicts safely: safetensors, or torch files with weights_only=True (never pickle)."""
from __future__ import annotations

import pickle
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file

from edgesmith.errors import CheckpointError

_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")
_SHOWN = 5


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The file's tensors by name, refused when unreadable, pickled or holding NaN/Inf weights."""
    state = _read(Path(path))
    for name, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise CheckpointError(f"checkpoint '{path}': tensor '{name}' holds {bad} NaN/Inf value(s) (the training "
                                  "that wrote it diverged); use an earlier checkpoint")
    return state


def _read(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist; fix model.checkpoint")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"checkpoint '{path}' is not a readable safetensors file ({exc})") from None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"checkpoint '{path}' needs pickle to load, which can run arbitrary code, so it is refused; "
            "re-save it as a plain state_dict (torch.save(model.state_dict(), ...)) or as .safetensors") from None
    except (RuntimeError, OSError, EOFError) as exc:
        raise CheckpointError(f"checkpoint '{path}' cannot be read as a torch file ({exc})") from None
    for key in _WRAPPER_KEYS:  # training scripts often wrap the weights: {"state_dict": {...}, "epoch": 3}
        if isinstance(data, dict) and isinstance(data.get(key), dict):
            data = data[key]
            break
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise CheckpointError(f"checkpoint '{path}' holds no state_dict (a mapping of names to tensors)")
    return data


def apply_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Strict load that reports the first mismatched keys and shapes, not torch's wall of text."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {list(state[k].shape)} ≠ model {list(v.shape)}"
              for k, v in expected.items() if k in state and state[k].shape != v.shape]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} key(s): {', '.join(missing[:_SHOWN])}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} key(s): {', '.join(unexpected[:_SHOWN])}")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatch(es): {'; '.join(shapes[:_SHOWN])}")
    if problems:
        raise CheckpointError(f"checkpoint '{source}' does not fit the model: {' | '.join(problems)}")
    model.load_state_dict(state, strict=True)
