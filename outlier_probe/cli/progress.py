"""A Rich progress bar over batches, handed to library calls as a plain callback."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


@contextmanager
def batch_progress(console: Console, label: str) -> Iterator[Callable[[int, int], None]]:
    # Only on a terminal: in a pipe or CI log a live bar is noise, and it leaves a blank line on stderr.
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True, disable=console.quiet or not console.is_terminal) as bar:
        tasks: dict[str, int] = {}

        def update(done: int, total: int, description: str = label) -> None:
            if description not in tasks:
                tasks[description] = bar.add_task(description, total=total)
            bar.update(tasks[description], completed=done, total=total)

        yield update


@contextmanager
def run_progress(console: Console, label: str) -> Iterator[Callable[[int, int, str], None]]:
    """A bar over whole runs (model evaluations) with the time left: update(done, total, what runs now)."""
    from rich.progress import TimeRemainingColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("eta"), TimeRemainingColumn(), console=console, transient=True,
                  disable=console.quiet or not console.is_terminal) as bar:
        task = bar.add_task(label, total=None)

        def update(done: int, total: int, what: str) -> None:
            bar.update(task, completed=done, total=total, description=f"{label}: {what}")

        yield update
