"""Channel selection: which channels a channel plan removes.

Pure: the coupling (read-only), the scores, the options and the blocks (ids whose channels must
stay, each with why) in; the chosen channels out. Nothing it is given is changed. Blocks join
their classes (sets of positions removed together) to FIXED; classes produced by one parameter
dim form a group, and each group loses its lowest-scoring classes per its ratio, or all classes
are ranked together (``scope="global"``). A removal no tensor shape could express is blocked
and the choice made again.

Partitions (a grouped conv's groups, GroupNorm's groups) ask every row to keep the same number
of positions: a group covered by one loses the same count from each row, each row its own
lowest. Where that cannot be expressed (a class spanning rows, a row partly fixed, two different
partitions over the same channels), the partition falls back to tying offsets across rows.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import PangkasError
from .graph.labels import Partition
from .graph.trace import Coupling
from .modules import ModuleFilter, Selector, matches
from .widths import fastest

Block = tuple[torch.Tensor, str]  # ids whose channels must stay, and why
Timer = Callable[[int], float]  # output width -> seconds
TimerFor = Callable[["Group"], Timer | None]  # round_to="auto": how to time a group's producer
NOT_RECTANGULAR = "removal would not leave a rectangular tensor"


@dataclass(frozen=True)
class Options:
    ratio: float
    importance: object
    scope: str
    ratios: dict
    round_to: int | str
    max_ratio: float
    allow_approximate: bool


@dataclass
class Group:
    """Channels removed together as one unit of the ratio (one layer's outputs, a residual stream)."""

    modules: tuple[str, ...]
    classes: torch.Tensor       # class representatives (ids)
    scores: torch.Tensor
    removed: torch.Tensor       # bool per class
    approximate: bool = False
    rows: torch.Tensor | None = None  # (rows, n) indices into classes that keep equal counts

    @property
    def kept(self) -> int:
        return int((~self.removed).sum())


@dataclass
class Selection:
    """Everything derived from the coupling for one set of blocks."""

    classes: torch.Tensor       # id -> class representative (0: fixed)
    removed: torch.Tensor       # bool per id: position is removed
    groups: list[Group]
    # (tensor name, dim) cut per row-block of dim 0 -> ids (rows, n) of the channel each position
    # stands for in each row-block (a grouped conv's input dim); see ``gathered_keep``.
    gathered: dict = field(default_factory=dict)

    def gathered_keep(self, key) -> torch.Tensor:
        """The kept positions per row-block (rows, k) of a gathered tensor dim."""
        kept = ~self.removed[self.gathered[key]]
        return torch.stack([row.nonzero().flatten() for row in kept])


def select_rectangular(coupling: Coupling, options: Options, scores: dict, model: nn.Module,
                       blocks: Sequence[Block] = (), timer_for: TimerFor | None = None
                       ) -> tuple[Selection, tuple[Block, ...]]:
    """:func:`select`, then block every axis whose removal would not leave a rectangular tensor,
    until none is left. Returns the selection and the blocks this added, in order."""
    added: list[Block] = []
    while True:
        selection = select(coupling, options, scores, model, [*blocks, *added], timer_for)
        broken = _non_rectangular(coupling, selection)
        if not broken:
            return selection, tuple(added)
        added.extend((ids, NOT_RECTANGULAR) for ids in broken)


def select(coupling: Coupling, options: Options, scores: dict, model: nn.Module,
           blocks: Sequence[Block] = (), timer_for: TimerFor | None = None) -> Selection:
    """Classes from the coupling and ``blocks``, grouped, scored, and the lowest of each group
    marked removed. ``round_to="auto"`` asks ``timer_for(group)`` for the widths' timings (none:
    the exact count)."""
    classes, held, grouping = _settle(coupling, options.allow_approximate, blocks)
    approximate = torch.zeros(coupling.num_ids, dtype=torch.bool)
    for ids, _ in coupling.approximations:
        approximate[classes[ids]] = True
    gathered = _gathered(coupling, classes, held)
    reps, score = _class_scores(coupling, classes, scores, gathered)
    group_of, producing = grouping or _grouping(coupling, classes)
    modules = _group_modules(reps, group_of, producing)
    groups = []
    for cls in _members(reps, group_of):
        groups.append(Group(modules.get(int(group_of[cls[0]]), ()), cls, score[cls],
                            torch.zeros(len(cls), dtype=torch.bool), bool(approximate[cls].any()),
                            _rows_of(cls, held, classes)))
    _choose(groups, options, model, timer_for)
    removed_class = torch.zeros(coupling.num_ids, dtype=torch.bool)
    for g in groups:
        removed_class[g.classes[g.removed]] = True
    removed = removed_class[classes]
    for partition in held:
        if partition.per_row is not None:  # the weight keeps k positions per row-block
            k = int((~removed[partition.rows[0]]).sum())
            removed[partition.per_row[k:]] = True
    return Selection(classes, removed, groups, {key: p.rows for key, p in gathered.items()})


def _settle(coupling: Coupling, allow_approximate: bool, blocks: Sequence[Block]):
    """Classes, the partitions that hold as equal counts per row, and the classes' grouping
    where it was needed (else None); each other partition falls back to tying offsets (which
    can make more fall back: repeat until none does)."""
    ties, fallen = [], set()
    while True:
        classes = coupling.classes(allow_approximate, blocks, ties)
        if not coupling.partitions:
            return classes, [], None
        grouping = _grouping(coupling, classes)
        group_of = grouping[0]
        held, claimed, newly = [], {}, []
        for index, p in enumerate(coupling.partitions):
            if index in fallen:
                continue
            rows = classes[p.rows]
            if not _holds(p, rows, classes, group_of):
                newly.append(index)
                continue
            shape = frozenset(frozenset(r) for r in rows.tolist())
            if any(claimed.setdefault(c, shape) != shape for c in rows.flatten().tolist() if c):
                newly.append(index)  # the same channels under another partition: tie this one
                continue
            held.append(p)
        if not newly:
            return classes, held, grouping
        fallen.update(newly)
        ties += [coupling.partitions[i].ties() for i in newly]


def _holds(p: Partition, rows: torch.Tensor, classes: torch.Tensor, group_of: torch.Tensor) -> bool:
    """Whether ``p`` can keep counts per row: every position its own class, all removable (a fixed
    one falls back: its ties fix the weight's per-row dim too), one group of exactly these classes."""
    per_row = None if p.per_row is None else classes[p.per_row]
    flat = rows.flatten()
    if (flat == 0).any() or flat.unique().numel() != flat.numel():
        return False
    if per_row is not None and ((per_row == 0).any() or per_row.unique().numel() != per_row.numel()
                                or torch.isin(per_row, flat).any()):
        return False
    group = group_of[flat]
    if (group != group[0]).any():
        return False
    others = (group_of == group[0]) & (torch.arange(len(classes)) == classes)
    return int(others.sum()) == flat.numel()


def _gathered(coupling: Coupling, classes: torch.Tensor, held: list[Partition]) -> dict:
    """(tensor name, dim) -> the held partition whose ``per_row`` classes that dim carries, in order."""
    per_row = {tuple(classes[p.per_row].tolist()): p for p in held if p.per_row is not None}
    found = {}
    if per_row:
        for name, dims in coupling.tensor_ids.items():
            for dim, ids in enumerate(dims):
                p = per_row.get(tuple(classes[ids].tolist()))
                if p is not None:
                    found[(name, dim)] = p
    return found


def _rows_of(cls: torch.Tensor, held: list[Partition], classes: torch.Tensor) -> torch.Tensor | None:
    """The row structure of a held partition over exactly the classes ``cls``, as indices into it."""
    for p in held:
        rows = classes[p.rows]
        if rows.numel() == cls.numel() and bool(torch.isin(cls, rows).all()):
            position = {c: i for i, c in enumerate(cls.tolist())}
            return torch.tensor([[position[c] for c in row] for row in rows.tolist()])
    return None


def blocks_outside(model: nn.Module, coupling: Coupling, include: Selector, exclude: Selector) -> list[Block]:
    """Blocks keeping every channel that touches a module ``include`` leaves out or ``exclude`` names."""
    chosen = ModuleFilter(include, exclude, list(model.named_modules()), f"module of {type(model).__name__}")
    blocks = []
    for name, ids in coupling.tensor_ids.items():
        module_name = module_of(name)
        module = model.get_submodule(module_name) if module_name else model
        if chosen.excluded(module_name, module):
            why = f"exclude={module_name}"
        elif not chosen.included(module_name, module):
            why = f"not in include= ({module_name or type(model).__name__})"
        else:
            continue
        blocks.extend((dim_ids, why) for dim_ids in ids)
    return blocks


def planned_shape(shaped, removed: torch.Tensor) -> tuple[int, ...]:
    """The shape of a traced tensor ``(shape, axes)`` once the positions ``removed`` flags go."""
    shape, axes = shaped
    shape = list(shape)
    for ax in axes:
        kept = ~removed[ax.ids]
        for pos, d in enumerate(ax.dims):
            others = [i for i in range(kept.ndim) if i != pos]
            shape[d] = int(kept.any(others).sum()) if others else int(kept.sum())
    return tuple(shape)


def module_of(name: str) -> str:
    """The module owning a parameter/buffer name (a parametrization's owner for its tensors)."""
    module = name.rsplit(".", 1)[0] if "." in name else ""
    return module.split(".parametrizations.")[0]


def _non_rectangular(coupling: Coupling, selection: Selection) -> list[torch.Tensor]:
    """Axes over several dims whose kept positions are not a full grid, or that would vanish."""
    broken, seen = [], set()
    for record in coupling.records:
        for _, axes in record.inputs + record.outputs:
            for ax in axes:
                if id(ax) in seen:
                    continue
                seen.add(id(ax))
                kept = ~selection.removed[ax.ids]
                if not kept.any():
                    broken.append(ax.ids)
                elif kept.ndim > 1:
                    grid = torch.ones_like(kept)
                    for pos in range(kept.ndim):
                        others = [i for i in range(kept.ndim) if i != pos]
                        shape = [1] * kept.ndim
                        shape[pos] = kept.shape[pos]
                        grid = grid & kept.any(others).reshape(shape)
                    if not torch.equal(grid, kept):
                        broken.append(ax.ids)
    return broken


def _class_scores(coupling: Coupling, classes: torch.Tensor, scores: dict,
                  gathered: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(the prunable classes, each class's summed score): every (tensor, dim) adds its
    per-position scores to the classes of its positions. A gathered dim (a grouped conv's
    input) is not a choice of its own: it gives each row's channel its score over the rows."""
    score = torch.zeros(coupling.num_ids)
    present = torch.zeros(coupling.num_ids, dtype=torch.bool)
    for name, dims in coupling.tensor_ids.items():
        for dim, ids in enumerate(dims):
            p = gathered.get((name, dim))
            reps = classes[ids] if p is None else classes[p.rows].flatten()
            if p is None:
                present[reps] = True
            if (name, dim) in scores:
                s = scores[(name, dim)].to(score.dtype)
                score.index_add_(0, reps, s if p is None else (s / len(p.rows)).repeat(len(p.rows)))
    present[0] = False
    return torch.nonzero(present).flatten(), score


def _grouping(coupling: Coupling, classes: torch.Tensor) -> tuple[torch.Tensor, list[tuple[str, torch.Tensor]]]:
    """Each class's group (its smallest class), and per parameter dim that produces classes: (its
    module, those classes, sorted). Classes produced by the same parameter dim (one layer's
    outputs) are one group; a residual stream merges its producers."""
    is_produced = torch.zeros(coupling.num_ids, dtype=torch.bool)
    is_produced[coupling.produced] = True
    producing = []
    for name, dims in coupling.tensor_ids.items():
        module = module_of(name)
        for ids in dims:
            reps = classes[ids]
            reps = reps[is_produced[ids] & (reps != 0)].unique()
            if reps.numel():
                producing.append((module, reps))
    # Join the producing dims that share a class (few: one per parameter dim), not the classes
    owner = torch.full((coupling.num_ids,), -1, dtype=torch.long)
    joined = list(range(len(producing)))

    def root(i: int) -> int:
        while joined[i] != i:
            joined[i] = joined[joined[i]]  # path halving: chains stay short
            i = joined[i]
        return i

    for index, (_, reps) in enumerate(producing):
        seen = owner[reps]
        for other in seen[seen >= 0].unique().tolist():
            a, b = sorted((root(index), root(other)))
            joined[b] = a
        owner[reps] = index
    by_root: dict[int, list[torch.Tensor]] = {}
    for index, (_, reps) in enumerate(producing):
        by_root.setdefault(root(index), []).append(reps)
    group_of = torch.arange(coupling.num_ids)
    for parts in by_root.values():
        reps = torch.cat(parts)
        group_of[reps] = reps.min()
    return group_of, producing


def _members(reps: torch.Tensor, group_of: torch.Tensor) -> list[torch.Tensor]:
    """The classes ``reps`` (ascending) split by group, each ascending; groups in the order of
    their smallest class."""
    found = group_of[reps]
    order = torch.argsort(found, stable=True)
    counts = torch.unique_consecutive(found[order], return_counts=True)[1]
    return sorted(torch.split(reps[order], counts.tolist()), key=lambda cls: int(cls[0]))


def _group_modules(reps: torch.Tensor, group_of: torch.Tensor, producing) -> dict[int, tuple[str, ...]]:
    """Per group: the modules producing its classes ``reps``, in the order of the smallest class
    each produces (then of the parameters)."""
    present = torch.zeros(len(group_of), dtype=torch.bool)
    present[reps] = True
    first: dict[int, dict[str, tuple[int, int]]] = {}
    for index, (module, produced) in enumerate(producing):
        produced = produced[present[produced]]
        if produced.numel():
            key = (int(produced[0]), index)
            seen = first.setdefault(int(group_of[produced[0]]), {})
            seen[module] = min(seen.get(module, key), key)
    return {g: tuple(sorted(seen, key=seen.__getitem__)) for g, seen in first.items()}


def ratio_source(group: Group, options: Options, model: nn.Module):
    """The ``options.ratios`` key that gives ``group`` its ratio, or None (``options.ratio``)."""
    modules = [(name, model.get_submodule(name) if name else model) for name in group.modules]
    for pattern in options.ratios:
        for name, module in modules:
            if matches(pattern, name, module):
                return pattern
    return None


def ratio_key(group: Group, groups: Sequence[Group]) -> str:
    """A module name that gives ``group`` (and no other group) its ratio."""
    others = {m for g in groups if g is not group for m in g.modules}
    found = next((m for m in group.modules if m not in others), None)
    if found is None:
        raise PangkasError(f"the channels of {group.modules[0]} share every producing module with another "
                           "group: they cannot get their own ratio; give the whole group one ratio")
    return found


def _group_ratio(group: Group, options: Options, model: nn.Module) -> float:
    source = ratio_source(group, options, model)
    return options.ratio if source is None else options.ratios[source]


def _choose(groups: list[Group], options: Options, model: nn.Module, timer_for: TimerFor | None) -> None:
    """Mark the lowest-scoring classes of each group removed, per the ratio and scope."""
    def remove(g, n):
        timer = timer_for(g) if options.round_to == "auto" and timer_for is not None else None
        _remove_lowest(g, n, options, timer)

    if options.scope == "local" or options.ratios:
        for g in groups:
            remove(g, round(_group_ratio(g, options, model) * len(g.classes)))
        return
    # Global: rank all classes by score normalised within their group, remove the lowest. Ties
    # go by group order (deterministic; an object's id would differ between runs).
    ranked = []
    for index, g in enumerate(groups):
        mean = g.scores.mean()
        normed = g.scores / mean if mean > 0 else g.scores
        ranked.extend((float(s), index, i) for i, s in enumerate(normed))
    total = round(options.ratio * len(ranked))
    cap = [min(len(g.classes) - 1, int(options.max_ratio * len(g.classes))) for g in groups]
    count = Counter()
    for s, index, i in sorted(ranked):
        if total == 0:
            break
        if count[index] < cap[index]:
            count[index] += 1
            total -= 1
    for index, n in count.items():
        remove(groups[index], n)


def _remove_lowest(group: Group, n: int, options: Options, timer: Timer | None = None) -> None:
    size = len(group.classes)
    keep = max(1, size - n)
    if options.round_to == "auto":
        keep = fastest(keep, size, timer) if timer is not None else keep
    elif options.round_to > 1:
        keep = min(size, -(-keep // options.round_to) * options.round_to)
    group.removed[:] = False
    if group.rows is not None:
        _remove_per_row(group, keep, options)
        return
    order = torch.argsort(group.scores, stable=True)
    group.removed[order[: size - keep]] = True


def _remove_per_row(group: Group, keep: int, options: Options) -> None:
    """Keep the same number in every row (about ``keep`` in all: the removal shared equally, then
    rounded up to ``round_to``), each row its highest-scoring."""
    count, width = group.rows.shape
    per_row = max(1, width - round((len(group.classes) - keep) / count))
    step = options.round_to if isinstance(options.round_to, int) else 1
    while (count * per_row) % step and per_row < width:
        per_row += 1
    for row in group.rows:
        order = torch.argsort(group.scores[row], stable=True)
        group.removed[row[order[: width - per_row]]] = True


def count_params(model: nn.Module, coupling: Coupling, removed: torch.Tensor | None) -> int:
    """Parameters of ``model`` left when the positions flagged in ``removed`` (None: none) go."""
    total = 0
    for name, p in model.named_parameters():
        ids = coupling.tensor_ids.get(name)
        if removed is None or ids is None:
            total += p.numel()
        else:
            n = 1
            for dim_ids in ids:
                n *= int((~removed[dim_ids]).sum())
            total += n
    return total
