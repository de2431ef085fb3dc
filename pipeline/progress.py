"""The one console edgesmith talks through (rich, on stderr so stdout stays parseable), silenced the standard way.

Library callers silence it with the logger's level (`logging.getLogger("edgesmith").setLevel(logging.WARNING)`
keeps warnings, ERROR keeps nothing) or with `edgesmith.run(..., quiet=True)`. Step lines and progress bars are
INFO, warnings WARNING.
"""
from __future__ import annotations

import contextlib
import io
import logging
import time
import warnings

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

logger = logging.getLogger("edgesmith")
if logger.level == logging.NOTSET:   # a caller's own setting wins
    logger.setLevel(logging.INFO)
console = Console(stderr=True)


def enabled() -> bool:
    """Whether progress (INFO) is shown: a library caller or --quiet may have silenced it."""
    return logger.isEnabledFor(logging.INFO)


def info(message: str) -> None:
    if enabled():
        console.print(message, highlight=False, soft_wrap=True)


def warn(message: str) -> None:
    if logger.isEnabledFor(logging.WARNING):
        console.print(f"[yellow]{escape(message)}[/]", highlight=False, soft_wrap=True)   # plain text, no markup


@contextlib.contextmanager
def silenced(quiet: bool = True):
    """Within it, edgesmith prints nothing but errors (when `quiet`)."""
    previous = logger.level
    if quiet:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(previous)


def progress_bar() -> Progress | LineProgress:
    """A live bar on a terminal; in a log or a pipe, plain lines (a bar redrawn there arrives cut off)."""
    if not console.is_terminal:
        return LineProgress()
    return Progress(TextColumn("  [bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[status]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                    console=console, transient=False, disable=not enabled())


class LineProgress:
    """Progress for logs: a line whenever an update closes a stretch of work (an update without `advance`: an
    epoch's end, with its validation score) and otherwise at most every INTERVAL_S seconds, each with the count,
    the status, the elapsed and the estimated remaining time. The subset of rich's Progress that stages use."""
    INTERVAL_S = 30.0

    def __init__(self):
        self.tasks: dict[int, dict] = {}

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc) -> None:
        return None

    def add_task(self, description: str, total: float | None = None, **fields) -> int:
        now = time.monotonic()
        self.tasks[len(self.tasks)] = {"description": description, "total": total, "completed": 0,
                                       "status": fields.get("status", ""), "started": now, "printed": now}
        return len(self.tasks) - 1

    def update(self, task_id: int, *, advance: float | None = None, completed: float | None = None,
               **fields) -> None:
        task = self.tasks[task_id]
        task["completed"] = completed if completed is not None else task["completed"] + (advance or 0)
        task["status"] = fields.get("status", task["status"])
        now = time.monotonic()
        if advance is None or now - task["printed"] >= self.INTERVAL_S:
            task["printed"] = now
            info(escape(self._line(task, now)))

    @staticmethod
    def _line(task: dict, now: float) -> str:
        elapsed, done, total = now - task["started"], task["completed"], task["total"]
        count = f"{done:.0f}/{total:.0f}" if total else f"{done:.0f}"
        remaining = f", ~{_clock(elapsed * (total - done) / done)} left" if total and done else ""
        return f"  {task['description']}: {count} {task['status']} ({_clock(elapsed)} elapsed{remaining})"


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}" if minutes >= 60 else f"{minutes}:{secs:02d}"


@contextlib.contextmanager
def quiet(*logger_names: str, hide_warnings: bool = False, hide_stderr: bool = False):
    """Silences a tool's own logging (below ERROR) and prints for one call: they say nothing to our users.
    Errors still raise. `""` names the root logger."""
    loggers = [logging.getLogger(name) for name in logger_names]
    levels = [logger.level for logger in loggers]
    for one in loggers:
        one.setLevel(logging.ERROR)
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
            if hide_stderr:
                stack.enter_context(contextlib.redirect_stderr(io.StringIO()))
            if hide_warnings:
                stack.enter_context(warnings.catch_warnings())
                warnings.simplefilter("ignore")
            yield
    finally:
        for one, level in zip(loggers, levels):
            one.setLevel(level)
