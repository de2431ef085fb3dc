"""The local pool's workers are forked from one server process (multiprocessing's forkserver) that imports the
libraries every job needs while the batch's driver is still importing and validating the matrix. A spawned worker
imported them itself, after the driver: ~2.5 s each, then 1.4 s of torch._dynamo for the jobs' weights or its first
training step (measured in the batch benchmark: first job 7.9 s after launch, 4.7 s forked); a forked one starts
with them loaded. `edgesmith batch` starts the server before its own imports (cli.py); a library caller's batch
starts it with its pool.

Forking is safe only from a single-threaded process, so the server preloads nothing that starts a thread: ONNX
Runtime's module starts one when imported, so each worker imports ONNX Runtime itself (0.03 s), and the BLAS and
OpenMP pools are sized to one thread in the server (numpy's OpenBLAS starts its threads when loaded).
tests/pipeline/test_worker_server.py checks both. A worker's torch threads are set per job (batch_job.run_job and
share_cores); numpy's BLAS, which only computes calibration statistics and parity checks here, keeps one thread
per worker so that parallel jobs do not fight over the cores. The server also gets libgomp's short spin count
(openmp_wait.py: a job's torch threads beside other work on the machine). Variables a user set are left as they are.

Light to import: the CLI imports this before torch.
"""
from __future__ import annotations

import multiprocessing
import multiprocessing.forkserver
import os
from multiprocessing.context import BaseContext

from edgesmith.pipeline.openmp_wait import spin_count_default

PRELOAD = ("torch", "torch._dynamo", "onnx", "torch_pruning", "edgesmith.pipeline.evaluate",
           "edgesmith.pipeline.stages", "edgesmith.pipeline.worker_server_exit")
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def start() -> BaseContext:
    """Starts the server if it is not running (it imports in the background; this returns at once) and returns the
    context whose processes it forks. Where there is no forkserver (Windows), workers are spawned."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(list(PRELOAD))   # no effect on a server already running
    added = {**{name: "1" for name in THREAD_VARIABLES if name not in os.environ}, **spin_count_default(os.environ)}
    os.environ.update(added)   # the server inherits the environment as it is now
    try:
        multiprocessing.forkserver.ensure_running()
    finally:
        for name in added:
            os.environ.pop(name, None)
    return context
