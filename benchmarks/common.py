"""What every benchmark table states about where it ran, and what the zoo benchmarks share."""

from __future__ import annotations

import argparse
import copy
import platform
import time
from collections import Counter
from pathlib import Path

import torch

from pangkas import plan_channels
from pangkas.latency_table import cpu_model
from pangkas.measure import min_rounds
from pangkas.oracle import oracle_error
from pangkas.tables import human_count

DOCS = Path(__file__).resolve().parent.parent / "docs"


def environment() -> str:
    return (f"torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu_model()}, "
            f"Python {platform.python_version()}")


def arguments(doc: str, page: str, rounds: int | None = 10) -> argparse.ArgumentParser:
    """The options of a benchmark: ``--out`` (its docs page) and, if it times, ``--rounds``
    (interleaved timing rounds; at least ``min_rounds()``, or a 95% interval is impossible)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    if rounds is not None:
        parser.add_argument("--rounds", type=_timing_rounds, default=rounds)
    parser.add_argument("--out", default=str(DOCS / page))
    return parser


def _timing_rounds(text: str) -> int:
    # Checked here, before any pruning, rather than by latency_ratios after minutes of work.
    if not text.strip().isdigit() or int(text) < min_rounds():
        raise argparse.ArgumentTypeError(f"{text!r}: a 95% interval for a latency ratio needs at least "
                                         f"{min_rounds()} rounds")
    return int(text)


def latency_note(rounds: int) -> str:
    """How the benchmarks' latency ratios are measured and printed, for their notes."""
    return (f"the median of per-round ratios over {rounds} interleaved timing rounds (torch.utils.benchmark, "
            "in one process), with its distribution-free 95% interval; \"no measurable difference\" where "
            "that interval contains 1.0")


def memory(field: str = "VmRSS") -> int:
    """This process's resident memory in bytes now (``VmRSS``) or at its peak (``VmHWM``), from
    /proc. Not ``ru_maxrss``: a child started by fork + exec keeps its parent's high-water mark
    through the exec, so a parent holding a lot would show as the child's peak."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def run_sections(doc: str, folder: str, sections: dict, titles: dict, script: str) -> None:
    """The main of a benchmark with ``--sections``: each section (a function of the timing rounds)
    writes its page ``docs/FOLDER/NAME.md``; threads: 1."""
    parser = arguments(doc, folder, rounds=10)
    parser.add_argument("--sections", nargs="*", choices=list(sections), default=list(sections))
    args = parser.parse_args()
    torch.set_num_threads(1)
    (DOCS / folder).mkdir(exist_ok=True)
    for name in args.sections:
        publish(str(DOCS / folder / f"{name}.md"), titles[name], sections[name](args.rounds),
                script=f"{script} --sections {name}")


def trained_digits():
    """The demo's digits CNN trained for 40 epochs (seed 0), and the digits split."""
    from pangkas.demo import digits_cnn, load_digits_split, train

    torch.manual_seed(0)
    data = load_digits_split()
    dense = digits_cnn()
    train(dense, data, 40)
    return dense, data


def publish(out: str, title: str, *sections: str, script: str) -> None:
    """Print a results document and write it to ``out``: title, sections, how to reproduce."""
    text = "\n\n".join([f"# {title}", *sections, f"Reproduce: `.venv/bin/python benchmarks/{script}`"])
    print(text)
    Path(out).write_text(text + "\n")


# -- the zoo benchmarks (zoo.py, zoo_timm.py): one model pruned at one ratio, checked by the oracle --

ZOO_RATIO = 0.5
ZOO_TOLERANCE = 1e-5
ZOO_COLUMNS = ("model", "result", "params", "params after/before", "MACs", "MACs after/before", "plan+apply s",
               "oracle error", "kept by rule gaps", "surgery retries")


def prune_and_check(model, x) -> dict:
    """Plan + apply on a copy of ``model`` (timed), then the oracle on another copy, in fp64 too
    when the fp32 check fails (an ill-conditioned random network may fail on rounding alone)."""
    make_plan = lambda m: plan_channels(m, x, ratio=ZOO_RATIO)  # noqa: E731
    work = copy.deepcopy(model)
    start = time.perf_counter()
    plan = make_plan(work)
    plan.apply()
    seconds = time.perf_counter() - start
    del work
    error, _ = oracle_error(model, x, make_plan)
    error64 = None if error <= ZOO_TOLERANCE else oracle_error(model, x, make_plan, dtype=torch.float64)[0]  # NaN too
    return {"params": (plan.params_before, plan.params_after), "macs": (plan.macs_before, plan.macs_after),
            "seconds": seconds, "error": error, "error64": error64, "retries": len(plan.retried),
            "gaps": plan.rule_gaps(), "gap_channels": plan.kept_by_rule_gaps(), "kept": plan.blocked()}


def exact(r: dict) -> bool:
    """The oracle holds, in fp32 or, when fp32 rounding alone fails, in fp64."""
    return min(r["error"], r["error64"] if r["error64"] is not None else r["error"]) <= ZOO_TOLERANCE


def status(r: dict) -> str:
    if not exact(r):
        return f"FAIL: oracle error {r['error']:.1e}"
    return "pass" if r["macs"][1] < r["macs"][0] else "nothing pruned"


def result_row(name: str, r: dict) -> tuple:
    """One table row (``ZOO_COLUMNS``) for the result of :func:`prune_and_check`."""
    (p0, p1), (m0, m1) = r["params"], r["macs"]
    error = f"{r['error']:.1e}" + (f" (fp64 {r['error64']:.1e})" if r["error64"] is not None else "")
    return (name, status(r), f"{human_count(p0)} -> {human_count(p1)}", f"{p1 / p0:.2f}",
            f"{human_count(m0)} -> {human_count(m1)}", f"{m1 / m0:.2f}", f"{r['seconds']:.2f}", error,
            gaps_cell(r["gap_channels"], r["gaps"]), r["retries"])


def failure_row(name: str, exc: Exception) -> tuple:
    message = " ".join(str(exc).split())[:120].replace("|", "/")
    return (name, f"FAIL: {type(exc).__name__}: {message}") + ("",) * (len(ZOO_COLUMNS) - 2)


def why_kept_row(name: str, r: dict, reasons: int = 3) -> tuple:
    """Where a model keeps channels: its MACs ratio, every rule gap, and the top reasons of all."""
    gaps = ", ".join(f"{op} {n}" for op, n in r["gaps"].most_common()) or "-"
    kept = "; ".join(f"{_short(why)} [{n}]" for why, n in r["kept"].most_common(reasons))
    return name, f"{r['macs'][1] / r['macs'][0]:.2f}", gaps, kept.replace("|", "/")


def _short(why: str) -> str:
    """A reason kept, in a table cell: the surgery check's boilerplate cut so the cause shows."""
    why = " ".join(why.split()).replace("the pruned model fails here (the model does not run on the example inputs: ",
                                        "fails: (")
    return why if len(why) <= 120 else why[:117] + "..."


def gaps_cell(channels: int, gaps: Counter) -> str:
    """Channels kept by rule gaps, and the op that kept most."""
    if not gaps:
        return "0"
    op, n = gaps.most_common(1)[0]
    return f"{channels} ({op} {n})"
