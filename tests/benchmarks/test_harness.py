import time

import pytest

from edgesmith.benchmarks.harness import measure


def test_measure_reports_ordered_percentiles_and_counts():
    calls = []
    stats = measure(lambda: (calls.append(1), time.sleep(0.001)), warmup=3, runs=20, batch_size=4, threads=2,
                    min_warmup_s=0)
    assert len(calls) == 23
    assert stats.min <= stats.p50 <= stats.p90 <= stats.p99
    assert stats.p50 >= 1.0  # each call sleeps 1 ms
    assert stats.throughput == pytest.approx(4 / (stats.p50 / 1e3))
    assert stats.peak_rss_mb > 10 and stats.threads == 2


def test_measure_rejects_nonsense_counts():
    with pytest.raises(ValueError):
        measure(lambda: None, warmup=0, runs=0, batch_size=1, threads=1)


def test_warmup_lasts_at_least_the_minimum_time():
    calls = []
    started = time.perf_counter()
    measure(lambda: calls.append(time.perf_counter()), warmup=1, runs=1, batch_size=1, threads=1, min_warmup_s=0.2)
    assert calls[-1] - started >= 0.2 and len(calls) > 2   # the timed run starts after ≥ 0.2 s of warm-up calls
