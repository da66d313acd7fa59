"""What every benchmark table states about where it ran."""

from __future__ import annotations

import argparse
import importlib.util
import platform
import sys
from pathlib import Path

import torch

HERE = str(Path(__file__).resolve().parent)


def _load_real_transformers() -> None:
    """benchmarks/transformers.py is named like the library it measures. Scripts run from this
    folder have it first on sys.path, so put the real package in sys.modules before anyone
    imports it."""
    if "transformers" in sys.modules:
        return
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if p not in (HERE, "")]
    try:
        if importlib.util.find_spec("transformers") is not None:
            import transformers  # noqa: F401
    finally:
        sys.path[:] = saved


_load_real_transformers()

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
