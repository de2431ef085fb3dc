"""Batch runs: every job of a matrix (pipeline/matrix.py) run into DIR/jobs/<label>/, in a local process pool or as
Ray tasks, all sharing one cache; then DIR/results.csv, results.json, batch.json and report.html.

The cache makes the batch cheap and resumable: a step that several jobs share (one training) is built once, the
others wait on its lock and reuse it; a re-run executes only what is new. A job's failure is its rows, never the
batch's end. Workers get the job (its recipe as plain data) and the folder paths, nothing else from the driver.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, as_completed, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from rich import box
from rich.live import Live
from rich.table import Table

from edgesmith.errors import first_line
from edgesmith.pipeline import progress, report, worker_server
from edgesmith.pipeline.batch_job import STATUS_FILE, STOP_FILE, Outcome, cores, run_job, unfinished, warm_up
from edgesmith.pipeline.cache import atomic_write_json, atomic_write_text
from edgesmith.pipeline.html_report import pyplot, render_report
from edgesmith.pipeline.job_order import JobQueue
from edgesmith.pipeline.matrix import ExecutorConfig, Job, Matrix, expand, load_matrix
from edgesmith.pipeline.ray_instance import RayInstance, instance_for, refuse_unauthenticated_local_ray

_GB = 1 << 30
_MEMORY_PER_JOB = 3 * _GB       # a training job's resident peak here is 1.5–2.5 GB (torch, ORT, the data)


@dataclass
class BatchResult:
    out_dir: Path
    outcomes: list[Outcome]
    executor: str
    parallel: int
    seconds: float

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status != "done"]

    @property
    def rows(self) -> list[dict]:
        """results.csv's rows: every job's rows, flat, with its model label and recipe name."""
        return [r for o in self.outcomes for r in outcome_rows(o)]


def outcome_rows(outcome: Outcome) -> list[dict]:
    rows = report.flat_rows(outcome.rows, outcome.model, outcome.recipe)
    if outcome.status != "done":   # where it stopped, and why: the job's own rows say what finished
        rows += report.flat_rows([{"stage": outcome.failed_step or "job", "status": f"{outcome.status}: "
                                   f"{outcome.reason}", "precision": None}], outcome.model, outcome.recipe)
    return rows


def run_batch(matrix_file: Path, out_dir: Path | None, cache_dir: Path, *, executor: str | None = None,
              ray_address: str | None = None, max_parallel: int | None = None, only: str | None = None,
              use_cache: bool = True, live: bool = True) -> BatchResult:
    """Validates every job, runs them, writes the batch's results and report. Raises KeyboardInterrupt after
    writing what finished when interrupted."""
    matrix = load_matrix(matrix_file)
    jobs = expand(matrix, matrix_file, only)
    cfg = _executor_config(matrix, executor, ray_address, max_parallel)
    out = Path(out_dir or Path("runs") / matrix.name)
    out.mkdir(parents=True, exist_ok=True)
    if Path(matrix_file).resolve() != (out / "matrix.yaml").resolve():   # a matrix written into its out folder stays
        shutil.copyfile(matrix_file, out / "matrix.yaml")
    for job in jobs:   # left by an interrupted batch: these jobs are queued now
        (out / "jobs" / job.label / STATUS_FILE).unlink(missing_ok=True)
    (out / STOP_FILE).unlink(missing_ok=True)
    parallel = cfg.max_parallel or default_parallel(len(jobs))
    cpus = cfg.resources.cpus or max(1, cores() // parallel)
    started = time.time()
    outcomes: dict[str, Outcome] = {}
    # jobs on this machine only (a cluster's workers are on others) and no CPU count declared for them
    share_idle_cores = (cfg.kind == "local" or cfg.address is None) and not cfg.resources.cpus
    args = (str(out.resolve()), str(Path(cache_dir).resolve()), use_cache, max(1, int(cpus)), share_idle_cores)
    pool = LocalExecutor(parallel) if cfg.kind == "local" else RayExecutor(cfg, parallel, cpus)
    board = JobBoard(jobs, out, enabled=live and progress.enabled())

    def update(outcomes: dict[str, Outcome]) -> None:
        board.update(outcomes)
        if len(jobs) - len(outcomes) < parallel:   # a slot idles: load the report's plotting now, not at the end
            pyplot()

    try:
        with board:
            pool.run(jobs, args, outcomes, update)
    except KeyboardInterrupt:
        for job in jobs:
            outcomes.setdefault(job.label, unfinished(job, out, "interrupted", "stopped by Ctrl-C"))
        raise
    finally:
        result = BatchResult(out, [outcomes.get(j.label) or unfinished(j, out, "failed", "did not run")
                                   for j in jobs], cfg.kind, parallel, time.time() - started)
        try:
            write_results(result, matrix)
        finally:
            pool.close()   # Ray's instance stopped meanwhile: waited for here
    return result


def _executor_config(matrix: Matrix, kind: str | None, address: str | None, parallel: int | None) -> ExecutorConfig:
    """The matrix's executor section with the command line's choices over it."""
    changes = {k: v for k, v in {"kind": kind, "address": address, "max_parallel": parallel}.items() if v}
    if address and not kind:
        changes["kind"] = "ray"
    return ExecutorConfig(**{**matrix.executor.model_dump(), **changes})


def default_parallel(jobs: int) -> int:
    """As many jobs as there are cores, and as fit the memory available now."""
    available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    return max(1, min(jobs, cores(), available // _MEMORY_PER_JOB))


# -------------------------------------------------------------------------------------------------- executors

Update = Callable[[dict], None]


class LocalExecutor:
    """A process pool on this machine. Processes are forked from a server that imported the jobs' libraries
    (worker_server.py; forking the driver, whose threads run, would not be safe) and reused across jobs. Jobs are
    handed out as workers free, in the queue's order (job_order.py). A worker that dies (out of memory, a crash in
    a native library) breaks the pool: the jobs that were running are tried once more in a new pool."""

    def __init__(self, parallel: int):
        self.parallel = parallel

    def close(self) -> None:
        pass   # the pool is shut down when run returns

    def run(self, jobs: list[Job], args: tuple, outcomes: dict[str, Outcome], update: Update) -> None:
        queue, crashes = None, Counter()
        while queue is None or queue:   # a new pool each time a worker died
            with ProcessPoolExecutor(self.parallel, mp_context=worker_server.start()) as pool:
                if queue is None:   # the order comes from the first worker to start (its imports and weights)
                    queue = _ordered_by_a_worker(pool, jobs, self.parallel)
                try:
                    self._until_done_or_broken(pool, queue, crashes, args, outcomes, update)
                except KeyboardInterrupt:
                    (Path(args[0]) / STOP_FILE).touch()   # before the workers finish unwinding the jobs they had
                    _stop(pool)
                    raise

    def _until_done_or_broken(self, pool: ProcessPoolExecutor, queue: JobQueue, crashes: Counter, args: tuple,
                              outcomes: dict[str, Outcome], update: Update) -> None:
        """Hands out jobs as workers free (the queue picks which) until none is left, or the pool broke and the
        jobs it was running came back."""
        out_dir, running, broken = Path(args[0]), {}, False
        while (queue and not broken) or running:
            while queue and not broken and len(running) < self.parallel:
                job = queue.take()
                try:
                    running[pool.submit(run_job, job, *args)] = job
                except BrokenProcessPool:   # a worker died since the last results came back
                    queue.retry(job)
                    broken = True
            done, _ = wait(running, timeout=0.5, return_when=FIRST_COMPLETED)
            for future in done:
                job = running.pop(future)
                try:
                    outcomes[job.label] = future.result()
                    queue.done(job)
                except BrokenProcessPool:
                    broken = True
                    self._retry_or_fail(job, queue, crashes, out_dir, outcomes)
                except Exception as exc:   # run_job reports failures itself: this is a bug of ours
                    queue.done(job)
                    outcomes[job.label] = unfinished(job, out_dir, "failed", f"{type(exc).__name__}: {first_line(exc)}")
            update(outcomes)

    @staticmethod
    def _retry_or_fail(job: Job, queue: JobQueue, crashes: Counter, out_dir: Path,
                       outcomes: dict[str, Outcome]) -> None:
        """A job whose worker died (or was running when one did) is tried once more in a new pool."""
        crashes[job.label] += (out_dir / "jobs" / job.label / STATUS_FILE).exists()
        if crashes[job.label] >= 2:
            queue.done(job)
            outcomes[job.label] = unfinished(job, out_dir, "failed", "its worker process died twice (killed, out "
                                              "of memory, or a crash in a native library)")
        else:
            queue.retry(job)


def _ordered_by_a_worker(pool: ProcessPoolExecutor, jobs: list[Job], parallel: int) -> JobQueue:
    """Every worker starts with warm_up; the first to finish gives the jobs' weights (the driver orders them
    itself if it cannot)."""
    warming = [pool.submit(warm_up, jobs) for _ in range(parallel)]
    try:
        return JobQueue(jobs, next(as_completed(warming)).result())
    except BrokenProcessPool:
        return JobQueue(jobs)


def _stop(pool: ProcessPoolExecutor) -> None:
    """Ctrl-C reached the workers too (one process group); those still busy after a grace period are ended.
    Their locks go with them and their half-built steps are swept by the next run."""
    processes = list((getattr(pool, "_processes", None) or {}).values())   # no public handle before Python 3.14
    pool.shutdown(wait=False, cancel_futures=True)
    deadline = time.time() + 10
    for process in processes:
        process.join(max(0.0, deadline - time.time()))
        if process.is_alive():
            process.terminate()


class RayExecutor:
    """Each job is a Ray task declaring its CPUs and GPUs. Without an address a local Ray instance is started (and
    stopped at the end); with one (`auto`, `ray://head:10001`) the batch joins that cluster (ray_instance.py). The
    cache and the batch folder must be paths every worker can read and write (a shared file system)."""

    def __init__(self, cfg: ExecutorConfig, parallel: int, cpus: float):
        if cfg.address is None:   # before any output or work
            refuse_unauthenticated_local_ray()
        self.cfg, self.parallel, self.cpus = cfg, parallel, cpus
        self.instance: RayInstance | None = None

    def run(self, jobs: list[Job], args: tuple, outcomes: dict[str, Outcome], update: Update) -> None:
        import ray

        self.instance = instance_for(self.cfg.address)
        queue, running = JobQueue(jobs), {}   # the jobs' weights (1.5 s of this core) while Ray starts
        self.instance.ready()
        task = ray.remote(run_job).options(num_cpus=self.cpus, num_gpus=self.cfg.resources.gpus, max_retries=0)
        try:
            while queue or running:
                while queue and len(running) < self.parallel:   # submitted as slots free: --max-parallel holds
                    job = queue.take()
                    running[task.remote(job, *args)] = job
                ready, _ = ray.wait(list(running), num_returns=1, timeout=0.5)
                for ref in ready:
                    job = running.pop(ref)
                    queue.done(job)
                    try:
                        outcomes[job.label] = ray.get(ref)
                    except ray.exceptions.RayError as exc:   # the worker died or Ray lost it
                        outcomes[job.label] = unfinished(job, Path(args[0]), "failed", f"Ray: {first_line(exc)}")
                update(outcomes)
        except KeyboardInterrupt:
            for ref in running:
                ray.cancel(ref, force=True)
            raise
        finally:
            self.instance.release()   # Ray stops while the driver writes the results

    def close(self) -> None:
        if self.instance is not None:
            self.instance.close()


# ------------------------------------------------------------------------------------------- progress and output

class JobBoard:
    """A live table of the jobs: queued, the step each running job is on, done or failed, with elapsed times."""

    def __init__(self, jobs: list[Job], out_dir: Path, enabled: bool):
        self.jobs, self.out_dir, self.enabled = jobs, out_dir, enabled
        self.outcomes: dict[str, Outcome] = {}
        self.live: Live | None = None

    def __enter__(self) -> JobBoard:
        if self.enabled:
            self.live = Live(self.render(), console=progress.console, refresh_per_second=2)
            self.live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.live is not None:
            self.live.update(self.render())
            self.live.__exit__(*exc)

    def update(self, outcomes: dict[str, Outcome]) -> None:
        self.outcomes = outcomes
        if self.live is not None:
            self.live.update(self.render())

    def render(self) -> Table:
        table = Table(title="jobs", box=box.SIMPLE_HEAD, pad_edge=False)
        for column in ("job", "state", "step", "elapsed"):
            table.add_column(column, justify="right" if column == "elapsed" else "left")
        now = time.time()
        for job in self.jobs:
            outcome = self.outcomes.get(job.label)
            if outcome is not None:
                state = "[green]done[/]" if outcome.status == "done" else f"[red]{outcome.status}[/]"
                table.add_row(job.label, state, outcome.failed_step or "", f"{outcome.seconds:.0f}s")
                continue
            try:
                status = json.loads((self.out_dir / "jobs" / job.label / STATUS_FILE).read_text())
            except (OSError, ValueError):
                table.add_row(job.label, "queued", "", "")
                continue
            table.add_row(job.label, "[cyan]running[/]", status.get("step", ""),
                          f"{now - status.get('started', now):.0f}s")
        return table


def summary_table(result: BatchResult) -> Table:
    """job, status, what ran, seconds, and why a job failed."""
    table = Table(title=f"batch {result.out_dir} ({result.executor}, {result.parallel} in parallel, "
                        f"{result.seconds:.0f}s)", box=box.SIMPLE_HEAD, pad_edge=False)
    for column in ("job", "status", "executed", "seconds", "reason"):
        table.add_column(column, justify="right" if column in ("executed", "seconds") else "left",
                         overflow="fold")
    for o in result.outcomes:
        table.add_row(o.label, o.status, f"{len(o.executed)}/{len(o.steps)}", f"{o.seconds:.1f}",
                      (f"at {o.failed_step}: " if o.failed_step else "") + (o.reason or ""))
    return table


def write_results(result: BatchResult, matrix: Matrix) -> None:
    out = result.out_dir
    rows = result.rows
    atomic_write_json(out / "results.json", rows)
    report.write_csv(out / "results.csv", rows)
    atomic_write_json(out / "batch.json", {
        "name": matrix.name, "executor": result.executor, "parallel": result.parallel,
        "seconds": round(result.seconds, 2),
        "jobs": [{k: v for k, v in asdict(o).items() if k not in ("rows", "steps")} | {
            "folder": f"jobs/{o.label}", "executed": o.executed} for o in result.outcomes]})
    atomic_write_text(out / "report.html", render_report([out]))
