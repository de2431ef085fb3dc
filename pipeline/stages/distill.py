"""Knowledge distillation for any task: the losses (KL for classes, MSE for dense outputs, cosine for embeddings), the
objective every stage's fine-tuning uses (label-free where there are no labels), and the distill stage (outputs plus
optional feature matching through learned adapters)."""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field, model_validator

from edgesmith.errors import ModelError, TrainingError
from edgesmith.pipeline.config import DistillConfig, FeaturePair, ModelConfig, TrainingConfig
from edgesmith.pipeline.data import Dataset
from edgesmith.pipeline.evaluate import Outputs, top1_applies, torch_accuracy
from edgesmith.pipeline.model_source import build_model, output_tensors
from edgesmith.pipeline.stages import StageContext, StageResult, stage
from edgesmith.pipeline.stages.layers import module_named
from edgesmith.pipeline.stages.train import Objective, fit


def distillation_loss(student: Outputs, teacher: Outputs, cfg: DistillConfig) -> torch.Tensor:
    """The mean over outputs of each output's distillation loss (`cfg.loss`; `auto` picks per output's shape)."""
    losses = [_LOSSES[_loss_kind(s, cfg)](s, t, cfg.temperature) for s, t in zip(student, teacher)]
    return torch.stack(losses).mean()


def _loss_kind(output: torch.Tensor, cfg: DistillConfig) -> str:
    if cfg.loss != "auto":
        return cfg.loss
    return "kl" if output.ndim == 2 and output.shape[1] > 1 else "mse"


def _kl(student: torch.Tensor, teacher: torch.Tensor, t: float) -> torch.Tensor:
    """T²·KL(softmax(teacher/T) ‖ softmax(student/T)) over the class axis (1), averaged over samples (and
    positions, for per-pixel classes); T² keeps the gradient's scale (Hinton)."""
    per_position = F.kl_div(F.log_softmax(student / t, 1), F.log_softmax(teacher / t, 1), log_target=True,
                            reduction="none").sum(1)
    return t * t * per_position.mean()


def _mse(student: torch.Tensor, teacher: torch.Tensor, t: float) -> torch.Tensor:
    return F.mse_loss(student, teacher)


def _cosine(student: torch.Tensor, teacher: torch.Tensor, t: float) -> torch.Tensor:
    """1 − cosine similarity per sample: an embedding's direction is what retrieval uses, not its length."""
    return (1 - F.cosine_similarity(student.flatten(1), teacher.flatten(1), dim=1)).mean()


_LOSSES = {"kl": _kl, "mse": _mse, "cosine": _cosine}


def distillation_objective(teacher: nn.Module, cfg: DistillConfig, training: TrainingConfig) -> Objective:
    """Distillation from `teacher`; with class labels mixed with cross-entropy (alpha), without labels alone."""
    teacher.eval()

    def objective(outputs: Outputs, y: torch.Tensor | None, xs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        with torch.no_grad():
            target = output_tensors(teacher(*xs))
        if [t.shape for t in target] != [o.shape for o in outputs]:
            raise TrainingError(f"distillation: the teacher outputs {_shapes(target)} but the student "
                                f"{_shapes(outputs)}; use a teacher with the same outputs")
        soft = distillation_loss(outputs, target, cfg)
        if y is None or not top1_applies(outputs[0], y):   # no class labels: the teacher is the only signal
            return soft
        hard = F.cross_entropy(outputs[0], y, label_smoothing=training.label_smoothing)
        return cfg.alpha * soft + (1 - cfg.alpha) * hard

    return objective


def finetune_objective(ctx: StageContext, data: Dataset, training: TrainingConfig, *, distill: bool,
                       distillation: DistillConfig) -> Objective | None:
    """A stage's fine-tuning: distillation from the reference model where asked for or where there are no labels
    (what lets a pruned detector or encoder recover); None: the plain labelled loss."""
    if not (distill or not data.labelled):
        return None
    teacher = ctx.load_teacher() if ctx.load_teacher else None
    if teacher is None:
        raise TrainingError("fine-tuning without labels distils from the model as it entered the first compression "
                            "stage, and this stage has none; give labels or put a compression stage first")
    return distillation_objective(teacher, distillation, training)


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


@stage("distill", DistillStage)
def run(cfg: DistillStage, model: nn.Module, data: Dataset, ctx: StageContext) -> StageResult:
    """The distill stage: the model learns from a teacher's soft outputs and, optionally, its features."""
    teacher = (build_model(cfg.teacher) if cfg.teacher else ctx.load_teacher()).eval()
    example = tuple(spec.example(2, torch.Generator().manual_seed(0)) for spec in ctx.specs)
    _check_same_outputs(model, teacher, example)
    outputs_objective = distillation_objective(teacher, cfg.distillation, cfg)
    with FeatureMatch(model, teacher, cfg.features, example, seed=cfg.seed) as features:
        def objective(outputs, y, xs):
            return outputs_objective(outputs, y, xs) + features.loss()

        history = fit(model, data, cfg, ctx, label="distill", objective=objective,
                      extra_parameters=features.adapters.parameters())
    teacher_name = (cfg.teacher.name or cfg.teacher.factory) if cfg.teacher else "input of first compression stage"
    return StageResult(model.eval(), {"history": history, "teacher": teacher_name,
                                      "teacher_accuracy": torch_accuracy(teacher, data, ctx.eval_batch_size,
                                                                         ctx.metric),
                                      "feature_pairs": [p.model_dump() for p in cfg.features]})


def _check_same_outputs(student: nn.Module, teacher: nn.Module, example: tuple[torch.Tensor, ...]) -> None:
    with torch.no_grad():
        s, t = output_tensors(student.eval()(*example)), output_tensors(teacher(*example))
    if [o.shape for o in s] != [o.shape for o in t]:
        raise ModelError(f"distill: the teacher outputs {_shapes(t)} but the student {_shapes(s)}; use a teacher "
                         "with the same outputs (same classes)")


def _shapes(outputs: Outputs) -> str:
    shapes = [list(o.shape) for o in outputs]
    return f"shape {shapes[0]}" if len(shapes) == 1 else f"shapes {shapes}"


class FeatureMatch:
    """Captures named layers' outputs in student and teacher with forward hooks and scores their distance
    (MSE); a learned 1×1 adapter maps the student's channels to the teacher's where the counts differ."""

    def __init__(self, student: nn.Module, teacher: nn.Module, pairs: list[FeaturePair],
                 example: tuple[torch.Tensor, ...], *, seed: int):
        self.pairs = pairs
        self.student_out: dict[int, torch.Tensor] = {}
        self.teacher_out: dict[int, torch.Tensor] = {}
        self.hooks = []
        for i, pair in enumerate(pairs):
            self.hooks.append(module_named(student, pair.student, f"distill.features.{i}.student")
                              .register_forward_hook(self._keep(self.student_out, i)))
            self.hooks.append(module_named(teacher, pair.teacher, f"distill.features.{i}.teacher")
                              .register_forward_hook(self._keep(self.teacher_out, i)))
        with torch.no_grad():
            student.eval()(*example), teacher(*example)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.adapters = nn.ModuleList(_adapter(self.student_out[i], self.teacher_out[i], pair)
                                          for i, pair in enumerate(pairs))

    @staticmethod
    def _keep(store: dict, index: int):
        def hook(module, inputs, output):
            store[index] = output[0] if isinstance(output, (tuple, list)) else output
        return hook

    def loss(self) -> torch.Tensor:
        total = torch.zeros(())
        for i, pair in enumerate(self.pairs):
            student = self.adapters[i](self.student_out[i])
            total = total + pair.weight * F.mse_loss(student, self.teacher_out[i].detach())
        return total

    def __enter__(self) -> "FeatureMatch":
        return self

    def __exit__(self, *exc) -> None:
        for hook in self.hooks:
            hook.remove()


def _adapter(student: torch.Tensor, teacher: torch.Tensor, pair: FeaturePair) -> nn.Module:
    """1×1 convolution for (N, C, H, W) features, a linear map for (N, ..., D); identity when sizes agree."""
    if student.shape == teacher.shape:
        return nn.Identity()
    if student.ndim == teacher.ndim == 4 and student.shape[2:] == teacher.shape[2:]:
        return nn.Conv2d(student.shape[1], teacher.shape[1], kernel_size=1, bias=False)
    if student.ndim == teacher.ndim and student.shape[:-1] == teacher.shape[:-1]:
        return nn.Linear(student.shape[-1], teacher.shape[-1], bias=False)
    raise ModelError(f"distill.features: student '{pair.student}' gives {list(student.shape)} and teacher "
                     f"'{pair.teacher}' gives {list(teacher.shape)}; only the channel (or last) size may differ — "
                     "pick layers at the same resolution")
