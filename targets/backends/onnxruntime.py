"""ONNX Runtime on CPU: the reference runtime for parity, and the INT8 path on CPU targets (TVM lowers Q/DQ to
float, DESIGN.md §3)."""
from __future__ import annotations

import shutil
from pathlib import Path

import onnxruntime as ort

from edgesmith.targets.backends import CompileOptions
from edgesmith.targets.bundle_files.edgesmith_runtime import OnnxRuntimeModel
from edgesmith.targets.profile import Profile

NAME = "onnxruntime"
ARTIFACT = "model.onnx"


def precisions(profile: Profile) -> list[str]:
    return ["int8", "fp32"]   # CPU execution provider: no FP16 kernels worth having on these CPUs


def unavailable_reason(profile: Profile) -> str | None:
    return None  # a required dependency of edgesmith


def runs_here(profile: Profile) -> bool:
    return True  # the ONNX file runs on this machine's CPU provider whatever the device


def loader_files(profile: Profile) -> list[str]:
    return []   # edgesmith_runtime.py, in every bundle, is its loader


def compile(onnx_path: Path, profile: Profile, out_dir: Path, options: CompileOptions | None = None) -> dict:
    """ORT consumes the ONNX file itself; graph optimisation happens at session creation on the device."""
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(onnx_path, out_dir / ARTIFACT)
    return {"runtime": f"onnxruntime {ort.__version__} CPUExecutionProvider", "threads": profile.threads}


OrtRunner = OnnxRuntimeModel   # the runtime the bundles ship: one session set-up everywhere


def load(folder: Path, profile: Profile | None = None) -> OrtRunner:
    """`folder`: the compiled folder, or the ONNX file itself. Threads: the profile's, when it is this host."""
    path = Path(folder)
    threads = profile.threads if profile is not None and profile.is_host else None
    return OrtRunner(path / ARTIFACT if path.is_dir() else path, threads)
