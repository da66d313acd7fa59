"""FSDP2 for ``recover(shard=True)``: a sharded training copy of a model, and its weights back.

The copy is built on the meta device (no second full copy is ever made), each repeated block
(``blocks_of``) and then the root become ``fully_shard`` units, and each rank's shard is sliced
from the original's tensors. The original is never touched while the copy trains, so a failed
run leaves it as it was without any collective (a rank that failed alone cannot join one).
Masks (``weights/masks.py``) are parametrizations: the copy keeps them, FSDP shards the
``original`` weight under them and the mask applies to the gathered weight in every forward.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .blockwise import blocks_of
from .errors import PangkasError


def check_shardable(model: nn.Module, checkpoint) -> None:
    """Refuse what ``sharded_copy`` cannot do, before anything changes."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise PangkasError("shard=True splits the student across the processes of torch.distributed, and "
                           "none is initialised: launch with torchrun and call "
                           "torch.distributed.init_process_group() first, or drop shard=True")
    if checkpoint is not None:
        raise PangkasError("checkpoint= is not supported with shard=True (the checkpoint would need the "
                           "sharded optimizer state gathered); drop one of them")
    from torch.distributed.fsdp import FSDPModule
    if any(isinstance(m, FSDPModule) for m in model.modules()):
        raise PangkasError("the student is already sharded (fully_shard); pass the plain model: "
                           "recover(shard=True) shards a copy itself")
    devices = {t.device for t in [*model.parameters(), *model.buffers()]}
    if len(devices) != 1 or torch.device("meta") in devices:
        raise PangkasError(f"shard=True needs the student's tensors on one real device, they are on "
                           f"{sorted(map(str, devices))}")


def sharded_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parameters are sharded over the default process group."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import distribute_tensor

    device = next(model.parameters()).device
    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    tensors = [*model.parameters(), *model.buffers()]
    memo = {id(t): _on_meta(t) for t in tensors}
    shell = copy.deepcopy(model, memo)
    for name in blocks_of(shell):
        fully_shard(shell.get_submodule(name), mesh=mesh)
    fully_shard(shell, mesh=mesh)
    shell.to_empty(device=device)
    with torch.no_grad():
        for name, p in shell.named_parameters():
            # src_data_rank=None: every rank holds the whole tensor and keeps its own slice, no traffic
            p.copy_(distribute_tensor(model.get_parameter(name).detach(), mesh, p.placements, src_data_rank=None))
        for name, b in shell.named_buffers():
            b.copy_(model.get_buffer(name))
    return shell


def _on_meta(t: torch.Tensor) -> torch.Tensor:
    meta = t.detach().to("meta")
    return nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else meta


def unshard_into(model: nn.Module, shell: nn.Module) -> None:
    """Put the trained weights of ``shell`` (every rank's shard) into ``model`` on every rank; its
    buffers (BatchNorm statistics, which each rank updates on its own batches) are rank 0's, as
    DDP's. All is gathered before ``model`` is written, so it changes whole or not at all."""
    weights = {name: p.full_tensor() for name, p in shell.named_parameters()}
    buffers = {}
    for name, b in shell.named_buffers():
        if b.is_floating_point():
            torch.distributed.broadcast(b, src=0)
        buffers[name] = b
    with torch.no_grad():
        for name, value in weights.items():
            model.get_parameter(name).copy_(value)
        for name, value in buffers.items():
            model.get_buffer(name).copy_(value)
