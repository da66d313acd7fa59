"""Measured layer timings kept on disk, per machine, torch version and layer shape.

``round_to="auto"`` times layers at candidate widths; a timing measured once is kept in memory
for the process and in ``<cache>/latency/layers.json`` for later ones. ``<cache>`` is
``$PANGKAS_CACHE_DIR`` if set (set it empty to keep timings in memory only), else
``$XDG_CACHE_HOME/pangkas`` or ``~/.cache/pangkas``. The file is plain JSON (nothing in it is
imported or run), written atomically and merged with what is on disk before each write; it is
safe to delete. A timing is used only on the machine (CPU model, cores, torch threads) and torch
version that measured it. A damaged file is ignored with a warning and rewritten; a cache that
cannot be read or written leaves timings in memory, with one warning.
"""

from __future__ import annotations

import functools
import json
import math
import os
import platform
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from .files import write_file

ENV = "PANGKAS_CACHE_DIR"
FORMAT = 1  # the "format" field; a file with another one is ignored (and rewritten)


def cache_file() -> Path | None:
    """Where timings persist, or None when ``$PANGKAS_CACHE_DIR`` is set empty (memory only)."""
    root = os.environ.get(ENV)
    if root is None:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(base, "pangkas")
    return Path(root) / "latency" / "layers.json" if root else None


@functools.cache  # read once: machine() is on the lookup fast path
def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what platform says."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    """What a timing depends on besides the layer: CPU model, core count, threads, torch version."""
    return (f"{cpu_model()} | {os.cpu_count()} cores | {torch.get_num_threads()} threads | "
            f"torch {torch.__version__}")


def _valid(data) -> bool:
    """Is ``data`` the shape this module writes: {"format": 1, "machines": {str: {str: seconds}}}?"""
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("machines"), dict):
        return False
    return all(isinstance(entries, dict) and all(
        type(s) in (int, float) and math.isfinite(s) and s > 0 for s in entries.values())
        for entries in data["machines"].values())


class LatencyTable:
    """Seconds per layer key for this machine: memory first, then the file at ``path``, then
    ``measure()`` (recorded in both). ``path=None`` keeps timings in memory only."""

    def __init__(self, path: Path | None):
        self.path = path
        self.memory: dict[tuple[str, str], float] = {}
        self.loaded = False
        self.warned = False

    def seconds(self, key: str, measure: Callable[[], float]) -> float:
        here = machine()
        if (here, key) not in self.memory:
            if not self.loaded:
                self.loaded = True
                self._absorb(self._read())
            if (here, key) not in self.memory:
                self.memory[here, key] = float(measure())
                self._write()
        return self.memory[here, key]

    def many(self, keys: list[str], measure: Callable[[], dict[str, float]]) -> dict[str, float]:
        """Seconds for every key in ``keys``: from memory or the file when all are known, else all
        from one ``measure()`` (a dict by key, e.g. a profile of one forward pass), recorded."""
        here = machine()
        if not self.loaded:
            self.loaded = True
            self._absorb(self._read())
        if any((here, key) not in self.memory for key in keys):
            measured = measure()
            for key in keys:
                self.memory[here, key] = max(float(measured[key]), 1e-12)  # the file keeps positive seconds
            self._write()
        return {key: self.memory[here, key] for key in keys}

    def _absorb(self, machines: dict) -> None:
        for name, entries in machines.items():
            for key, s in entries.items():
                self.memory.setdefault((name, key), float(s))

    def _warn(self, problem: str) -> None:
        if not self.warned:
            self.warned = True
            warnings.warn(f"latency cache {self.path}: {problem}; timings are kept in memory "
                          f"(set {ENV} to move the cache, or empty to silence this)", stacklevel=4)

    def _read(self) -> dict:
        """The file's machines, or {} if there is no usable file (warning if one is damaged)."""
        if self.path is None or not (self.path.exists() or self.path.is_symlink()):
            return {}
        try:
            data = json.loads(self.path.read_bytes())
        except (OSError, ValueError) as exc:
            data = exc
        if isinstance(data, Exception) or not _valid(data):
            if self.path.is_file() and os.access(self.path, os.R_OK):
                warnings.warn(f"latency cache {self.path} is damaged or from another pangkas; "
                              "ignoring it (it will be rewritten)", stacklevel=4)
            else:
                self._warn("cannot read it")
            return {}
        return data["machines"]

    def _write(self) -> None:
        """Merge what is on disk with memory and replace the file atomically (last writer wins)."""
        if self.path is None or self.warned:
            return
        merged = self._read_quietly()
        for (name, key), s in self.memory.items():
            merged.setdefault(name, {})[key] = s
        data = json.dumps({"format": FORMAT, "machines": merged}, indent=0, sort_keys=True)
        try:
            write_file(self.path, data.encode(), overwrite=True)
        except (OSError, ValueError) as exc:  # OperationFailed, PangkasError (permissions, a dir in the way)
            self._warn(f"cannot write it ({exc})")

    def _read_quietly(self) -> dict:
        try:
            data = json.loads(self.path.read_bytes())
        except (OSError, ValueError):
            return {}
        return data["machines"] if _valid(data) else {}


_tables: dict[Path | None, LatencyTable] = {}


def table() -> LatencyTable:
    """The process's table for the current cache file (``$PANGKAS_CACHE_DIR`` is read each call)."""
    path = cache_file()
    if path not in _tables:
        _tables[path] = LatencyTable(path)
    return _tables[path]


def forget() -> None:
    """Drop the timings held in memory (the file stays): the next lookup reads it afresh."""
    _tables.clear()
