"""Streamed structural pruning: attention heads, MLP neurons and hidden size removed from a
checkpoint directory without loading it whole.

The plan is made on the ``meta`` model (``plan_transformer``: the trace, the coupled groups and
the selection need no weights); only the scores need them, and those are computed block by block
as the weights stream in (an activation-aware criterion measures each block on the inputs the
dense model gives it). The plan is then applied to the ``meta`` model (which updates its config)
and to the checkpoint tensor by tensor while the shards are copied, each cut tensor checked
against the cut model's shape. Same scores, same plan, same tensors as in-memory pruning.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from ..blockwise import blocks_of, next_inputs
from ..channels import ChannelReport
from ..errors import PangkasError
from ..importance import Importance, Scores, Slice
from ..integrations.hf_directory import write_config
from ..modules import Selector
from ..progress import track
from ..transformer import plan_transformer
from .checkpoint import Checkpoint, materialize, release, skeleton, tie
from .output import ResumableOutput
from .walk import block_of, check_memory, fingerprint, first_inputs, outside_units


class _Calls(nn.Module):
    """A block called with captured (args, kwargs) pairs, so a criterion's ``measure`` (which calls
    a model on batches) can run it; its layers are named ``block.<name in the block>``."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, args, kwargs):
        return self.block(*args, **kwargs)


def prune_transformer(directory: str | Path, output: str | Path, *, heads: float | None = None,
                      ffn: float | None = None, hidden: float | None = None, importance="l1",
                      data: Iterable | None = None, include: Selector = None, exclude: Selector = None,
                      round_to: int = 1, max_memory: int | str | None = None, overwrite: bool = False) -> ChannelReport:
    """Remove ``heads``, ``ffn`` and ``hidden`` (fractions of each unit, as in
    ``pangkas.prune_transformer``) from the Hugging Face checkpoint in ``directory`` into a
    checkpoint directory ``output``, holding one block in memory at a time. ``importance``: a
    criterion scored tensor by tensor (``"l1"``, ``"l2"``, ``"random"``, ``"wanda"`` with ``data``,
    ...; not ``"taylor"``, which needs the whole model's gradients); with ``hidden`` only data-free
    ones (the head's inputs are not measured). Reconstruction and sensitivity allocation are not
    streamed. The result equals in-memory ``prune_transformer`` with the same options. Run again
    after a crash or interrupt to continue from the last shard written."""
    source = Checkpoint(directory)
    model, _ = skeleton(directory)
    tie(source, model)
    blocks = blocks_of(model)
    if not blocks:
        raise PangkasError(f"{type(model).__name__} has no repeated blocks to stream one at a time")
    batches = list(data) if data is not None else []
    if max_memory is not None:
        check_memory(model, blocks, source, batches, False, max_memory)
    example = batches[0] if batches else torch.zeros(1, 16, dtype=torch.long)
    scorer = _StreamedScores(model, blocks, source, batches, hidden is not None)
    plan = plan_transformer(model, example, heads=heads, ffn=ffn, hidden=hidden, importance=importance,
                            data=batches or None, include=include, exclude=exclude, round_to=round_to, scorer=scorer)
    keep = plan.keep()
    report = plan.apply()  # on meta: the cut shapes and the config that says them
    shapes = {key: tuple(t.shape) for key, t in model.state_dict().items()}
    options = ("transformer", str(importance), heads, ffn, hidden, repr(include), repr(exclude), round_to)
    rest = outside_units(model, blocks, source)
    units = {**{b: [k for k in source.keys() if k.startswith(b + ".")] for b in blocks}, **rest}
    out = ResumableOutput(output, list(units), fingerprint(source, options, batches), source=Path(directory),
                          overwrite=overwrite)
    for unit, keys in track(list(units.items()), "writing the cut shards"):
        if out.done(unit) is None:
            out.write(unit, {key: _cut(key, source.tensor(key), keep, shapes) for key in keys}, {})
    out.finish(lambda staging: write_config(staging, model))
    return report


def _cut(key: str, tensor: torch.Tensor, keep: dict, shapes: dict) -> torch.Tensor:
    """``tensor`` with only the kept positions of each dim, checked against the cut model."""
    for dim, kept in enumerate(keep.get(key, ())):
        if kept is not None:
            if kept.ndim != 1:
                raise PangkasError(f"{key} is cut per row block along dim {dim} (a grouped convolution), which "
                                   "streamed pruning does not do")
            tensor = tensor.index_select(dim, kept)
    if key in shapes and tuple(tensor.shape) != shapes[key]:
        raise PangkasError(f"cutting {key} gives {tuple(tensor.shape)}, but the cut model has {shapes[key]}")
    return tensor.contiguous()


class _StreamedScores:
    """The plan's ``scorer``: each block loaded in turn and scored (measured on the inputs the dense
    model gives it, for a criterion that reads data), then the modules outside the blocks."""

    def __init__(self, model: nn.Module, blocks: list[str], source: Checkpoint, batches: list, hidden: bool):
        self.model, self.blocks, self.source, self.batches, self.hidden = model, blocks, source, batches, hidden

    def __call__(self, slices: list[Slice], criterion: Importance) -> Scores:
        if criterion.needs_loss:
            raise PangkasError(f"importance={criterion.name!r} needs the whole model's gradients, which streamed "
                               "pruning does not compute: use l1, l2, wanda or another per-tensor criterion")
        if criterion.needs_data and self.hidden:
            raise PangkasError(f"importance={criterion.name!r} with hidden= needs the LM head's inputs, which "
                               "streamed pruning does not measure: use a data-free criterion (l1) for hidden=")
        by_unit: dict[str | None, list[Slice]] = {}
        for piece in slices:
            if piece.tensor is not None:
                by_unit.setdefault(block_of(piece.name, self.blocks), []).append(piece)
        scores: Scores = {}
        calls = first_inputs(self.model, self.blocks, self.source, self.batches) if criterion.needs_data else None
        for name in track(self.blocks, f"{criterion.name}: scoring block by block (streamed)"):
            block = self.model.get_submodule(name)
            materialize(block, name, self.source)
            measured = self._measured(criterion, block, name, calls) if calls is not None else None
            scores.update(criterion.scores(self._real(by_unit.get(name, [])), measured))
            if calls is not None and name != self.blocks[-1]:
                with torch.no_grad():
                    calls = next_inputs(block, calls)
            release(block)
        unmeasured = {} if criterion.needs_data else None  # the head's inputs: not measured (hidden refused)
        by_owner: dict[str, list[Slice]] = {}
        for piece in by_unit.get(None, []):
            by_owner.setdefault(piece.module_name, []).append(piece)
        for owner_name, pieces in by_owner.items():
            owner = self.model.get_submodule(owner_name)
            materialize(owner, owner_name, self.source)
            scores.update(criterion.scores(self._real(pieces), unmeasured))
            release(owner)
        return scores

    def _real(self, pieces: list[Slice]) -> list[Slice]:
        """The slices with the tensors and modules now loaded in place of the ``meta`` ones."""
        params = dict(self.model.named_parameters(remove_duplicate=False))
        modules = dict(self.model.named_modules())
        return [dataclasses.replace(p, tensor=params[p.name].detach(), module=modules.get(p.module_name))
                for p in pieces]

    @staticmethod
    def _measured(criterion: Importance, block: nn.Module, name: str, calls: list):
        """``criterion.measure`` on one block and its inputs, keyed by the layers' names in the model."""
        measured = criterion.measure(_Calls(block), calls, None)
        if not isinstance(measured, dict):
            return measured
        return {f"{name}.{key.removeprefix('block.')}": value for key, value in measured.items()}
