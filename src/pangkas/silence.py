"""Silencing: zero what reads the channels a plan removes, so the dense model computes what the
pruned one will.

Zero the input weights of every consumer of the channels a plan removes: those channels can then
no longer affect the output. Where a removed channel has no consuming weight (the query/key head
dims of attention meet each other, not a weight), or an op reads its value into other channels
(GRN's mean response, a weight-standardised conv: ``Coupling.at_source``), its producing slices
are zeroed too; for the latter its buffers as well (a pruned weight-standardised conv's stored
moments would keep a zeroed filter's output alive). The oracle
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
    ``consumers_only``, a producer's only where an op reads the value across channels. Returns
    (tensor, old data): :func:`restore` undoes it."""
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
    at_source = torch.zeros(coupling.num_ids, dtype=torch.bool)
    at_source[classes[coupling.at_source]] = True
    for key, rows in gathered.items():  # a grouped conv's input dim read across: the channels it reads
        if at_source[classes[coupling.tensor_ids[key[0]][key[1]]]].any():
            at_source[classes[rows]] = True
    unread = ~has_consumer & ~torch.tensor(consumers_only)
    where = owners(plan.model)
    saved = []
    for name, dims in coupling.tensor_ids.items():
        module, attr = where[name]
        buffer = attr not in module._parameters  # zeroed only where silenced at the source
        tensor = module._buffers[attr] if buffer else module._parameters[attr]
        if buffer and not tensor.is_floating_point():
            continue
        for dim, ids in enumerate(dims):
            if buffer:
                zero = removed[ids] & at_source[classes[ids]] & ((name, dim) not in gathered)
                zero_mask = None
            elif (name, dim) in gathered:
                zero = removed[gathered[(name, dim)]]  # (blocks, n): per row-block of dim 0
                zero = zero.repeat_interleave(tensor.shape[0] // zero.shape[0], 0)
                shape = [zero.shape[0]] + [1] * (tensor.ndim - 1)
                shape[dim] = zero.shape[1]
                zero_mask = zero.reshape(shape).expand_as(tensor)
            else:
                zero = removed[ids] & (consumed[ids] | unread[classes[ids]] | at_source[classes[ids]])
                zero_mask = None
            if zero.any():
                if not saved or saved[-1][0] is not tensor:
                    saved.append((tensor, tensor.detach().clone()))
                if zero_mask is not None:
                    tensor.masked_fill_(zero_mask.to(tensor.device), 0.0)
                else:
                    tensor.index_fill_(dim, zero.nonzero().flatten().to(tensor.device), 0.0)
    return saved


def lowest_removed(plan, group, n: int) -> torch.Tensor:
    """The positions (a bool per id) removing the ``n`` lowest-scoring classes of ``group`` alone
    would remove, for :func:`silence_removed`."""
    removed_class = torch.zeros(plan.coupling.num_ids, dtype=torch.bool)
    removed_class[group.classes[torch.argsort(group.scores, stable=True)[:n]]] = True
    return removed_class[plan.selection.classes]


@torch.no_grad()
def restore(saved: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Undo :func:`silence_removed` (or any list of (tensor, old data) taken before changing them)."""
    for tensor, data in reversed(saved):
        tensor.copy_(data)
