"""Saving and loading pruned models as safetensors (never pickle), with sparse weights compressed.

A weight with a pangkas mask, or with enough exact zeros to pay for it, is stored as a bitmap
(one bit per weight) plus its kept values. The file's metadata records every encoding, the masks to
restore, tensors shared between keys, and a CRC32 of every stored tensor so corruption is caught.
"""

from __future__ import annotations

import ctypes
import re
import json
import os
import tempfile
import zlib
from pathlib import Path

import torch
import safetensors.torch
from safetensors import SafetensorError, safe_open

from .errors import PangkasError
from .surgery import shrink
from .surgery.blocks import remove_blocks
from .weights.masks import masked_modules, masks_by_key, plain_name, remove_mask, set_mask, state_key

FORMAT = "pangkas-1"
_BITS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)
_LOADED_FROM = "_pangkas_loaded_from"
# Set on a model whose tensors pangkas cut (channel or layer pruning): its file may load into a
# fresh, larger instance of the same class, which is cut to the file's shapes first.
RESHAPED = "_pangkas_reshaped"
EDITS = "_pangkas_edits"  # structural edits (removed blocks) that a fresh instance must replay
_MASK_NAME = re.compile(r"^(.*)\.parametrizations\.([^.]+)\.0\.mask$")


# -- bitmaps ---------------------------------------------------------------------------------

def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    flat = mask.flatten().to(torch.uint8)
    flat = torch.nn.functional.pad(flat, (0, (-flat.numel()) % 8))
    return (flat.view(-1, 8) * _BITS).sum(1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    bits = (packed.unsqueeze(1) & _BITS).ne(0).flatten()
    return bits[: int(torch.Size(shape).numel())].view(shape)


def _stored_bits(t: torch.Tensor) -> torch.Tensor:
    """Where ``t`` is not bit-for-bit +0 (so -0.0 survives a round trip)."""
    nonzero = t != 0
    return nonzero | torch.signbit(t) if t.is_floating_point() else nonzero


def _bitmap_pays(t: torch.Tensor, nonzero: int) -> bool:
    return t.numel() // 8 + 1 + nonzero * t.element_size() < t.numel() * t.element_size()


# -- encoding --------------------------------------------------------------------------------

def _crc(t: torch.Tensor) -> int:
    t = t.detach().contiguous().cpu()
    if t.numel() == 0:
        return 0
    return zlib.crc32((ctypes.c_ubyte * t.nbytes).from_address(t.data_ptr()))


def encode(model: torch.nn.Module, *, compress: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors to store and the metadata describing how to rebuild the state dict from them.

    With ``compress=False`` every tensor is stored dense: the size a plain safetensors file has.
    """
    masks = masks_by_key(model) if compress else {}
    tensors, entries, seen = {}, {}, {}
    for key, value in model.state_dict().items():
        if value.layout != torch.strided:
            raise PangkasError(
                f"{key} is a {value.layout} tensor; save the model before to_sparse_inference "
                "(the saved file is already compressed)"
            )
        value = value.detach().cpu()
        identity = (value.untyped_storage().data_ptr(), value.storage_offset(), value.shape,
                    value.stride(), value.dtype)
        if value.numel() and identity in seen:
            entries[key] = {"alias": seen[identity]}
            continue
        seen[identity] = key
        mask = masks.get(key)
        keep = _stored_bits(value) if mask is None else mask.cpu()
        if compress and (mask is not None or _bitmap_pays(value, int(keep.sum()))):
            tensors[f"{key}:bitmap"] = pack_bits(keep)
            tensors[f"{key}:values"] = value[keep].contiguous()
            entries[key] = {"bitmap": True, "mask": mask is not None, "shape": list(value.shape)}
        else:
            tensors[key] = value.contiguous()
            entries[key] = {}
    crcs = {name: _crc(t) for name, t in tensors.items()}
    header = {"format": FORMAT, "entries": entries, "crc32": crcs,
              "reshaped": bool(getattr(model, RESHAPED, False)), "edits": getattr(model, EDITS, [])}
    return tensors, {"pangkas": json.dumps(header)}


def decode(tensors: dict[str, torch.Tensor], header: dict) -> tuple[dict, dict[str, torch.Tensor]]:
    """(state dict, masks by key) from ``encode``'s output."""
    for name, crc in header["crc32"].items():
        if name not in tensors or _crc(tensors[name]) != crc:
            raise PangkasError(f"tensor {name!r} fails its checksum: the file is corrupt")
    state, masks = {}, {}
    for key, entry in header["entries"].items():
        if "alias" in entry:
            continue
        if entry.get("bitmap"):
            keep = unpack_bits(tensors[f"{key}:bitmap"], tuple(entry["shape"]))
            values = tensors[f"{key}:values"]
            dense = torch.zeros(keep.shape, dtype=values.dtype)
            dense[keep] = values
            state[key] = dense
            if entry["mask"]:
                masks[key] = keep
        else:
            state[key] = tensors[key]
    for key, entry in header["entries"].items():
        if "alias" in entry:
            state[key] = state[entry["alias"]]
    return state, masks


# -- files -----------------------------------------------------------------------------------

def save(model: torch.nn.Module, path: str | os.PathLike, *, metadata: dict[str, str] | None = None,
         overwrite_input: bool = False) -> Path:
    """Write ``model`` (weights, masks, buffers) to ``path`` as safetensors, atomically.

    Refuses to replace the file the model was loaded from unless ``overwrite_input=True``.
    ``metadata`` (str -> str) is stored alongside, e.g. how to rebuild the architecture.
    """
    path = Path(path)
    if not overwrite_input and getattr(model, _LOADED_FROM, None) == path.resolve():
        raise PangkasError(f"{path} is the file this model was loaded from; write elsewhere or pass "
                           "overwrite_input=True (CLI: --overwrite-input)")
    extra = dict(metadata or {})
    if "pangkas" in extra:
        raise PangkasError("metadata key 'pangkas' is reserved")
    tensors, own = encode(model)
    _atomic_write(path, serialize(tensors, {**extra, **own}))
    return path


def serialize(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """The safetensors bytes of ``tensors``."""
    return safetensors.torch.save(tensors, metadata=metadata)


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would make the result private
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata dict of a safetensors file (pangkas's own entry included)."""
    return _read(Path(path))[1]


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if not path.is_file():
        raise PangkasError(f"no such file: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        tensors = safetensors.torch.load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise PangkasError(f"{path} is not a readable safetensors file (truncated or corrupt?): {exc}") from exc
    return tensors, metadata


def load(path: str | os.PathLike, model: torch.nn.Module) -> torch.nn.Module:
    """Load weights (bit-exact) and masks from ``path`` into ``model``, which must have the same
    architecture. Plain safetensors state dicts load too. On any error the model is unchanged."""
    path = Path(path)
    tensors, metadata = _read(path)
    if "pangkas" in metadata:
        try:
            header = json.loads(metadata["pangkas"])
        except json.JSONDecodeError as exc:
            raise PangkasError(f"{path}: pangkas metadata is corrupt: {exc}") from exc
        if header.get("format") != FORMAT:
            raise PangkasError(f"{path}: unknown format {header.get('format')!r}; expected {FORMAT}")
        state, masks = decode(tensors, header)
    else:
        header, state, masks = {}, tensors, {}
    edits = _replay(model, header.get("edits", []), path)
    try:
        shrunk = _check_fits(model, state, path, allow_smaller=header.get("reshaped", False))
        undo = shrink(model, _keep_leading(model, shrunk)) if shrunk else None
        try:
            _restore(model, state, masks)
        except PangkasError:
            if undo is not None:
                undo.restore()
            raise
    except PangkasError:
        for undo in reversed(edits):
            undo.restore()
        raise
    if header.get("edits"):
        setattr(model, EDITS, list(header["edits"]))
    setattr(model, _LOADED_FROM, path.resolve())
    if shrunk:
        setattr(model, RESHAPED, True)
    return model


def _replay(model: torch.nn.Module, edits: list[dict], path: Path) -> list:
    """Re-apply the structural edits recorded in the file (blocks removed by layer pruning) to a
    fresh instance, unless the model already carries them."""
    if not edits or getattr(model, EDITS, []) == edits:
        return []
    if getattr(model, EDITS, []):
        raise PangkasError(f"{path} was pruned differently from this model; load it into a fresh instance")
    undos = []
    try:
        for edit in edits:
            undos.append(remove_blocks(model, edit["remove_blocks"], edit.get("tuple_lengths")))
    except Exception as exc:
        for undo in reversed(undos):
            undo.restore()
        raise PangkasError(f"{path} removes blocks this model does not have ({exc}); "
                           "load it into an instance of the architecture it was pruned from") from exc
    return undos


def _keep_leading(model: torch.nn.Module, shapes: dict[str, tuple[int, ...]]) -> dict:
    """Cut every tensor of ``model`` whose state-dict key is in ``shapes`` (and any mask on it) to
    that shape; which positions stay does not matter, the file's values overwrite them."""
    keep = {}
    for name, t in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers()):
        key = _MASK_NAME.sub(r"\1.\2", plain_name(name))  # conv.parametrizations.weight.0.mask -> conv.weight
        if key in shapes:
            keep[name] = [None if n == size else torch.arange(n) for n, size in zip(shapes[key], t.shape)]
    return keep


def _check_fits(model: torch.nn.Module, state: dict[str, torch.Tensor], path: Path,
                allow_smaller: bool) -> dict:
    """Raise unless ``state`` fits ``model``; for a file of a pruned model (``allow_smaller``)
    returns the keys whose tensors are smaller in the file, with their file shapes."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shrunk, wrong = {}, []
    for k in expected.keys() & state.keys():
        got, want = tuple(state[k].shape), expected[k]
        if got == want:
            continue
        if allow_smaller and len(got) == len(want) and all(g <= w for g, w in zip(got, want)):
            shrunk[k] = got
        else:
            wrong.append(f"{k}: file {got} vs model {want}")
    if missing or unexpected or wrong:
        raise PangkasError(
            f"{path} does not fit {type(model).__name__}: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, shape mismatches {wrong[:5]}"
        )
    return shrunk


def _restore(model: torch.nn.Module, state: dict, masks: dict[str, torch.Tensor]) -> None:
    before = {key: mask.clone() for key, mask in masks_by_key(model).items()}
    try:
        _set_masks(model, masks)
        model.load_state_dict(state, strict=True)
    except Exception as exc:
        _set_masks(model, before)
        raise PangkasError(f"could not load into {type(model).__name__}: {exc}") from exc


def _set_masks(model: torch.nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Make the model's masks exactly ``masks`` (by state-dict key)."""
    for module_name, module, tensor_name in list(masked_modules(model)):
        if state_key(module_name, tensor_name) not in masks:
            remove_mask(module, tensor_name, keep_zeros=False)
    for key, mask in masks.items():
        module_name, _, tensor_name = key.rpartition(".")
        set_mask(model.get_submodule(module_name), mask, tensor_name)
