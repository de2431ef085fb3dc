"""Task metrics and data for the non-classifier reference models, usable from any recipe:
`metric: {fn: "edgesmith.benchmarks.tasks:mask_iou"}`."""
from __future__ import annotations

import numpy as np
import torch


def mask_iou(outputs: torch.Tensor, targets: torch.Tensor | None) -> float:
    """Intersection over union of the predicted foreground (class 1 wins the pixel) with the target masks."""
    if targets is None:
        raise ValueError("mask IoU needs target masks; use data.targets: masks")
    predicted, truth = outputs.argmax(1) == 1, targets == 1
    union = int((predicted | truth).sum())
    return int((predicted & truth).sum()) / union if union else 1.0


def digit_tokens(targets: str = "classes") -> dict:
    """scikit-learn's 1,797 real 8×8 digits as token sequences: each pixel's intensity (0-16) is a token, 64 per
    image, for the tiny transformer (`vocab_size: 17, seq_len: 64`). `targets: none` leaves the labels out."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    tokens = {"input_ids": digits.images.reshape(len(digits.images), -1).astype(np.int64)}
    return tokens if targets == "none" else {**tokens, "y": digits.target.astype(np.int64)}
