"""What ``pangkas.compress`` returns besides the model: the chosen configuration, its measured
figures and score, the finalists, and every scored point with its Pareto front."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..files import pyplot, write_figure
from ..measure import Ratio
from ..reports import Report
from ..tables import human_bytes, human_count, render_table
from .budget import Budget


@dataclass(frozen=True)
class Point:
    """A model the search scored: its budget figures (fractions of the dense model's; estimated
    unless ``measured``) and ``score`` (``eval_fn``, higher is better)."""

    strategy: str
    figures: dict[str, float]
    score: float
    measured: bool = False


@dataclass
class Finalist:
    """A search's end state, built for real: what it cuts, its measured figures, its score."""

    strategy: str                   # "width+depth", "width" or "depth"
    cuts: dict                      # {"widths": {module: "kept/size"}, "blocks": [...], "sparsity": {layer: "k/8"}}
    figures: dict[str, float]       # measured, fractions of the dense model's
    absolute: dict[str, int]        # params, macs, file_size (bytes as pangkas.save writes them)
    latency: Ratio | None
    score: float
    met: bool
    split: dict[str, float]         # share of the saving (in the tightest kind) from width / depth / sparsity
    corrections: int = 0            # times the search went on because the measured latency missed


@dataclass
class CompressReport(Report):
    """The outcome of :func:`pangkas.compress`. ``chosen`` is None when the dense model already
    met the budget (``unchanged`` says why)."""

    budget: Budget
    dense: dict[str, int]
    dense_score: float
    chosen: Finalist | None = None
    finalists: list[Finalist] = field(default_factory=list)
    points: list[Point] = field(default_factory=list)
    unchanged: str | None = None
    seconds: float = 0.0
    measurements: int = 0           # distortion measurements the search made
    notes: list[str] = field(default_factory=list)
    kind = "compress"

    params_before = property(lambda self: self.dense["params"])
    macs_before = property(lambda self: self.dense["macs"])
    params_after = property(lambda self: self.chosen.absolute["params"] if self.chosen else self.dense["params"])
    macs_after = property(lambda self: self.chosen.absolute["macs"] if self.chosen else self.dense["macs"])

    @property
    def met(self) -> bool:
        return self.chosen is None or self.chosen.met

    @property
    def kind_shown(self) -> str:
        """The budget kind plots and the front are drawn against: the tightest limit asked."""
        return self.budget.tightest

    def pareto(self) -> list[Point]:
        """The points no other point beats on both the shown budget figure (lower) and score
        (higher), by budget figure."""
        kind = self.kind_shown
        ordered = sorted(self.points, key=lambda p: (p.figures[kind], -p.score))
        front, best = [], float("-inf")
        for p in ordered:
            if p.score > best:
                front.append(p)
                best = p.score
        return front

    def details(self) -> dict:
        def finalist(f: Finalist) -> dict:
            return {"strategy": f.strategy, "cuts": f.cuts, "figures": f.figures, "absolute": f.absolute,
                    "latency": None if f.latency is None else
                    {"value": f.latency.value, "low": f.latency.low, "high": f.latency.high},
                    "score": f.score, "met": f.met, "split": f.split, "corrections": f.corrections}

        return {"budget": self.budget.asked, "met": self.met, "unchanged": self.unchanged,
                "dense_score": self.dense_score, "chosen": None if self.chosen is None else finalist(self.chosen),
                "finalists": [finalist(f) for f in self.finalists],
                "points": [{"strategy": p.strategy, "figures": p.figures, "score": p.score, "measured": p.measured}
                           for p in self.points],
                "seconds": self.seconds, "measurements": self.measurements, "notes": list(self.notes)}

    def __str__(self) -> str:
        head = f"compress to {self.budget.describe()}"
        if self.chosen is None:
            return f"{head}: {self.unchanged}"
        rows = []
        for f in self.finalists:
            latency = "-" if f.latency is None else f.latency.format()
            rows.append(((">" if f is self.chosen else " ") + f.strategy, human_count(f.absolute["params"]),
                         human_count(f.absolute["macs"]), human_bytes(f.absolute["file_size"]), latency,
                         f"{f.score:.4g}", "yes" if f.met else "no"))
        text = render_table(f"{head} (dense: score {self.dense_score:.4g}, {human_count(self.dense['params'])} "
                            f"params, {human_count(self.dense['macs'])} MACs)",
                            ("finalist", "params", "MACs", "file", "latency vs dense", "score", "meets"), rows)
        c = self.chosen
        blocks = ", ".join(c.cuts["blocks"]) or "none"
        widths = ", ".join(f"{m} {k}" for m, k in list(c.cuts["widths"].items())[:8])
        more = len(c.cuts["widths"]) - 8
        text += (f"\nchosen: {c.strategy}; blocks removed: {blocks}; widths: {widths or 'unchanged'}"
                 + (f" +{more} more" if more > 0 else ""))
        if c.cuts.get("sparsity"):
            text += f"\nweight sparsity (eighths): " + ", ".join(f"{m} {k}" for m, k in list(c.cuts["sparsity"].items())[:8])
        text += (f"\nsaving in {self.kind_shown} from " + ", from ".join(f"{k} {v:.0%}" for k, v in c.split.items())
                 + " (estimated)")
        text += f"\nsearch: {self.measurements} distortion measurements, {self.seconds:.0f} s"
        for note in self.notes:
            text += f"\nnote: {note}"
        return text

    def plot(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Score against the tightest budget figure: every scored point (hollow: estimated
        figures), the Pareto front, the finalists (measured) and the chosen one; an existing file
        is replaced only with ``overwrite=True``."""
        plt = pyplot()

        kind = self.kind_shown
        fig, ax = plt.subplots(figsize=(7, 4.5))
        strategies = sorted({p.strategy for p in self.points})
        colors = dict(zip(strategies, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
        for s in strategies:
            pts = [p for p in self.points if p.strategy == s]
            ax.scatter([p.figures[kind] for p in pts], [p.score for p in pts], facecolors="none",
                       edgecolors=colors[s], label=f"{s} (search, estimated)")
        front = self.pareto()
        ax.plot([p.figures[kind] for p in front], [p.score for p in front], color="gray", linestyle="--",
                label="Pareto front")
        for f in self.finalists:
            ax.scatter([f.figures[kind]], [f.score], color=colors.get(f.strategy, "black"), marker="o", s=50)
        if self.chosen is not None:
            ax.scatter([self.chosen.figures[kind]], [self.chosen.score], color="red", marker="*", s=200,
                       label=f"chosen ({self.chosen.strategy}, measured)", zorder=5)
        ax.scatter([1.0], [self.dense_score], color="black", marker="s", label="dense")
        ax.axvline(self.budget.limits[kind], color="black", linestyle=":", label=f"{kind} limit")
        ax.set_xlabel(f"{kind} (fraction of the dense model's)")
        ax.set_ylabel("score (higher is better)")
        ax.legend(fontsize="small")
        fig.tight_layout()
        return write_figure(fig, path, overwrite=overwrite)
