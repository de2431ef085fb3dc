"""Knowledge distillation: the loss, and the objective any stage's fine-tuning can use."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.errors import TrainingError
from pipeline.recipe import DistillConfig, TrainingConfig
from pipeline.stages.train import Objective


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
