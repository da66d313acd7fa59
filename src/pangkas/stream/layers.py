"""Streamed layer pruning: whole decoder layers removed from a checkpoint directory without
loading it whole.

Each block is loaded in turn and scored on the inputs the dense model gives it (block influence:
1 - cos(input, output), as ``pangkas.prune_layers`` scores it; or its weights' magnitude), the
lowest go, the ``meta`` model loses them (its layer list renumbered, its config updated), and the
kept blocks' tensors are copied under their new numbers.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from ..blockwise import blocks_of, following
from ..errors import PangkasError
from ..integrations.hf_directory import write_config
from ..layer_importance.base import lowest
from ..layer_importance.magnitude import magnitude
from ..layer_importance.states import cosine, input_tensor
from ..layers import _count
from ..modules import ModuleFilter, Selector
from ..outputs import first_tensor
from ..progress import track
from ..reports import Report
from ..surgery.blocks import remove_blocks
from ..tables import render_table
from .checkpoint import Checkpoint, materialize, release, skeleton, tie
from .output import ResumableOutput
from .walk import check_memory, fingerprint, first_inputs, outside_units

IMPORTANCES = ("block_influence", "magnitude")


@dataclass
class StreamedLayersReport(Report):
    """The blocks removed from a checkpoint, with every block's score (lowest went)."""

    importance: str
    scores: dict[str, float]
    removed: list[str]
    params_before: int
    params_after: int
    macs_before: None = None
    macs_after: None = None
    kind: str = field(default="layers", init=False)

    def details(self) -> dict:
        return {"importance": self.importance, "removed": list(self.removed), "scores": dict(self.scores)}

    def __str__(self) -> str:
        rows = [(name, f"{score:.4f}", "removed" if name in self.removed else "")
                for name, score in self.scores.items()]
        return render_table(f"layers removed (streamed, importance={self.importance}): {len(self.removed)}; "
                            f"parameters {self.params_before:,} -> {self.params_after:,}",
                            ("block", "score", ""), rows)


def prune_layers(directory: str | Path, output: str | Path, *, n: int | None = None, ratio: float | None = None,
                 data: Iterable | None = None, importance: str = "block_influence", include: Selector = None,
                 exclude: Selector = None, max_memory: int | str | None = None,
                 overwrite: bool = False) -> StreamedLayersReport:
    """Remove ``n`` (or ``ratio`` of the) repeated blocks of the Hugging Face checkpoint in
    ``directory`` into a checkpoint directory ``output``, one block in memory at a time.
    ``importance``: ``"block_influence"`` (needs ``data``; as ``pangkas.prune_layers`` scores it,
    so the same blocks go) or ``"magnitude"`` (mean |w|). ``include`` / ``exclude`` restrict
    which blocks may go. Run again after a crash or interrupt to continue writing."""
    if importance not in IMPORTANCES:
        raise PangkasError(f"streamed layer pruning scores blocks one at a time: importance must be one of "
                           f"{', '.join(IMPORTANCES)}, got {importance!r}")
    batches = list(data) if data is not None else []
    if importance == "block_influence" and not batches:
        raise PangkasError("importance='block_influence' needs data= (calibration batches the model accepts)")
    source = Checkpoint(directory)
    model, _ = skeleton(directory)
    tie(source, model)
    blocks = blocks_of(model)
    allowed = ModuleFilter(include, exclude, [(b, model.get_submodule(b)) for b in blocks], "removable block")
    candidates = [b for b in blocks if allowed.allows(b, model.get_submodule(b))]
    if not candidates:
        raise PangkasError(f"no removable block is selected among {blocks[:3]}...; check include=/exclude=")
    count = _count(n, ratio, len(candidates))
    if max_memory is not None:
        check_memory(model, blocks, source, batches, False, max_memory)
    params_before = sum(p.numel() for p in model.parameters())
    scores = _scores(model, blocks, candidates, source, batches, importance)
    removed = lowest(scores, count)
    renamed = _renumbered(blocks, removed)
    remove_blocks(model, removed)  # on meta: the layer list renumbered, the config updated
    units = {**{renamed[b]: [(k, renamed[b] + k[len(b):]) for k in source.keys() if k.startswith(b + ".")]
                for b in blocks if b not in removed},
             **{unit: [(k, k) for k in keys] for unit, keys in outside_units(model, blocks, source).items()}}
    options = ("layers", importance, count, repr(include), repr(exclude))
    out = ResumableOutput(output, list(units), fingerprint(source, options, batches), source=Path(directory),
                          overwrite=overwrite)
    for unit, keys in track(list(units.items()), "writing the kept blocks"):
        if out.done(unit) is None:
            out.write(unit, {new: source.tensor(old) for old, new in keys}, {})
    out.finish(lambda staging: write_config(staging, model))
    return StreamedLayersReport(importance, scores, removed, params_before, sum(p.numel() for p in model.parameters()))


def _renumbered(blocks: list[str], removed: list[str]) -> dict[str, str]:
    """Each kept block's name once the removed ones are gone (``layers.5`` -> ``layers.4``)."""
    by_container: dict[str, int] = {}
    renamed = {}
    for name in blocks:
        if name in removed:
            continue
        container, _, _ = name.rpartition(".")
        index = by_container.get(container, 0)
        by_container[container] = index + 1
        renamed[name] = f"{container}.{index}" if container else str(index)
    return renamed


@torch.no_grad()
def _scores(model: nn.Module, blocks: list[str], candidates: list[str], source: Checkpoint, batches: list,
            importance: str) -> dict[str, float]:
    calls = first_inputs(model, blocks, source, batches) if importance == "block_influence" else None
    scores = {}
    for name in track(blocks, f"{importance}: scoring block by block (streamed)"):
        block = model.get_submodule(name)
        materialize(block, name, source)
        if calls is not None:
            outputs = [block(*args, **kwargs) for args, kwargs in calls]
            if name in candidates:  # summed batch by batch as prune_layers sums them: the same floats
                total = 0.0
                for (args, kwargs), output, batch in zip(calls, outputs, batches):
                    total += 1 - float(cosine(input_tensor(args, kwargs), first_tensor(output), batch))
                scores[name] = total / len(batches)
            calls = following(calls, outputs)
        elif name in candidates:
            scores.update(magnitude(model, [SimpleNamespace(name=name)]))
        release(block)
    return scores
