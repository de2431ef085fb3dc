"""Accuracy for torch and ONNX models on the validation split, and model size (params, MACs)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from edgesmith.errors import DataError, ModelError, first_line
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
        if not top1_applies(logits, y):   # dense outputs or targets: top-1 says nothing (n/a)
            return None
        check_labels(logits, y)
        correct += int((logits.argmax(-1) == y).sum())
    return 100.0 * correct / len(data.val)


def onnx_accuracy(runner, data: Dataset, specs: tuple[InputSpec, ...], batch_size: int) -> float | None:
    if not data.labelled:
        return None
    correct = 0
    for xs, y in data.batches(data.val, batch_size):
        logits = runner(feeds(xs, specs))[0]
        if not top1_applies(logits, y):
            return None
        correct += int((np.argmax(logits, -1) == y.numpy()).sum())
    return 100.0 * correct / len(data.val)


def feeds(xs: tuple[torch.Tensor, ...], specs: tuple[InputSpec, ...]) -> dict[str, np.ndarray]:
    return {spec.name: x.numpy() for x, spec in zip(xs, specs)}


def top1_applies(logits, y: torch.Tensor) -> bool:
    """Top-1 accuracy needs (batch, classes) outputs and one integer class per sample."""
    return logits.ndim == 2 and y.ndim == 1 and not torch.is_floating_point(y)


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
    total = sum(p.numel() for p in params)
    return sum(int((p == 0).sum()) for p in params) / total if total else 0.0   # a parameter-free model


def evaluate_onnx_file(path: Path, recipe) -> dict:
    """An ONNX file from anywhere (another tool's quantizer, say), scored exactly as the pipeline's stages are."""
    from edgesmith.pipeline.data import load_dataset
    from edgesmith.pipeline.model_source import build_model, input_specs

    if not Path(path).is_file():
        raise DataError(f"ONNX file '{path}' does not exist")
    specs = input_specs(build_model(recipe.model), recipe.model)
    runner = _open_onnx(Path(path), specs)
    data = load_dataset(recipe.data, specs)
    accuracy = onnx_accuracy(runner, data, specs, recipe.data.eval_batch_size)
    return {"file": str(path), "data": recipe.data.name, "samples": len(data.val), "accuracy": accuracy}


_ORT_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64",
               "tensor(int32)": "int32"}


def _open_onnx(path: Path, specs: tuple[InputSpec, ...]):
    """The file in ONNX Runtime, refused in one line when it is not ONNX or does not take the recipe's inputs."""
    from edgesmith.targets.backends.onnxruntime import OrtRunner
    from edgesmith.targets.bundle_files.edgesmith_runtime import InputError, check_feeds

    try:
        runner = OrtRunner(path)
    except Exception as exc:   # ONNX Runtime's own exception types (InvalidProtobuf, Fail, ...)
        raise ModelError(f"'{path}' cannot be loaded by ONNX Runtime: {first_line(exc)}") from exc
    takes = [{"name": i.name, "dtype": _ORT_DTYPES.get(i.type, i.type),
              "shape": [d if isinstance(d, int) else 1 for d in i.shape],
              "dynamic_axes": {str(a): str(d) for a, d in enumerate(i.shape) if not isinstance(d, int)}}
             for i in runner.session.get_inputs()]
    try:
        check_feeds(feeds(tuple(s.example(1) for s in specs), specs), takes)
    except InputError as exc:
        raise ModelError(f"'{path}' does not take the recipe model's inputs ({_given(specs)}): {exc}") from None
    return runner


def _given(specs: tuple[InputSpec, ...]) -> str:
    return "; ".join(f"'{s.name}' {s.dtype}{list(s.shape)}" for s in specs)
