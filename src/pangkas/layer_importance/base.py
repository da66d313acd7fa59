"""The layer importance protocol: what a criterion is shown (the removable blocks, the batches)
and what it answers (a score per block, the blocks to remove)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from ..errors import PangkasError


@dataclass(frozen=True)
class Candidate:
    """A block that can go: its path, why it qualifies, its hidden-state shape, size and cost."""

    name: str
    kinds: tuple[str, ...]
    container: str | None      # the ModuleList/Sequential it sits in, if any
    index: int | None
    shape: tuple[int, ...]
    params: int
    macs: int
    tuple_length: int = 0  # the block returns a tuple of this length (0: a tensor)


Scores = dict[str, float]  # block name -> score; lower = removed first


class LayerImportance:
    """How much each removable block matters (lower = removed first), for layer pruning.

    To add a criterion: subclass, set ``name`` (and ``needs_loss`` / ``needs_metric`` if it
    calls ``loss_fn`` / ``metric_fn``), implement :meth:`scores` (the ``n`` lowest blocks go,
    none inside another), or :meth:`choose` when the choice is not "the lowest" (a contiguous
    run, a greedy search). Then ``pangkas.layer_importance.register(Mine())`` makes it
    ``importance="mine"``; or pass the object itself. Both run with the model in eval mode;
    ``data`` is the list of calibration batches.
    """

    name: str = ""
    needs_data: bool = True     # reads the batches (plan_layers always takes them: they find the blocks)
    needs_loss: bool = False    # calls loss_fn=(output, batch) -> scalar
    needs_metric: bool = False  # calls metric_fn=(output, batch) -> scalar, higher is better

    def scores(self, model: nn.Module, candidates: list[Candidate], data: list, *,
               loss_fn: Callable | None = None, metric_fn: Callable | None = None) -> Scores:
        """One score per candidate block, by name."""
        raise NotImplementedError(f"{type(self).__name__} must implement scores(...) or choose(...)")

    def choose(self, model: nn.Module, candidates: list[Candidate], data: list, n: int, *,
               loss_fn: Callable | None = None, metric_fn: Callable | None = None) -> tuple[Scores, list[str]]:
        """(scores by block name, the ``n`` block names to remove): by default the ``n``
        lowest of :meth:`scores`."""
        scores = self.scores(model, candidates, data, loss_fn=loss_fn, metric_fn=metric_fn)
        return scores, lowest(scores, n)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} layer importance {self.name!r}>"

    def __str__(self) -> str:
        return self.name  # how plans name it: importance=block_influence


class FromFunction(LayerImportance):
    """A plain ``fn(model, candidates, data) -> {block name: score}`` as a criterion."""

    def __init__(self, fn: Callable):
        self.fn = fn
        self.name = getattr(fn, "__name__", "custom")

    def scores(self, model, candidates, data, *, loss_fn=None, metric_fn=None) -> Scores:
        return self.fn(model, candidates, data)


def nested(a: str, b: str) -> bool:
    """Whether blocks ``a`` and ``b`` are the same or one sits inside the other."""
    return a == b or a.startswith(b + ".") or b.startswith(a + ".")


def lowest(scores: Scores, count: int) -> list[str]:
    """The ``count`` lowest-scoring blocks, none inside another chosen one."""
    chosen: list[str] = []
    for name in sorted(scores, key=scores.get):
        if len(chosen) == count:
            break
        if not any(nested(name, c) for c in chosen):
            chosen.append(name)
    if len(chosen) < count:
        raise PangkasError(f"only {len(chosen)} blocks can be removed together (the others nest in them)")
    return chosen


def checked(criterion: LayerImportance, result, candidates: list[Candidate], n: int) -> tuple[Scores, list[str]]:
    """``criterion.choose``'s answer, if it names ``n`` distinct candidate blocks, none inside
    another (a criterion from outside pangkas must not make the plan remove something else)."""
    names = {c.name for c in candidates}
    scores, chosen = result if isinstance(result, tuple) and len(result) == 2 else (None, None)
    if not isinstance(scores, dict) or not isinstance(chosen, list):
        raise PangkasError(f"importance={criterion.name!r} must return (scores dict, list of block names), "
                           f"got {result!r:.200}")
    unknown = [name for name in [*scores, *chosen] if name not in names]
    if unknown:
        raise PangkasError(f"importance={criterion.name!r} returned names that are not candidate blocks: "
                           f"{unknown[:6]}; candidates are {[c.name for c in candidates][:12]}")
    overlapping = any(nested(a, b) for i, a in enumerate(chosen) for b in chosen[:i])
    if len(chosen) != n or overlapping:
        raise PangkasError(f"importance={criterion.name!r} chose {chosen}; expected {n} distinct blocks, "
                           "none inside another")
    return scores, chosen
