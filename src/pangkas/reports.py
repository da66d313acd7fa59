"""What every ``plan.apply()`` and ``prune_*`` returns: one small protocol for all reports.

A report prints as a table (``str(report)``), converts to plain data (``to_dict()``, for logs and
JSON), and says how big the model was and is: ``params_before`` / ``params_after`` (the
parameters the model computes with: for weight pruning, the non-zero ones) and ``macs_before`` /
``macs_after`` (None where the verb does not run the model: weight pruning keeps every MAC of a
dense kernel).
"""

from __future__ import annotations


class Report:
    """Base of every report; a subclass sets the four sizes and may add ``details()``."""

    kind = "report"
    params_before: int
    params_after: int
    macs_before: int | None
    macs_after: int | None

    def details(self) -> dict:
        """What this kind of report adds to ``to_dict()`` (plain Python values only)."""
        return {}

    def to_dict(self) -> dict:
        return {"kind": self.kind, "params_before": self.params_before, "params_after": self.params_after,
                "macs_before": self.macs_before, "macs_after": self.macs_after, **self.details()}
