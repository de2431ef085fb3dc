"""The train stage: supervised training with a cosine schedule, deterministic for a seed."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.data import Dataset
from pipeline.errors import DataError, TrainingError
from pipeline.evaluate import check_labels, torch_accuracy
from pipeline.progress import progress_bar
from pipeline.recipe import TrainStage
from pipeline.stages import StageContext, StageResult


def run(cfg: TrainStage, model: nn.Module, data: Dataset, ctx: StageContext) -> StageResult:
    if not data.labelled:
        raise DataError("the train stage needs labelled data; data 'synthetic' has none (use it for latency-only runs)")
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    steps_per_epoch = math.ceil(len(data.train) / cfg.batch_size)
    optimizer = _optimizer(cfg, model)
    total = cfg.epochs * steps_per_epoch
    schedule = (torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, total) if cfg.schedule == "cosine"
                else torch.optim.lr_scheduler.ConstantLR(optimizer, 1.0))
    history = []
    with progress_bar() as bar:
        task = bar.add_task("train", total=total, status="")
        for epoch in range(cfg.epochs):
            model.train()
            loss_sum, seen = 0.0, 0
            for xs, y in data.batches(data.train, cfg.batch_size, shuffle=True, augment=cfg.augment,
                                      generator=generator):
                logits = model(*xs)
                if epoch == 0 and seen == 0:
                    check_labels(logits, y)
                loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
                if not torch.isfinite(loss):
                    raise TrainingError(f"train: loss became {loss.item()} at epoch {epoch + 1}; "
                                        f"lower stages.train.lr (now {cfg.lr})")
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
    return StageResult(model.eval(), {"history": history, "final_loss": history[-1]["loss"]})


def _optimizer(cfg: TrainStage, model: nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay, nesterov=True)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
