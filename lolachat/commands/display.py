"""Terminal output helpers: progress bars on a TTY (quiet when piped), notices on stderr, JSON."""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

stderr = Console(stderr=True, highlight=False)


def notice(message: str) -> None:
    """One line on stderr for things the user should know but that are not the output."""
    stderr.print(message, markup=False, style="dim", soft_wrap=True)


def print_json(data) -> None:
    json.dump(data, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


class _TokensPerSecond(TextColumn):
    def __init__(self):
        super().__init__("")

    def render(self, task):
        speed = task.finished_speed or task.speed
        return f"{speed:,.0f} tok/s" if speed else "— tok/s"


@contextmanager
def token_progress(label: str, enabled: bool | None = None):
    """Yield a callback (done, total) that drives a bar of tokens with tok/s and ETA."""
    enabled = sys.stderr.isatty() if enabled is None else enabled
    if not enabled:
        yield lambda done, total: None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), _TokensPerSecond(),
               TimeRemainingColumn())
    with Progress(*columns, console=stderr, transient=True) as bar:
        task = bar.add_task(label, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


@contextmanager
def byte_progress(enabled: bool | None = None):
    """Yield a callback (label, done, total) that shows one bar per file with rate and ETA."""
    enabled = sys.stderr.isatty() if enabled is None else enabled
    if not enabled:
        yield lambda label, done, total: None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
               TimeRemainingColumn())
    with Progress(*columns, console=stderr) as bar:
        tasks: dict[str, int] = {}

        def update(label: str, done: int, total: int | None) -> None:
            if label not in tasks:
                tasks[label] = bar.add_task(label, total=total)
            bar.update(tasks[label], completed=done, total=total)

        yield update
