"""Accuracy for torch and ONNX models on the validation split, and model size (params, MACs)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from edgesmith.errors import DataError, ModelError, first_line
from edgesmith.models import InputSpec
from edgesmith.pipeline.data import Dataset
from edgesmith.pipeline.model_source import output_tensors
from edgesmith.pipeline.user_code import resolve_callable

Outputs = tuple[torch.Tensor, ...]


@dataclass(frozen=True)
class TaskMetric:
    """The recipe's `metric`: what the accuracy column and the budget measure. `top1` (percent), `none`, or a user's
    function of (outputs, targets) returning a float, higher is better; `auto` is top-1 where it applies."""
    name: str                        # "auto", "top1", "none" or the function's "file.py:function"
    function: Callable | None = None

    @classmethod
    def from_recipe(cls, metric) -> TaskMetric:
        if isinstance(metric, str):
            return cls(metric)
        return cls(metric.fn, resolve_callable(metric.fn, "metric.fn", DataError))

    def is_top1(self, output: torch.Tensor | np.ndarray, data: Dataset) -> bool:
        """Whether top-1 accuracy (and top-1 agreement as a gate) applies to this output on this data."""
        if self.name == "top1":
            return True
        return self.name == "auto" and data.labelled and top1_applies(output, data.val.y)

    def score(self, run: Callable[[tuple[torch.Tensor, ...]], Outputs], data: Dataset, batch_size: int) -> float | None:
        """The metric over the validation split; None where it does not apply (no labels for top-1, `none`)."""
        if self.function is not None:
            return self._call_function(run, data, batch_size)
        if self.name == "none" or not data.labelled:
            if self.name == "top1" and not data.labelled:
                raise DataError(f"metric top1 needs labels; data '{data.name}' has none: give labels, or set "
                                "metric: none (fidelity to the reference model is then the measure)")
            return None
        correct = 0
        for xs, y in data.batches(data.val, batch_size):
            logits = torch.as_tensor(run(xs)[0])
            if not self.is_top1(logits, data):   # dense outputs or targets: top-1 says nothing (n/a)
                return None
            check_labels(logits, y)
            correct += int((logits.argmax(-1) == y).sum())
        return 100.0 * correct / len(data.val)

    def _call_function(self, run, data: Dataset, batch_size: int) -> float:
        parts = [tuple(torch.as_tensor(o) for o in run(xs)) for xs, _ in data.batches(data.val, batch_size)]
        outputs = tuple(torch.cat(chunks) for chunks in zip(*parts))
        try:
            value = self.function(outputs[0] if len(outputs) == 1 else outputs, data.val.y)
        except Exception as exc:   # the user's code
            raise DataError(f"metric.fn '{self.name}' raised {type(exc).__name__}: {first_line(exc)}") from exc
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not math.isfinite(value):
            raise DataError(f"metric.fn '{self.name}' returned {value!r:.60} ({type(value).__name__}); it must "
                            "return one finite number, higher is better")
        return float(value)


def torch_outputs(model: nn.Module) -> Callable[[tuple[torch.Tensor, ...]], Outputs]:
    model.eval()

    def run(xs: tuple[torch.Tensor, ...]) -> Outputs:
        with torch.inference_mode():
            return output_tensors(model(*xs))
    return run


def onnx_outputs(runner, specs: tuple[InputSpec, ...]) -> Callable[[tuple[torch.Tensor, ...]], Outputs]:
    return lambda xs: tuple(torch.from_numpy(o) for o in runner(feeds(xs, specs)))


def torch_accuracy(model: nn.Module, data: Dataset, batch_size: int, metric: TaskMetric = TaskMetric("auto")) \
        -> float | None:
    """The task metric of a torch model: top-1 percent by default, None (reported as n/a, never 0) where none
    applies."""
    return metric.score(torch_outputs(model), data, batch_size)


def onnx_accuracy(runner, data: Dataset, specs: tuple[InputSpec, ...], batch_size: int,
                  metric: TaskMetric = TaskMetric("auto")) -> float | None:
    return metric.score(onnx_outputs(runner, specs), data, batch_size)


def feeds(xs: tuple[torch.Tensor, ...], specs: tuple[InputSpec, ...]) -> dict[str, np.ndarray]:
    return {spec.name: x.numpy() for x, spec in zip(xs, specs)}


def top1_applies(logits, y: torch.Tensor | None) -> bool:
    """Top-1 accuracy needs (batch, classes) outputs and one integer class per sample."""
    return y is not None and logits.ndim == 2 and y.ndim == 1 and not torch.is_floating_point(y)


def check_labels(logits: torch.Tensor, y: torch.Tensor | None) -> None:
    """Labels that fit top-1: one class per sample for (batch, classes) outputs."""
    if y is None:
        return
    if logits.ndim != 2 or y.ndim != 1 or torch.is_floating_point(y):
        raise DataError(f"metric top1 needs (batch, classes) outputs and one integer label per sample; the model "
                        f"outputs shape {list(logits.shape)} and the labels have shape {list(y.shape)} ({y.dtype}): "
                        "set metric: none or metric: {fn: 'file.py:function'}")
    check_classes(logits, y)


def check_class_targets(scores: torch.Tensor, y: torch.Tensor) -> None:
    """Labels that fit cross-entropy: a class per sample (batch, classes) or per position (batch, classes, ...)."""
    if torch.is_floating_point(y) or y.shape != scores.shape[:1] + scores.shape[2:]:
        raise DataError(f"training with cross-entropy needs one integer class per sample or per output position; the "
                        f"model outputs shape {list(scores.shape)} and the labels have shape {list(y.shape)} "
                        f"({y.dtype}): drop the train stage and compress a trained model by distillation "
                        "(prune, distill and qat need no labels)")
    check_classes(scores, y)


def check_classes(logits: torch.Tensor, y: torch.Tensor) -> None:
    if int(y.max()) >= logits.shape[1]:
        raise DataError(f"the data has labels up to {int(y.max())} but the model outputs {logits.shape[1]} classes; "
                        f"set model.kwargs.num_classes: {int(y.max()) + 1}")


def model_size(model: nn.Module, specs: tuple[InputSpec, ...]) -> tuple[int, int]:
    """(parameters, multiply-accumulates for one sample), counted by Torch-Pruning's op counter. A model on the
    meta device (no weights) is counted with meta inputs."""
    import torch_pruning as tp

    device = next(model.parameters(), torch.empty(0)).device
    example = tuple(spec.example(1).to(device) for spec in specs)
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
    metric = TaskMetric.from_recipe(recipe.metric)
    accuracy = onnx_accuracy(runner, data, specs, recipe.data.eval_batch_size, metric)
    return {"file": str(path), "data": recipe.data.name, "samples": len(data.val), "metric": metric.name,
            "accuracy": accuracy}


ORT_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64",
              "tensor(int32)": "int32"}


def load_onnx_file(path: Path):
    """Any ONNX file in ONNX Runtime (the pipeline's session set-up), or one line saying why it cannot be."""
    from edgesmith.targets.backends.onnxruntime import OrtRunner

    try:
        return OrtRunner(path)
    except Exception as exc:   # ONNX Runtime's own exception types (InvalidProtobuf, Fail, ...)
        raise ModelError(f"'{path}' cannot be loaded by ONNX Runtime: {first_line(exc)}") from exc


def _open_onnx(path: Path, specs: tuple[InputSpec, ...]):
    """The file in ONNX Runtime, refused in one line when it is not ONNX or does not take the recipe's inputs."""
    from edgesmith.targets.bundle_files.edgesmith_runtime import InputError, check_feeds

    runner = load_onnx_file(path)
    takes = [{"name": i.name, "dtype": ORT_DTYPES.get(i.type, i.type),
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
