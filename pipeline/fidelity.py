"""Fidelity to the reference model for any task: the outputs of every model and file on the same validation inputs,
saved once per step, and compared with the runtime's `fidelity` (cosine, PSNR, largest difference)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch

from edgesmith.pipeline.config import ParityConfig
from edgesmith.pipeline.data import Dataset
from edgesmith.targets.bundle_files.edgesmith_runtime import fidelity

OUTPUTS_FILE = "outputs.npz"


def collect_outputs(run: Callable[[tuple[torch.Tensor, ...]], tuple], data: Dataset, samples: int,
                    batch_size: int) -> list[np.ndarray]:
    """The outputs for the first `samples` validation inputs (always the same ones, in the same order)."""
    parts, seen = [], 0
    for xs, _ in data.batches(data.val, min(batch_size, samples)):
        if seen >= samples:
            break
        parts.append([np.asarray(o, dtype=np.float32) for o in run(xs)])
        seen += len(xs[0])
    return [np.concatenate(chunks)[:samples] for chunks in zip(*parts)]


def save_outputs(path: Path, outputs: list[np.ndarray]) -> None:
    np.savez(path, **{f"output_{i}": o for i, o in enumerate(outputs)})


def compare_outputs(outputs: list[np.ndarray], reference: list[np.ndarray]) -> dict:
    """Fidelity of `outputs` to `reference` on their common first samples."""
    rows = min(len(outputs[0]), len(reference[0]))
    return fidelity([o[:rows] for o in outputs], [r[:rows] for r in reference])


def int8_gate(vs_fp32: dict, int8_vs_reference: dict, fp32_vs_reference: dict, cfg: ParityConfig, *, top1: bool,
              label: str) -> str | None:
    """Why an INT8 file is too far from FP32 (None when it is close enough). It passes a measure when it is within
    the bound of the FP32 model it was made from, or loses no more than that bound's slack of the FP32 model's own
    fidelity to the reference: QAT trains, so its file may rightly move away from where training started, towards
    the reference it distils from."""
    measures = [("cosine", cfg.int8_min_cosine, "int8_min_cosine")]
    if top1 and vs_fp32.get("top1_agreement") is not None:
        measures.append(("top1_agreement", cfg.int8_min_top1_agreement, "int8_min_top1_agreement"))
    problems = []
    for key, bound, name in measures:
        direct, kept, start = vs_fp32[key], int8_vs_reference[key], fp32_vs_reference[key]
        if direct is None or kept is None or start is None:
            problems.append("its outputs hold NaN/Inf")
        elif direct < bound and kept < start - (1 - bound):
            problems.append(f"{key.replace('_', ' ')} {direct:.4f} against the FP32 model (export.parity.{name} "
                            f"{bound:g}), {kept:.4f} against the reference where the FP32 model has {start:.4f}")
    if not problems:
        return None
    psnr = vs_fp32["psnr_db"]
    return (f"{label} fails the INT8 fidelity gate on {vs_fp32['samples']} validation inputs: {'; '.join(problems)}"
            + (f" (PSNR {psnr:.1f} dB against FP32)" if psnr is not None else "")
            + "; calibrate on real data (more calibration_samples, calibration: percentile), use QAT, or loosen "
              "export.parity")
