"""Waiting OpenMP threads go to sleep soon instead of spinning long: GOMP_SPINCOUNT=10000 for libgomp (torch's
OpenMP runtime in its Linux wheels), unless the user set GOMP_SPINCOUNT or OMP_WAIT_POLICY.

libgomp's default spins a thread that waits at a barrier for 300,000 iterations before it sleeps. On a machine that
other work loads, the spinning thread holds a core that the thread it waits for needs, and every parallel region
ends late. Measured here (2 cores, 2 busy processes beside, median of 3 interleaved rounds): the default recipe's
training stage, 1 epoch in `edgesmith run` with torch's 2 threads, took 16.5 s with libgomp's default and 10.7 s with
10,000 (`python -m edgesmith.benchmarks.loaded_host`; idle: 5.3 and 5.6 s, rounds overlapping). Bare training steps
at batch 64 in a loop (a one-off measurement, not kept): 8 of resnet18 at 28 px took 25.6 s with the default and
2.2 s with 10,000 (1 thread: 2.2 s), 40 of mnist_cnn 33.2 and 5.5 s (1 thread: 6.4 s); idle, the same (0.87 vs
0.78 s, 2.2 vs 2.3 s). 50,000 still collapsed now and then (14.5 s); no spinning at all (OMP_WAIT_POLICY=PASSIVE)
cost resnet18 27 % on the idle host.

libgomp reads it when it loads, so it must be set before torch is imported: the command line sets it for its own
process first (entry), and with it for the local pool's worker server and a local Ray instance, which inherit its
environment; a library caller's batch starts the worker server with it (worker_server.start). A library caller's
own process is left as its owner set it. Other OpenMP runtimes (LLVM's libomp on macOS) are not tuned here: not
measured.
"""
from __future__ import annotations

from collections.abc import Mapping

SPIN_COUNT = "10000"
USER_CHOICES = ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")   # either one set by the user: left as it is


def spin_count_default(environ: Mapping[str, str]) -> dict[str, str]:
    """The variable to add to `environ` ({} when the user chose a wait policy or spin count themselves)."""
    if any(name in environ for name in USER_CHOICES):
        return {}
    return {"GOMP_SPINCOUNT": SPIN_COUNT}
