"""What every benchmark table states about where it ran."""

from __future__ import annotations

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


def publish(out: str, title: str, *sections: str, script: str) -> None:
    """Print a results document and write it to ``out``: title, sections, how to reproduce."""
    text = "\n\n".join([f"# {title}", *sections, f"Reproduce: `.venv/bin/python benchmarks/{script}`"])
    print(text)
    Path(out).write_text(text + "\n")
