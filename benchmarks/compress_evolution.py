"""Does an evolutionary search over per-layer ratios beat compress's greedy searches?

For each model, ``pangkas.compress`` is run as in benchmarks/compress.py; then, on a ``Space``
built the way compress builds it (``pangkas.compress._space``) and a fresh ``Scorer`` on the same
proxy (output distortion on the first ``proxy_batches`` calibration batches), an evolutionary
search is given as many proxy measurements as compress's greedy searches made:

- (a) from a random population around uniform ratios;
- (b) seeded with compress's finalists (a refinement step after the greedy searches).

The best state of each (lowest proxy distortion within the estimated budget) is built the way
compress builds a finalist (``pangkas.compress._built``: least-squares re-fit on the calibration
data, ``replace`` as compress was given it) and scored with compress's ``eval_fn``. MiniLM:
``latency=0.5`` at batch 8 x 128 tokens, ``replace="linear"``, mean cosine to the full model on
600 sentences; the evolved models and compress's are timed against the dense model in the same
interleaved rounds. Digits CNN: ``macs=0.25``, no recovery, test accuracy.

    .venv/bin/python benchmarks/compress_evolution.py                    # both
    .venv/bin/python benchmarks/compress_evolution.py --sections digits  # one
"""

from __future__ import annotations

import random
import time
import warnings

import torch

from common import arguments, environment, publish, trained_digits
import pangkas
from pangkas.compress import _built, _measured, _space
from pangkas.compress.budget import Budget, parse
from pangkas.compress.search import Scorer
from pangkas.compress.evolution import POPULATION, Evolution
from pangkas.compress.space import Space, State
from pangkas.distortion import Distortion
from pangkas.layers import _batches
from pangkas.measure import latency_ratios
from pangkas.tables import render_table

PROXY_BATCHES = 4  # compress's default
NOISE = {"mean cosine": 0.005, "accuracy": 0.005}  # score differences below these are not a win


def _state(space: Space, cuts: dict) -> State:
    """The state a finalist's ``cuts`` (``space.describe``'s names) stand for."""
    firsts = [g.modules[0] for g in space.groups]
    counts = [0] * len(space.groups)
    for module, kept in cuts["widths"].items():
        k, size = map(int, kept.split("/"))
        counts[firsts.index(module)] = size - k
    return State(tuple(counts), frozenset(cuts["blocks"]), space.start().sparsity)


def compare(model, data, example, eval_fn, limits: dict, replace, rounds: int, timing, seeds: int) -> dict:
    """compress, then evolution (a) and (b) (``seeds`` runs each) on the same proxy and measurement
    count; everything the table needs."""
    start = time.perf_counter()
    small, report = pangkas.compress(model, data, example_inputs=example, eval_fn=eval_fn, replace=replace,
                                     rounds=rounds, **limits)
    greedy_seconds = time.perf_counter() - start
    print(report, flush=True)
    batches = _batches(data)
    budget = parse(None, limits, _measured(model, example))
    space = _space(model, example, batches, budget, True, True, False, 0.125, None, True, replace, None, None, None)
    distortion = Distortion(model, batches[:PROXY_BATCHES])
    reference = Scorer(space, distortion)  # for the table only: its measurements count for no search
    finalists = [_state(space, f.cuts) for f in report.finalists]
    chosen = _state(space, report.chosen.cuts)
    n = report.measurements
    rows = {"greedy": dict(model=small, score=report.chosen.score, distortion=reference(chosen),
                           measured=n, seconds=greedy_seconds, cuts=report.chosen.cuts, estimate=space.figures(chosen),
                           label=f"compress ({report.chosen.strategy})")}
    for name, seeded in (("evolution (a) random", None), ("evolution (b) seeded", finalists)):
        for seed in range(seeds):
            rng = random.Random(seed)
            score = Scorer(space, distortion)
            search = Evolution(space, budget, score, rng)
            start = time.perf_counter()
            initial = seeded if seeded is not None else [
                s for s in (search.random() for _ in range(50 * POPULATION)) if s is not None][:POPULATION]
            best, d = search.run(initial, n)
            searched = time.perf_counter() - start
            pruned = _built(model, space, best, example, batches, True, replace, 0)
            value = float(eval_fn(pruned))
            label = name + (f", seed {seed}" if seeds > 1 else "")
            rows[label] = dict(model=pruned, score=value, distortion=d, measured=score.measured, search=name,
                               seconds=time.perf_counter() - start, cuts=space.describe(best), label=label,
                               estimate=space.figures(best))
            print(label, value, d, score.measured, f"{searched:.0f} s", space.describe(best), flush=True)
    dense = _measured(model, example)
    for row in rows.values():
        absolute = _measured(row["model"], example)
        row.update({kind: absolute[kind] / dense[kind] for kind in absolute})
    if "latency" in limits:
        ratios = latency_ratios([model, *(r["model"] for r in rows.values())], timing, rounds=rounds)
        for row, ratio in zip(rows.values(), ratios[1:]):
            row["latency"] = ratio
    return dict(rows=rows, report=report, finalists=finalists, reference=reference)


def _cuts(cuts: dict) -> str:
    return (f"blocks {', '.join(cuts['blocks']) or '-'}; widths "
            + (", ".join(f"{k} {v}" for k, v in cuts["widths"].items()) or "-"))


def _verdict(rows: dict, metric: str, kind: str, limit: float) -> str:
    """Per search: the mean score difference to compress's row over its seeds, against ``NOISE``."""
    base = rows["greedy"]
    scale, unit = (100, " points") if metric == "accuracy" else (1, "")
    parts = []
    for name in ("evolution (a) random", "evolution (b) seeded"):
        runs = [r for r in rows.values() if r.get("search") == name]
        diffs = [r["score"] - base["score"] for r in runs]
        mean = sum(diffs) / len(diffs)
        spread = f" (mean of {len(runs)} seeds, {scale * min(diffs):+.3f} to {scale * max(diffs):+.3f})"
        shown = f"{scale * mean:+.3f}{unit} {metric}" + (spread if len(runs) > 1 else "")
        missed = [r for r in runs if not (r["latency"].meets(limit) if kind == "latency" else r[kind] <= limit + 1e-9)]
        if missed:
            parts.append(f"{name}: does not win: {len(missed)} of {len(runs)} runs miss {kind}={limit}; {shown}")
        elif mean >= NOISE[metric]:
            parts.append(f"{name}: wins by {shown}")
        elif mean > -NOISE[metric]:
            parts.append(f"{name}: no measurable win ({shown}, within {scale * NOISE[metric]:g}{unit})")
        else:
            parts.append(f"{name}: does not win: {shown}")
    return "; ".join(parts)


def _table(title: str, result: dict, metric: str, kind: str, limit: float, fmt) -> str:
    rows = result["rows"]
    figure = (lambda r: r["latency"].format()) if kind == "latency" else (lambda r: f"{r[kind]:.3f}")
    met = (lambda r: r["latency"].meets(limit)) if kind == "latency" else (lambda r: r[kind] <= limit + 1e-9)
    column = f"{kind} vs dense" + (" (95% interval)" if kind == "latency" else "")
    table = render_table(title, ("search", metric, column,
                                 f"meets {limit}", "proxy distortion", "proxy measurements", "seconds"),
                         [(r["label"], fmt(r["score"]), figure(r), "yes" if met(r) else "no", f"{r['distortion']:.4g}",
                           r["measured"], f"{r['seconds']:.0f}") for r in rows.values()], markdown=True)
    reference = result["reference"]
    finalists = render_table("compress's finalists (its greedy searches' end states) on the same proxy",
                             ("finalist", metric, "proxy distortion", "cuts"),
                             [(f.strategy, fmt(f.score), f"{reference(s):.4g}", _cuts(f.cuts))
                              for f, s in zip(result["report"].finalists, result["finalists"])], markdown=True)
    cuts = render_table("what each compared model cuts", ("search", "estimated figures", "cuts"),
                        [(r["label"], ", ".join(f"{k} {v:.3f}" for k, v in r.get("estimate", {}).items()
                                                if k in ("latency", "macs")) or "-", _cuts(r["cuts"]))
                         for r in rows.values()], markdown=True)
    return "\n\n".join([table, finalists, cuts, f"**Verdict ({title.split(',')[0]}):** "
                        + _verdict(rows, metric, kind, limit)])


def minilm_section(rounds: int) -> str:
    import minilm

    warnings.filterwarnings("ignore")
    dense, calibration, evaluation, reference, timing = minilm.setup()
    score = lambda m: minilm.fidelity(m, evaluation, reference)  # noqa: E731
    result = compare(dense, calibration, timing, score, {"latency": 0.5}, "linear", rounds, timing, seeds=1)
    return _table("MiniLM, latency=0.5 at batch 8 x 128 tokens", result, "mean cosine", "latency", 0.5,
                  lambda v: f"{v:.3f}")


def digits_section(rounds: int) -> str:
    from pangkas.demo import accuracy

    dense, data = trained_digits()
    score = lambda m: accuracy(m, data.x_test, data.y_test)  # noqa: E731
    result = compare(dense, list(data.x_train.split(64)), data.x_test[:1], score, {"macs": 0.25}, None, rounds, None,
                     seeds=3)
    return _table("digits CNN, macs=0.25, no recovery", result, "accuracy", "macs", 0.25, lambda v: f"{v:.2%}")


SECTIONS = {"minilm": minilm_section, "digits": digits_section}


def main() -> None:
    parser = arguments(__doc__, "compress/evolution.md", rounds=10)
    parser.add_argument("--sections", nargs="*", choices=list(SECTIONS), default=list(SECTIONS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    texts = [SECTIONS[name](args.rounds) for name in args.sections]
    notes = (
        f"Measured with {environment()}. What was compared: `pangkas.compress` (its greedy searches: width+depth, "
        "width, depth and depth-first mixes; each end state built, re-fitted and scored, the best-scoring one chosen) "
        "against an evolutionary search (`pangkas.compress.evolution.Evolution`: population 16, tournament of 2, uniform "
        "crossover per group and block, 1-3 groups shifted by one step, a block toggled with probability 0.3, "
        "children cut at random, weighted by saving, until they meet the budget's estimated figures and then given "
        "back steps while they still do; survivors the best 16 of parents and children) on a `Space` built as "
        "compress builds it and the same proxy (output distortion on 4 calibration batches), stopped after as many "
        "proxy measurements as compress's searches made. (a) starts from 16 random states around uniform ratios; "
        "(b) from compress's finalists (so its total cost is compress's plus its own). Only the evolved state with "
        "the lowest proxy distortion is built (as compress builds a finalist: least-squares re-fit, `replace` as "
        "given to compress) and scored with the same `eval_fn`; compress chose among its finalists by that score, "
        "evolution had no such choice. `proxy distortion` of compress's row: its chosen state measured on the same "
        "proxy. `seconds`: compress, the whole call (searches, scored checkpoints, every finalist built, re-fitted "
        "and timed); evolution, its search plus building and scoring its one state. MiniLM latency: all models "
        "timed against the dense model in the same interleaved rounds (95% interval; meets when its upper end is "
        "within the limit). Seeds: one (0) per search on MiniLM (time), three (0-2) on the digits CNN; the "
        "verdict takes the mean difference over seeds. A difference under 0.005 cosine or 0.5 accuracy points "
        "counts as no measurable win.")
    publish(args.out, "compress: does an evolutionary search over per-layer ratios win?", *texts, notes,
            script="compress_evolution.py" + ("" if len(args.sections) == len(SECTIONS)
                                              else f" --sections {' '.join(args.sections)}"))


if __name__ == "__main__":
    main()
