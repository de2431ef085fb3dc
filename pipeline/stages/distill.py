"""Knowledge distillation: the loss, the objective any stage's fine-tuning can use, and the distill stage
(logits plus optional feature matching through learned adapters)."""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field, model_validator

from edgesmith.errors import ModelError, TrainingError
from edgesmith.pipeline.config import DistillConfig, FeaturePair, ModelConfig, TrainingConfig
from edgesmith.pipeline.data import Dataset
from edgesmith.pipeline.evaluate import torch_accuracy
from edgesmith.pipeline.model_source import build_model
from edgesmith.pipeline.stages import StageContext, StageResult, stage
from edgesmith.pipeline.stages.layers import module_named
from edgesmith.pipeline.stages.train import Objective, fit


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, y: torch.Tensor, cfg: DistillConfig,
            label_smoothing: float = 0.0) -> torch.Tensor:
    """alpha·T²·KL(softmax(teacher/T) ‖ softmax(student/T)) + (1 − alpha)·CE; T² keeps gradient scale (Hinton)."""
    t = cfg.temperature
    soft = F.kl_div(F.log_softmax(student / t, -1), F.log_softmax(teacher / t, -1), log_target=True,
                    reduction="batchmean")
    hard = F.cross_entropy(student, y, label_smoothing=label_smoothing)
    return cfg.alpha * t * t * soft + (1 - cfg.alpha) * hard


def distillation_objective(teacher: nn.Module, cfg: DistillConfig, training: TrainingConfig) -> Objective:
    teacher.eval()

    def objective(logits: torch.Tensor, y: torch.Tensor, xs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        with torch.no_grad():
            target = teacher(*xs)
        if target.shape != logits.shape:
            raise TrainingError(f"distillation: the teacher outputs shape {list(target.shape)} but the student "
                                f"{list(logits.shape)}; use a teacher with the same classes")
        return kd_loss(logits, target, y, cfg, training.label_smoothing)

    return objective


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
    logits_objective = distillation_objective(teacher, cfg.distillation, cfg)
    with FeatureMatch(model, teacher, cfg.features, example, seed=cfg.seed) as features:
        def objective(logits, y, xs):
            return logits_objective(logits, y, xs) + features.loss()

        history = fit(model, data, cfg, ctx, label="distill", objective=objective,
                      extra_parameters=features.adapters.parameters())
    teacher_name = (cfg.teacher.name or cfg.teacher.factory) if cfg.teacher else "input of first compression stage"
    return StageResult(model.eval(), {"history": history, "teacher": teacher_name,
                                      "teacher_accuracy": torch_accuracy(teacher, data, ctx.eval_batch_size),
                                      "feature_pairs": [p.model_dump() for p in cfg.features]})


def _check_same_outputs(student: nn.Module, teacher: nn.Module, example: tuple[torch.Tensor, ...]) -> None:
    with torch.no_grad():
        s, t = student.eval()(*example), teacher(*example)
    if s.shape != t.shape:
        raise ModelError(f"distill: the teacher outputs shape {list(t.shape)} but the student {list(s.shape)}; "
                         "use a teacher trained on the same classes")


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
