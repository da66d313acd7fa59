"""``importance="angular"``: the contiguous run of blocks whose ends are closest."""

from __future__ import annotations

import math

from ..errors import PangkasError
from ..progress import track
from .base import Candidate, LayerImportance
from .states import cosine, hidden_states


def runs(candidates: list[Candidate], n: int) -> list[list[Candidate]]:
    """Contiguous runs of ``n`` candidates: consecutive indices in one container."""
    found = []
    for i in range(len(candidates) - n + 1):
        run = candidates[i:i + n]
        if run[0].container is not None and all(
                c.container == run[0].container and c.index == run[0].index + k for k, c in enumerate(run)):
            found.append(run)
    return found


def angular(model, candidates, data, n: int) -> dict[tuple[str, ...], float]:
    """Angular distance arccos(cos)/pi between the input of a run's first block and the output
    of its last (Gromov et al. 2024): low = the whole run could go."""
    options = runs(candidates, n)
    if not options:
        raise PangkasError(f"importance='angular' needs {n} consecutive blocks in one container; none found")
    total = {tuple(c.name for c in run): 0.0 for run in options}
    batches = 0
    for batch, states in hidden_states(model, candidates, data):
        for run in options:
            cos = float(cosine(states[run[0].name][0], states[run[-1].name][1], batch))
            total[tuple(c.name for c in run)] += math.acos(max(-1.0, min(1.0, cos))) / math.pi
        batches += 1
    return {key: s / batches for key, s in total.items()}


class Angular(LayerImportance):
    """Scores a run by its first block; removes the closest run of ``n``, not the ``n`` lowest."""

    name = "angular"

    def choose(self, model, candidates, data, n, *, loss_fn=None, metric_fn=None):
        by_run = angular(model, candidates, track(data, "scoring runs"), n)
        best = min(by_run, key=by_run.get)
        return {run[0]: d for run, d in by_run.items()}, list(best)
