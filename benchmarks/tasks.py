"""Task metrics and data for the non-classifier reference models, usable from any recipe:
`metric: {fn: "edgesmith.benchmarks.tasks:mask_iou"}`."""
from __future__ import annotations

import torch


def mask_iou(outputs: torch.Tensor, targets: torch.Tensor | None) -> float:
    """Intersection over union of the predicted foreground (class 1 wins the pixel) with the target masks."""
    if targets is None:
        raise ValueError("mask IoU needs target masks; use data.targets: masks")
    predicted, truth = outputs.argmax(1) == 1, targets == 1
    union = int((predicted | truth).sum())
    return int((predicted & truth).sum()) / union if union else 1.0
