"""The order a batch starts its jobs in, so that its cores stay busy to the end.

A batch ends when its last job does; started late, a long job runs alone while the other cores idle. So jobs start
longest first (LPT, the classic list-scheduling rule), each round of one recipe over every model heaviest model
first. And a job is not started while another job of the same model runs: they share that model's steps (its
training), so it would wait on the other's lock with its core idle; another model's job goes first instead.

A job's length is not known before it runs. Its model's weight is estimated on PyTorch's meta device (no memory,
no weights; ~1.5 s the first time in a process, when meta ops import torch._dynamo (as a job's first optimizer step
does anyway), so it is done by the local pool's first worker, whose server preloaded it (worker_server.py), and
by Ray's driver while Ray starts; then milliseconds): arithmetic (FLOPs of one forward pass) plus a fixed cost per
module, because small models on a CPU are bound by per-call overhead, not arithmetic (mobilenet_v2 at 28 px does 7×
fewer FLOPs than mnist_cnn and takes twice as long to train here). Only registry models are estimated: a user's
factory is not run in the batch's driver; its jobs are taken as the heaviest (started first), in matrix order.
"""
from __future__ import annotations

import math
from collections import Counter

import torch

from edgesmith import models
from edgesmith.models import input_spec_of
from edgesmith.pipeline.config import ModelConfig
from edgesmith.pipeline.evaluate import model_size
from edgesmith.pipeline.matrix import Job

MODULE_CALL_FLOPS = 5e5    # one module's fixed cost per call (~10 µs, forward and backward) in FLOPs at ~50 GFLOP/s


def start_order(jobs: list[Job], weights: dict[str, float] | None = None) -> list[Job]:
    """Round by round (a model's first job, then its second, ...), heaviest model first within a round. Jobs of one
    model keep their matrix order, and so do models of equal weight. `weights`: model_weights(jobs), if known."""
    weights = weights or model_weights(jobs)
    seen: Counter = Counter()
    rounds = []
    for job in jobs:
        rounds.append(seen[job.model])
        seen[job.model] += 1
    order = sorted(range(len(jobs)), key=lambda i: (rounds[i], -weights[jobs[i].model], i))
    return [jobs[i] for i in order]


def model_weights(jobs: list[Job]) -> dict[str, float]:
    """Each job's model label → model_weight of its model."""
    return {job.model: model_weight(job.recipe["model"]) for job in jobs}


def model_weight(model_section: dict) -> float:
    """The estimated cost of one forward pass of a recipe's model: twice its MACs (Torch-Pruning's count, as in
    results' `macs`) plus a fixed cost per leaf module; infinite where it cannot be estimated."""
    if model_section.get("name") is None:
        return math.inf
    try:
        cfg = ModelConfig.model_validate(model_section)
        with torch.device("meta"):
            model = models.create(cfg.name, **cfg.kwargs).eval()
        _, macs = model_size(model, tuple(cfg.inputs) if cfg.inputs else input_spec_of(model))
    except Exception:   # a model the meta device cannot run (data-dependent shapes): no estimate, started early
        return math.inf
    leaves = sum(1 for module in model.modules() if next(module.children(), None) is None)
    return 2 * macs + leaves * MODULE_CALL_FLOPS


class JobQueue:
    """The jobs not yet started, in start order. `take` hands out the first one whose model has no job running
    (or the first one when every model has); `done` and `retry` tell it what came back."""

    def __init__(self, jobs: list[Job], weights: dict[str, float] | None = None):
        self.queued = start_order(jobs, weights)
        self.running: Counter = Counter()

    def __bool__(self) -> bool:
        return bool(self.queued)

    def take(self) -> Job:
        job = next((j for j in self.queued if not self.running[j.model]), self.queued[0])
        self.queued.remove(job)
        self.running[job.model] += 1
        return job

    def done(self, job: Job) -> None:
        self.running[job.model] -= 1

    def retry(self, job: Job) -> None:
        self.done(job)
        self.queued.insert(0, job)
