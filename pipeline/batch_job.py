"""One job of a batch, run in a worker (a pool process or a Ray task): the job's pipeline run into
DIR/jobs/<label>/, its progress into the job's log, its current step into status.json, its failure into its outcome.
The worker gets the job and the folder paths only; nothing here needs the driver."""
from __future__ import annotations

import contextlib
import functools
import json
import os
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from edgesmith.errors import EdgesmithError, first_line
from edgesmith.pipeline import host_lock, progress
from edgesmith.pipeline.cache import atomic_write_json
from edgesmith.pipeline.matrix import Job
from edgesmith.pipeline.quick_exit import skip_final_collections
from edgesmith.pipeline.run_folders import claim_run_folder

STATUS_FILE = "status.json"     # in a running job's folder: its current step (the live table reads it)
LOG_FILE = "log.txt"            # a job's progress lines: a batch's terminal shows the table instead
STOP_FILE = ".interrupted"      # in the batch folder after Ctrl-C: a worker handed one more job starts nothing


@dataclass
class Outcome:
    label: str
    model: str
    recipe: str
    status: str                  # done | failed | interrupted
    reason: str | None = None
    failed_step: str | None = None
    seconds: float = 0.0
    rows: list[dict] = field(default_factory=list)      # the job's results.json
    steps: list[dict] = field(default_factory=list)     # the job's manifest steps: kind, key, cached, build_seconds

    @property
    def executed(self) -> list[str]:
        return [s["kind"] for s in self.steps if not s["cached"]]


def cores() -> int:
    return len(os.sched_getaffinity(0))


def run_job(job: Job, out_dir: str, cache_dir: str, use_cache: bool, threads: int, share_idle_cores: bool) \
        -> Outcome:
    """Runs one job in a pool process or a Ray worker: its progress goes to the job's log.txt, its current step to
    status.json; any failure becomes the outcome (the job's finished steps stay cached and published).
    `share_idle_cores`: the job's torch threads grow into the cores that finished jobs left idle (threads_now),
    at each step and between the batches of a step (host_lock.adjusting)."""
    import torch

    skip_final_collections()   # this worker's exit, after the batch's last job

    from edgesmith.pipeline.run import run as run_pipeline

    os.chdir(job.cwd)   # recipes' relative paths are relative to where the batch was started
    torch.set_num_threads(threads)
    folder = Path(out_dir) / "jobs" / job.label
    if (Path(out_dir) / STOP_FILE).exists():
        return unfinished(job, Path(out_dir), "interrupted", "stopped by Ctrl-C before it started")
    recipe = job.resolved()
    claim_run_folder(folder, recipe, force=True)   # the batch owns its job folders: a changed job replaces its own
    started = time.time()
    step = {"label": None}
    share = functools.partial(share_cores, Path(out_dir), threads)

    def on_step(label: str) -> None:
        step["label"] = label
        atomic_write_json(folder / STATUS_FILE, {"started": started, "step": label, "step_started": time.time()})
        if share_idle_cores:
            share()

    status, reason = "done", None
    sharing = host_lock.adjusting(share) if share_idle_cores else contextlib.nullcontext()
    with open(folder / LOG_FILE, "a") as log, _console_to(log), sharing:
        log.write(f"— batch job {job.label}, {time.strftime('%Y-%m-%d %H:%M:%S')} —\n")
        try:
            run_pipeline(recipe, folder, Path(cache_dir), use_cache=use_cache, on_step=on_step)
        except EdgesmithError as exc:
            status, reason = "failed", first_line(exc, 600)
        except KeyboardInterrupt:   # Ctrl-C reached the whole process group: no job may start after this one
            status, reason = "interrupted", "stopped by Ctrl-C"
            (Path(out_dir) / STOP_FILE).touch()
        except Exception as exc:   # a bug of ours or the model's: its traceback is in the job's log
            status, reason = "failed", f"{type(exc).__name__}: {first_line(exc)} (traceback in {folder / LOG_FILE})"
            log.write(traceback.format_exc())
    if status != "interrupted":   # kept to say where it stopped (the driver may not get this outcome)
        (folder / STATUS_FILE).unlink(missing_ok=True)
    return Outcome(job.label, job.model, job.recipe_name, status, reason,
                   step["label"] if status != "done" else None, round(time.time() - started, 2),
                   *_written(folder))


def warm_up(jobs: list[Job]) -> dict[str, float]:
    """A new worker's first task: the imports every job needs, and the jobs' model weights (job_order.py), which
    cost a worker nothing its first job's training would not import anyway but the driver 1.5 s of a core."""
    import edgesmith.pipeline.run  # noqa: F401
    from edgesmith.pipeline.job_order import model_weights

    return model_weights(jobs)


def share_cores(out_dir: Path, threads: int) -> None:
    """Sets this thread's torch threads to threads_now."""
    import torch

    wanted = threads_now(out_dir, threads)
    if wanted != torch.get_num_threads():
        torch.set_num_threads(wanted)


def threads_now(out_dir: Path, threads: int) -> int:
    """Torch threads for a job now: this machine's cores over the jobs running (those with a status file), never
    fewer than the job's share. Without it a batch's last jobs run one core each while the cores of the finished
    ones idle (the last job's fine-tuning, 5 s here, once ran on one of two cores)."""
    running = sum(1 for _ in (out_dir / "jobs").glob(f"*/{STATUS_FILE}"))
    return max(threads, cores() // max(1, running))


@contextlib.contextmanager
def _console_to(handle):
    """edgesmith's console writes to the job's log while the job runs (plain text: it is not a terminal)."""
    console = progress.console
    previous = console.file
    console.file = handle
    try:
        yield
    finally:
        console.file = previous


def _written(folder: Path) -> tuple[list[dict], list[dict]]:
    """The rows and steps the job's run folder holds (written even when the run failed part-way)."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
        return manifest["metrics"], manifest["steps"]
    except (OSError, ValueError, KeyError):
        return [], []


def unfinished(job: Job, out: Path, status: str, reason: str) -> Outcome:
    folder = out / "jobs" / job.label
    try:
        running = json.loads((folder / STATUS_FILE).read_text())["step"]
    except (OSError, ValueError, KeyError):
        running = None
    return Outcome(job.label, job.model, job.recipe_name, status, reason, running, 0.0, *_written(folder))
