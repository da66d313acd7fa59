"""What every benchmark table states about where it ran."""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

import torch

DOCS = Path(__file__).resolve().parent.parent / "docs"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> str:
    return (f"torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu_name()}, "
            f"Python {platform.python_version()}")


def arguments(doc: str, page: str, rounds: int | None = 5) -> argparse.ArgumentParser:
    """The options of a benchmark: ``--out`` (its docs page) and, if it times, ``--rounds``."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    if rounds is not None:
        parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--out", default=str(DOCS / page))
    return parser


def publish(out: str, title: str, *sections: str, script: str) -> None:
    """Print a results document and write it to ``out``: title, sections, how to reproduce."""
    text = "\n\n".join([f"# {title}", *sections, f"Reproduce: `.venv/bin/python benchmarks/{script}`"])
    print(text)
    Path(out).write_text(text + "\n")
