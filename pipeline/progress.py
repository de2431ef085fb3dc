"""The one console and progress-bar style every long step uses (rich, on stderr so stdout stays parseable)."""
from __future__ import annotations

import contextlib
import io
import logging
import warnings

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True)


def progress_bar() -> Progress:
    return Progress(TextColumn("  [bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[status]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                    console=console, transient=False)


@contextlib.contextmanager
def quiet(*logger_names: str, hide_warnings: bool = False, hide_stderr: bool = False):
    """Silences a tool's own logging (below ERROR) and prints for one call: they say nothing to our users.
    Errors still raise. `""` names the root logger."""
    loggers = [logging.getLogger(name) for name in logger_names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
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
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
