"""Saving and loading pruned models as safetensors (never pickle), with sparse weights compressed.

A weight with a pangkas mask, or with enough exact zeros to pay for it, is stored as a bitmap
(one bit per weight) plus its kept values; a tensor of zeros only (a zero point) as its shape.
The file's metadata records every encoding, the masks to restore, tensors shared between keys,
and a CRC32 of every stored tensor so corruption is caught.

A Linear weight quantized by ``pangkas.quantize`` (int8-dynamic, int8-weight-only) is stored as its
tensors (int8 data, scales, zero points), each encoded as any tensor is, plus the scheme's name;
``load`` quantizes the fresh model's layer with that scheme and copies the stored tensors in.

An int8-static model (a graph) is stored as the tensors its graph reads, the numbers its quantize
steps use, and how to rebuild it (``quant_static``); ``load`` rebuilds it from a fresh float
instance and returns the graph.
"""

from __future__ import annotations

import copy
import ctypes
import math
import re
import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
import safetensors.torch
from safetensors import SafetensorError, safe_open

from .errors import PangkasError
from .files import check_file_target, write_file
from .markers import EDITS, RESHAPED
from .markers import LOADED_FROM as _LOADED_FROM
from .quant_schemes import PARTS, STORED, is_torchao, parts, quantized_weight, scheme_of
from . import quant_static
from .quant_static import DTYPES
from .integrations import active as active_integrations
from .surgery import shrink
from .surgery.blocks import LinearStandIn, remove_blocks
from .weights.masks import masked_modules, masks_by_key, plain_name, remove_mask, set_mask, state_key

FORMAT = "pangkas-1"
_BITS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)
_MASK_NAME = re.compile(r"^(.*)\.parametrizations\.([^.]+)\.0\.mask$")
_FLOATS = {str(d).removeprefix("torch."): d for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64)}


@dataclass
class Quantized:
    """A quantized weight as read from a file, for ``load`` to rebuild with ``scheme``."""

    scheme: str
    block_size: list[int]
    dtype: torch.dtype  # of the float weight it stands for
    parts: dict[str, torch.Tensor]

    @property
    def shape(self) -> torch.Size:
        return self.parts["qdata"].shape


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
    if quant_static.is_static(model):
        return _encode_static(model, compress)
    masks = masks_by_key(model) if compress else {}
    tensors, entries, seen = {}, {}, {}
    for key, value in model.state_dict().items():
        if is_torchao(value):
            if key in masks:  # quantize bakes masks in first; a mask put on afterwards would be lost
                raise PangkasError(f"{key} is quantized and has a pangkas mask; quantize after pruning, not before")
            entries[key] = _store_quantized(model, key, value, tensors, compress)
            continue
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
        entries[key] = _store(key, value, masks.get(key), tensors, compress)
    return tensors, _header(entries, tensors, bool(getattr(model, RESHAPED, False)), getattr(model, EDITS, []))


def _encode_static(graph: torch.fx.GraphModule, compress: bool) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    stored, record = quant_static.stored(graph)
    tensors = {}
    entries = {key: _store(key, value.detach().cpu(), None, tensors, compress) for key, value in stored.items()}
    return tensors, _header(entries, tensors, record.pop("reshaped"), record.pop("edits"), static=record)


def _header(entries: dict, tensors: dict, reshaped: bool, edits: list, **extra) -> dict[str, str]:
    crcs = {name: _crc(t) for name, t in tensors.items()}
    header = {"format": FORMAT, "entries": entries, "crc32": crcs, "reshaped": reshaped, "edits": edits, **extra}
    return {"pangkas": json.dumps(header, separators=(",", ":"))}  # no spaces: it is escaped again in the file


def _store(name: str, value: torch.Tensor, mask: torch.Tensor | None, tensors: dict, compress: bool) -> dict:
    """Put ``value`` into ``tensors`` as bitmap + kept values (masked, or where that is smaller)
    or dense; returns its entry."""
    keep = _stored_bits(value) if mask is None else mask.cpu()
    if compress and mask is None and value.numel() and not keep.any():
        return {"zeros": str(value.dtype).removeprefix("torch."), "shape": list(value.shape)}
    if compress and (mask is not None or _bitmap_pays(value, int(keep.sum()))):
        tensors[f"{name}:bitmap"] = pack_bits(keep)
        tensors[f"{name}:values"] = value[keep].contiguous()
        return {"bitmap": True, "mask": mask is not None, "shape": list(value.shape)}
    tensors[name] = value.contiguous()
    return {}


def _store_quantized(model: torch.nn.Module, key: str, weight: torch.Tensor, tensors: dict, compress: bool) -> dict:
    """A torchao weight's entry: its scheme, and its tensors stored as ``key:qdata`` etc., each
    encoded as any tensor is (a sparse int8 weight as bitmap + int8 values)."""
    module_name, _, tensor_name = key.rpartition(".")
    if not isinstance(model.get_submodule(module_name), torch.nn.Linear) or tensor_name != "weight":
        raise PangkasError(f"{key} is a torchao tensor but not a Linear weight, which is all load can quantize; "
                           "save the float model and quantize it after loading, or pangkas.export_onnx it")
    try:
        scheme = scheme_of(weight)
    except PangkasError as exc:
        raise PangkasError(f"{key}: {exc}") from exc
    stored, attributes = parts(weight)
    if str(weight.dtype).removeprefix("torch.") not in _FLOATS:
        raise PangkasError(f"{key}: a quantized weight standing for {weight.dtype} cannot be saved")
    return {"quantized": scheme, "dtype": str(weight.dtype).removeprefix("torch."),
            "block_size": list(attributes["block_size"]),
            "parts": {name: _store(f"{key}:{name}", t.detach().cpu(), None, tensors, compress)
                      for name, t in stored.items()}}


def decode(tensors: dict[str, torch.Tensor], header: dict) -> tuple[dict, dict[str, torch.Tensor]]:
    """(state dict, masks by key) from ``encode``'s output; PangkasError if the header is malformed,
    a checksum fails or a bitmap disagrees with its values."""
    _check_header(header, set(tensors))
    for name, crc in header["crc32"].items():
        if _crc(tensors[name]) != crc:
            raise PangkasError(f"tensor {name!r} fails its checksum: the file is corrupt")
    state, masks = {}, {}
    for key, entry in header["entries"].items():
        if "quantized" in entry:
            stored = {name: _value(f"{key}:{name}", part, tensors)[0] for name, part in entry["parts"].items()}
            state[key] = Quantized(entry["quantized"], entry["block_size"], _FLOATS[entry["dtype"]], stored)
        elif "alias" not in entry:
            state[key], keep = _value(key, entry, tensors)
            if entry.get("mask"):
                masks[key] = keep
    for key, entry in header["entries"].items():
        if "alias" in entry:
            state[key] = state[entry["alias"]]
    return state, masks


def _value(name: str, entry: dict, tensors: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(tensor, keep mask or None) of a dense, zeros or bitmap entry."""
    if "zeros" in entry:
        return torch.zeros(entry["shape"], dtype=DTYPES[entry["zeros"]]), None
    if "bitmap" in entry:
        return _unpack(name, entry["shape"], tensors[f"{name}:bitmap"], tensors[f"{name}:values"])
    return tensors[name], None


def _corrupt(problem: str) -> PangkasError:
    return PangkasError(f"corrupt pangkas header: {problem}")


def _is_int(value) -> bool:
    return type(value) is int  # not bool, which JSON's true/false would be


def _check_header(header, stored: set[str]) -> None:
    """Raise PangkasError unless ``header`` has the shape ``encode`` writes and accounts for exactly
    the ``stored`` tensor names; nothing but JSON is read, so this runs before any tensor work."""
    if not isinstance(header, dict):
        raise _corrupt("not a JSON object")
    if header.get("format") != FORMAT:
        raise PangkasError(f"unknown format {header.get('format')!r}; expected {FORMAT} "
                           "(written by another pangkas version?)")
    unknown = sorted(set(header) - {"format", "entries", "crc32", "reshaped", "edits", "static"})
    if unknown:  # "reshaped"/"edits" may be absent (older files) but never misspelt
        raise _corrupt(f"unknown keys {unknown}")
    entries, crcs = header.get("entries"), header.get("crc32")
    if not isinstance(entries, dict):
        raise _corrupt('"entries" is missing or not an object')
    if not isinstance(crcs, dict) or not all(_is_int(c) and 0 <= c < 2**32 for c in crcs.values()):
        raise _corrupt('"crc32" is missing or does not map tensor names to 32-bit integers')
    if not isinstance(header.get("reshaped", False), bool):
        raise _corrupt('"reshaped" is not true or false')
    if not _edits_ok(header.get("edits", [])):
        raise _corrupt('"edits" is not a list of {"remove_blocks": [names], "tuple_lengths": {name: int}, '
                       '"stand_ins": {name: {"width": int}}}')
    if "static" in header:
        quant_static.check_record(header["static"], entries)
    named = [name for key, entry in entries.items() for name in _entry_tensors(key, entry, entries)]
    if sorted(named) != sorted(stored) or set(crcs) != stored:
        raise _corrupt(f"its entries and checksums do not account for exactly the stored tensors "
                       f"{sorted(stored)[:6]}")


def _entry_tensors(key: str, entry, entries: dict) -> list[str]:
    """The stored tensors an entry reads, once it is known to be well-formed."""
    if entry == {}:
        return [key]
    if isinstance(entry, dict) and set(entry) == {"alias"}:
        target = entry["alias"]
        if not (isinstance(target, str) and isinstance(entries.get(target), dict)
                and not {"alias", "quantized"} & set(entries[target])):
            raise _corrupt(f"{key} is an alias of {target!r}, which is not a stored entry (of an unquantized tensor)")
        return []
    if isinstance(entry, dict) and set(entry) == {"bitmap", "mask", "shape"}:
        if entry["bitmap"] is not True or not isinstance(entry["mask"], bool):
            raise _corrupt(f"{key}: \"bitmap\" must be true and \"mask\" true or false")
        _check_shape(key, entry["shape"])
        return [f"{key}:bitmap", f"{key}:values"]
    if isinstance(entry, dict) and set(entry) == {"zeros", "shape"}:
        if entry["zeros"] not in DTYPES:
            raise _corrupt(f"{key}: dtype {entry['zeros']!r} is not one of {sorted(DTYPES)}")
        _check_shape(key, entry["shape"])
        return []
    if isinstance(entry, dict) and set(entry) == {"quantized", "dtype", "block_size", "parts"}:
        return _quantized_tensors(key, entry)
    raise _corrupt(f"entry {key} is {entry!r}, not {{}}, {{alias}}, {{bitmap, mask, shape}}, {{zeros, shape}} "
                   "or {quantized, dtype, block_size, parts}")


def _check_shape(key: str, shape) -> None:
    if not (isinstance(shape, list) and all(_is_int(d) and d >= 0 for d in shape)):
        raise _corrupt(f"{key}: shape {shape!r} is not a list of sizes >= 0")


def _quantized_tensors(key: str, entry: dict) -> list[str]:
    """The stored tensors of a quantized entry: each part is a dense or unmasked bitmap entry."""
    scheme, block, stored = entry["quantized"], entry["block_size"], entry["parts"]
    if scheme not in STORED:  # the name picks one of pangkas's own configs, nothing else
        raise PangkasError(f"{key} is quantized with {scheme!r}, which pangkas cannot load (it loads "
                           f"{', '.join(STORED)}); written by another pangkas version?")
    if entry["dtype"] not in _FLOATS:
        raise _corrupt(f"{key}: dtype {entry['dtype']!r} is not one of {sorted(_FLOATS)}")
    if not (isinstance(block, list) and block and all(_is_int(n) and n > 0 for n in block)):
        raise _corrupt(f"{key}: block_size {block!r} is not a list of sizes > 0")
    if not (isinstance(stored, dict) and {"qdata", "scale"} <= set(stored) <= set(PARTS)):
        raise _corrupt(f"{key}: its parts must be qdata, scale and optionally zero_point, not {stored!r}")
    names = []
    for name, part in stored.items():
        keys = set(part) if isinstance(part, dict) else None
        if not (part == {} or keys == {"zeros", "shape"}
                or (keys == {"bitmap", "mask", "shape"} and part["mask"] is False)):
            raise _corrupt(f"{key}:{name} is {part!r}, not {{}}, {{zeros, shape}} or an unmasked "
                           "{bitmap, mask, shape}")
        names += _entry_tensors(f"{key}:{name}", part, {})
    return names


def _edits_ok(edits) -> bool:
    def edit_ok(edit) -> bool:
        names, lengths = edit.get("remove_blocks"), edit.get("tuple_lengths") or {}
        stand_ins = edit.get("stand_ins") or {}
        return (set(edit) <= {"remove_blocks", "tuple_lengths", "stand_ins"} and isinstance(names, list)
                and all(isinstance(n, str) for n in names) and isinstance(lengths, dict)
                and all(_is_int(n) and n >= 0 for n in lengths.values()) and isinstance(stand_ins, dict)
                and all(n in names and isinstance(s, dict) and set(s) == {"width"} and _is_int(s["width"])
                        and s["width"] > 0 for n, s in stand_ins.items()))

    return isinstance(edits, list) and all(isinstance(e, dict) and edit_ok(e) for e in edits)


def _unpack(key: str, shape: list[int], bitmap: torch.Tensor, values: torch.Tensor):
    """(dense tensor, keep mask) of a bitmap entry, after checking the two tensors agree with
    ``shape`` and each other (a checksum cannot tell that the header's shape is wrong)."""
    numel = math.prod(shape)
    if bitmap.dtype != torch.uint8 or bitmap.shape != (-(-numel // 8),) or values.ndim != 1:
        raise _corrupt(f"{key}: shape {shape} needs a {-(-numel // 8)}-byte bitmap and 1-d values; "
                       f"stored {bitmap.dtype} {tuple(bitmap.shape)} and {tuple(values.shape)}")
    bits = unpack_bits(bitmap, (bitmap.numel() * 8,))
    keep = bits[:numel].view(shape)
    if int(bits.sum()) != values.numel() or bits[numel:].any():
        raise _corrupt(f"{key}: its bitmap marks {int(bits[:numel].sum())} of {numel} positions "
                       f"but {values.numel()} values are stored")
    dense = torch.zeros(shape, dtype=values.dtype)
    dense[keep] = values
    return dense, keep


# -- files -----------------------------------------------------------------------------------

def save(model: torch.nn.Module, path: str | os.PathLike, *, metadata: dict[str, str] | None = None,
         overwrite: bool = False, overwrite_input: bool = False) -> Path:
    """Write ``model`` (weights, masks, buffers) to ``path`` as safetensors, atomically.

    An existing file is replaced only with ``overwrite=True``; the file the model was loaded
    from only with ``overwrite_input=True``. ``metadata`` (str -> str) is stored alongside,
    e.g. how to rebuild the architecture.
    """
    path = Path(path)
    loaded_from = getattr(model, _LOADED_FROM, None) == path.resolve()
    if loaded_from and not overwrite_input:
        raise PangkasError(f"{path} is the file this model was loaded from; write elsewhere or pass "
                           "overwrite_input=True (CLI: --overwrite-input)")
    check_file_target(path, overwrite=overwrite or loaded_from)
    extra = dict(metadata or {})
    if "pangkas" in extra:
        raise PangkasError("metadata key 'pangkas' is reserved")
    tensors, own = encode(model)
    return write_file(path, serialize(tensors, {**extra, **own}), overwrite=overwrite or loaded_from)


def serialize(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """The safetensors bytes of ``tensors``."""
    return safetensors.torch.save(tensors, metadata=metadata)


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata dict of a safetensors file (pangkas's own entry included); no tensor is read."""
    return _read(Path(path), tensors=False)[1]


def _read(path: Path, tensors: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if not path.is_file():
        raise PangkasError(f"no such file: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:  # one open: metadata and tensors of one file
            return (f.get_tensors() if tensors else {}), f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise PangkasError(f"{path} is not a readable safetensors file (truncated or corrupt?): {exc}") from exc


def load(path: str | os.PathLike, model: torch.nn.Module, *, dtype: torch.dtype | None = None,
         integrations: list | None = None) -> torch.nn.Module:
    """Load weights and masks from ``path`` into ``model``, which must have the same architecture.
    Plain safetensors state dicts load too.

    Bit-exact: every tensor in the file must have the dtype of the model's, unless ``dtype`` (a
    floating-point ``torch.dtype``) is given: the file's floating-point tensors are then cast to
    it (as ``Tensor.to`` rounds) and must match the model's, so the model must be ``dtype`` too.

    Checksums and header are checked before the model is touched, shapes and dtypes before any
    value is. On any error ``PangkasError`` is raised; on it or an interrupt (re-raised as it is)
    the model is left exactly as it was. ``integrations``: model families pruned with a per-call
    ``integrations=`` (the registered ones are always known).

    Returns ``model``, except for a file of an int8-static model (``pangkas.quantize(...,
    "int8-static")``): that graph is rebuilt from a copy of ``model`` (a fresh float instance of the
    architecture) and returned, and ``model`` is left as it was.
    """
    path = Path(path)
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise PangkasError(f"dtype must be None (the file's dtypes must be the model's) or a floating-point "
                           f"torch.dtype to cast the file's floating-point tensors to, got {dtype!r}")
    if any(is_torchao(p) for p in model.parameters()) or quant_static.is_static(model):
        raise PangkasError(f"{type(model).__name__} is already quantized; load into a fresh float instance "
                           "(the file says which layers to quantize)")
    header, state, masks = _decoded(path, *_read(path))
    if "static" in header:
        if dtype is not None:
            raise PangkasError("dtype= cannot cast an int8-static file (its scales were chosen for the saved dtype)")
        return _load_static(path, model, header, state, integrations)
    shrunk = _load_into(model, path, header, _cast(state, dtype), masks, integrations)
    if header.get("edits"):
        setattr(model, EDITS, list(header["edits"]))
    setattr(model, _LOADED_FROM, path.resolve())
    if shrunk:
        setattr(model, RESHAPED, True)
    return model


def _decoded(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[dict, dict, dict]:
    """(header, state dict, masks by key) of a file; only PangkasError escapes for a corrupt one."""
    if "pangkas" not in metadata:
        return {}, tensors, {}
    try:
        header = json.loads(metadata["pangkas"])
        return (header, *decode(tensors, header))
    except PangkasError as exc:
        raise PangkasError(f"{path}: {exc}") from exc
    except (ValueError, RecursionError) as exc:  # JSON syntax, absurd numbers, absurd nesting
        raise PangkasError(f"{path}: corrupt pangkas header: {exc}") from exc
    except Exception as exc:  # backstop: decoding reads only the file, the model is not touched yet
        raise PangkasError(f"{path}: corrupt pangkas file ({type(exc).__name__}: {exc})") from exc


def _cast(state: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    if dtype is None:
        return state
    if any(isinstance(t, Quantized) for t in state.values()):
        raise PangkasError("dtype= cannot cast a file with quantized weights (their scales were chosen for the "
                           "saved dtype): load it without dtype= into a model of that dtype")
    cast: dict[int, torch.Tensor] = {}  # by identity: a tensor stored once for several keys is cast once
    for t in state.values():
        if t.is_floating_point() and id(t) not in cast:
            cast[id(t)] = t.to(dtype)
    return {key: cast.get(id(t), t) for key, t in state.items()}


def _load_into(model: torch.nn.Module, path: Path, header: dict, state: dict, masks: dict,
               integrations: list | None = None) -> dict:
    """Replay the file's edits, cut the model to its shapes and load it; returns the cut shapes.
    All of it is undone on failure or interrupt (which is re-raised as it is)."""
    undos = []
    try:
        shrunk = _fit(model, path, header, state, integrations, undos)
        _restore(model, state, masks, _quantized_weights(model, state, path))
    except BaseException as exc:
        for undo in reversed(undos):
            undo.restore()
        if isinstance(exc, Exception) and not isinstance(exc, PangkasError):
            raise PangkasError(f"{path} could not be loaded into {type(model).__name__}: "
                               f"{type(exc).__name__}: {exc}") from exc
        raise
    return shrunk


def _fit(model: torch.nn.Module, path: Path, header: dict, state: dict, integrations: list | None, undos: list,
         check_dtypes: bool = True) -> dict:
    """Replay the file's edits and cut the model to the shapes of ``state``; returns the cut shapes
    and appends what undoes each step to ``undos``."""
    undos += _replay(model, header.get("edits", []), path)
    reshaped = header.get("reshaped", False)
    shrunk = _check_fits(model, state, path, allow_smaller=reshaped, check_dtypes=check_dtypes)
    if shrunk:
        known = active_integrations(integrations)  # a family's module is cut the way it was pruned
        undos.append(shrink(model, _keep_leading(model, shrunk), known.updater_for, known.fix))
    if reshaped:  # the cut's fixers may add buffers (a weight-standardised conv's removed moments)
        _check_fits(model, state, path, allow_smaller=False, check_dtypes=check_dtypes)
    return shrunk


def _load_static(path: Path, model: torch.nn.Module, header: dict, state: dict,
                 integrations: list | None) -> torch.fx.GraphModule:
    """The int8-static graph of the file, rebuilt from a copy of ``model`` (left as it was)."""
    record = header["static"]
    shapes = {key: torch.empty(shape, device="meta") for key, shape in record["shapes"].items()}
    try:
        work = copy.deepcopy(model)
        _fit(work, path, header, shapes, integrations, [], check_dtypes=False)
        graph = quant_static.rebuild(work, record, state)
    except PangkasError as exc:
        raise PangkasError(f"{path}: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 -- a copy was changed; the model was not
        raise PangkasError(f"{path} could not be rebuilt from {type(model).__name__}: "
                           f"{type(exc).__name__}: {exc}") from exc
    setattr(graph, _LOADED_FROM, path.resolve())
    return graph


def _replay(model: torch.nn.Module, edits: list[dict], path: Path) -> list:
    """Re-apply the structural edits recorded in the file (blocks removed by layer pruning, the
    stand-ins put in their place, whose weights the file then loads) to a fresh instance, unless
    the model already carries them."""
    if not edits or getattr(model, EDITS, []) == edits:
        return []
    if getattr(model, EDITS, []):
        raise PangkasError(f"{path} was pruned differently from this model; load it into a fresh instance")
    undos = []
    try:
        for edit in edits:
            stand_ins = _stand_ins(model, edit)
            undos.append(remove_blocks(model, edit["remove_blocks"], edit.get("tuple_lengths"), stand_ins))
    except BaseException as exc:
        for undo in reversed(undos):
            undo.restore()
        if not isinstance(exc, Exception):
            raise
        raise PangkasError(f"{path} removes blocks this model does not have ({exc}); "
                           "load it into an instance of the architecture it was pruned from") from exc
    return undos


def _stand_ins(model: torch.nn.Module, edit: dict) -> dict[str, LinearStandIn]:
    """Fresh stand-ins for an edit, each with the dtype and device of the block it replaces."""
    found = {}
    for name, spec in (edit.get("stand_ins") or {}).items():
        reference = next(model.get_submodule(name).parameters(), None)
        found[name] = LinearStandIn(spec["width"], int((edit.get("tuple_lengths") or {}).get(name, 0)),
                                    dtype=None if reference is None else reference.dtype,
                                    device=None if reference is None else reference.device)
    return found


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
                allow_smaller: bool, check_dtypes: bool = True) -> dict:
    """Raise unless ``state`` fits ``model``; for a file of a pruned model (``allow_smaller``)
    returns the keys whose tensors are smaller in the file, with their file shapes (its keys the
    model lacks are left to the check after the cut, which may add them)."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = [] if allow_smaller else sorted(set(state) - set(expected))
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
    if check_dtypes:
        _check_dtypes(model, state, path)
    return shrunk


def _check_dtypes(model: torch.nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """Loading casts silently; a restore that should be bit-exact must not."""
    for key, want in model.state_dict().items():
        got = state[key].dtype
        if got != want.dtype:
            hint = (f"pass dtype={want.dtype} to cast the file's floating-point tensors, or "
                    if got.is_floating_point and want.dtype.is_floating_point else "")
            raise PangkasError(f"{path}: {key} is {got} in the file but {want.dtype} in "
                               f"{type(model).__name__}; {hint}convert the model (model.to(...)) first")


def _quantized_weights(model: torch.nn.Module, state: dict, path: Path) -> dict[str, torch.nn.Parameter]:
    """By key, the torchao weights of the file's quantized entries: quantized by the file's scheme
    at the layer's shape, checked against the file's tensors and filled with them. The model is
    not touched (its weights are swapped in by ``_restore``)."""
    built = {}
    for key, stored in state.items():
        if not isinstance(stored, Quantized):
            continue
        module_name, _, tensor_name = key.rpartition(".")
        module = model.get_submodule(module_name)
        if not isinstance(module, torch.nn.Linear) or tensor_name != "weight":
            raise PangkasError(f"{path}: {key} is quantized with {stored.scheme}, which quantizes Linear weights, "
                               f"but in {type(model).__name__} it is the {tensor_name} of a {type(module).__name__}")
        weight = quantized_weight(stored.scheme, tuple(stored.shape), stored.dtype, module.weight.device)
        tensors, attributes = parts(weight)
        _check_quantized(key, stored, tensors, list(attributes.get("block_size", [])), path)
        with torch.no_grad():
            for name, t in tensors.items():
                t.copy_(stored.parts[name])
        built[key] = weight
    return built


def _check_quantized(key: str, stored: Quantized, tensors: dict, block_size: list[int], path: Path) -> None:
    """The file's tensors must be those ``stored.scheme`` makes here: a checksum cannot tell that
    the header is wrong, and torchao's format may change between versions."""
    made = f"{stored.scheme} (torchao here)"
    if set(stored.parts) != set(tensors):
        raise PangkasError(f"{path}: {key} stores {sorted(stored.parts)} but {made} makes {sorted(tensors)}")
    if stored.block_size != block_size:
        raise PangkasError(f"{path}: {key} has block_size {stored.block_size} but {made} uses {block_size}")
    for name, t in tensors.items():
        got = stored.parts[name]
        if got.shape != t.shape or got.dtype != t.dtype:
            raise PangkasError(f"{path}: {key}:{name} is {got.dtype} {tuple(got.shape)} in the file but "
                               f"{made} makes {t.dtype} {tuple(t.shape)}")


def _restore(model: torch.nn.Module, state: dict, masks: dict[str, torch.Tensor],
             quantized: dict[str, torch.nn.Parameter]) -> None:
    """Make ``model``'s masks and tensors those of the file, swapping in the ``quantized`` weights.
    ``load_state_dict`` copies module by module, so a failure or interrupt midway needs a copy of
    every old value (and every weight swapped out) to put back."""
    before = {key: mask.clone() for key, mask in masks_by_key(model).items()}
    values = [(t, t.detach().clone()) for t in list(model.parameters()) + list(model.buffers())]
    swapped = []  # (module, its float weight)
    try:
        _set_masks(model, masks)
        for key, weight in quantized.items():
            module = model.get_submodule(key.rpartition(".")[0])
            swapped.append((module, module.weight))
            module.weight = weight
        dense = {key: value for key, value in state.items() if key not in quantized}
        missing, unexpected = model.load_state_dict(dense, strict=False)
        if set(missing) != set(quantized) or unexpected:
            raise PangkasError(f"keys missing {sorted(set(missing) - set(quantized))[:5]}, unexpected {unexpected[:5]}")
    except BaseException as exc:
        for module, weight in reversed(swapped):
            module.weight = weight
        _set_masks(model, before)
        with torch.no_grad():
            for t, old in values:
                t.copy_(old)
        if not isinstance(exc, Exception):
            raise
        raise PangkasError(f"could not load into {type(model).__name__}: {exc}") from exc


def _set_masks(model: torch.nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Make the model's masks exactly ``masks`` (by state-dict key)."""
    for module_name, module, tensor_name in list(masked_modules(model)):
        if state_key(module_name, tensor_name) not in masks:
            remove_mask(module, tensor_name, keep_zeros=False)
    for key, mask in masks.items():
        module_name, _, tensor_name = key.rpartition(".")
        set_mask(model.get_submodule(module_name), mask, tensor_name)
