"""Benchmark orchestration: load a compiled artifact with its backend and time it with the harness."""
from __future__ import annotations

from pathlib import Path

import torch

from benchmarks.harness import LatencyStats, measure
from models import InputSpec
from pipeline.recipe import BenchConfig
from targets import Profile
from targets.backends import get_backend


def bench_artifact(backend_name: str, artifact: Path, profile: Profile, specs: tuple[InputSpec, ...],
                   cfg: BenchConfig) -> LatencyStats:
    runner = get_backend(backend_name).load(artifact, profile)
    generator = torch.Generator().manual_seed(0)
    feeds = {s.name: s.example(cfg.batch_size, generator).numpy() for s in specs}
    return measure(lambda: runner(feeds), warmup=cfg.warmup, runs=cfg.runs, batch_size=cfg.batch_size,
                   threads=runner.threads)
