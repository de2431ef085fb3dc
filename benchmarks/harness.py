"""Latency measurement: warm-up, N timed runs, percentiles, throughput and peak memory."""
from __future__ import annotations

import resource
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np


@dataclass(frozen=True)
class LatencyStats:
    p50: float        # milliseconds
    p90: float
    p99: float
    mean: float
    std: float
    min: float
    runs: int
    warmup: int
    batch_size: int
    throughput: float  # samples per second at the median latency
    threads: int
    peak_rss_mb: float  # peak resident memory of this process so far

    def to_dict(self) -> dict:
        return asdict(self)


def peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


MIN_WARMUP_S = 0.5   # thread pools of work just finished (torch's OpenMP threads spin) must go quiet first


def measure(run_once: Callable[[], object], *, warmup: int, runs: int, batch_size: int, threads: int,
            min_warmup_s: float = MIN_WARMUP_S) -> LatencyStats:
    """Times `run_once` `runs` times after `warmup` untimed calls, warming up for at least `min_warmup_s`."""
    if runs < 1 or warmup < 0:
        raise ValueError(f"runs must be ≥ 1 and warmup ≥ 0, got runs={runs}, warmup={warmup}")
    started = time.perf_counter()
    done = 0
    while done < warmup or (warmup and time.perf_counter() - started < min_warmup_s):
        run_once()
        done += 1
    times = np.empty(runs)
    for i in range(runs):
        start = time.perf_counter()
        run_once()
        times[i] = time.perf_counter() - start
    ms = times * 1e3
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return LatencyStats(p50=float(p50), p90=float(p90), p99=float(p99), mean=float(ms.mean()), std=float(ms.std()),
                        min=float(ms.min()), runs=runs, warmup=warmup, batch_size=batch_size,
                        throughput=float(batch_size / (p50 / 1e3)), threads=threads, peak_rss_mb=peak_rss_mb())
