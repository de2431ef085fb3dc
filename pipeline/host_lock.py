"""One host, several jobs: a latency figure is never taken while another job computes on the same cores.

Runs that share a cache may run side by side (a batch's jobs). Every step's build holds the host's lock shared;
a timing loop (`measuring`) holds it exclusively, for just the loop. A measurement waiting announces itself on a
second lock ("intent"): builds pause for it between data batches (`pause_point`, called by Dataset.batches, so
training, fine-tuning, calibration and evaluation all yield at batch granularity) and new builds wait behind it,
so it neither waits for a whole training run nor starves. Builds that cannot pause (an export, a compile) finish
first. Lock files live in the cache, named by host: machines sharing a cache over a network file system do not
wait on each other. Kernel flocks: a killed holder leaves no stale lock. A pause point is also where a batch job
takes the cores that finished jobs left idle (`adjusting`).
"""
from __future__ import annotations

import contextlib
import fcntl
import socket
import threading
import time
from pathlib import Path
from typing import IO, Callable, Iterator

from edgesmith.pipeline.progress import info

_ADJUST_EVERY_S = 0.25     # a pause point comes every few milliseconds in training: adjusting costs a file listing
_held = threading.local()   # this thread's open lock files (intent, host), whether exclusive, and nesting depth


@contextlib.contextmanager
def computing(locks_dir: Path) -> Iterator[None]:
    """Held around a step's build (shared with other builds). Nested builds share the outer hold."""
    if getattr(_held, "files", None):
        yield
        return
    name = f"host-{socket.gethostname()}"
    with open(locks_dir / f"{name}.intent", "a") as intent, open(locks_dir / f"{name}.lock", "a") as host:
        _pass_pending_measurement(intent)
        fcntl.flock(host, fcntl.LOCK_SH)
        _held.files, _held.exclusive = (intent, host), False
        try:
            yield
        finally:
            _held.files = None
            fcntl.flock(host, fcntl.LOCK_UN)


@contextlib.contextmanager
def measuring() -> Iterator[None]:
    """The host to this thread alone for a timing loop: other builds pause at their next batch or finish first.
    Outside a build (no cache to hold locks in) it times as is."""
    files = getattr(_held, "files", None)
    if not files or _held.exclusive:
        yield
        return
    intent, host = files
    fcntl.flock(host, fcntl.LOCK_UN)      # another measurement may be waiting on this build: let it go first
    fcntl.flock(intent, fcntl.LOCK_EX)    # from now on builds pause at their next batch
    fcntl.flock(host, fcntl.LOCK_EX)      # every build paused or finished
    _held.exclusive = True
    try:
        yield
    finally:
        _held.exclusive = False
        fcntl.flock(host, fcntl.LOCK_SH)   # back to an ordinary build
        fcntl.flock(intent, fcntl.LOCK_UN)


@contextlib.contextmanager
def stepped_aside() -> Iterator[None]:
    """Around a wait for another job's work (a latency table it is measuring): this build's shared hold is let go
    meanwhile, or that job's measurements would wait for a build that does nothing."""
    files = getattr(_held, "files", None)
    if not files or _held.exclusive:
        yield
        return
    intent, host = files
    fcntl.flock(host, fcntl.LOCK_UN)
    try:
        yield
    finally:
        _pass_pending_measurement(intent)
        fcntl.flock(host, fcntl.LOCK_SH)


@contextlib.contextmanager
def one_job_at_a_time(path: Path, waiting: str) -> Iterator[None]:
    """Around work that parallel jobs would each repeat (a latency table they all need): one job does it while the
    others wait, their builds stepped aside meanwhile, then find it done. `waiting`: said when this job waits."""
    with open(path.with_suffix(".lock"), "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            info(waiting)
            with stepped_aside():
                fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def adjusting(adjust: Callable[[], None]) -> Iterator[None]:
    """`adjust` runs at this thread's pause points (at most every _ADJUST_EVERY_S) while inside: a batch job
    resizes its torch threads there, which only the computing thread can do (OpenMP's thread count is per thread)."""
    previous = getattr(_held, "adjust", None)
    _held.adjust, _held.adjusted = adjust, time.monotonic()
    try:
        yield
    finally:
        _held.adjust = previous


def pause_point() -> None:
    """Between two batches of a build: if a measurement is waiting, step aside until it is done."""
    adjust = getattr(_held, "adjust", None)
    if adjust is not None and time.monotonic() - _held.adjusted >= _ADJUST_EVERY_S:
        _held.adjusted = time.monotonic()
        adjust()
    files = getattr(_held, "files", None)
    if not files or _held.exclusive:
        return
    intent, host = files
    try:
        fcntl.flock(intent, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:   # a measurement holds the intent lock
        fcntl.flock(host, fcntl.LOCK_UN)
        _pass_pending_measurement(intent)
        fcntl.flock(host, fcntl.LOCK_SH)
        return
    fcntl.flock(intent, fcntl.LOCK_UN)


def _pass_pending_measurement(intent: IO) -> None:
    """Waits while a measurement holds the intent lock."""
    fcntl.flock(intent, fcntl.LOCK_SH)
    fcntl.flock(intent, fcntl.LOCK_UN)
