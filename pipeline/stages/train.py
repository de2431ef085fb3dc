"""The train stage, and `fit`: the one training loop every stage's fine-tuning uses."""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.data import Dataset
from pipeline.errors import DataError, TrainingError
from pipeline.evaluate import check_labels, torch_accuracy
from pipeline.progress import progress_bar
from pipeline.recipe import TrainingConfig, TrainStage
from pipeline.stages import StageContext, StageResult

# (student logits, labels, inputs) -> loss
Objective = Callable[[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]], torch.Tensor]


def run(cfg: TrainStage, model: nn.Module, data: Dataset, ctx: StageContext) -> StageResult:
    history = fit(model, data, cfg, ctx, label="train")
    return StageResult(model.eval(), {"history": history, "final_loss": history[-1]["loss"]})


def cross_entropy(cfg: TrainingConfig) -> Objective:
    return lambda logits, y, xs: F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)


def fit(model: nn.Module, data: Dataset, cfg: TrainingConfig, ctx: StageContext, *, label: str,
        objective: Objective | None = None) -> list[dict]:
    """Trains `model` in place; deterministic for cfg.seed. Returns per-epoch loss and validation accuracy."""
    if not data.labelled:
        raise DataError(f"{label} needs labelled data; data 'synthetic' has none (use it for latency-only runs)")
    objective = objective or cross_entropy(cfg)
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    optimizer = _optimizer(cfg, model)
    total = cfg.epochs * math.ceil(len(data.train) / cfg.batch_size)
    schedule = (torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, total) if cfg.schedule == "cosine"
                else torch.optim.lr_scheduler.ConstantLR(optimizer, 1.0))
    history = []
    with progress_bar() as bar:
        task = bar.add_task(label, total=total, status="")
        for epoch in range(cfg.epochs):
            model.train()
            loss_sum, seen = 0.0, 0
            for xs, y in data.batches(data.train, cfg.batch_size, shuffle=True, augment=cfg.augment,
                                      generator=generator):
                logits = model(*xs)
                if epoch == 0 and seen == 0:
                    check_labels(logits, y)
                loss = objective(logits, y, xs)
                if not torch.isfinite(loss):
                    raise TrainingError(f"{label}: loss became {loss.item()} at epoch {epoch + 1}; lower its lr "
                                        f"(now {cfg.lr}); artifacts of earlier stages are kept")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                loss_sum += loss.item() * len(y)
                seen += len(y)
                bar.update(task, advance=1, status=f"epoch {epoch + 1}/{cfg.epochs} loss {loss_sum / seen:.3f}")
            accuracy = torch_accuracy(model, data, ctx.eval_batch_size)
            history.append({"epoch": epoch + 1, "loss": loss_sum / seen, "accuracy": accuracy})
            bar.update(task, status=f"epoch {epoch + 1}/{cfg.epochs} loss {loss_sum / seen:.3f} val {accuracy:.2f}%")
    return history


def _optimizer(cfg: TrainingConfig, model: nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay, nesterov=True)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
