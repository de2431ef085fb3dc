"""The recipe's sections as frozen pydantic models: validated at load, unknown keys refused.

The stages' own configs live beside their functions (pipeline/stages/<stage>.py); `Recipe` (pipeline/recipe.py)
puts everything together. Shared here: what several stages or steps read (training, distillation, export, data).
"""
from __future__ import annotations

import re
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from edgesmith import models
from edgesmith.config_files import suggest
from edgesmith.models import InputSpec
from edgesmith.targets.profile import Precision


class Strict(BaseModel):
    """Unknown keys refused; numbers finite (`lr: .inf` is refused); booleans are not numbers (`epochs: true`)."""
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _booleans_are_not_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, bool) and _is_number(cls.model_fields[info.field_name].annotation):
            raise ValueError(f"{str(value).lower()} is a boolean; give a number")
        return value


def _is_number(annotation: Any) -> bool:
    """int, float, or an optional one (YAML's true/false would silently become 1/0)."""
    options = get_args(annotation) if get_origin(annotation) in (Union, UnionType) else (annotation,)
    return any(option in (int, float) for option in options)


class ModelConfig(Strict):
    name: str | None = None
    factory: str | None = None     # "package.module:function" or "path/to/file.py:function"
    kwargs: dict[str, Any] = {}
    checkpoint: Path | None = None  # .safetensors, or .pt/.pth loaded with weights_only=True
    seed: int = 0                   # random initialisation, so a fresh process builds the same model
    inputs: list[InputSpec] | None = None

    @model_validator(mode="after")
    def _one_source(self):
        if (self.name is None) == (self.factory is None):
            raise ValueError("give exactly one of model.name (a registered model) or model.factory "
                             "('package.module:function' or 'file.py:function')")
        if self.name is not None and self.name not in models.list_models():
            raise ValueError(f"unknown model '{self.name}'{suggest(self.name, models.list_models())}; "
                             f"registered models: {', '.join(models.list_models())}")
        if self.name is not None:
            allowed = models.get_entry(self.name).defaults()
            for key in self.kwargs:
                if key not in allowed:
                    raise ValueError(f"model '{self.name}' takes no argument '{key}'{suggest(key, list(allowed))}; "
                                     f"its arguments: {', '.join(allowed)}")
        if self.factory is not None and ":" not in self.factory:
            raise ValueError(f"model.factory '{self.factory}' must look like 'package.module:function' "
                             "or 'path/to/file.py:function'")
        return self

    @property
    def short_name(self) -> str:
        """What results call this model: the registry name with its kwargs (`mnist_cnn-width16`) or the factory's
        function name, as a folder-safe word."""
        name = self.name or self.factory.rpartition(":")[2]
        kwargs = "-".join(f"{k}{v}" for k, v in sorted(self.kwargs.items()))
        return re.sub(r"[^A-Za-z0-9._-]+", "_", f"{name}-{kwargs}" if kwargs else name)


class DataConfig(Strict):
    """Where inputs (and, optionally, labels) come from. Without labels every stage still runs: accuracy is n/a and
    fidelity to the reference model is the measure."""
    name: Literal["mnist5k", "digits", "image_folder", "npz", "factory", "synthetic"] = "factory"
    # image_folder: one sub-folder per class (labelled) or images directly in it (unlabelled);
    # npz: one array per model input, named like the input (or `x` for a one-input model), optional labels `y`
    path: Path | None = None
    factory: str | None = None      # "file.py:function" or "package.module:function" (name: factory)
    kwargs: dict[str, Any] = {}     # passed to the factory
    # mnist5k and digits: `classes` (0-9), `masks` (per-pixel: the digit's strokes, for segmenters) or `none`
    targets: Literal["classes", "masks", "none"] = "classes"
    val_fraction: float = Field(default=0.2, gt=0, lt=1)
    seed: int = 0
    samples: int = Field(default=256, ge=1)   # synthetic: how many random inputs
    eval_batch_size: int = Field(default=256, ge=1)

    @model_validator(mode="after")
    def _source_complete(self):
        if self.name in ("image_folder", "npz") and self.path is None:
            raise ValueError(f"data '{self.name}' needs data.path")
        if (self.name == "factory") != (self.factory is not None):
            raise ValueError("give data.factory ('file.py:function' returning input arrays, see the README) or a "
                             "data.name (mnist5k, digits, image_folder, npz, synthetic), not both or neither")
        if self.factory is not None and ":" not in self.factory:
            raise ValueError(f"data.factory '{self.factory}' must look like 'package.module:function' "
                             "or 'path/to/file.py:function'")
        if self.targets != "classes" and self.name not in ("mnist5k", "digits"):
            raise ValueError(f"data.targets applies to the built-in mnist5k and digits; data '{self.name}' brings its "
                             "own labels (or none)")
        return self


class TrainingConfig(Strict):
    """Hyper-parameters shared by the train stage and every stage's fine-tuning."""
    epochs: int = Field(default=10, ge=1)
    batch_size: int = Field(default=64, ge=1)
    lr: float = Field(default=3e-3, gt=0)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    weight_decay: float = Field(default=5e-4, ge=0)
    schedule: Literal["cosine", "constant"] = "cosine"
    label_smoothing: float = Field(default=0.05, ge=0, lt=1)
    augment: bool = True            # small random affine jitter of image inputs
    seed: int = 0


class DistillConfig(Strict):
    """Per output: `kl` = T²·KL(softmax(teacher/T) ‖ softmax(student/T)) (classes), `mse` (score maps, boxes, any
    dense output), `cosine` = 1 − cosine similarity per sample (embeddings); `auto`: kl for (batch, classes)
    outputs, mse otherwise. With class labels the loss is alpha·distillation + (1 − alpha)·cross-entropy."""
    alpha: float = Field(default=0.7, ge=0, le=1)
    temperature: float = Field(default=4.0, gt=0)
    loss: Literal["auto", "kl", "mse", "cosine"] = "auto"


class FinetuneConfig(TrainingConfig):
    epochs: int = Field(default=2, ge=1)
    lr: float = Field(default=1e-3, gt=0)
    distill: bool = False           # the teacher is the model as it entered the first compression stage
    distillation: DistillConfig = DistillConfig()


class FeaturePair(Strict):
    """Feature distillation: the student's layer output is matched (MSE) to the teacher's, through a learned
    1×1 adapter where their channel counts differ."""
    student: str
    teacher: str
    weight: float = Field(default=1.0, gt=0)


QuantScheme = Literal["tensorrt", "ort-x86", "ort-arm"]


class ParityConfig(Strict):
    max_abs_diff: float = Field(default=1e-3, gt=0)
    # INT8: fake-quant torch vs the Q/DQ ONNX round at different points, and the differences grow with depth
    # (measured: mnist_cnn 0.007, pruned mobilenet_v2 0.23 of the largest |output|, top-1 agreement 1.0 for both).
    # The bound catches a broken export (a wrong scale, a missing quantizer); top-1 agreement is the main gate.
    int8_max_rel_diff: float = Field(default=0.5, gt=0)
    int8_min_top1_agreement: float = Field(default=0.97, ge=0, le=1)   # measured 0.988 on a 1-epoch mobilenet_v2
    # Every INT8 file (QAT or PTQ) against the FP32 model it quantizes, on validation inputs: the worst output's
    # mean cosine similarity. Top-1 agreement is gated too where the task metric is top-1.
    int8_min_cosine: float = Field(default=0.98, ge=-1, le=1)
    min_top1_agreement: float = Field(default=0.99, ge=0, le=1)
    samples: int = Field(default=256, ge=1)


class ExportConfig(Strict):
    exporter: Literal["dynamo", "torchscript"] = "dynamo"
    opset: int = Field(default=18, ge=13, le=23)
    slim: bool = True               # onnxslim: constant folding and graph clean-up
    parity: ParityConfig = ParityConfig()

    @model_validator(mode="after")
    def _dynamo_opset(self):
        if self.exporter == "dynamo" and self.opset < 18:  # dynamo silently rewrites opset < 18 to 18
            raise ValueError(f"export.opset {self.opset} needs exporter 'torchscript'; dynamo exports opset ≥ 18")
        return self


class BenchConfig(Strict):
    warmup: int = Field(default=20, ge=0)
    runs: int = Field(default=200, ge=1)
    batch_size: int = Field(default=1, ge=1)


class TVMCompileConfig(Strict):
    tuning_trials: int = Field(default=0, ge=0)   # MetaSchedule trials for targets that run here; 0: untuned


class CompileConfig(Strict):
    """Per-device choice: each target tries its backends × these precisions (the order is the preference used when
    nothing can be measured), keeps what passes parity, and bundles the fastest measured one."""
    precisions: list[Precision] = Field(default=["int8", "fp16", "fp32"], min_length=1)
    parity_samples: int = Field(default=32, ge=1)   # validation inputs for device parity (shipped in the bundle)
    # Compiled artifact vs ONNX Runtime on the same ONNX, relative to the largest |output|, per precision.
    max_rel_diff: dict[Precision, float] = {"fp32": 1e-3, "fp16": 2e-2, "int8": 0.1}
    min_top1_agreement: float = Field(default=0.97, ge=0, le=1)
    tvm: TVMCompileConfig = TVMCompileConfig()
    # HOST:PORT of a TVM RPC tracker. Targets whose profile's rpc_key has a device registered there are measured on
    # that device (its `edgesmith_runtime.py --rpc-server`): parity and latency of every candidate, every run.
    rpc_tracker: str | None = Field(default=None, pattern=r"^[^:\s]+:\d{1,5}$")


class FidelityBound(Strict):
    """Lowest acceptable fidelity to the reference model (the model as it entered the first compression stage)."""
    cosine: float | None = Field(default=None, ge=-1, le=1)
    psnr_db: float | None = None


class BudgetConfig(Strict):
    max_accuracy_drop: float | None = Field(default=None, ge=0)   # the metric's points, against the uncompressed model
    min_fidelity: FidelityBound | None = None


class MetricFunction(Strict):
    """A user's task metric: `fn(outputs, targets) -> float`, higher is better. `outputs`: the model's output tensor
    (a tuple for several) over the validation split; `targets`: the labels (None for unlabelled data)."""
    fn: str

    @field_validator("fn")
    @classmethod
    def _reference(cls, fn: str) -> str:
        if ":" not in fn:
            raise ValueError(f"metric.fn '{fn}' must look like 'path/to/file.py:function' or 'package.module:function'")
        return fn


# `auto`: top-1 accuracy where there are class labels and the output is (batch, classes); otherwise none
Metric = Literal["auto", "top1", "none"] | MetricFunction


