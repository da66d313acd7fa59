"""Recovery checkpoints: a directory holding the model (``pangkas.save``: weights and masks) and the
trainer state (optimizer tensors; step, epoch, optimizer class, parameter shapes as JSON), replaced
crash-safely after every epoch.

A save writes ``.<name>.pangkas-staging-XXXX/`` (marker first), renames ``<name>`` to
``.<name>.pangkas-old``, renames the staging folder to ``<name>`` and removes the old folder.
``prepare`` (and every save) puts a crash at any of those points right: before the second rename
the last checkpoint goes back, after it the old one goes; half-written staging folders go. Only
folders pangkas wrote (holding the marker) are ever removed; a checkpoint path holding anything but
a pangkas checkpoint is refused.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path

import safetensors.torch
import torch
from torch import nn

from .errors import PangkasError
from .files import staging_prefix
from .io import load, save

MODEL, TRAINER = "model.safetensors", "trainer.safetensors"
MARKER = ".pangkas-checkpoint"  # written first into every folder pangkas creates, removed last
OLD = ".pangkas-old"  # the replaced checkpoint, beside the directory: .<name><OLD>


def _old(directory: Path) -> Path:
    return directory.with_name(f".{directory.name}{OLD}")


def is_complete(directory: Path) -> bool:
    return (directory / MODEL).is_file() and (directory / TRAINER).is_file()


def _is_ours(path: Path, unmarked: frozenset = frozenset()) -> bool:
    """A folder pangkas wrote: it holds the marker, or nothing but ``unmarked`` names."""
    if path.is_symlink() or not path.is_dir():
        return False
    names = {p.name for p in path.iterdir()}
    return MARKER in names or names <= unmarked


def _remove_ours(path: Path) -> None:
    """Delete a folder ``_is_ours`` recognised; the marker last, so that a crash halfway leaves a
    folder still recognised."""
    for entry in path.iterdir():
        if entry.name != MARKER:
            entry.unlink()
    (path / MARKER).unlink(missing_ok=True)
    path.rmdir()


def _repair(directory: Path) -> None:
    """Finish or roll back a checkpoint swap that a crash interrupted; remove abandoned staging."""
    old = _old(directory)
    if old.exists() or old.is_symlink():
        if not _is_ours(old, frozenset({MODEL, TRAINER})):  # pangkas before the marker wrote none
            raise PangkasError(f"{old} is in the way of the checkpoint swap and was not written by "
                               "pangkas; move it elsewhere")
        if directory.exists() or not is_complete(old):
            _remove_ours(old)  # the new checkpoint is in place (or this is a half-removed leftover)
        else:
            old.rename(directory)  # stopped between the two renames: the last checkpoint goes back
    legacy = directory.with_name(directory.name + ".old")  # what pangkas before staging names left
    if (not directory.exists() and legacy.is_dir() and not legacy.is_symlink()
            and {p.name for p in legacy.iterdir()} == {MODEL, TRAINER}):
        legacy.rename(directory)
    prefix = staging_prefix(directory)
    if directory.parent.is_dir():
        for path in directory.parent.iterdir():
            if path.name.startswith(prefix) and _is_ours(path):
                _remove_ours(path)


def _check_directory(directory: Path) -> None:
    """Refuse a checkpoint path holding anything but a pangkas checkpoint: every save replaces it."""
    if not directory.exists():
        return
    if not directory.is_dir():
        raise PangkasError(f"checkpoint={directory} is a file; pass a directory: a new or empty one, or "
                           "one holding a pangkas checkpoint to resume")
    names = sorted(p.name for p in directory.iterdir())
    foreign = [name for name in names if name not in (MODEL, TRAINER, MARKER)]
    if foreign or (names and not is_complete(directory)):
        raise PangkasError(f"checkpoint={directory} holds {', '.join((foreign or names)[:5])}: not a pangkas "
                           f"checkpoint ({MODEL} + {TRAINER}), and every save replaces the directory; "
                           "pass a new or empty directory")


def save_checkpoint(directory: Path, model: nn.Module, optimizer, step: int, epoch: int) -> None:
    """Write the checkpoint into a fresh staging folder and swap it in for ``directory``."""
    _repair(directory)
    _check_directory(directory)  # a file put there since the start must not be swapped away
    directory.parent.mkdir(parents=True, exist_ok=True)
    old = _old(directory)
    try:
        staging = Path(tempfile.mkdtemp(dir=directory.parent, prefix=staging_prefix(directory)))
        _write(staging / MARKER, b"written by pangkas.recover; removed with its checkpoint\n")
        save(model, staging / MODEL)
        _write(staging / TRAINER, _trainer_bytes(optimizer, step, epoch))
        if directory.exists():
            directory.rename(old)
        staging.rename(directory)
        if old.exists():
            _remove_ours(old)
        _fsync_directory(directory.parent)
    except BaseException:
        with contextlib.suppress(Exception):
            _repair(directory)  # tidy now rather than at the next run
        raise


def _write(path: Path, data: bytes) -> None:
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_directory(path: Path) -> None:
    """Make the renames durable (a power cut could otherwise undo them); not possible everywhere."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _trainer_bytes(optimizer, step: int, epoch: int) -> bytes:
    """trainer.safetensors: the optimizer's tensors; step, epoch, the optimizer's class, the shapes of
    its parameters and the rest of its state as JSON metadata."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, slots in state["state"].items():
        for key, value in slots.items():
            if isinstance(value, torch.Tensor) and value.ndim > 0:
                tensors[f"{index}.{key}"] = value.detach().contiguous()
            else:
                scalars[f"{index}.{key}"] = float(value)
    shapes = [list(p.shape) for group in optimizer.param_groups for p in group["params"]]
    meta = {"step": step, "epoch": epoch, "optimizer": type(optimizer).__name__, "shapes": shapes,
            "param_groups": state["param_groups"], "scalars": scalars}
    return safetensors.torch.save(tensors, metadata={"trainer": json.dumps(meta)})


def read_trainer(directory: Path) -> tuple[dict, dict]:
    path = directory / TRAINER
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            meta = json.loads(f.metadata()["trainer"])
        tensors = safetensors.torch.load_file(str(path))
        missing = {"step", "epoch", "param_groups", "scalars"} - meta.keys()
        if missing:
            raise KeyError(f"no {sorted(missing)}")
    except Exception as exc:
        raise PangkasError(f"{path} is not a readable pangkas checkpoint: {exc}") from exc
    return meta, tensors


def check_resumable(directory: Path, meta: dict, optimizer, names: dict[int, str]) -> None:
    """Raise PangkasError saying what differs between the checkpoint and this run's optimizer."""
    hint = "resume with the student and optimizer= it was made with, or pass another checkpoint directory"
    ours = type(optimizer).__name__
    theirs = meta.get("optimizer", ours)  # older checkpoints lack it: their group settings tell
    if theirs != ours:
        raise PangkasError(f"{directory} was written with {theirs}, this run uses {ours}; {hint}")
    saved, current = meta["param_groups"], optimizer.state_dict()["param_groups"]
    sizes = [len(g["params"]) for g in saved], [len(g["params"]) for g in current]
    if sizes[0] != sizes[1]:
        raise PangkasError(f"{directory} holds optimizer state for {sizes[0]} trainable tensors (per "
                           f"parameter group), this run has {sizes[1]}; {hint}")
    for a, b in zip(saved, current) if "optimizer" not in meta else ():
        if a.keys() != b.keys():
            raise PangkasError(f"{directory} has optimizer settings {sorted(a.keys() - {'params'})}, this "
                               f"run's optimizer {sorted(b.keys() - {'params'})}; {hint}")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for shape, p in zip(meta.get("shapes", []), params):
        if tuple(shape) != tuple(p.shape):
            raise PangkasError(f"{directory}: {names.get(id(p), 'a parameter')} is {tuple(shape)} there, "
                               f"{tuple(p.shape)} here; {hint}")


def apply_checkpoint(directory: Path, student: nn.Module, optimizer, meta: dict, tensors: dict) -> None:
    """Load a checked checkpoint into the student (atomically: ``load``) and the optimizer."""
    load(directory / MODEL, student)
    state: dict = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    for key, value in meta["scalars"].items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = torch.tensor(value)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def prepare(directory: Path) -> None:
    """Finish or roll back an interrupted save, then refuse a directory that is not a checkpoint."""
    _repair(directory)
    _check_directory(directory)
