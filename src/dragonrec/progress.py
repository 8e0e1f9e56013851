"""Progress for long commands: a live bar on a terminal, plain log lines elsewhere (CI, nohup, a log file).

    with progress_bar(console, quiet=False) as bar:
        task = bar.task("ranking test", total=len(cases))
        task.update(done)                      # a bar on a terminal; a line every `every_s` seconds otherwise
    log(console, "epoch 3 loss 5.12", quiet)   # one plain line, never swallowed by a missing terminal
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


def is_terminal(console: Console | None = None) -> bool:
    return bool((console or Console(stderr=True)).is_terminal)


def log(console: Console | None, message: str, quiet: bool = False) -> None:
    """One plain, flushed line on stderr (with a time stamp when not on a terminal)."""
    if quiet:
        return
    console = console or Console(stderr=True)
    if console.is_terminal:
        console.print(message, highlight=False)
    else:
        print(f"{time.strftime('%H:%M:%S')} {message}", file=console.file or sys.stderr, flush=True)


class _Task:
    def __init__(self, bar: _Bar, description: str, total: int):
        self.bar, self.description, self.total = bar, description, total
        self.t0 = self.last = time.perf_counter()
        self.id = bar.rich.add_task(description, total=total) if bar.rich is not None else None

    def update(self, completed: int) -> None:
        if self.bar.rich is not None:
            self.bar.rich.update(self.id, completed=completed)
            return
        now = time.perf_counter()
        if self.bar.quiet or (now - self.last < self.bar.every_s and completed < self.total):
            return
        self.last = now
        log(self.bar.console, f"{self.description}: {completed}/{self.total} ({now - self.t0:.0f}s)")


class _Bar:
    def __init__(self, console: Console, quiet: bool, every_s: float):
        self.console, self.quiet, self.every_s = console, quiet, every_s
        self.rich = None
        if not quiet and console.is_terminal:
            self.rich = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), console=console, transient=True)

    def task(self, description: str, total: int) -> _Task:
        return _Task(self, description, total)


@contextmanager
def progress_bar(console: Console | None = None, quiet: bool = False, every_s: float = 30.0):
    """A bar on a terminal; otherwise a log line per task every `every_s` seconds and when it completes."""
    bar = _Bar(console or Console(stderr=True), quiet, every_s)
    if bar.rich is None:
        yield bar
        return
    with bar.rich:
        yield bar
