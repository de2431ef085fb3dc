"""Latency measurement: warm-up, N timed runs, percentiles, throughput and peak memory.

The timing loop is the one the bundles' standalone runtime runs on devices, so host and device figures are taken
the same way."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np

from edgesmith.targets.bundle_files.edgesmith_runtime import MIN_WARMUP_S, peak_rss_mb, time_calls


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


def measure(run_once: Callable[[], object], *, warmup: int, runs: int, batch_size: int, threads: int,
            min_warmup_s: float = MIN_WARMUP_S) -> LatencyStats:
    """Times `run_once` `runs` times after `warmup` untimed calls, warming up for at least `min_warmup_s`."""
    if runs < 1 or warmup < 0:
        raise ValueError(f"runs must be ≥ 1 and warmup ≥ 0, got runs={runs}, warmup={warmup}")
    samples = time_calls(run_once, warmup, runs, min_warmup_s)
    return summarize(samples, warmup=warmup, batch_size=batch_size, threads=threads, peak_rss=peak_rss_mb())


def summarize(ms, *, warmup: int, batch_size: int, threads: int, peak_rss: float) -> LatencyStats:
    """Statistics of per-call milliseconds, timed here or on a device (edgesmith_runtime's samples)."""
    ms = np.asarray(ms, dtype=float)
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return LatencyStats(p50=float(p50), p90=float(p90), p99=float(p99), mean=float(ms.mean()), std=float(ms.std()),
                        min=float(ms.min()), runs=len(ms), warmup=warmup, batch_size=batch_size,
                        throughput=float(batch_size / (p50 / 1e3)), threads=threads, peak_rss_mb=peak_rss)
