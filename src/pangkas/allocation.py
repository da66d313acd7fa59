"""Non-uniform allocation: each group's share of a removal from measured sensitivity.

A uniform ratio takes as much from a layer that matters as from one that hardly does. Here every
group of a plan is removed alone at its asked ratio and at twice that (silenced: exactly what
removing those channels does, without any re-fit), and the distortion of the model's outputs on a
few calibration batches is measured: the KL divergence of its predictions where it has ``logits``,
else the relative squared error of its output. Per group the distortion is fitted as ``a * x^2``
(``x`` the fraction removed); minimising the summed distortion for the same parameters removed
gives each group ``x`` proportional to its parameters per channel over ``a`` (the Lagrange
condition), capped at the largest fraction measured. Groups are pooled: a pool (all groups under
``ratio=``, one ``ratios=`` entry, or one transformer unit such as the FFNs) removes as many
parameters as its uniform choice, give or take a channel.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

from .distortion import Distortion
from .errors import PangkasError
from .progress import track
from .selection import Group, count_params, ratio_key
from .silence import lowest_removed, restore, silence_removed

ALLOCATIONS = ("uniform", "sensitivity")
BATCHES = 4  # calibration batches the distortion is measured on
MULTIPLES = (1, 2)  # fractions measured per group: these times its asked ratio


def check(allocation, data, scope: str) -> None:
    if allocation not in ALLOCATIONS:
        raise PangkasError(f"allocation must be one of {ALLOCATIONS}, got {allocation!r}")
    if allocation == "sensitivity":
        if data is None:
            raise PangkasError("allocation='sensitivity' measures on calibration batches: give data=")
        if scope != "local":
            raise PangkasError("allocation='sensitivity' replaces scope='global' (both decide the per-group "
                               "ratios): use one of them")


def reallocate(plan, pool_of: Callable[[Group], str | None], data) -> dict[str, float]:
    """Re-choose ``plan`` (a channel plan chosen uniformly) with per-group ratios from measured
    sensitivity, pooled by ``pool_of(group)`` (None: left as it is). Returns the new ratio of each
    re-allocated group, by the module that carries it in ``plan.options.ratios``."""
    batches = [b for _, b in zip(range(BATCHES), data)]
    if not batches:
        raise PangkasError("data= yielded no batches")
    pools: dict[str, list[Group]] = {}
    for g in plan.selection.groups:
        pool = pool_of(g)
        if pool is not None and g.removed.any() and g.rows is None and g.modules:
            pools.setdefault(pool, []).append(g)
    measured = [g for groups in pools.values() if len(groups) > 1 for g in groups]
    if not measured:
        return {}
    distortion = Distortion(plan.model, batches)
    before = count_params(plan.model, plan.coupling, None)
    curves, cost = {}, {}
    for g in track(measured, "allocation: measuring each group's sensitivity"):
        asked = int(g.removed.sum())
        counts = sorted({min(len(g.classes) - 1, m * asked) for m in MULTIPLES})
        points = []
        for n in counts:
            removed = lowest_removed(plan, g, n)
            if n == counts[0]:
                cost[id(g)] = (before - count_params(plan.model, plan.coupling, removed)) / n
            saved = silence_removed(plan, removed)
            try:
                points.append((n / len(g.classes), distortion()))
            finally:
                restore(saved)
        curves[id(g)] = points
    ratios = {}
    for groups in pools.values():
        if len(groups) > 1:
            counts = split(groups, curves, cost)
            ratios.update({ratio_key(g, plan.selection.groups): n / len(g.classes) for g, n in zip(groups, counts)})
    rest = {k: v for k, v in plan.options.ratios.items() if k not in ratios}
    plan.options = replace(plan.options, ratios={**ratios, **rest})
    plan._choose([])
    return ratios


def split(groups: Sequence[Group], curves: dict, cost: dict) -> list[int]:
    """Counts to remove per group: the pool's parameters removed as its uniform choice, each
    group's share ``∝ cost per channel * size^2 / a`` for its fitted ``a * x^2``, capped."""
    sizes = [len(g.classes) for g in groups]
    budget = sum(int(g.removed.sum()) * cost[id(g)] for g in groups)
    curvature = []
    for g in groups:
        xs, ds = zip(*curves[id(g)])
        curvature.append(sum(d * x * x for x, d in zip(xs, ds)) / sum(x ** 4 for x in xs))
    floor = max(max(curvature) * 1e-6, 1e-30)
    caps = [max(x for x, _ in curves[id(g)]) * n for g, n in zip(groups, sizes)]
    share = [cost[id(g)] * n * n / max(a, floor) for g, n, a in zip(groups, sizes, curvature)]

    def counts(lam: float) -> list[float]:
        return [min(cap, lam * s) for cap, s in zip(caps, share)]

    low, high = 0.0, 1.0
    while sum(c * cost[id(g)] for c, g in zip(counts(high), groups)) < budget and high < 1e30:
        high *= 2
    for _ in range(100):
        mid = (low + high) / 2
        if sum(c * cost[id(g)] for c, g in zip(counts(mid), groups)) < budget:
            low = mid
        else:
            high = mid
    exact = counts(high)
    whole = [int(c) for c in exact]
    spent = sum(n * cost[id(g)] for n, g in zip(whole, groups))
    for i in sorted(range(len(groups)), key=lambda i: whole[i] - exact[i]):  # largest remainder first
        if spent >= budget - cost[id(groups[i])] / 2:
            break
        if whole[i] < caps[i]:
            whole[i] += 1
            spent += cost[id(groups[i])]
    return whole
