"""Transformer pruning in a Hugging Face model's own units: attention heads, FFN neurons, hidden size.

A channel plan whose per-module ratios the Hugging Face integration derives from those units;
applying it also checks that the model's config can still say its sizes.
"""

from __future__ import annotations

import warnings

from torch import nn

from . import verify
from .allocation import check as check_allocation, reallocate
from .channels import ChannelReport, Plan, plan_channels
from .errors import PangkasError
from .integrations import huggingface
from .rotate import RotationPlan, RotationReport, plan_rotation
from .selection import ratio_source


class TransformerPlan:
    """What :func:`prune_transformer` would remove; nothing changes until :meth:`apply`.

    ``plan.channels`` is the channel plan it wraps; its attributes read through (``keep()``,
    ``params_after``, ``selection``, ...)."""

    def __init__(self, channels: Plan, amounts: dict[str, float], units: dict[str, list[str]]):
        self.channels = channels
        self.amounts = amounts  # the fractions asked for, by unit
        self.units = units  # by unit: the modules whose outputs count it

    @property
    def removed(self) -> dict[str, float]:
        """The fraction of each unit the plan really removes (whole KV groups, rounding)."""
        keep = self.channels.keep()
        out = {}
        for unit, names in self.units.items():
            gone = total = 0
            for name in names:
                dim = huggingface.output_dim(self.channels.model.get_submodule(name))
                width = self.channels.model.get_submodule(name).weight.shape[dim]
                kept = keep.get(f"{name}.weight", [None] * 2)[dim]
                gone += 0 if kept is None else width - len(kept)
                total += width
            out[unit] = gone / total if total else 0.0
        return out

    def __getattr__(self, name: str):
        if name == "channels":  # not set yet (copying, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.channels, name)

    def __str__(self) -> str:
        removed = self.removed
        asked = ", ".join(f"{unit}={amount} (removes {removed[unit]:.3g})" for unit, amount in self.amounts.items())
        return f"transformer plan: {asked}\n{self.channels}"

    def apply(self) -> ChannelReport:
        """Apply the channel plan (see ``Plan.apply``). Warns when the config cannot say the new
        sizes: save with ``pangkas.save_pretrained`` then."""
        return self._apply()

    def _apply(self) -> ChannelReport:
        report, revert = self.channels._apply()
        try:
            problem = huggingface.config_warning(self.channels.model)  # slow enough to be interrupted
        except BaseException:
            revert()
            raise
        if problem:
            warnings.warn(problem, stacklevel=3)  # the caller of apply() or prune_transformer()
        return report


def plan_transformer(model: nn.Module, example_inputs, *, heads: float | None = None,
                     ffn: float | None = None, hidden: float | None = None, allocation: str = "uniform",
                     rotate: bool = False, **options) -> TransformerPlan | RotationPlan:
    """Plan removing ``heads`` of the attention heads, ``ffn`` of the MLP neurons and ``hidden``
    of the hidden size (approximate: LayerNorm/RMSNorm statistics change) of a Hugging Face model;
    each is a fraction of its unit. Heads go whole (whole key/value groups with GQA), so ``heads``
    is rounded per layer to the nearest whole number of them (refused if that is none or all);
    ``plan.removed`` says what is really removed. ``allocation="sensitivity"`` (needs ``data``)
    spreads each unit's removal over the layers by measured sensitivity (see
    ``pangkas.allocation``): a layer whose cut hurts the outputs more keeps more, each unit's total
    is unchanged; ``"uniform"`` (default) cuts every layer alike. Other options (``importance=``,
    ``data=``, ``integrations=``, ...) go to ``plan_channels``.

    ``rotate=True`` (with ``hidden=`` and ``data=`` only; LLaMA, Mistral, Qwen2, Qwen3 causal LMs)
    removes hidden size SliceGPT-style instead: the residual stream is rotated onto its principal
    directions on ``data`` and the weakest are dropped (see ``pangkas.rotate``); a ``RotationPlan``."""
    if rotate:
        if allocation != "uniform":
            raise PangkasError("rotate=True cuts one residual stream: allocation= does not apply")
        return _plan_rotation(model, example_inputs, heads, ffn, hidden, options)
    asked = {unit: amount for unit, amount in {"heads": heads, "ffn": ffn, "hidden": hidden}.items()
             if amount is not None}
    if not asked:
        raise PangkasError("give at least one of heads=, ffn=, hidden=")
    check_allocation(allocation, options.get("data"), options.get("scope", "local"))
    if allocation != "uniform":
        options["data"] = list(options["data"])  # read again by the allocation
    per_unit = {unit: huggingface.ratios(model, **{unit: amount}) for unit, amount in asked.items()}
    ratios = {name: r for unit_ratios in per_unit.values() for name, r in unit_ratios.items()}
    plan = plan_channels(model, example_inputs, ratio=0.0, ratios=ratios, allow_approximate=hidden is not None,
                         **options)
    if allocation != "uniform":
        unit_of = {name: unit for unit, names in per_unit.items() for name in names}
        reallocate(plan, lambda g: unit_of.get(ratio_source(g, plan.options, model)), options["data"])
        verify.rehearse(plan)
    return TransformerPlan(plan, asked, {unit: list(r) for unit, r in per_unit.items()})


def _plan_rotation(model, example_inputs, heads, ffn, hidden, options) -> RotationPlan:
    if heads is not None or ffn is not None:
        raise PangkasError("rotate=True prunes hidden= only; prune heads=/ffn= in a second call")
    if hidden is None:
        raise PangkasError("rotate=True needs hidden= (the fraction of the hidden size to remove)")
    extra = sorted(k for k, v in options.items() if k != "data" and v not in (None, False))
    if extra:
        raise PangkasError(f"rotate=True takes data= only, not {', '.join(extra)}= (the rotation's principal "
                           "directions are its importance)")
    return plan_rotation(model, example_inputs, hidden, options.get("data"))


def prune_transformer(model: nn.Module, example_inputs, *, heads: float | None = None,
                      ffn: float | None = None, hidden: float | None = None, rotate: bool = False,
                      **options) -> ChannelReport | RotationReport:
    """``plan_transformer(...).apply()``: remove ``heads``, ``ffn`` and ``hidden`` (fractions of
    each unit) of a Hugging Face model, then update its config. Warns when the config cannot say
    the new sizes (save with ``pangkas.save_pretrained`` then). ``rotate=True``: hidden size by
    rotation (see ``plan_transformer``)."""
    plan = plan_transformer(model, example_inputs, heads=heads, ffn=ffn, hidden=hidden, rotate=rotate, **options)
    return plan.apply() if rotate else plan._apply()
