"""``prune_weights``: unstructured and N:M weight pruning with lasting masks."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..deprecation import renamed
from ..errors import PangkasError
from ..modules import Selector, select_modules
from ..reports import Report
from ..tables import human_count, render_table
from . import criteria
from . import sparsity as rules
from .criteria import CalibratedImportance, WeightImportance, scores_of
from .oneshot import calibrated_masks
from .masks import get_mask, parameter_counts, remove_mask, set_mask, underlying_parameter

PRUNABLE = (nn.Linear, nn.modules.conv._ConvNd)  # Conv1d/2d/3d and ConvTranspose1d/2d/3d


@dataclass(frozen=True)
class LayerSparsity:
    name: str
    shape: tuple[int, ...]
    nonzero_before: int
    nonzero_after: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def sparsity(self) -> float:
        return 1 - self.nonzero_after / self.numel


def _layer_table(title: str, layers, params: int, nonzero_before: int, nonzero_after: int,
                 skipped: dict[str, str]) -> str:
    rows = [(l.name, "x".join(map(str, l.shape)), human_count(l.nonzero_before),
             human_count(l.nonzero_after), f"{l.sparsity:.2%}") for l in layers]
    numel = sum(layer.numel for layer in layers)
    rows.append(("pruned layers", "", "", "", f"{1 - sum(l.nonzero_after for l in layers) / numel:.2%}"))
    rows.append(("whole model", human_count(params), human_count(nonzero_before),
                 human_count(nonzero_after), f"{1 - nonzero_after / params:.2%}"))
    text = render_table(title, ("layer", "shape", "non-zero before", "non-zero after", "sparsity"), rows)
    for name, why in skipped.items():
        text += f"\nskipped {name}: {why}"
    return text


@dataclass(frozen=True)
class WeightReport(Report):
    """What ``prune_weights`` did: per-layer sparsity and model-wide non-zero counts. As a
    ``Report``, its params before/after are the non-zero ones (MACs: None, a dense kernel does
    them all)."""

    rule: str
    layers: tuple[LayerSparsity, ...]
    params: int
    nonzero_before: int
    nonzero_after: int
    skipped: dict[str, str] = field(default_factory=dict)
    kind = "weights"
    params_before = property(lambda self: self.nonzero_before)
    params_after = property(lambda self: self.nonzero_after)
    macs_before = macs_after = None

    def details(self) -> dict:
        return {"rule": self.rule, "params": self.params, "sparsity": self.sparsity,
                "model_sparsity": self.model_sparsity, "skipped": dict(self.skipped),
                "layers": [{"name": l.name, "shape": list(l.shape), "nonzero_before": l.nonzero_before,
                            "nonzero_after": l.nonzero_after} for l in self.layers]}

    @property
    def sparsity(self) -> float:
        """Fraction of zeros over the pruned layers' weights."""
        numel = sum(layer.numel for layer in self.layers)
        return 1 - sum(layer.nonzero_after for layer in self.layers) / numel

    @property
    def model_sparsity(self) -> float:
        """Fraction of zeros over all the model's parameters (biases and norms included)."""
        return 1 - self.nonzero_after / self.params

    def __str__(self) -> str:
        return _layer_table(f"prune_weights: {self.rule}", self.layers, self.params, self.nonzero_before,
                            self.nonzero_after, self.skipped)


@dataclass
class WeightPlan:
    """What ``prune_weights`` would do: each layer's new mask (and, for SparseGPT, its
    compensated weights). Nothing changes until :meth:`apply`."""

    model: nn.Module
    rule: str
    targets: list[tuple[str, nn.Module]]
    masks: list[torch.Tensor]
    old_masks: list[torch.Tensor | None]
    updates: dict[str, torch.Tensor]  # layer name -> the weight it gets (SparseGPT)
    skipped: dict[str, str]
    applied: bool = False

    def layers(self) -> tuple[LayerSparsity, ...]:
        """Each layer's non-zero weights now and after ``apply()``."""
        return tuple(
            LayerSparsity(name, tuple(m.weight.shape), int(torch.count_nonzero(m.weight)),
                          int(torch.count_nonzero(self.updates.get(name, m.weight) * mask)))
            for (name, m), mask in zip(self.targets, self.masks))

    def __str__(self) -> str:
        layers = self.layers()
        params, nonzero = parameter_counts(self.model)
        after = nonzero - sum(l.nonzero_before - l.nonzero_after for l in layers)
        return _layer_table(f"weight plan: {self.rule}", layers, params, nonzero, after, self.skipped)

    @torch.no_grad()
    def apply(self) -> WeightReport:
        """Set the masks (and compensated weights) of every layer, or of none: on an error or an
        interrupt the model is restored."""
        if self.applied:
            raise PangkasError("this plan was already applied; make a new plan for further pruning")
        for (name, module), old in zip(self.targets, self.old_masks):
            now = get_mask(module)
            if (now is None) != (old is None) or (now is not None and not torch.equal(now, old)):
                raise PangkasError(f"the model changed since this plan was made ({name}); make a new plan")
        modules = [m for _, m in self.targets]
        before = [int(torch.count_nonzero(m.weight)) for m in modules]
        params, nonzero_before = parameter_counts(self.model)
        updates = [(underlying_parameter(m), self.updates[n]) for n, m in self.targets if n in self.updates]
        saved = [(param, param.detach().clone()) for param, _ in updates]
        try:
            for param, weight in updates:
                param.data.copy_(weight)
            _apply(modules, self.masks, self.old_masks)
        except BaseException:  # an interrupt too: never leave half the updates in place
            for param, data in saved:
                param.data.copy_(data)
            raise
        self.applied = True
        layers = tuple(LayerSparsity(name, tuple(m.weight.shape), b, int(torch.count_nonzero(m.weight)))
                       for (name, m), b in zip(self.targets, before))
        # Only the targets changed: counting them again is enough (not a pass over the whole model).
        nonzero_after = nonzero_before - sum(layer.nonzero_before - layer.nonzero_after for layer in layers)
        return WeightReport(self.rule, layers, params, nonzero_before, nonzero_after, self.skipped)


def parse_pattern(pattern: str) -> tuple[int, int]:
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(pattern))
    if not match or not 0 < int(match[1]) < int(match[2]):
        raise PangkasError(
            f"pattern must be 'N:M' with 0 < N < M (e.g. '2:4' keeps 2 of every 4), got {pattern!r}"
        )
    return int(match[1]), int(match[2])


def _validate(sparsity, threshold, pattern, scope, importance, data) -> WeightImportance:
    given = [k for k, v in (("sparsity", sparsity), ("threshold", threshold), ("pattern", pattern))
             if v is not None]
    if len(given) != 1:
        raise PangkasError(
            "give exactly one of sparsity=, threshold= or pattern= "
            f"(got {', '.join(given) if given else 'none'})"
        )
    if sparsity is not None and not (isinstance(sparsity, (int, float)) and 0 <= sparsity < 1):
        raise PangkasError(f"sparsity must be a number in [0, 1), got {sparsity!r}")
    if threshold is not None and not (isinstance(threshold, (int, float)) and threshold >= 0):
        raise PangkasError(f"threshold must be a number >= 0 (weights with |w| > threshold stay), "
                           f"got {threshold!r}")
    if pattern is not None:
        parse_pattern(pattern)
    if scope not in ("local", "global"):
        raise PangkasError(f"scope must be 'local' or 'global', got {scope!r}")
    if scope == "global" and sparsity is None:
        raise PangkasError("scope='global' applies to sparsity= only; threshold and N:M are per weight")
    return _criterion(importance, threshold, scope, data)


def _criterion(importance, threshold, scope, data) -> WeightImportance:
    """The criterion ``importance`` stands for, if the rule and ``data`` suit it."""
    criterion = criteria.resolve(importance)
    if isinstance(criterion, CalibratedImportance):
        if threshold is not None or scope != "local":
            raise PangkasError(f"importance={criterion.name!r} prunes each layer's rows by sparsity= or "
                               "pattern= (scope='local'); threshold= and scope='global' do not apply")
    # a plain function was always let through with threshold= (which ignores it)
    elif threshold is not None and criterion.name != "magnitude" and not _is_function(importance):
        raise PangkasError("threshold= compares magnitudes; it cannot be combined with "
                           f"importance={criterion.name!r}")
    if criterion.needs_data and data is None:
        raise PangkasError(f"importance={criterion.name!r} needs data= (calibration batches the model accepts)")
    return criterion


def _is_function(importance) -> bool:
    return callable(importance) and not isinstance(importance, (str, type, WeightImportance))


def _input_dim(module: nn.Module) -> int:
    return 0 if isinstance(module, nn.modules.conv._ConvTransposeNd) else 1


def _shared_weights(model: nn.Module) -> dict[int, list[str]]:
    owners: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(name)
    return owners


def _targets(model, include, exclude) -> tuple[list[tuple[str, nn.Module]], dict[str, str]]:
    chosen = select_modules(model, PRUNABLE, include, exclude)
    if not chosen:
        raise PangkasError(
            f"{type(model).__name__} has no prunable layer (Linear, Conv1d/2d/3d, ConvTranspose) "
            "among the selected modules; check include=/exclude="
        )
    owners = _shared_weights(model)
    targets, skipped = [], {}
    for name, module in chosen:
        param = underlying_parameter(module)
        if len(owners[id(param)]) > 1:
            skipped[name] = f"weight is shared with {owners[id(param)]}; masking one user would untie it"
        else:
            targets.append((name, module))
    if not targets:
        raise PangkasError(f"every selected layer was skipped: {skipped}")
    return targets, skipped


def _check_finite(targets) -> None:
    """A NaN weight never ranks as small and an infinite one never as large: refuse them."""
    for name, module in targets:
        bad = int((~torch.isfinite(module.weight)).sum())
        if bad:
            raise PangkasError(f"{name}.weight has {bad} non-finite values (NaN/inf); repair the weights "
                               f"or leave the layer out (exclude={name!r})")


def _new_masks(targets, weights, old_masks, criterion, sparsity, threshold, pattern, scope):
    if threshold is not None:
        return [rules.threshold_mask(w, threshold) for w in weights]
    scores = [scores_of(criterion, w, name) for (name, _), w in zip(targets, weights)]
    if pattern is not None:
        n, m = parse_pattern(pattern)
        return [rules.extend_n_m(s, old, n, m, _input_dim(mod))
                for s, old, (_, mod) in zip(scores, old_masks, targets)]
    if scope == "global":
        return rules.global_masks(scores, old_masks, sparsity)
    return [rules.extend_mask(s, old, rules.prune_count(s.numel(), sparsity)) for s, old in zip(scores, old_masks)]


@renamed(method="importance")
@torch.no_grad()
def plan_weights(
    model: nn.Module,
    *,
    sparsity: float | None = None,
    threshold: float | None = None,
    pattern: str | None = None,
    scope: str = "local",
    importance: str | WeightImportance | Callable[[torch.Tensor], torch.Tensor] = "magnitude",
    include: Selector = None,
    exclude: Selector = None,
    data: Iterable | None = None,
) -> WeightPlan:
    """Plan masking weights of Linear and (transposed) convolution layers so they stay zero through
    training; ``plan.apply()`` (or ``prune_weights``, plan + apply) does it.

    Exactly one rule:

    - ``sparsity=s``: remove the lowest-scoring fraction ``s``; ``scope="local"`` removes
      ``round(s * numel)`` weights of every layer, ``scope="global"`` one cut across all of them.
    - ``threshold=t``: keep weights with ``|w| > t`` (the classic magnitude rule).
    - ``pattern="N:M"``: keep at most N of every M consecutive weights along the input dimension.

    ``importance``: ``"magnitude"`` (default), ``"random"``, a callable ``fn(weight) -> scores``, or
    one-shot from calibration ``data`` (batches, processed one block at a time): ``"wanda"``
    (|w| x input activation norm, per output row) or ``"sparsegpt"`` (also updates the kept
    weights to compensate; Linear and Conv2d layers). Also any name given to
    ``pangkas.weights.criteria.register``, or a ``WeightImportance`` object (see
    ``pangkas.weights.criteria``). ``method=`` is the old name of ``importance=``.

    Masks compose: pruning again only removes more, never brings a pruned weight back. Biases and
    norms are untouched. Weights shared by several modules are skipped (and reported).
    ``pangkas.finalize(model)`` removes the masks, leaving plain zeros.
    """
    criterion = _validate(sparsity, threshold, pattern, scope, importance, data)
    targets, skipped = _targets(model, include, exclude)
    _check_finite(targets)
    weights = [m.weight for _, m in targets]
    old_masks = [None if (mask := get_mask(m)) is None else mask.clone() for _, m in targets]
    updates = {}  # SparseGPT's compensated weights
    if isinstance(criterion, CalibratedImportance):
        found = calibrated_masks(model, dict(targets), data, criterion, sparsity,
                                 parse_pattern(pattern) if pattern else None, get_mask)
        new_masks = [found[name][1] if name in found else torch.ones_like(w, dtype=torch.bool)
                     for (name, _), w in zip(targets, weights)]
        updates = {n: found[n][0] for n, _ in targets if n in found and found[n][0] is not None}
    else:
        new_masks = _new_masks(targets, weights, old_masks, criterion, sparsity, threshold, pattern, scope)
    masks = [new if old is None else new & old for new, old in zip(new_masks, old_masks)]
    rule = (f"sparsity={sparsity} ({scope})" if sparsity is not None
            else f"threshold={threshold}" if threshold is not None else f"pattern={pattern}")
    if sparsity is not None or pattern is not None:
        rule += f", importance={criterion.name}"
    return WeightPlan(model, rule, targets, masks, old_masks, updates, skipped)


@renamed(method="importance")
def prune_weights(model: nn.Module, **options) -> WeightReport:
    """``plan_weights(model, **options).apply()``: mask weights so they stay zero through
    training (see :func:`plan_weights` for the options)."""
    return plan_weights(model, **options).apply()


def _apply(modules, masks, old_masks) -> None:
    """Set every mask or none: on failure or interrupt, the masks touched so far are restored."""
    touched = 0
    try:
        for module, mask in zip(modules, masks):
            touched += 1  # before set_mask: an interrupt inside it may leave this one half-masked
            set_mask(module, mask)
    except BaseException:
        for module, old in zip(modules[:touched], old_masks):
            if old is None:
                remove_mask(module, keep_zeros=False)
            else:
                set_mask(module, old)
        raise
