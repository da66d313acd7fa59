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
