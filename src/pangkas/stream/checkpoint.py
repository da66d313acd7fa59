"""A Hugging Face checkpoint directory read tensor by tensor, and its model built without weights.

The model is built on ``meta`` (its buffers that are computed, not stored, such as rotary
frequencies, are real); ``materialize`` loads one module's tensors from the shards (safetensors
reads only the bytes asked for) and ``release`` puts it back on ``meta``. Only config.json and
safetensors files are read: pickled ``.bin`` checkpoints are refused. A shard is opened for each
read and closed after: an open one stays memory-mapped, and the pages read would stay resident.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
from pathlib import Path

import torch
from torch import nn

from ..errors import PangkasError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class Checkpoint:
    """The tensors of a checkpoint directory by name, each read from its shard on request."""

    def __init__(self, directory: str | Path, files: list[str] | None = None):
        """The checkpoint in ``directory`` (its index or single file), or the tensors of ``files``
        in it (shards being written, before there is an index)."""
        self.directory = Path(directory)
        self.aliases: dict[str, str] = {}  # a tied tensor the checkpoint stores once: its other names
        if files is not None:
            self.files = {}
            for file in files:
                with self._opened(file) as handle:
                    self.files.update(dict.fromkeys(handle.keys(), file))
            return
        if not (self.directory / "config.json").is_file():
            raise PangkasError(f"{self.directory} has no config.json: not a Hugging Face model directory")
        self.files = self._weight_map()

    def _weight_map(self) -> dict[str, str]:
        index, single = self.directory / INDEX, self.directory / SINGLE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as exc:
                raise PangkasError(f"{index} is not a safetensors index (a JSON weight_map): {exc}") from exc
            if not (isinstance(weight_map, dict) and all(isinstance(v, str) and "/" not in v and v.endswith(
                    ".safetensors") for v in weight_map.values())):
                raise PangkasError(f"{index}: weight_map must name .safetensors files in the directory")
            return weight_map
        if single.is_file():
            with self._opened(SINGLE) as handle:
                return dict.fromkeys(handle.keys(), SINGLE)
        raise PangkasError(f"{self.directory} has no {SINGLE} or {INDEX}: streamed pruning reads safetensors "
                           "checkpoints only (pickled .bin files are never loaded)")

    @contextlib.contextmanager
    def _opened(self, file: str):
        from safetensors import SafetensorError, safe_open

        try:
            handle = safe_open(str(self.directory / file), framework="pt")
        except (SafetensorError, OSError) as exc:
            raise PangkasError(f"cannot read {self.directory / file}: {exc}") from exc
        try:
            yield handle
        finally:
            del handle  # unmapped: the pages read are not kept resident

    def keys(self) -> list[str]:
        return list(self.files)

    def tensor(self, key: str) -> torch.Tensor:
        return self.tensors([key])[key]

    def tensors(self, keys: list[str]) -> dict[str, torch.Tensor]:
        """The tensors ``keys`` name, each shard opened once."""
        stored = {key: key if key in self.files else self.aliases.get(key, key) for key in keys}
        missing = [key for key in keys if stored[key] not in self.files]
        if missing:
            raise PangkasError(f"{self.directory} has no tensor {missing[0]!r}")
        found = {}
        for file in dict.fromkeys(self.files[k] for k in stored.values()):
            with self._opened(file) as handle:
                for key, name in stored.items():
                    if self.files[name] == file:
                        try:
                            found[key] = handle.get_tensor(name)
                        except Exception as exc:  # noqa: BLE001 -- safetensors' errors for a damaged shard vary
                            raise PangkasError(f"cannot read {name} from {self.directory / file}: {exc}") from exc
        return found

    def header(self) -> list:
        """(key, dtype, shape) of every tensor, from the shards' headers: what identifies the weights
        without reading them."""
        found = []
        for file in sorted(set(self.files.values())):
            with self._opened(file) as handle:
                for key in sorted(handle.keys()):
                    piece = handle.get_slice(key)
                    found.append((key, piece.get_dtype(), list(piece.get_shape())))
        return found


def skeleton(directory: str | Path) -> tuple[nn.Module, object]:
    """(the directory's model with its parameters on ``meta``, its config). The class is the one
    config.json's ``architectures`` names among transformers' own (no code from the directory)."""
    try:
        import transformers
        from accelerate import init_empty_weights
    except ImportError as exc:
        raise PangkasError("streamed pruning needs transformers and accelerate: pip install 'pangkas[hf]'") from exc
    try:
        config = transformers.AutoConfig.from_pretrained(directory)
    except Exception as exc:  # noqa: BLE001 -- transformers says what is wrong with the config
        raise PangkasError(f"{directory}/config.json does not load: {exc}") from exc
    architectures = [a for a in getattr(config, "architectures", None) or [] if hasattr(transformers, a)]
    if not architectures:
        raise PangkasError(f"{directory}/config.json names no transformers architecture "
                           f"({getattr(config, 'architectures', None)}); streamed pruning builds the model from it")
    with init_empty_weights(include_buffers=False):
        model = getattr(transformers, architectures[0])._from_config(config)
    return model.eval(), config


def tie(checkpoint: Checkpoint, model: nn.Module) -> None:
    """Let ``checkpoint`` answer for every name of a tensor the model ties (an LM head sharing the
    embeddings), by the name it is stored under."""
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    for group in names.values():
        stored = next((n for n in group if n in checkpoint.files), None)
        checkpoint.aliases.update({n: stored for n in group if stored is not None and n not in checkpoint.files})


def materialize(module: nn.Module, prefix: str, checkpoint: Checkpoint) -> None:
    """Give ``module`` (named ``prefix`` in the model) its tensors from ``checkpoint``, replacing
    the ``meta`` ones; a buffer not in the checkpoint (computed at construction) stays as it is."""
    wanted = {}
    for name, value in module.state_dict().items():
        key = f"{prefix}.{name}" if prefix else name
        if key in checkpoint.files or key in checkpoint.aliases:
            wanted[name] = key
        elif value.is_meta:
            raise PangkasError(f"{checkpoint.directory} has no tensor {key!r}, which the model built from its "
                               "config has (checkpoints from older transformers may name tensors differently: "
                               "load and save_pretrained it once with this version)")
    found = checkpoint.tensors(list(wanted.values()))
    module.load_state_dict({name: found[key] for name, key in wanted.items()}, strict=False, assign=True)


def release(module: nn.Module) -> None:
    """Put ``module``'s parameters and buffers back on ``meta``, freeing their memory, and hand the
    freed memory back to the system (glibc keeps freed blocks for reuse, and a block's worth of
    them at a time would add up to the peak)."""
    module.to("meta")
    _trim()


def _trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to hand back this way
        pass


@contextlib.contextmanager
def on_demand(model: nn.Module, names: list[str], checkpoint: Checkpoint):
    """While inside, each module in ``names`` gets its tensors when first called (so a forward pass
    loads only what it reaches: the embeddings before the first block, not the head); all are
    released on exit."""
    loaded: list[nn.Module] = []

    def load(module, args, name):
        if any(t.is_meta for t in module.parameters(recurse=False)):
            materialize(module, name, checkpoint)
            loaded.append(module)

    handles = [model.get_submodule(n).register_forward_pre_hook(
        lambda m, a, n=n: load(m, a, n)) for n in names]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for module in loaded:
            release(module)
