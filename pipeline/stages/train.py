"""The train stage, and `fit`: the one training loop every stage's fine-tuning uses."""
from __future__ import annotations

import math
from typing import Callable, Iterable, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from edgesmith.errors import DataError, TrainingError
from edgesmith.pipeline.config import TrainingConfig
from edgesmith.pipeline.data import Dataset
from edgesmith.pipeline.evaluate import Outputs, check_class_targets, torch_accuracy
from edgesmith.pipeline.model_source import output_tensors
from edgesmith.pipeline.progress import progress_bar
from edgesmith.pipeline.stages import StageContext, StageResult, stage
from edgesmith.pipeline.stages.layers import WEIGHT_LAYERS

# (the model's outputs, labels or None, inputs) -> loss
Objective = Callable[[Outputs, torch.Tensor | None, tuple[torch.Tensor, ...]], torch.Tensor]


class TrainStage(TrainingConfig):
    kind: Literal["train"]


@stage("train", TrainStage)
def run(cfg: TrainStage, model: nn.Module, data: Dataset, ctx: StageContext) -> StageResult:
    history = fit(model, data, cfg, ctx, label="train")
    return StageResult(model.eval(), {"history": history, "final_loss": history[-1]["loss"]})


def cross_entropy(cfg: TrainingConfig) -> Objective:
    def objective(outputs: Outputs, y: torch.Tensor, xs) -> torch.Tensor:
        check_class_targets(outputs[0], y)   # per sample, or per pixel for a segmenter
        return F.cross_entropy(outputs[0], y, label_smoothing=cfg.label_smoothing)
    return objective


def fit(model: nn.Module, data: Dataset, cfg: TrainingConfig, ctx: StageContext, *, label: str,
        objective: Objective | None = None, extra_parameters: Iterable[nn.Parameter] = (),
        before_step: Callable[[int, int], None] | None = None) -> list[dict]:
    """Trains `model` in place; deterministic for cfg.seed. Returns per-epoch loss and validation accuracy.

    `extra_parameters` train alongside the model (distillation adapters); `before_step(step, epoch)` runs
    before every optimizer step (a pruning schedule)."""
    if objective is None and not data.labelled:
        raise DataError(f"{label} needs labelled data; data '{data.name}' has no labels: give labels (a y array, "
                        "class sub-folders), or compress without them (prune, distill and qat distil from the "
                        "model as it entered the first compression stage)")
    objective = objective or cross_entropy(cfg)
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    optimizer = _optimizer(cfg, [*model.parameters(), *extra_parameters])
    total = cfg.epochs * math.ceil(len(data.train) / cfg.batch_size)
    schedule = (torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, total) if cfg.schedule == "cosine"
                else torch.optim.lr_scheduler.ConstantLR(optimizer, 1.0))
    zeros = _zero_masks(model) if ctx.keep_sparsity else []
    history, step = [], 0
    with progress_bar() as bar:
        task = bar.add_task(label, total=total, status="")
        for epoch in range(cfg.epochs):
            model.train()
            loss_sum, seen = 0.0, 0
            for xs, y in data.batches(data.train, cfg.batch_size, shuffle=True, augment=cfg.augment,
                                      generator=generator):
                if before_step:
                    before_step(step, epoch)
                step += 1
                loss = objective(output_tensors(model(*xs)), y, xs)
                if not torch.isfinite(loss):
                    raise TrainingError(f"{label}: loss became {loss.item()} at epoch {epoch + 1}; lower its lr "
                                        f"(now {cfg.lr}); artifacts of earlier stages are kept")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                _reapply(zeros)
                loss_sum += loss.item() * len(xs[0])
                seen += len(xs[0])
                bar.update(task, advance=1, status=f"epoch {epoch + 1}/{cfg.epochs} loss {loss_sum / seen:.3f}")
            accuracy = torch_accuracy(model, data, ctx.eval_batch_size, ctx.metric)
            history.append({"epoch": epoch + 1, "loss": loss_sum / seen, "accuracy": accuracy})
            score = "" if accuracy is None else f" val {accuracy:.4g}"
            bar.update(task, status=f"epoch {epoch + 1}/{cfg.epochs} loss {loss_sum / seen:.3f}{score}")
    return history


def _optimizer(cfg: TrainingConfig, parameters: list[nn.Parameter]) -> torch.optim.Optimizer:
    params = [p for p in parameters if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay, nesterov=True)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


_SPARSE_ENOUGH = 0.05   # weights with fewer zeros than this were not pruned; their zeros may change


def _zero_masks(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(weight, mask of its non-zeros) for every pruned weight tensor of the model."""
    masks = []
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, WEIGHT_LAYERS) and isinstance(weight, torch.Tensor):
            mask = weight.detach() != 0
            if 1 - mask.float().mean() >= _SPARSE_ENOUGH:
                masks.append((weight, mask))
    return masks


@torch.no_grad()
def _reapply(masks: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    for weight, mask in masks:
        weight.mul_(mask)
