"""The one console edgesmith talks through (rich, on stderr so stdout stays parseable), silenced the standard way.

Library callers silence it with the logger's level (`logging.getLogger("edgesmith").setLevel(logging.WARNING)`
keeps warnings, ERROR keeps nothing) or with `edgesmith.run(..., quiet=True)`. Step lines and progress bars are
INFO, warnings WARNING.
"""
from __future__ import annotations

import contextlib
import io
import logging
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


def progress_bar() -> Progress:
    return Progress(TextColumn("  [bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[status]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                    console=console, transient=False, disable=not logger.isEnabledFor(logging.INFO))


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
