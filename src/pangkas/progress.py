"""Progress bars for long work (rich); silent when output is not a terminal."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn
from rich.progress import track as _rich_track

T = TypeVar("T")


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    console = Console(stderr=True)
    yield from _rich_track(items, description=escape(description), total=total, transient=True,
                           console=console, disable=not console.is_terminal)


@contextlib.contextmanager
def bar(description: str, total: float) -> Iterator[Callable[[float, str], None]]:
    """A progress bar for work measured in any unit (``total`` of it): yields
    ``update(done, description)``."""
    console = Console(stderr=True)
    progress = Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), transient=True,
                        console=console, disable=not console.is_terminal)
    task = progress.add_task(escape(description), total=total)
    with progress:
        yield lambda done, text: progress.update(task, completed=done, description=escape(text))
