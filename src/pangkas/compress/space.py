"""What the compress search can cut, what a combination of cuts costs, and how to try or build it.

A ``State`` says how many channels go from each searchable channel group (the coupled groups of a
channel plan: a layer's filters, a transformer layer's heads or FFN neurons) and which removable
blocks go. Its figures (parameters, MACs, bytes, estimated latency) come from the trace, without
touching the model; ``silenced`` makes the model compute exactly what that state's pruned model
would (zeroed consumers, blocks skipped) so that its outputs can be judged, and ``build`` makes
the real pruned copy.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass, replace
from functools import partial

import torch
from torch import nn

from .. import verify
from ..channels import Plan
from ..graph.trace import count_flops
from ..layer_importance import Candidate
from ..layers import LayerPlan
from ..measure import file_sizes
from ..reconstruct import fit_stand_in
from ..selection import module_of, planned_shape, ratio_key
from ..silence import lowest_removed, restore, silence_removed
from ..surgery.blocks import remove_blocks
from ..weights import prune_weights
from ..weights.masks import underlying_parameter
from ..weights.sparsity import lowest_mask
from .latency_model import LatencyModel


@dataclass(frozen=True)
class State:
    """Channels removed per searchable group (in ``Space.groups`` order), the removed blocks, and
    the weight sparsity of each sparse-able layer (in ``Space.layers`` order) in eighths."""

    cuts: tuple[int, ...]
    blocks: frozenset[str] = frozenset()
    sparsity: tuple[int, ...] = ()


@dataclass(frozen=True)
class Move:
    """One step of the search: ``"width"`` (one more step of group ``target``, an index),
    ``"depth"`` (remove block ``target``, a name) or ``"weights"`` (one more eighth of layer
    ``target``'s weights zeroed, by magnitude)."""

    kind: str
    target: int | str


SPARSITY_STEPS = 8  # weight sparsity moves in eighths, up to 7/8


def _inside(name: str, block: str) -> bool:
    return name == block or name.startswith(block + ".")


def _sparse_bytes(numel: int, zeroed: int, element_size: int) -> int:
    """Bytes ``pangkas.save`` stores for a weight with ``zeroed`` of ``numel`` masked: bitmap +
    kept values when that is smaller than the dense tensor (see ``io``)."""
    return min(numel * element_size, numel // 8 + 1 + (numel - zeroed) * element_size)


class Space:
    """The cuts a search may combine on ``plan.model``: ``step`` of each group's channels at a
    time (at least one channel), the removable ``blocks``, and the weight sparsity of ``layers``
    (names of Linear/conv layers; only the file size gains from it). With ``stand_ins_on``
    (calibration batches; ``replace="linear"``), a run of removed blocks that pass hidden states
    with features last is judged with a fitted ``LinearStandIn`` in its place, and costs one.
    ``int8``: names of the weights that will be stored as int8 (a byte each, a scale per row), and
    ``int8_file`` the bytes of the dense model's file so quantized (it calibrates their header share)."""

    def __init__(self, plan: Plan, blocks: list[Candidate], step: float, latency: LatencyModel | None,
                 layers: list[str] = (), stand_ins_on: list | None = None, int8: frozenset[str] = frozenset(),
                 int8_file: int | None = None):
        self.plan, self.model = plan, plan.model
        self.latency = latency
        allowed = plan.options.allow_approximate
        self.groups = [g for g in plan.selection.groups
                       if len(g.classes) > 1 and g.rows is None and g.modules and (allowed or not g.approximate)]
        self.keys = {}
        for i, g in enumerate(self.groups):
            try:
                self.keys[i] = ratio_key(g, plan.selection.groups)
            except ValueError:  # shares its producers with another group: cannot get its own count
                pass
        self.groups = [g for i, g in enumerate(self.groups) if i in self.keys]
        self.keys = [self.keys[i] for i in sorted(self.keys)]
        self.steps = [max(1, round(step * len(g.classes))) for g in self.groups]
        self.blocks = {c.name: c for c in blocks}
        self.home = [next((b for b in self.blocks if all(_inside(m, b) for m in g.modules)), None)
                     for g in self.groups]  # the block a group lies in, if any
        self._ends = {name: self._block_ends(name) for name in self.blocks}
        self.layers = list(layers)
        self.layer_home = [next((b for b in self.blocks if _inside(n, b)), None) for n in self.layers]
        self._weight = {f"{n}.weight": i for i, n in enumerate(self.layers)}
        self.stand_ins_on = stand_ins_on
        self._stand_ins: dict[tuple[str, ...], nn.Module] = {}  # by run, fitted on the dense model
        self._removed: dict[tuple[int, ...], torch.Tensor] = {}
        self._lowest: dict[tuple[int, int], torch.Tensor] = {}
        self._per_tensor = self._per_int8 = 0.0
        self.int8 = frozenset()  # the dense model's file, as it is, first
        params, size, self._dense_work = self._totals(self.start())
        self.dense = {"params": params, "file_size": file_sizes(self.model)[1],
                      "macs": sum(w[0] for w in self._dense_work.values()) / 2}
        tensors = len(self.model.state_dict())
        self._per_tensor = (self.dense["file_size"] - size) / tensors  # the header's share per stored tensor
        self.int8 = frozenset(int8)
        if self.int8 and int8_file is not None:  # a quantized weight's header entry is longer than a plain one's
            self._per_int8 = (int8_file - self._totals(self.start())[1]) / len(self.int8)

    # -- states and moves ------------------------------------------------------------------

    def start(self) -> State:
        return State((0,) * len(self.groups), frozenset(), (0,) * len(self.layers))

    def limit(self, i: int) -> int:
        return len(self.groups[i].classes) - 1  # every group keeps a channel

    def moves(self, state: State, kinds: tuple[str, ...]) -> list[Move]:
        """Every move allowed from ``state`` of the given kinds."""
        found = []
        if "width" in kinds:
            found += [Move("width", i) for i in range(len(self.groups)) if self.allowed(state, Move("width", i))]
        if "depth" in kinds:
            found += [Move("depth", b) for b in self.blocks if b not in state.blocks]
        if "weights" in kinds:
            found += [Move("weights", i) for i in range(len(self.layers)) if self.allowed(state, Move("weights", i))]
        return found

    def allowed(self, state: State, move: Move) -> bool:
        if move.kind == "depth":
            return move.target not in state.blocks and self.fits(self.after(state, move))
        i = move.target
        if move.kind == "weights":
            return state.sparsity[i] < SPARSITY_STEPS - 1 and self.layer_home[i] not in state.blocks
        return state.cuts[i] < self.limit(i) and self.home[i] not in state.blocks and self.fits(self.after(state, move))

    def _block_ends(self, block: str):
        """(what the block reads, what it returns) as traced (shape, axes), or None if not traced."""
        inside = [r for r in self.plan.coupling.records if _inside(r.module, block) and r.inputs and r.outputs]
        return (inside[0].inputs[0], inside[-1].outputs[0]) if inside else None

    def fits(self, state: State) -> bool:
        """Whether every removed block would still pass on what it reads unchanged: a block that is not
        a residual branch can go only while the channel cuts leave its input as wide as its output."""
        if not state.blocks or not any(state.cuts):
            return True
        removed = self.removed(self.effective(state))
        for block in state.blocks:
            ends = self._ends[block]
            if ends is not None and planned_shape(ends[0], removed) != planned_shape(ends[1], removed):
                return False
        return True

    def after(self, state: State, move: Move) -> State:
        if move.kind == "depth":
            return State(state.cuts, state.blocks | {move.target}, state.sparsity)
        i = move.target
        if move.kind == "weights":
            sparsity = list(state.sparsity)
            sparsity[i] += 1
            return State(state.cuts, state.blocks, tuple(sparsity))
        cuts = list(state.cuts)
        cuts[i] = min(self.limit(i), cuts[i] + self.steps[i])
        return State(tuple(cuts), state.blocks, state.sparsity)

    def furthest(self, kinds: tuple[str, ...]) -> State:
        """Everything the kinds allow removed at once."""
        start = self.start()
        return State(tuple(self.limit(i) for i in range(len(self.groups))) if "width" in kinds else start.cuts,
                     frozenset(self.blocks) if "depth" in kinds else frozenset(),
                     (SPARSITY_STEPS - 1,) * len(self.layers) if "weights" in kinds else start.sparsity)

    def only(self, state: State, kind: str) -> State:
        """The part of ``state`` one kind of move made (the rest as in the dense model)."""
        start = self.start()
        return State(state.cuts if kind == "width" else start.cuts, state.blocks if kind == "depth" else frozenset(),
                     state.sparsity if kind == "weights" else start.sparsity)

    def effective(self, state: State) -> State:
        """``state`` without the cuts and sparsity of what lies inside removed blocks (it goes with
        the block)."""
        cuts = tuple(0 if self.home[i] in state.blocks else n for i, n in enumerate(state.cuts))
        sparsity = tuple(0 if self.layer_home[i] in state.blocks else k for i, k in enumerate(state.sparsity))
        return State(cuts, state.blocks, sparsity)

    # -- figures ---------------------------------------------------------------------------

    def removed(self, state: State) -> torch.Tensor:
        """A bool per traced id: removed by the state's channel cuts."""
        if state.cuts not in self._removed:
            removed = torch.zeros(self.plan.coupling.num_ids, dtype=torch.bool)
            for i, n in enumerate(state.cuts):
                if n:
                    if (i, n) not in self._lowest:
                        self._lowest[i, n] = lowest_removed(self.plan, self.groups[i], n)
                    removed |= self._lowest[i, n]
            if len(self._removed) > 4096:
                self._removed.clear()
            self._removed[state.cuts] = removed
        return self._removed[state.cuts]

    def figures(self, state: State) -> dict[str, float]:
        """``params``, ``file_size`` (as ``pangkas.save`` writes it: the parameters' bytes, sparse
        ones as bitmap + values, the buffers, the header as a share per stored tensor), ``macs`` and
        ``latency`` (an estimate) of ``state``, as fractions of the dense model's."""
        params, size, work = self._totals(state)
        macs = sum(w[0] for w in work.values()) / 2 + sum(self._stand_in_macs(run) for run in self._stood_in(state.blocks))
        return {"params": params / self.dense["params"],
                "file_size": size / self.dense["file_size"],
                "macs": macs / self.dense["macs"] if self.dense["macs"] else 1.0,
                "latency": self._latency(state, work)}

    def _totals(self, state: State) -> tuple[int, int, dict[str, list[float]]]:
        """Parameters, the bytes of the file, and per module the [FLOPs, elements written] of its ops."""
        removed = self.removed(state)
        gone = lambda name: any(_inside(name, b) for b in state.blocks)  # noqa: E731
        params = size = stored = 0
        buffers = dict(self.model.named_buffers())
        for name, p in itertools.chain(self.model.named_parameters(), buffers.items()):
            if gone(module_of(name)):
                continue
            ids = self.plan.coupling.tensor_ids.get(name)
            n = p.numel() if ids is None else math.prod(int((~removed[d]).sum()) for d in ids)
            stored += 1
            if name in buffers:  # in the file, not among the parameters
                size += n * p.element_size()
                continue
            params += n
            eighths = state.sparsity[self._weight[name]] if name in self._weight and state.sparsity else 0
            if name in self.int8:  # int8 data (bitmap + values if sparse), a float scale and a zero point per row
                rows = p.shape[0] if ids is None else int((~removed[ids[0]]).sum())
                size += _sparse_bytes(n, round(n * eighths / SPARSITY_STEPS), 1) + rows * 4 + rows // 8 + 1
                size += self._per_int8
            else:
                size += _sparse_bytes(n, round(n * eighths / SPARSITY_STEPS), p.element_size())
            stored += eighths > 0  # stored as bitmap + values: two entries
        for run in self._stood_in(state.blocks):
            width = self.blocks[run[0]].shape[-1]
            params += width * width + width
            size += (width * width + width) * 4 + 2 * self._per_tensor
        work: dict[str, list[float]] = {}
        shape_of = partial(planned_shape, removed=removed)
        for record in self.plan.coupling.records:
            if gone(record.module):
                continue
            entry = work.setdefault(record.module, [0.0, 0.0])
            entry[0] += count_flops([record], shape_of)
            entry[1] += math.prod(shape_of(record.outputs[0])) if record.outputs else 0
        return params, size + stored * self._per_tensor, work

    def _latency(self, state: State, work: dict[str, list[float]]) -> float:
        if self.latency is None:
            return 1.0
        scales = {}
        for module, (flops0, written0) in self._dense_work.items():
            flops, written = work.get(module, (0.0, 0.0))
            scales[module] = flops / flops0 if flops0 else written / written0 if written0 else 1.0
        for name in self.latency.shares:
            if any(_inside(name, b) for b in state.blocks):
                scales[name] = 0.0
        extra = 0.0
        for run in self._stood_in(state.blocks):  # a stand-in costs its MACs' share of the run's time
            modules = [n for n in self.latency.shares if any(_inside(n, b) for b in run)]
            run_flops = sum(self._dense_work.get(n, (0.0, 0.0))[0] for n in modules)
            if run_flops:
                extra += (sum(self.latency.shares[n] for n in modules) * 2 * self._stand_in_macs(run) / run_flops)
        return self.latency.ratio(scales) + extra

    def _stood_in(self, blocks: frozenset[str]) -> list[list[str]]:
        """The runs of ``blocks`` that get a fitted stand-in (``stand_ins_on`` given, features last)."""
        if self.stand_ins_on is None or not blocks:
            return []
        runs = LayerPlan(self.model, None, list(self.blocks.values()), "", {}, sorted(blocks), 0, 0).runs()
        return [run for run in runs if len(self.blocks[run[0]].shape) <= 3]

    def _stand_in_macs(self, run: list[str]) -> int:
        shape = self.blocks[run[0]].shape
        return math.prod(shape[:-1]) * shape[-1] * shape[-1]

    def _fitted(self, blocks: frozenset[str]) -> dict[str, nn.Module]:
        """Stand-ins for the runs of ``blocks`` (by first block), fitted on the dense model once."""
        found = {}
        for run in self._stood_in(blocks):
            if tuple(run) not in self._stand_ins:
                self._stand_ins[tuple(run)] = fit_stand_in(self.model, run[0], run[-1], self.stand_ins_on,
                                                           tuple_length=self.blocks[run[0]].tuple_length)
            found[run[0]] = self._stand_ins[tuple(run)]
        return found

    def forget(self) -> None:
        """The model's weights changed: what was fitted on them (the stand-ins) is refitted when next needed."""
        self._stand_ins.clear()

    # -- trying and building ---------------------------------------------------------------

    @contextlib.contextmanager
    def silenced(self, state: State) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
        """The model computes what ``state``'s pruned model would, inside the block; yields the
        (tensor, old data) of what was zeroed."""
        state = self.effective(state)
        stand_ins = self._fitted(state.blocks)  # before anything is silenced: on the dense model
        saved = silence_removed(self.plan, self.removed(state)) if any(state.cuts) else []
        try:
            saved += self._sparsified(state)
            undo = remove_blocks(self.model, sorted(state.blocks), self._tuples(), stand_ins) if state.blocks else None
            try:
                yield saved
            finally:
                if undo is not None:
                    undo.restore()
        finally:
            restore(saved)

    @torch.no_grad()
    def _sparsified(self, state: State) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Zero, per sparse layer, the share of its kept weights (those its channel cuts leave)
        with the smallest magnitudes that ``prune_weights`` would mask in the cut layer. Returns
        (tensor, old data) for ``restore``."""
        saved = []
        removed = self.removed(state)
        for i, eighths in enumerate(state.sparsity):
            if not eighths:
                continue
            name = f"{self.layers[i]}.weight"
            weight = underlying_parameter(self.model.get_submodule(self.layers[i]))
            gone = torch.zeros(weight.shape, dtype=torch.bool)
            for dim, ids in enumerate(self.plan.coupling.tensor_ids.get(name, ())):
                if (name, dim) not in self.plan.selection.gathered:
                    shape = [1] * weight.ndim
                    shape[dim] = -1
                    gone |= removed[ids].view(shape)
            kept = int((~gone).sum())
            zeroed = int(gone.sum()) + round(kept * eighths / SPARSITY_STEPS)
            keep = lowest_mask(weight.detach().abs().masked_fill(gone, -1.0), zeroed)
            saved.append((weight, weight.detach().clone()))
            weight.mul_(keep)
        return saved

    def _tuples(self) -> dict[str, int]:
        return {name: c.tuple_length for name, c in self.blocks.items()}

    def build(self, state: State, example_inputs, reconstruct_on: list | None = None,
              replace_blocks: str | None = None, data: list | None = None) -> nn.Module:
        """A pruned copy of the model for ``state``: channels removed (their readers re-fitted on
        ``reconstruct_on`` if given), then blocks (replaced by fitted linear maps with
        ``replace_blocks="linear"``, fitted on ``data``)."""
        state = self.effective(state)
        model = copy.deepcopy(self.model)
        if any(state.cuts):
            plan = copy.copy(self.plan)
            plan.model, plan.blocks, plan.retried = model, list(self.plan.blocks), []
            ratios = {key: n / len(g.classes) for key, g, n in zip(self.keys, self.groups, state.cuts) if n}
            plan.options = replace(plan.options, ratio=0.0, ratios=ratios, scope="local")
            plan._choose([])
            verify.rehearse(plan)  # on a weightless copy first, as plan_channels does
            plan.reconstruct_on = reconstruct_on
            plan._apply()
        for name, eighths in zip(self.layers, state.sparsity):
            if eighths:  # before blocks go: their removal renames the layers after them
                prune_weights(model, sparsity=eighths / SPARSITY_STEPS, include=[name])
        if state.blocks:
            params = sum(p.numel() for p in model.parameters())
            chosen = sorted(state.blocks)
            layers = LayerPlan(model, example_inputs, list(self.blocks.values()), "compress", {}, chosen,
                               0, params, replace=replace_blocks, data=data if replace_blocks else None)
            if replace_blocks:
                layers.check_replaceable()
            layers.apply()
        return model

    def describe(self, state: State) -> dict:
        """The state in the model's own names: kept/size per cut group, removed blocks."""
        state = self.effective(state)
        widths = {self.groups[i].modules[0]: f"{len(self.groups[i].classes) - n}/{len(self.groups[i].classes)}"
                  for i, n in enumerate(state.cuts) if n}
        sparsity = {name: f"{k}/{SPARSITY_STEPS}" for name, k in zip(self.layers, state.sparsity) if k}
        return {"widths": widths, "blocks": sorted(state.blocks), "sparsity": sparsity}
