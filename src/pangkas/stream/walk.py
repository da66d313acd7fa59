"""Walking a checkpoint's model block by block: which unit holds a tensor, the first block's inputs
(captured with only what that pass reaches loaded), what a resumed run must share with the first,
and the memory a walk needs."""

from __future__ import annotations

import hashlib
import re

import torch
from torch import nn

from ..blockwise import first_block_inputs
from ..errors import PangkasError
from .checkpoint import Checkpoint, on_demand

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)\s*$", re.I)
_UNITS = {"": 1, "B": 1, "K": 1e3, "KB": 1e3, "M": 1e6, "MB": 1e6, "G": 1e9, "GB": 1e9, "T": 1e12, "TB": 1e12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def block_of(name: str, blocks: list[str]) -> str | None:
    """The block ``name`` (a module or tensor) is inside, or None."""
    return next((b for b in blocks if name.startswith(b + ".")), None)


def outside_units(model: nn.Module, blocks: list[str], source: Checkpoint) -> dict[str, list[str]]:
    """The checkpoint's tensors outside the blocks, by the module holding them (one shard each)."""
    modules = {name for name, _ in model.named_modules()}
    units: dict[str, list[str]] = {}
    for key in source.keys():
        if block_of(key, blocks) is None:
            owner = key.rpartition(".")[0]
            units.setdefault(owner if owner in modules else key, []).append(key)
    return units


def first_inputs(model: nn.Module, blocks: list[str], source: Checkpoint, batches: list) -> list:
    """The first block's calls on ``batches``; the modules outside the blocks that the pass reaches
    (the embeddings) are loaded for it and released after."""
    owners = [n for n, m in model.named_modules() if block_of(n, blocks) is None and n not in blocks
              and any(True for _ in m.parameters(recurse=False))]
    with on_demand(model, owners, source):
        return first_block_inputs(model, blocks[0], batches)


def fingerprint(source: Checkpoint, options: tuple, batches: list) -> str:
    """What a resumed run must share with the one it continues: the checkpoint's tensors (names,
    dtypes, shapes, file sizes), the options (their ``repr``) and the calibration data."""
    digest = hashlib.sha256()
    sizes = {f: (source.directory / f).stat().st_size for f in sorted(set(source.files.values()))}
    digest.update(repr((source.header(), sizes, options)).encode())
    for batch in batches:
        values = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (tuple, list)) else [batch]
        for value in values:
            if isinstance(value, torch.Tensor):
                digest.update(repr((value.dtype, tuple(value.shape))).encode())
                digest.update(value.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
            else:
                digest.update(repr(value).encode())
    return digest.hexdigest()


def parse_bytes(value: int | str) -> int:
    """``4GB``, ``512MiB``, ``1.5G`` or a number of bytes."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    match = _SIZE.match(value) if isinstance(value, str) else None
    unit = match[2].upper() if match else ""
    if not match or unit not in _UNITS or float(match[1]) <= 0:
        raise PangkasError(f"max_memory must be a size such as 4GB, 512MiB or a number of bytes > 0, got {value!r}")
    return int(float(match[1]) * _UNITS[unit])


def check_memory(model: nn.Module, blocks: list[str], source: Checkpoint, batches: list, gram: bool,
                 limit: int | str) -> None:
    """Refuse before any work when the estimated peak exceeds ``limit``: the largest block twice
    (loaded, and serialized for its shard), its layers' input statistics in float32 (Gram
    matrices with ``gram``, else one norm per input), and the calibration activations three times
    (a block's inputs, its outputs, one batch's intermediate)."""
    limit = parse_bytes(limit)
    header = {key: (dtype, shape) for key, dtype, shape in source.header()}

    def nbytes(key):
        dtype, shape = header[key]
        return _DTYPE_BYTES.get(dtype, 4) * int(torch.Size(shape).numel())

    block_bytes = max(sum(nbytes(k) for k in source.keys() if k.startswith(b + ".")) for b in blocks)
    widths = [m.in_features for m in model.get_submodule(blocks[0]).modules() if isinstance(m, nn.Linear)]
    statistics = sum(w * w if gram else w for w in widths) * 4 if batches else 0
    hidden = getattr(getattr(model, "config", None), "hidden_size", max(widths, default=0))
    tokens = sum(_tokens(b) for b in batches)
    estimate = 2 * block_bytes + statistics + 3 * tokens * hidden * 4
    if estimate > limit:
        raise PangkasError(f"streaming {source.directory} needs about {estimate / 2**30:.2f} GiB at its largest "
                           f"block (block {block_bytes / 2**30:.2f} GiB, statistics {statistics / 2**30:.2f} GiB, "
                           f"activations of {tokens} tokens), over max_memory={limit / 2**30:.2f} GiB; "
                           "calibrate on fewer tokens or allow more memory")


def _tokens(batch) -> int:
    value = batch.get("input_ids") if isinstance(batch, dict) else batch[0] if isinstance(batch, (tuple, list)) \
        else batch
    return int(value.numel()) if isinstance(value, torch.Tensor) else 0
