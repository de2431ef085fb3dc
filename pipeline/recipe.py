"""Recipes: YAML validated with pydantic before any work; frozen once loaded.

Every error is one line naming the field, the bad value and the valid choices.
"""
from __future__ import annotations

import difflib
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args

import yaml
from pydantic import (BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, field_validator,
                      model_validator)

import models
from pipeline.errors import RecipeError
from targets import ProfileError, list_profiles
from targets.profile import Precision

DEFAULT_RECIPE = "default.yaml"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InputConfig(Strict):
    """An input spec given in the recipe, for models that declare none (users' own architectures)."""
    name: str = "input"
    shape: list[int] = Field(min_length=1)
    dtype: Literal["float32", "float16", "int64", "int32"] = "float32"
    dynamic_axes: dict[int, str] = {0: "batch"}
    mean: list[float] | None = None
    std: list[float] | None = None
    value_range: tuple[int, int] | None = None


class ModelConfig(Strict):
    name: str | None = None
    factory: str | None = None     # "package.module:function" or "path/to/file.py:function"
    kwargs: dict[str, Any] = {}
    checkpoint: Path | None = None  # .safetensors, or .pt/.pth loaded with weights_only=True
    seed: int = 0                   # random initialisation, so a fresh process builds the same model
    inputs: list[InputConfig] | None = None

    @model_validator(mode="after")
    def _one_source(self):
        if (self.name is None) == (self.factory is None):
            raise ValueError("give exactly one of model.name (a registered model) or model.factory "
                             "('package.module:function' or 'file.py:function')")
        if self.name is not None and self.name not in models.list_models():
            raise ValueError(f"unknown model '{self.name}'{_suggest(self.name, models.list_models())}; "
                             f"registered models: {', '.join(models.list_models())}")
        if self.factory is not None and ":" not in self.factory:
            raise ValueError(f"model.factory '{self.factory}' must look like 'package.module:function' "
                             "or 'path/to/file.py:function'")
        return self


class DataConfig(Strict):
    name: Literal["mnist5k", "digits", "image_folder", "npz", "synthetic"]
    path: Path | None = None        # image_folder: one sub-folder per class; npz: arrays x and y
    val_fraction: float = Field(default=0.2, gt=0, lt=1)
    seed: int = 0
    samples: int = Field(default=256, ge=1)   # synthetic: how many random inputs
    eval_batch_size: int = Field(default=256, ge=1)

    @model_validator(mode="after")
    def _path_when_needed(self):
        if self.name in ("image_folder", "npz") and self.path is None:
            raise ValueError(f"data '{self.name}' needs data.path")
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


class TrainStage(TrainingConfig):
    kind: Literal["train"]


class DistillConfig(Strict):
    """Loss = alpha·T²·KL(softmax(student/T) ‖ softmax(teacher/T)) + (1 − alpha)·cross-entropy."""
    alpha: float = Field(default=0.7, ge=0, le=1)
    temperature: float = Field(default=4.0, gt=0)


class FinetuneConfig(TrainingConfig):
    epochs: int = Field(default=2, ge=1)
    lr: float = Field(default=1e-3, gt=0)
    distill: bool = False           # the teacher is the model as it entered the first compression stage
    distillation: DistillConfig = DistillConfig()


class PruneStage(Strict):
    """Structured pruning: whole channels (and attention heads) leave the model, so it gets faster."""
    kind: Literal["prune"]
    method: Literal["channel"] = "channel"
    ratio: float = Field(gt=0, lt=1)                  # fraction of channels (and heads) removed
    importance: Literal["l1", "l2", "taylor", "bn_scale"] = "l2"
    global_pruning: bool = False                      # rank channels across layers instead of per layer
    layer_ratios: dict[str, Annotated[float, Field(gt=0, lt=1)]] = {}   # module name → its own ratio
    ignored_layers: list[str] | None = None           # None: the classifier (the layer producing the output)
    round_to: int | None = Field(default=None, ge=1)  # None: the targets' channel_multiple
    iterative_steps: int = Field(default=1, ge=1)     # fine-tuning runs after each step
    finetune: FinetuneConfig | None = None


class MagnitudePruneStage(Strict):
    """Unstructured pruning: single weights are zeroed on Zhu & Gupta's cubic schedule while fine-tuning.
    The model keeps its shape: smaller when compressed, never faster on dense runtimes."""
    kind: Literal["prune"]
    method: Literal["magnitude"]
    final_sparsity: float = Field(gt=0, lt=1)
    initial_sparsity: float = Field(default=0.0, ge=0, lt=1)
    start_epoch: int = Field(default=0, ge=0)
    end_epoch: int | None = Field(default=None, ge=0)   # ramp ends with this epoch; None: the one before the last
    update_every: int = Field(default=10, ge=1)          # optimizer steps between sparsity updates
    ignored_layers: list[str] | None = None              # None: the classifier
    finetune: FinetuneConfig | None = None               # None: one-shot pruning to final_sparsity

    @model_validator(mode="after")
    def _schedule(self):
        if self.initial_sparsity > self.final_sparsity:
            raise ValueError(f"initial_sparsity {self.initial_sparsity} exceeds final_sparsity {self.final_sparsity}")
        epochs = self.finetune.epochs if self.finetune else 1
        if not self.start_epoch <= self.ramp_end_epoch < epochs:
            raise ValueError(f"the schedule needs start_epoch ≤ end_epoch < finetune.epochs ({epochs}); "
                             f"got start_epoch {self.start_epoch}, end_epoch {self.ramp_end_epoch}")
        return self

    @property
    def ramp_end_epoch(self) -> int:
        """By default the last epoch fine-tunes at the final sparsity (recovery), when there is more than one."""
        epochs = self.finetune.epochs if self.finetune else 1
        return self.end_epoch if self.end_epoch is not None else max(self.start_epoch, epochs - 2)


class FeaturePair(Strict):
    """Feature distillation: the student's layer output is matched (MSE) to the teacher's, through a learned
    1×1 adapter where their channel counts differ."""
    student: str
    teacher: str
    weight: float = Field(default=1.0, gt=0)


class DistillStage(TrainingConfig):
    kind: Literal["distill"]
    epochs: int = Field(default=3, ge=1)
    lr: float = Field(default=1e-3, gt=0)
    teacher: ModelConfig | None = None   # None: the model as it entered the first compression stage
    distillation: DistillConfig = DistillConfig()
    features: list[FeaturePair] = []

    @model_validator(mode="after")
    def _trained_teacher(self):
        if self.teacher and not self.teacher.checkpoint and not self.teacher.kwargs.get("pretrained"):
            raise ValueError("distill.teacher needs trained weights: give teacher.checkpoint "
                             "(or kwargs.pretrained: true for a model with a weights file)")
        return self


QuantScheme = Literal["tensorrt", "ort-x86", "ort-arm"]


class QATStage(TrainingConfig):
    """NNCF quantization-aware training; one Q/DQ ONNX per quantization scheme the targets need."""
    kind: Literal["qat"]
    epochs: int = Field(default=1, ge=1)
    lr: float = Field(default=1e-4, gt=0)
    augment: bool = False
    schemes: list[QuantScheme] | None = None   # None: the recipe's targets' quant_scheme
    calibration_samples: int = Field(default=300, ge=1)
    distill: bool = False                      # teacher: the model as it entered the first compression stage
    distillation: DistillConfig = DistillConfig()


class PTQStage(Strict):
    """Post-training quantization (calibration only): ONNX Runtime's calibrators on the exported FP32 ONNX."""
    kind: Literal["ptq"]
    calibration: Literal["minmax", "percentile", "entropy"] = "minmax"
    percentile: float = Field(default=99.999, gt=90, le=100)
    calibration_samples: int = Field(default=300, ge=1)
    schemes: list[QuantScheme] | None = None


QUANT_KINDS = ("qat", "ptq")


def stage_tag(value: Any) -> str | None:
    """Stages are told apart by `kind`, and prune stages also by `method`."""
    get = value.get if isinstance(value, dict) else lambda k, d=None: getattr(value, k, d)
    kind = get("kind")
    return f"prune-{get('method', 'channel')}" if kind == "prune" else kind


Stage = Annotated[Union[Annotated[TrainStage, Tag("train")], Annotated[PruneStage, Tag("prune-channel")],
                        Annotated[MagnitudePruneStage, Tag("prune-magnitude")], Annotated[DistillStage, Tag("distill")],
                        Annotated[QATStage, Tag("qat")], Annotated[PTQStage, Tag("ptq")]],
                  Discriminator(stage_tag, custom_error_type="stage_kind",
                                custom_error_message="unknown stage kind or prune method; valid kinds: train, prune "
                                                     "(method channel | magnitude), distill, qat, ptq")]


class ParityConfig(Strict):
    max_abs_diff: float = Field(default=1e-3, gt=0)
    # INT8: fake-quant torch vs the Q/DQ ONNX round at different points, and the differences grow with depth
    # (measured: mnist_cnn 0.007, pruned mobilenet_v2 0.23 of the largest |output|, top-1 agreement 1.0 for both).
    # The bound catches a broken export (a wrong scale, a missing quantizer); top-1 agreement is the main gate.
    int8_max_rel_diff: float = Field(default=0.5, gt=0)
    int8_min_top1_agreement: float = Field(default=0.97, ge=0, le=1)   # measured 0.988 on a 1-epoch mobilenet_v2
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


class BudgetConfig(Strict):
    max_accuracy_drop: float | None = Field(default=None, ge=0)   # points, against the uncompressed model


class Recipe(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    model: ModelConfig
    data: DataConfig
    stages: list[Stage] = []
    export: ExportConfig = ExportConfig()
    bench: BenchConfig = BenchConfig()
    compile: CompileConfig = CompileConfig()
    targets: list[str] = ["x86-host"]
    budget: BudgetConfig = BudgetConfig()

    @field_validator("targets")
    @classmethod
    def _known_targets(cls, targets: list[str]) -> list[str]:
        try:
            valid = list_profiles()
        except ProfileError as exc:
            raise ValueError(str(exc)) from None
        for t in targets:
            if t not in valid:
                raise ValueError(f"unknown target '{t}'{_suggest(t, valid)}; valid targets: {', '.join(valid)}")
        return targets

    @field_validator("stages")
    @classmethod
    def _quantization_last(cls, stages: list) -> list:
        """QAT/PTQ fix the INT8 format per target, so the flow branches there: nothing can follow them."""
        quant = [i for i, s in enumerate(stages) if s.kind in QUANT_KINDS]
        if len(quant) > 1 or (quant and quant[0] != len(stages) - 1):
            raise ValueError(f"a recipe has at most one qat/ptq stage and it comes last; got kinds "
                             f"{[s.kind for s in stages]}")
        return stages

    @property
    def model_stages(self) -> list:
        """The stages that produce a torch model (all but a final qat/ptq)."""
        return self.stages[:-1] if self.quantization else list(self.stages)

    @property
    def quantization(self) -> "QATStage | PTQStage | None":
        return self.stages[-1] if self.stages and self.stages[-1].kind in QUANT_KINDS else None

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _suggest(bad: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(bad, valid, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def load_recipe(path: Path | None = None, overrides: list[str] | None = None) -> Recipe:
    """Reads a recipe file (or the built-in default), applies `--set key=value` overrides and validates."""
    source = str(path) if path else f"built-in {DEFAULT_RECIPE}"
    raw = _read_yaml(path)
    for item in overrides or []:
        _apply_override(raw, item)
    return validate_recipe(raw, source)


def validate_recipe(raw: dict, source: str) -> Recipe:
    try:
        return Recipe(**raw)
    except ValidationError as exc:
        raise RecipeError(f"{source}: {_one_line(exc)}") from None


def _read_yaml(path: Path | None) -> dict:
    try:
        text = path.read_text() if path else resources.files("pipeline.recipes").joinpath(DEFAULT_RECIPE).read_text()
    except OSError as exc:
        raise RecipeError(f"recipe file '{path}' cannot be read ({exc.strerror}); check the path") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of fields (name, model, data, ...), got {type(data).__name__}")
    return data


def _one_line(exc: ValidationError) -> str:
    err = exc.errors()[0]
    tagged = [str(p) for p in err["loc"] if not str(p).startswith(("function-after", "tagged-union"))]
    # Discriminated unions put the tag in the location (stages.0.train.epochs): keep it to find the stage's
    # class, drop it from the field name the user sees.
    loc = [p for i, p in enumerate(tagged) if not _is_stage_tag(tagged, i)]
    field = ".".join(loc) or "recipe"
    if err["type"] == "extra_forbidden":
        parent = _model_at(tagged[:-1])
        valid = f"; valid fields: {', '.join(parent.model_fields)}" if parent else ""
        return f"field '{field}' is not allowed{_suggest(loc[-1], list(parent.model_fields) if parent else [])}{valid}"
    msg = err["msg"].removeprefix("Value error, ")
    value = err.get("input")
    if err["type"] == "stage_kind" and isinstance(value, dict):
        value = {k: value[k] for k in ("kind", "method") if k in value}
        return f"field '{field}': {msg} (got {value})"
    shown = "" if isinstance(value, (dict, list)) or err["type"] in ("missing", "value_error") else f" (got {value!r})"
    return f"field '{field}': {msg}{shown}"


# The stage classes by tag, read off the Stage union so a new stage needs no second list here.
_STAGE_BY_TAG = {meta.tag: get_args(member)[0] for member in get_args(get_args(Stage)[0])
                 for meta in get_args(member)[1:] if isinstance(meta, Tag)}


def _is_stage_tag(loc: list[str], i: int) -> bool:
    return i > 0 and loc[i - 1].isdigit() and loc[i] in _STAGE_BY_TAG


def _model_at(loc: list[str]) -> type[BaseModel] | None:
    """The pydantic model class that sits at a field path, to list its valid fields."""
    current: type[BaseModel] = Recipe
    for i, part in enumerate(loc):
        if part.isdigit():
            continue
        if _is_stage_tag(loc, i):
            current = _STAGE_BY_TAG[part]
            continue
        field = current.model_fields.get(part)
        if field is None:
            return None
        inner = _model_in_annotation(field.annotation)
        if inner is None:
            return None
        current = inner
    return current


def _model_in_annotation(annotation) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _model_in_annotation(arg)
        if found:
            return found
    return None


def _apply_override(raw: dict, item: str) -> None:
    """`a.b.0.c=value`: the value is parsed as YAML, so numbers, booleans, lists and null keep their types."""
    if "=" not in item:
        raise RecipeError(f"--set '{item}' must look like key.path=value (e.g. stages.0.epochs=2)")
    key, value = item.split("=", 1)
    parts = key.strip().split(".")
    node: Any = raw
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        where = ".".join(parts[: i + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise RecipeError(f"--set '{key}': '{where}' is not an index of a list of {len(node)} items")
            part = int(part)
        elif not isinstance(node, dict):
            raise RecipeError(f"--set '{key}': '{'.'.join(parts[:i])}' is a value, not a section")
        if last:
            node[part] = yaml.safe_load(value)
        else:
            if isinstance(node, dict) and node.get(part) is None:
                node[part] = {}
            node = node[part]
