"""Benchmark orchestration: load a compiled artifact with its backend and time it with the harness."""
from __future__ import annotations

from pathlib import Path

import torch

from edgesmith.benchmarks.harness import LatencyStats, measure
from edgesmith.models import InputSpec
from edgesmith.pipeline import host_lock
from edgesmith.pipeline.config import BenchConfig
from edgesmith.targets.backends import get_backend


def host_latency(onnx_path: Path, specs: tuple[InputSpec, ...], cfg: BenchConfig) -> LatencyStats:
    """ONNX Runtime on this machine with all its cores: the per-stage latency column."""
    return time_runner(get_backend("onnxruntime").load(onnx_path), specs, cfg)


def time_runner(runner, specs: tuple[InputSpec, ...], cfg: BenchConfig) -> LatencyStats:
    generator = torch.Generator().manual_seed(0)
    feeds = {s.name: s.example(cfg.batch_size, generator).numpy() for s in specs}
    with host_lock.measuring():   # parallel jobs sharing this host pause meanwhile
        return measure(lambda: runner(feeds), warmup=cfg.warmup, runs=cfg.runs, batch_size=cfg.batch_size,
                       threads=runner.threads)
