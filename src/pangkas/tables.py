"""Plain-text tables (rendered by rich) for reports and comparisons."""

from __future__ import annotations

import io
from collections.abc import Sequence

from rich.console import Console
from rich.table import Table
from rich.text import Text


def render_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[object]],
                 markdown: bool = False) -> str:
    """A titled table as text; ``markdown=True`` gives a Markdown table for docs."""
    if markdown:
        lines = [f"**{title}**", "", "| " + " | ".join(columns) + " |",
                 "|" + "|".join(["---"] + ["---:"] * (len(columns) - 1)) + "|"]
        lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
        return "\n".join(lines)
    # Text, not str: names and paths are shown as they are, never read as rich markup.
    table = Table(title=Text(title), title_justify="left")
    for i, column in enumerate(columns):
        table.add_column(Text(column), justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*(Text(str(cell)) for cell in row))
    console = Console(file=io.StringIO(), width=200, no_color=True, color_system=None)
    console.print(table)
    return console.file.getvalue().rstrip()


def human_count(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}" if float(n).is_integer() else f"{n:.3g}"


def human_bytes(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"
