"""Deleting whole blocks: from their container (ModuleList / Sequential, re-indexed) or, for a block
that is an attribute of its parent, by putting a ``Skip`` in its place; or putting a fitted
``LinearStandIn`` where a run of them was. Layer counters that
depend on the position (Hugging Face ``config.num_hidden_layers``, ``config.layer_types``, each
layer's ``layer_idx`` used by KV caches) follow. Every change can be undone.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from torch import nn


def _hidden(args, kwargs) -> torch.Tensor | None:
    """The hidden state a block is called with (positional, or ``hidden_states=`` in Hugging Face)."""
    x = kwargs.get("hidden_states")
    if x is None:
        x = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
    return x


def _returned(y: torch.Tensor, tuple_length: int):
    """``y`` in the calling convention of the block it stands for: a tensor, or a tuple with the
    hidden state first and its optional extras (attention weights...) None."""
    return (y,) + (None,) * (tuple_length - 1) if tuple_length else y


class Skip(nn.Module):
    """Stands where a residual block was: returns its input (the block's f(x) is gone).

    ``tuple_length`` mirrors blocks that returned a tuple (hidden state first, then optional
    extras such as attention weights, which become None); 0 for a plain tensor.
    """

    def __init__(self, tuple_length: int = 0):
        super().__init__()
        self.tuple_length = tuple_length

    def forward(self, *args, **kwargs):
        return _returned(_hidden(args, kwargs), self.tuple_length)

    def extra_repr(self) -> str:
        return f"tuple_length={self.tuple_length}" if self.tuple_length else ""


class LinearStandIn(nn.Module):
    """Stands where a run of removed blocks was: returns ``x + linear(x)``, an affine map of its
    input fitted to what the run returned (``replace="linear"`` where no map can be folded into a
    neighbour, e.g. post-norm transformers). Written as identity plus a correction so that a fresh
    one (weights zero) is a ``Skip`` and the ridge of its fit pulls towards doing nothing.

    ``tuple_length`` as for ``Skip``. Its weights are ordinary parameters: ``pangkas.save`` stores
    them and ``pangkas.load`` recreates the module from the file's edits.
    """

    def __init__(self, width: int, tuple_length: int = 0, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None):
        super().__init__()
        self.tuple_length = tuple_length
        self.linear = nn.Linear(width, width, dtype=dtype, device=device)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, *args, **kwargs):
        x = _hidden(args, kwargs)
        return _returned(x + self.linear(x), self.tuple_length)

    def extra_repr(self) -> str:
        return f"tuple_length={self.tuple_length}" if self.tuple_length else ""


@dataclass
class BlockUndo:
    containers: list[tuple[nn.Module, OrderedDict]] = field(default_factory=list)
    attributes: list[tuple[object, str, object]] = field(default_factory=list)

    def restore(self) -> None:
        for container, modules in self.containers:
            container._modules = modules
        for owner, name, value in reversed(self.attributes):
            setattr(owner, name, value)


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def remove_blocks(model: nn.Module, names: list[str], tuple_lengths: dict[str, int] | None = None,
                  stand_ins: dict[str, nn.Module] | None = None) -> BlockUndo:
    """Delete the blocks ``names`` (dotted paths, as they are before this call); a block that is
    not in a container becomes a ``Skip`` returning a tuple of ``tuple_lengths[name]`` if given.
    A block named in ``stand_ins`` is replaced by that module instead (it keeps its slot)."""
    undo = BlockUndo()
    tuple_lengths, stand_ins = tuple_lengths or {}, stand_ins or {}
    try:
        by_container: dict[int, tuple[nn.Module, list[int], dict[int, nn.Module]]] = {}
        for name in names:
            parent, child = _parent(model, name)
            if isinstance(parent, (nn.ModuleList, nn.Sequential)) and child.isdigit():
                _, removed, replaced = by_container.setdefault(id(parent), (parent, [], {}))
                if name in stand_ins:
                    replaced[int(child)] = stand_ins[name]
                else:
                    removed.append(int(child))
            else:
                undo.attributes.append((parent, child, getattr(parent, child)))
                setattr(parent, child, stand_ins[name] if name in stand_ins else Skip(int(tuple_lengths.get(name, 0))))
        for container, indices, replaced in by_container.values():
            undo.containers.append((container, OrderedDict(container._modules)))
            kept = [replaced.get(i, m) for i, m in enumerate(container._modules.values()) if i not in set(indices)]
            container._modules = OrderedDict((str(i), m) for i, m in enumerate(kept))
            _renumber(container, undo)
            _fix_config(model, len(kept) + len(indices), sorted(indices), undo)
    except BaseException:  # an interrupt too: never leave blocks half removed
        undo.restore()
        raise
    return undo


def _renumber(container: nn.Module, undo: BlockUndo) -> None:
    """Layers that know their position (``layer_idx``, for KV caches) learn the new one."""
    for index, layer in enumerate(container.children()):
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int) and module.layer_idx != index:
                undo.attributes.append((module, "layer_idx", module.layer_idx))
                module.layer_idx = index


def _fix_config(model: nn.Module, before: int, removed: list[int], undo: BlockUndo) -> None:
    """A Hugging Face config counting these layers is updated, as is any per-layer list in it."""
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is None or getattr(config, "num_hidden_layers", None) != before:
            continue
        undo.attributes.append((config, "num_hidden_layers", before))
        config.num_hidden_layers = before - len(removed)
        for key, value in list(vars(config).items()):
            if isinstance(value, list) and len(value) == before and key != "architectures":
                undo.attributes.append((config, key, value))
                setattr(config, key, [v for i, v in enumerate(value) if i not in removed])
