"""What the user asks the compressed model to fit: latency, MACs, parameters, file size.

Every limit is kept as a fraction of the dense model's figure. ``latency`` is relative (the
compressed model's time over the dense model's, on this machine, at the example inputs' shape);
``macs``, ``params`` and ``file_size`` are relative when at most 1, else absolute (a count, or
bytes for ``file_size``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import PangkasError

KINDS = ("latency", "macs", "params", "file_size")
UNITS = {"latency": "x dense time", "macs": "MACs", "params": "parameters", "file_size": "bytes"}


@dataclass(frozen=True)
class Budget:
    """The limits (fractions of the dense model's figures) a compressed model must meet, and
    what was asked (as given)."""

    limits: dict[str, float]
    asked: dict[str, float]

    def met(self, figures: dict[str, float]) -> bool:
        """Whether relative ``figures`` (by kind) are all within their limits."""
        return all(figures[kind] <= limit for kind, limit in self.limits.items())

    def binding(self, figures: dict[str, float]) -> str:
        """The kind furthest over (or least under) its limit: the one a search should lower next."""
        return max(self.limits, key=lambda kind: figures[kind] / self.limits[kind])

    @property
    def tightest(self) -> str:
        """The kind with the smallest limit: what reports and plots are drawn against."""
        return min(self.limits, key=self.limits.get)

    def met_measured(self, figures: dict[str, float], latency) -> bool:
        """Whether measured ``figures`` meet every limit, latency (a ``Ratio``) at its interval's upper end."""
        return self.met({**figures, "latency": latency.high})

    def gap(self, figures: dict[str, float]) -> float:
        """How far ``figures`` are from meeting every limit, in the binding kind's fraction (0: met)."""
        return max(0.0, max(figures[kind] - limit for kind, limit in self.limits.items()))

    def describe(self) -> str:
        return ", ".join(f"{kind}={self.asked[kind]:g}" for kind in self.limits)


def parse(target: dict | None, keywords: dict, dense: dict[str, float]) -> Budget:
    """The budget from ``target`` (a dict by kind) or keyword limits (not both), against the dense
    model's absolute ``dense`` figures (by kind; latency is always relative)."""
    given = {k: v for k, v in keywords.items() if v is not None}
    if target is not None:
        if given:
            raise PangkasError(f"give the budget as target= or as {', '.join(given)}=, not both")
        if not isinstance(target, dict):
            raise PangkasError(f"target must be a dict such as {{'latency': 0.5}}, got {type(target).__name__}")
        given = dict(target)
    unknown = sorted(set(given) - set(KINDS))
    if unknown:
        raise PangkasError(f"unknown budget {unknown}: give one or more of {', '.join(KINDS)}")
    if not given:
        raise PangkasError(f"give a budget: one or more of {', '.join(f'{k}=' for k in KINDS)} "
                           "(e.g. latency=0.5: half the dense model's time on this machine)")
    limits = {}
    for kind, value in given.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise PangkasError(f"{kind} must be a positive number, got {value!r}")
        if kind == "latency" or value <= 1:
            limits[kind] = float(value)
        else:
            limits[kind] = float(value) / dense[kind]  # absolute: a count, or bytes
    return Budget(limits, given)
