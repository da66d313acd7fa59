"""Running a model one repeated block at a time on calibration data.

Work that changes a block from what it reads (one-shot weight pruning, reconstruction) runs the
blocks in order: the first block's inputs are captured from the data once, each block runs on the
inputs it really receives, and its outputs (computed after it changed) become the next block's
inputs, so errors do not compound unseen and memory holds one block's activations.
"""

from __future__ import annotations

from torch import nn

from .errors import PangkasError
from .inputs import call_model
from .repeats import is_stack

LAYERS = (nn.Linear, nn.Conv2d)
Call = tuple[tuple, dict]  # a block's positional and keyword arguments


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the first block's inputs are captured."""


def blocks_of(model: nn.Module) -> list[str]:
    """The model's repeated blocks in order: the longest ModuleList/Sequential of same-class
    modules that contain prunable layers (HF layers, ViT encoder layers, ResNet stages' blocks)."""
    best: list[str] = []
    for name, module in model.named_modules():
        if is_stack(module):
            children = list(module.named_children())
            if any(isinstance(m, LAYERS) for _, c in children for m in c.modules()):
                if len(children) > len(best):
                    best = [f"{name}.{c}" if name else c for c, _ in children]
    return best


def first_block_inputs(model: nn.Module, first: str, batches: list) -> list[Call]:
    """The arguments ``model.get_submodule(first)`` is called with, one call per batch; the rest
    of each forward pass is skipped."""
    captured: list[Call] = []

    def grab(module, args, kwargs):
        captured.append((args, kwargs))
        raise _Stop

    handle = model.get_submodule(first).register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for batch in batches:
            try:
                call_model(model, batch)
            except _Stop:
                pass
    finally:
        handle.remove()
    if len(captured) != len(batches):
        raise PangkasError(f"could not capture the inputs of {first} for every batch")
    return captured


def next_inputs(block: nn.Module, calls: list[Call]) -> list[Call]:
    """The next block's calls: ``block``'s hidden-state output in place of its input."""
    out = []
    for args, kwargs in calls:
        output = block(*args, **kwargs)
        hidden = output[0] if isinstance(output, (tuple, list)) else output
        out.append(((hidden, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": hidden}))
    return out
