"""Accuracy for torch and ONNX models on the validation split, and model size (params, MACs)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from edgesmith.errors import DataError
from edgesmith.models import InputSpec
from edgesmith.pipeline.data import Dataset


@torch.inference_mode()
def torch_accuracy(model: nn.Module, data: Dataset, batch_size: int) -> float | None:
    """Top-1 accuracy in percent, or None for unlabelled data (reported as n/a, never 0)."""
    if not data.labelled:
        return None
    model.eval()
    correct = 0
    for xs, y in data.batches(data.val, batch_size):
        logits = model(*xs)
        check_labels(logits, y)
        correct += int((logits.argmax(-1) == y).sum())
    return 100.0 * correct / len(data.val)


def onnx_accuracy(runner, data: Dataset, specs: tuple[InputSpec, ...], batch_size: int) -> float | None:
    if not data.labelled:
        return None
    correct = 0
    for xs, y in data.batches(data.val, batch_size):
        logits = runner(feeds(xs, specs))[0]
        correct += int((np.argmax(logits, -1) == y.numpy()).sum())
    return 100.0 * correct / len(data.val)


def feeds(xs: tuple[torch.Tensor, ...], specs: tuple[InputSpec, ...]) -> dict[str, np.ndarray]:
    return {spec.name: x.numpy() for x, spec in zip(xs, specs)}


def check_labels(logits: torch.Tensor, y: torch.Tensor) -> None:
    if logits.ndim != 2:
        raise DataError(f"the model outputs shape {list(logits.shape)}; classification needs (batch, classes)")
    if int(y.max()) >= logits.shape[-1]:
        raise DataError(f"the data has labels up to {int(y.max())} but the model outputs {logits.shape[-1]} classes; "
                        f"set model.kwargs.num_classes: {int(y.max()) + 1}")


def model_size(model: nn.Module, specs: tuple[InputSpec, ...]) -> tuple[int, int]:
    """(parameters, multiply-accumulates for one sample), counted by Torch-Pruning's op counter."""
    import torch_pruning as tp

    example = tuple(spec.example(1) for spec in specs)
    macs, params = tp.utils.count_ops_and_params(model.eval(), example[0] if len(example) == 1 else example)
    return int(params), int(macs)


@torch.no_grad()
def model_sparsity(model: nn.Module) -> float:
    """Zeros among all parameters: what magnitude pruning leaves, and what compresses."""
    params = list(model.parameters())
    return sum(int((p == 0).sum()) for p in params) / sum(p.numel() for p in params)


def evaluate_onnx_file(path: Path, recipe) -> dict:
    """An ONNX file from anywhere (another tool's quantizer, say), scored exactly as the pipeline's stages are."""
    from edgesmith.pipeline.data import load_dataset
    from edgesmith.pipeline.model_source import build_model, input_specs
    from edgesmith.targets.backends.onnxruntime import OrtRunner

    if not Path(path).is_file():
        raise DataError(f"ONNX file '{path}' does not exist")
    specs = input_specs(build_model(recipe.model), recipe.model)
    data = load_dataset(recipe.data, specs)
    accuracy = onnx_accuracy(OrtRunner(Path(path)), data, specs, recipe.data.eval_batch_size)
    return {"file": str(path), "data": recipe.data.name, "samples": len(data.val), "accuracy": accuracy}
