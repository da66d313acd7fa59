"""``pangkas.compress``: give a budget, get the most accurate model found that meets it.

The pieces: ``budget`` (what is asked), ``space`` (what can be cut and what a combination costs),
``latency_model`` (this machine's per-module time profile, cached on disk), ``search`` (greedy with
lazy re-scoring on a distortion proxy), ``report`` (finalists, points, Pareto front, plot). Here:
the search is run for depth and width together and, when both are allowed, for each alone and for
a few depth-first mixes; each end state (a finalist) is built for real, optionally re-fitted and recovered, measured (latency
against the dense model, interleaved, with a confidence interval: met only if the interval's upper
end is within the limit; if it misses, the search goes on from there) and scored; the best-scoring
finalist that meets the budget is returned.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import itertools
import math
import random
import time
import warnings
from collections.abc import Callable, Iterable

import torch
from torch import nn

from ..channels import plan_channels
from ..distortion import Distortion, Fidelity
from ..errors import PangkasError
from ..layers import _batches, _granular, _selected, layer_candidates
from ..measure import count_macs, file_sizes, latency_ratios, min_rounds
from ..modules import Selector, select_modules
from ..progress import bar
from ..quantize import quantize as quantized
from ..recover import recover
from ..weights.prune import PRUNABLE
from .budget import KINDS, Budget, parse
from .evolution import Evolution
from .latency_model import LatencyModel
from .report import CompressReport, Finalist, Point
from .rounds import RoundRecovery, objective, stages
from .search import Scorer, Step, greedy
from .space import Space, State

__all__ = ["CompressReport", "Finalist", "Point", "compress"]

MAX_CORRECTIONS = 3
SLACK = 0.9  # a finalist timed under this share of the latency limit was cut more than needed


def compress(model: nn.Module, data: Iterable, target: dict | None = None, *, latency: float | None = None,
             macs: float | None = None, params: float | None = None, file_size: float | None = None,
             eval_fn: Callable[[nn.Module], float] | None = None, example_inputs=None, width: bool = True,
             depth: bool = True, sparsity: bool = False, step: float = 0.125, importance=None, reconstruct: bool = True,
             replace: str | None = None, recover_steps: int = 0, recover_rounds: int = 0, proxy_batches: int = 4,
             depth_mixes: int = 3, evolve: int = 0, quantize: str | None = None,
             include: Selector = None, exclude: Selector = None, integrations: list | None = None,
             rounds: int = 10, confidence: float = 0.95, checkpoints: int = 2) -> tuple[nn.Module, CompressReport]:
    """Search per-layer widths (channels, heads, FFN neurons) and blocks to remove for the most
    accurate model that meets the budget; returns ``(compressed model, report)``. ``model`` is
    left as it was (the compressed model is a new one), or returned itself when it already meets
    the budget (the report says so).

    Budget (one or more, as keywords or ``target={"latency": 0.5}``): ``latency`` (time relative
    to ``model``'s on this machine at the shape of ``example_inputs``, default the first batch),
    ``macs``, ``params``, ``file_size`` (relative when <= 1, else a count or bytes). A budget that
    removing everything removable cannot reach is refused before the search, naming the best
    reachable figures.

    ``data``: calibration batches (as everywhere: tensors, tuples or dicts the model is called
    with). ``eval_fn(model) -> float`` (higher is better) scores the finalists; by default the
    last quarter of ``data`` is held back and the score is the mean cosine similarity of each
    example's output to ``model``'s (``pangkas.distortion.Fidelity``). The search itself is
    guided by the distortion of the outputs on ``proxy_batches`` calibration batches (KL of the
    predictions for models with logits, else relative squared error).

    ``width`` / ``depth``: whether channel groups / whole blocks (layers of a layer list,
    residual blocks) may be cut; ``sparsity=True`` adds weight sparsity (one eighth of a Linear or
    conv layer's weights at a time, by magnitude, as masks: only the file ``pangkas.save`` writes
    gets smaller); ``step``: the fraction of a group removed per search step; ``depth_mixes``: how
    many depth-first mixes to search besides width+depth, width and depth alone (k blocks removed
    as the depth-only search removed them, then widths; k spread over that search's path);
    ``evolve=N``: after them, an evolutionary search (``compress.evolution``) seeded with their
    end states, for N more proxy measurements, whose best state is one more finalist (it spreads
    cuts the greedy piles onto one layer; off by default, as it costs about as much again and won
    on a small CNN, not on MiniLM: docs/compress/evolution.md).
    ``importance`` ranks channels within a group (``plan_channels``' names; default ``"obs"``
    with ``reconstruct``, else ``"wanda"``). ``reconstruct``: the layers reading removed channels
    are re-fitted by least squares on ``data``; ``replace="linear"``: removed blocks are replaced by
    fitted linear maps (see ``plan_layers``). ``quantize="int8-dynamic"`` or ``"int8-weight-only"``:
    every finalist's Linear layers are quantized last (``pangkas.quantize``) and measured so; the
    search counts their weights at a byte each and estimates latency from the per-module profile of
    the dense model so quantized, scaled by its measured time over the float model's (int8 may be
    slower than float for small layers: the estimate says so too), so a file-size or latency budget
    is met by pruning and quantization together, with fewer cuts. A quantized dense model estimated
    to meet the budget is built and timed first, and cut only if its timing misses.
    ``recover_steps``: fine-tune each finalist this many batches of ``data``, distilling from
    ``model``; with ``recover_rounds=R`` also R times during each search (NetAdapt's short-term
    fine-tune: at evenly spread shares of the way to the budget, the model as cut so far, the cut
    weights held at zero), so that later cuts are judged on adapted weights. The search then runs
    on a copy of ``model`` (one more model in memory), and the finalists are built from that
    search's fine-tuned weights without ``reconstruct`` (a re-fit would pull them back to what the
    dense weights compute). ``include`` / ``exclude``: which modules may lose channels and which
    blocks may go. Latency ratios come from ``rounds`` interleaved rounds
    at ``confidence``; ``checkpoints`` states along each search are scored with ``eval_fn``
    (the report's points).
    """
    started = time.perf_counter()
    _check(width, depth, sparsity, step, recover_steps, recover_rounds, proxy_batches, depth_mixes, evolve, replace,
           eval_fn, rounds, confidence, checkpoints, quantize)
    batches = _batches(data)
    if eval_fn is None:
        if len(batches) < 2:
            raise PangkasError("compress holds back part of data= to score the result: give at least 2 batches, "
                               "or eval_fn=")
        held = max(1, len(batches) // 4)
        batches, held_back = batches[:-held], batches[-held:]
        eval_fn = Fidelity(model, held_back)
    elif not batches:
        raise PangkasError("data is empty: compress needs calibration batches")
    example = batches[0] if example_inputs is None else example_inputs
    dense = _measured(model, example)
    budget = parse(target, {"latency": latency, "macs": macs, "params": params, "file_size": file_size}, dense)
    if budget.met({kind: 1.0 for kind in KINDS}):
        report = CompressReport(budget, dense, float(eval_fn(model)), unchanged="the dense model already meets "
                                "the budget; it is returned unchanged")
        report.seconds = time.perf_counter() - started
        return model, report

    searched = copy.deepcopy(model) if recover_rounds else model  # fine-tuned between rounds: a copy
    space = _space(searched, example, batches, budget, width, depth, sparsity, step, importance, reconstruct, replace,
                   include, exclude, integrations, quantize)
    allowed = tuple(k for k, on in (("width", width), ("depth", depth), ("weights", sparsity)) if on)
    _check_reachable(space, budget, allowed)
    score = Scorer(space, Distortion(searched, batches[:proxy_batches]))
    recovery = RoundRecovery(model, space, score.forget, batches, recover_steps, recover_rounds) \
        if recover_rounds else None
    report = CompressReport(budget, dense, float(eval_fn(model)))
    start = Step(None, space.start(), 0.0, space.figures(space.start()))
    if quantize and "latency" in budget.limits:
        report.notes.append(f"{quantize}: the dense model so quantized is estimated at "
                            f"{start.figures['latency']:.2f}x the float model's latency")
    timed = functools.partial(_timed, model, space, example, batches, reconstruct and not recover_rounds, replace,
                              recover_steps, quantize, rounds, confidence, dense)
    built: list[tuple[Finalist, nn.Module]] = []
    ends: list[State] = []

    def finish(name: str, kinds: tuple[str, ...], steps: list[Step]) -> None:
        """Build and time a search's end state now: the next search may change the weights."""
        ends.append(steps[-1].state)
        built.append(_finalize(space, budget, score, kinds, steps, name, eval_fn, timed, report))

    if quantize and budget.met(start.figures):  # quantized, the dense model is estimated to fit
        finish(f"{quantize} only", allowed, [start])  # if its timing misses, the cuts start from it
        finalist = built[-1][0]
        if any(finalist.cuts.values()):
            finalist.strategy = f"{quantize} + {'+'.join(allowed)}"
    else:
        _searches(space, budget, score, start, width, depth, sparsity, depth_mixes, eval_fn, checkpoints, report,
                  recovery, finish)
    if evolve and ends:
        if recovery is not None:
            recovery.reset()
        best, distortion = Evolution(space, budget, score, random.Random(0)).run(ends, evolve)
        finish("evolution", tuple(k for k in allowed if k != "weights"), [Step(None, best, distortion,
                                                                                 space.figures(best))])
    if not built:
        raise PangkasError(f"no search reached {budget.describe()}")
    report.finalists = [f for f, _ in built]
    meeting = [(f, m) for f, m in built if f.met] or built
    report.chosen, chosen = max(meeting, key=lambda fm: fm[0].score if math.isfinite(fm[0].score) else -math.inf)
    report.measurements = score.measured
    report.seconds = time.perf_counter() - started
    if not report.chosen.met:
        warnings.warn(f"compress: no finalist met {budget.describe()} when measured; returning the best-scoring "
                      "one (see report.finalists)", stacklevel=2)
    return chosen, report


def _searches(space, budget, score, start, width, depth, sparsity, mixes, eval_fn, checkpoints, report, recovery,
              finish) -> None:
    """Run the searches; ``finish(name, kinds of move, steps)`` each that meets the budget. Width and
    depth together (NetAdapt-style), each alone, and ``mixes`` depth-first mixes: k blocks removed
    as the depth-only search removed them, then widths (k spread over that search's path), since
    the proxy cannot see how much re-fitting saves each kind of cut. Weight sparsity, when asked,
    goes with every search (it only lowers the file size). With ``recovery``, each search starts
    from the dense weights."""
    extra = ("weights",) if sparsity else ()

    def run(name: str, kinds: tuple[str, ...], begin: Step, marks: int) -> list[Step]:
        name += "+sparsity" if sparsity and kinds else ""
        kinds = (*kinds, *extra)
        if kinds != ("depth", *extra) and not budget.met(space.figures(space.furthest(kinds))):
            report.notes.append(f"{name} cannot reach the budget")
            return []
        if recovery is not None:
            recovery.reset()
            begin = dataclasses.replace(begin, distortion=score(begin.state))
        steps = _search(space, budget, score, kinds, begin, name, eval_fn, marks, report, recovery)
        if steps and budget.met(steps[-1].figures):
            finish(name, kinds, steps)
        else:
            report.notes.append(f"{name} cannot reach the budget")
        return steps

    if width and depth:
        run("width+depth", ("width", "depth"), start, checkpoints)
    if width:
        run("width", ("width",), start, checkpoints)
    if depth:
        path = run("depth", ("depth",), start, checkpoints)
        short = path[:-1] if path and budget.met(path[-1].figures) else path
        if width:
            for k in _spread(len(short), mixes):
                run(f"depth {k} + width", ("width",), short[k - 1], 0)
    if not (width or depth):
        run("sparsity", (), start, checkpoints)


def _spread(n: int, m: int) -> list[int]:
    """Up to ``m`` of 1..``n``, evenly spread."""
    return list(range(1, n + 1)) if n <= m else sorted({round(i * n / (m + 1)) or 1 for i in range(1, m + 1)})


def _check(width, depth, sparsity, step, recover_steps, recover_rounds, proxy_batches, depth_mixes, evolve, replace,
           eval_fn, rounds, confidence, checkpoints, quantize):
    if any(flag not in (True, False) for flag in (width, depth, sparsity)):
        raise PangkasError("width=, depth= and sparsity= must be True or False")
    if not (width or depth or sparsity):
        raise PangkasError("width=False and depth=False (without sparsity=True) leave nothing to search: "
                           "allow at least one")
    if isinstance(step, bool) or not isinstance(step, (int, float)) or not 0 < step <= 1:
        raise PangkasError(f"step must be a fraction in (0, 1] (of a group's channels per search step), got {step!r}")
    for name, value, low in (("recover_steps", recover_steps, 0), ("recover_rounds", recover_rounds, 0),
                             ("proxy_batches", proxy_batches, 1),
                             ("depth_mixes", depth_mixes, 0), ("evolve", evolve, 0), ("checkpoints", checkpoints, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise PangkasError(f"{name} must be an integer >= {low}, got {value!r}")
    if evolve and not width:
        raise PangkasError("evolve= evolves per-layer widths: it needs width=True")
    if recover_rounds and not recover_steps:
        raise PangkasError(f"recover_rounds={recover_rounds} fine-tunes recover_steps batches each round: give "
                           "recover_steps= too")
    if quantize == "int8-static":
        raise PangkasError("compress times its finalists in PyTorch eager mode, where an int8-static graph is slower "
                           "than float: compress, then pangkas.quantize(..., 'int8-static') and export_onnx")
    if quantize not in (None, "int8-dynamic", "int8-weight-only"):
        raise PangkasError(f"quantize must be None, 'int8-dynamic' or 'int8-weight-only', got {quantize!r}")
    if replace not in (None, "linear"):
        raise PangkasError(f"replace must be None or 'linear', got {replace!r}")
    if eval_fn is not None and not callable(eval_fn):
        raise PangkasError("eval_fn must be a callable: eval_fn(model) -> score, higher is better")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < min_rounds(confidence):
        raise PangkasError(f"rounds={rounds!r} cannot give a {confidence:.0%} interval: use at least "
                           f"{min_rounds(confidence)}")


def _measured(model: nn.Module, example) -> dict[str, int]:
    """The dense model's absolute figures: parameters, MACs on ``example``, bytes ``pangkas.save`` writes."""
    return {"params": sum(p.numel() for p in model.parameters()), "macs": count_macs(model, example),
            "file_size": file_sizes(model)[1]}


def _space(model, example, batches, budget: Budget, width, depth, sparsity, step, importance, reconstruct, replace,
           include, exclude, integrations, quantize=None) -> Space:
    if importance is None:
        importance = "obs" if reconstruct else "wanda"
    plan = plan_channels(model, example, ratio=0.0, importance=importance if width else "l1",
                         data=batches if width else None, include=include, exclude=exclude,
                         integrations=integrations)
    blocks = []
    if depth:
        blocks = _granular(_selected(model, layer_candidates(model, example), include, exclude, None), "layers")
    latency = LatencyModel(model, example, quantize) if "latency" in budget.limits else None
    layers = [name for name, _ in select_modules(model, PRUNABLE, include, exclude)] if sparsity else []
    int8, int8_file = frozenset(), None
    if quantize:
        int8 = frozenset(f"{name}.weight" for name, _ in select_modules(model, (nn.Linear,)))
        int8_file = file_sizes(quantized(model, None, quantize)[0])[1]
    return Space(plan, blocks, step, latency, layers, stand_ins_on=batches if replace == "linear" else None,
                 int8=int8, int8_file=int8_file)


def _check_reachable(space: Space, budget: Budget, allowed: tuple[str, ...]) -> None:
    furthest = space.figures(space.furthest(allowed))
    if not budget.met(furthest):
        best = ", ".join(f"{kind}={furthest[kind]:.3g}" for kind in budget.limits)
        estimated = " (latency estimated)" if "latency" in budget.limits else ""
        raise PangkasError(f"the budget {budget.describe()} cannot be met: removing everything removable "
                           f"({' and '.join('sparsity' if k == 'weights' else k for k in allowed)}) reaches "
                           f"{best}{estimated} of the dense model")


def _search(space, budget, score, kinds, start, name, eval_fn, checkpoints, report, recovery=None):
    """Greedy from ``start`` with a progress bar (budget figures, distortion, best score so far);
    scores ``checkpoints`` states along the way. With ``recovery``, in rounds: the model is
    fine-tuned as cut at the end of each but the last."""
    total = budget.gap(start.figures) or 1.0
    marks = iter([(k + 1) / (checkpoints + 1) for k in range(checkpoints)])
    mark = next(marks, None)
    with bar(f"compress ({name})", total) as update:
        def on_step(s: Step) -> None:
            nonlocal mark
            progress = 1 - budget.gap(s.figures) / total
            while mark is not None and progress >= mark:
                with space.silenced(s.state):
                    report.points.append(Point(name, s.figures, float(eval_fn(space.model))))
                mark = next(marks, None)
            best = max((p.score for p in report.points if p.figures[report.kind_shown] <= budget.limits[
                report.kind_shown]), default=None)
            update(total * progress, f"compress ({name}): {_figures(s.figures, budget)}, distortion "
                   f"{s.distortion:.3g}" + ("" if best is None else f", best score within budget {best:.4g}"))

        if recovery is None:
            return greedy(space, budget, score, kinds, start, on_step)
        steps, current = [], start
        for stage in stages(budget, start.figures, recovery.rounds):
            more = greedy(space, stage, score, kinds, current, on_step)
            steps += more
            current = more[-1] if more else current
            if not stage.met(current.figures):
                break
            if stage is not budget and more:
                recovery(current.state)
                current = dataclasses.replace(current, distortion=score(current.state))
        return steps


def _figures(figures: dict[str, float], budget: Budget) -> str:
    return ", ".join(f"{kind} {figures[kind]:.3f}" for kind in budget.limits)


def _finalize(space, budget, score, kinds, steps, name, eval_fn, timed, report):
    """Build the search's end state and time it against the dense model. Each timing calibrates
    the latency estimate: where the interval's upper end misses the limit, the search goes on with
    the limit lowered by the miss; where it is well within, the earliest state of the search
    predicted (so calibrated) to meet is built and timed instead, and kept if it meets. At most
    ``MAX_CORRECTIONS`` such re-timings. ``timed(state)`` builds and measures a state."""
    tried = [(steps[-1], *timed(steps[-1].state))]
    for corrections in range(1, MAX_CORRECTIONS + 1):
        step, pruned, figures, absolute, ratio = tried[-1]
        met = budget.met_measured(figures, ratio)
        if "latency" not in budget.limits or not budget.met({**figures, "latency": 0.0}):
            break  # nothing to calibrate, or a limit the estimate of latency cannot help with
        limit = budget.limits["latency"]
        factor = ratio.high / step.figures["latency"]  # estimate -> measured upper end
        if not met:
            if any(budget.met_measured(f, r) for _, _, f, _, r in tried):
                break  # an earlier (less cut) state met: keep that one
            internal = Budget({**budget.limits, "latency": limit / factor * 0.98}, budget.asked)
            more = _search(space, internal, score, kinds, step, f"{name}, correction {corrections}", eval_fn, 0,
                           report)
            if not more or not internal.met(more[-1].figures):
                report.notes.append(f"{name}: the measured latency missed and no further cut is possible")
                break
            steps = steps + more
            step = steps[-1]
        elif ratio.high < SLACK * limit:
            step = next((s for s in steps if s.figures["latency"] * factor <= 0.97 * limit
                         and budget.met({**s.figures, "latency": 0.0})), step)
            if step is tried[-1][0]:
                break
        else:
            break
        tried.append((step, *timed(step.state)))
    meeting = [t for t in tried if budget.met_measured(t[2], t[4])]
    step, pruned, figures, absolute, ratio = meeting[-1] if meeting else tried[-1]
    value = float(eval_fn(pruned))
    report.points.append(Point(name, figures, value, measured=True))
    return Finalist(name, space.describe(step.state), figures, absolute, ratio, value, bool(meeting),
                    _split(space, step.state, budget), len(tried) - 1), pruned


def _timed(model, space, example, batches, reconstruct, replace, recover_steps, quantize, rounds, confidence, dense,
           state):
    """(pruned model, its figures, absolute figures, latency ratio) for ``state``."""
    pruned = _built(model, space, state, example, batches, reconstruct, replace, recover_steps)
    if quantize:
        pruned = quantized(pruned, batches[:4], quantize)[0]
    return (pruned, *_measure(model, pruned, example, rounds, confidence, dense))


def _built(model, space: Space, state: State, example, batches, reconstruct, replace, recover_steps) -> nn.Module:
    pruned = space.build(state, example, reconstruct_on=batches if reconstruct else None,
                         replace_blocks=replace, data=batches)
    if recover_steps:
        recover(pruned, list(itertools.islice(itertools.cycle(batches), recover_steps)), teacher=model,
                objective=objective(model, batches[0]))
        pruned.eval()
    return pruned


def _measure(model, pruned, example, rounds, confidence, dense):
    """The pruned model's figures (fractions of ``dense``, the dense model's; latency: the median
    ratio), absolute figures, and latency ratio with its interval."""
    absolute = _measured(pruned, example)
    figures = {kind: absolute[kind] / dense[kind] if dense[kind] else 1.0 for kind in absolute}
    ratio = latency_ratios([model, pruned], example, rounds=rounds, confidence=confidence)[1]
    figures["latency"] = ratio.value
    return figures, absolute, ratio


def _split(space: Space, state: State, budget: Budget) -> dict[str, float]:
    """Shares of the estimated saving in the tightest budget kind due to width cuts, blocks and
    (when searched) weight sparsity (counted from the start state: with ``quantize`` its figures
    are already below 1)."""
    kind = budget.tightest
    state = space.effective(state)
    kinds = {"width": "width", "depth": "depth"} | ({"sparsity": "weights"} if space.layers else {})
    base = space.figures(space.start())[kind]
    saved = {label: max(0.0, base - space.figures(space.only(state, k))[kind]) for label, k in kinds.items()}
    total = sum(saved.values())
    return {label: v / total if total > 0 else 0.0 for label, v in saved.items()}
