"""Backends are found by file name (tinygrad's idiom): `targets/backends/<name>.py` is backend `<name>`.

Each backend module has the same contract:
  NAME: str
  unavailable_reason() -> str | None    why it cannot run here (None: it can)
  compile(onnx_path, profile, out_dir) -> Path     writes the deployable artifact into out_dir
  load(artifact, profile) -> Runner     a callable taking {input name: ndarray}, returning a list of ndarrays
Heavy toolchains (tvm, tensorrt) are imported only inside their own module.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType
from typing import Protocol

import numpy as np

_DIR = Path(__file__).parent


class Runner(Protocol):
    threads: int

    def __call__(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]: ...


def backend_names() -> list[str]:
    return sorted(p.stem for p in _DIR.glob("*.py") if not p.stem.startswith("_"))


def get_backend(name: str) -> ModuleType:
    if name not in backend_names():
        raise KeyError(f"unknown backend '{name}'; valid backends: {', '.join(backend_names())}")
    return importlib.import_module(f"targets.backends.{name}")
