"""Progress bars for long work (rich); silent when output is not a terminal."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.markup import escape
from rich.progress import track as _rich_track

T = TypeVar("T")


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    console = Console(stderr=True)
    yield from _rich_track(items, description=escape(description), total=total, transient=True,
                           console=console, disable=not console.is_terminal)
