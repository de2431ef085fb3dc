"""Backends are found by file name (tinygrad's idiom): `targets/backends/<name>.py` is backend `<name>`, a module
that satisfies the `Backend` protocol below. Heavy toolchains (tvm, tensorrt) are imported only inside their own
module; measuring on a device over RPC is targets/device.py, for every backend."""
from __future__ import annotations

import importlib
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable, Protocol

import numpy as np

from edgesmith.errors import EdgesmithError

_DIR = Path(__file__).parent
BUNDLE_FILES = _DIR.parent / "bundle_files"


def declared_input_shapes(onnx_path: Path) -> dict[str, list[int]]:
    """Input shapes from the io.json the pipeline writes beside an ONNX file (a sequence length a symbolic axis
    hides, say), or none for a file from elsewhere."""
    try:
        spec = json.loads(Path(onnx_path).with_name("io.json").read_text())
        return {i["name"]: list(i["shape"]) for i in spec["inputs"]}
    except (OSError, ValueError, KeyError):
        return {}


class BackendError(EdgesmithError, ValueError):
    """A backend cannot build or run a model; the message names the cause (an op, a tool, a setting) and the fix."""


class DeviceUnreachable(BackendError):
    """No device answers for a profile's RPC key: the target is chosen without measurements, it does not fail."""


@dataclass(frozen=True)
class CompileOptions:
    precision: str = "fp32"          # int8 | fp16 | fp32
    batch_size: int = 1              # static batch for TVM (MetaSchedule tunes static shapes)
    tuning_trials: int = 0           # TVM MetaSchedule trials; 0: untuned
    tuning_dir: Path | None = None   # where tuning databases persist, keyed by (ONNX hash, target)
    # Called between a compile's phases and TVM's passes, where the build may stop a while (a parallel job waiting
    # to time a model on this host goes first). Changes nothing that is built.
    pause_point: Callable[[], None] | None = field(default=None, compare=False, repr=False)

    def key_parts(self) -> dict:
        """What of these options changes the artifact: a cache key's part. Every compared field, so an option added
        later is in the key; where tuning persists is not."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.compare} | {"tuning_dir": None}

    def pause(self) -> None:
        if self.pause_point is not None:
            self.pause_point()


class Runner(Protocol):
    threads: int

    def __call__(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]: ...


class Backend(Protocol):
    """The contract every backend module meets (modules satisfy protocols structurally)."""
    NAME: str
    ARTIFACT: str   # the deployable file's name inside the compiled folder

    def precisions(self, profile) -> list[str]:
        """What it can build for that device (int8, fp16, fp32)."""

    def unavailable_reason(self, profile) -> str | None:
        """Why it cannot compile for that device here (None: it can)."""

    def runs_here(self, profile) -> bool:
        """Whether the compiled artifact executes on this machine."""

    def compile(self, onnx_path: Path, profile, out_dir: Path, options: CompileOptions) -> dict:
        """Writes the artifact (and what the device needs to finish it) into out_dir; facts for the manifest."""

    def load(self, folder: Path, profile=None) -> Runner:
        """A runner for a compiled folder."""

    def loader_files(self, profile) -> list[str]:
        """Files of targets/bundle_files/ that a bundle of this backend carries."""


BACKEND_FUNCTIONS = ("precisions", "unavailable_reason", "runs_here", "compile", "load", "loader_files")


def backend_names() -> list[str]:
    return sorted(p.stem for p in _DIR.glob("*.py") if not p.stem.startswith("_"))


def get_backend(name: str) -> Backend:
    if name not in backend_names():
        raise KeyError(f"unknown backend '{name}'; valid backends: {', '.join(backend_names())}")
    return importlib.import_module(f"edgesmith.targets.backends.{name}")
