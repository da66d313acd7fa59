"""A checkpoint directory written one unit (a block, the tensors outside the blocks) at a time,
resumable after a crash.

Shards are written, each atomically, into a partial directory beside the target
(``.<name>.pangkas-partial``) with a progress file naming the units done. A later run with the same
fingerprint (inputs, options, calibration data) continues after the last unit written; one with
another fingerprint is refused rather than mixed in. When every unit is written, the index, the
config and the input's other files (tokenizer...) are added and the directory is published to
the target in one step (``files.publish``).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from ..errors import PangkasError
from ..files import check_directory_target, publish, write_file, write_with
from .checkpoint import INDEX, Checkpoint

PARTIAL = ".pangkas-partial"
PROGRESS = "pangkas-progress.json"
SKIPPED = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".index.json", PROGRESS)


class ResumableOutput:
    """The directory ``path`` being written as ``units`` (names, in order), one shard each."""

    def __init__(self, path: str | Path, units: list[str], fingerprint: str, *, source: Path, overwrite: bool):
        self.path = check_directory_target(path, overwrite=overwrite, inputs=[source])
        self.source, self.overwrite = source, overwrite
        self.units = units
        self.fingerprint = fingerprint
        self.partial = self.path.parent / f".{self.path.name}{PARTIAL}"
        self.progress = self._progress()

    def _progress(self) -> dict:
        file = self.partial / PROGRESS
        if not file.is_file():
            if self.partial.exists():
                raise PangkasError(f"{self.partial} is in the way (pangkas writes its partial output there); "
                                   "move it away")
            return {"fingerprint": self.fingerprint, "done": {}}
        try:
            progress = json.loads(file.read_text())
            done = progress["done"]
            assert isinstance(done, dict) and all(isinstance(v, dict) for v in done.values())
        except (ValueError, KeyError, TypeError, AssertionError) as exc:
            raise PangkasError(f"{file} is damaged ({exc}); remove {self.partial} to start over") from exc
        if progress.get("fingerprint") != self.fingerprint:
            raise PangkasError(f"{self.partial} holds a partial run with other inputs, options or data; run that "
                               "again to finish it, or remove the directory to start over")
        return progress

    def file(self, unit: str) -> str:
        return f"model-{self.units.index(unit) + 1:05d}-of-{len(self.units):05d}.safetensors"

    def done(self, unit: str) -> dict | None:
        """What was recorded when ``unit`` was written, or None if it has not been (completely)."""
        record = self.progress["done"].get(unit)
        return record if record is not None and (self.partial / self.file(unit)).is_file() else None

    def written(self) -> Checkpoint:
        """The shards written so far, readable like the input checkpoint."""
        return Checkpoint(self.partial, [self.file(u) for u in self.progress["done"] if self.done(u)])

    def write(self, unit: str, tensors: dict[str, torch.Tensor], record: dict) -> None:
        """Write ``unit``'s shard, then note it done (with ``record``) in the progress file."""
        import safetensors.torch

        self.partial.mkdir(exist_ok=True)
        tensors = {k: v.contiguous() for k, v in tensors.items()}
        write_with(self.partial / self.file(unit),  # a shard of an interrupted run is ours to replace
                   lambda tmp: safetensors.torch.save_file(tensors, str(tmp), {"format": "pt"}), overwrite=True)
        self.progress["done"][unit] = {**record, "keys": sorted(tensors)}
        write_file(self.partial / PROGRESS, json.dumps(self.progress).encode(), overwrite=True)

    def finish(self, write_config: Callable[[Path], object]) -> Path:
        """Add the index, the config (``write_config(directory)`` writes it) and the source's other
        files, then publish."""
        missing = [u for u in self.units if self.done(u) is None]
        if missing:
            raise PangkasError(f"cannot finish {self.path}: units {missing[:3]} were not written")
        weight_map = {key: self.file(u) for u in self.units for key in self.progress["done"][u]["keys"]}
        total = sum((self.partial / self.file(u)).stat().st_size for u in self.units)
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        write_file(self.partial / INDEX, json.dumps(index, indent=2).encode(), overwrite=True)
        write_config(self.partial)
        for item in self.source.iterdir():
            if item.name == "config.json" or item.name.endswith(SKIPPED) or (self.partial / item.name).exists():
                continue
            (shutil.copytree if item.is_dir() else shutil.copy2)(item, self.partial / item.name)
        (self.partial / PROGRESS).unlink()
        check_directory_target(self.path, overwrite=self.overwrite, inputs=[self.source])  # changed meanwhile?
        publish(self.partial, self.path)
        if self.partial.exists():  # merged into a directory that was there: what is left is empty
            self.partial.rmdir()
        return self.path
