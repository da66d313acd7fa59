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


def read_by(block: nn.Module, layers: list[nn.Module], calls: list[Call]) -> None:
    """Run ``block`` on ``calls`` for what ``layers`` read (their statistics are recorded by hooks
    registered before this). When the first call shows each layer reading exactly once, later calls
    stop as soon as the last of them has read: the rest of the block (a transformer's last
    projection, its residual add) would only compute an output nobody uses."""
    if not layers:
        return  # nothing to record: the pass would be wasted
    counts = {id(m): 0 for m in layers}
    early = False

    def seen(module, args):
        counts[id(module)] += 1
        if early and all(counts.values()):
            raise _Stop

    handles = [m.register_forward_pre_hook(seen) for m in layers]
    try:
        for i, (args, kwargs) in enumerate(calls):
            counts.update(dict.fromkeys(counts, 0))
            try:
                block(*args, **kwargs)
            except _Stop:
                pass
            if i == 0:
                early = all(n == 1 for n in counts.values())
    finally:
        for handle in handles:
            handle.remove()


def next_inputs(block: nn.Module, calls: list[Call]) -> list[Call]:
    """The next block's calls: ``block``'s hidden-state output in place of its input."""
    return following(calls, [block(*args, **kwargs) for args, kwargs in calls])


def following(calls: list[Call], outputs: list) -> list[Call]:
    """The next block's calls, given what this block returned for each of ``calls``."""
    out = []
    for (args, kwargs), output in zip(calls, outputs):
        hidden = output[0] if isinstance(output, (tuple, list)) else output
        out.append(((hidden, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": hidden}))
    return out
