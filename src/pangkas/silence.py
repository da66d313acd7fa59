"""Silencing: zero what reads the channels a plan removes, so the dense model computes what the
pruned one will.

Zero the input weights of every consumer of the channels a plan removes: those channels can then
no longer affect the output. Where a removed channel has no consuming weight (the query/key head
dims of attention meet each other, not a weight), its producing slices are zeroed. The oracle
compares a silenced model with the pruned one; reconstruction fits the consumers' kept weights on
a silenced model.
"""

from __future__ import annotations

import torch

from .surgery import owners


@torch.no_grad()
def silence_removed(plan, removed: torch.Tensor | None = None,
                    consumers_only: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Zero, in ``plan.model``, the consumer slices of every channel ``plan`` (a channel
    ``Plan``) removes, or of the positions flagged in ``removed`` (a bool per id); with
    ``consumers_only``, never a producer's. Returns (tensor, old data): :func:`restore` undoes it."""
    coupling = plan.coupling
    removed = plan.selection.removed if removed is None else removed
    consumed = torch.zeros(coupling.num_ids, dtype=torch.bool)
    if coupling.consumed.numel():
        consumed[coupling.consumed] = True
    classes = plan.selection.classes
    gathered = plan.selection.gathered
    has_consumer = torch.zeros(coupling.num_ids, dtype=torch.bool)
    has_consumer[classes[consumed.nonzero().flatten()]] = True
    for rows in gathered.values():  # a grouped conv reads each row's channels per block
        has_consumer[classes[rows]] = True
    where = owners(plan.model)
    saved = []
    for name, dims in coupling.tensor_ids.items():
        module, attr = where[name]
        if attr not in module._parameters:
            continue
        tensor = module._parameters[attr]
        for dim, ids in enumerate(dims):
            if (name, dim) in gathered:
                zero = removed[gathered[(name, dim)]]  # (blocks, n): per row-block of dim 0
                zero = zero.repeat_interleave(tensor.shape[0] // zero.shape[0], 0)
                shape = [zero.shape[0]] + [1] * (tensor.ndim - 1)
                shape[dim] = zero.shape[1]
                zero_mask = zero.reshape(shape).expand_as(tensor)
            else:
                zero = removed[ids] & (consumed[ids] | (~has_consumer[classes[ids]] & ~consumers_only))
                zero_mask = None
            if zero.any():
                if not saved or saved[-1][0] is not tensor:
                    saved.append((tensor, tensor.detach().clone()))
                if zero_mask is not None:
                    tensor.masked_fill_(zero_mask.to(tensor.device), 0.0)
                else:
                    tensor.index_fill_(dim, zero.nonzero().flatten().to(tensor.device), 0.0)
    return saved


@torch.no_grad()
def restore(saved: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Undo :func:`silence_removed` (or any list of (tensor, old data) taken before changing them)."""
    for tensor, data in reversed(saved):
        tensor.copy_(data)
