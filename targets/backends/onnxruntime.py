"""ONNX Runtime on CPU: the reference runtime for parity and the INT8 path on CPU targets."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort

from targets.profile import Profile

NAME = "onnxruntime"
ARTIFACT = "model.onnx"


def unavailable_reason() -> str | None:
    return None  # a required dependency of edgesmith


def compile(onnx_path: Path, profile: Profile, out_dir: Path) -> Path:
    """ORT consumes the ONNX file itself; graph optimisation happens at session creation on the device."""
    out_dir.mkdir(parents=True, exist_ok=True)
    artifact = out_dir / ARTIFACT
    shutil.copyfile(onnx_path, artifact)
    return artifact


class OrtRunner:
    def __init__(self, model: Path | bytes, threads: int | None = None):
        options = ort.SessionOptions()
        self.threads = threads or os.cpu_count() or 1
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        source = model if isinstance(model, bytes) else str(model)
        self.session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def __call__(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(None, feeds)


def load(artifact: Path, profile: Profile | None = None) -> OrtRunner:
    return OrtRunner(artifact, profile.threads if profile else None)
