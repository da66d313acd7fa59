"""The compress search: NetAdapt-style greedy with lazy re-scoring.

From the current state, every allowed move (one more step off a channel group, or a block
removed) is scored by the distortion it adds per unit of budget it saves, in the budget kind that
is furthest from its limit. The best move is taken, until the budget is met. Scores are re-measured
lazily: the best-looking move is measured again at the current state before it is taken; if it
no longer looks best it goes back in the queue (a move's score measured at an earlier state is
kept as its estimate meanwhile, as cuts usually hurt more, not less, once others are made). So
each step costs a few measurements instead of one per move, and every move taken was judged on the
model as it then was.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from dataclasses import dataclass

from .budget import Budget
from .space import Move, Space, State


@dataclass(frozen=True)
class Step:
    """A state the search reached: the move that led there, its distortion, its figures."""

    move: Move | None
    state: State
    distortion: float
    figures: dict[str, float]


class Scorer:
    """Distortion of states (measured on the silenced model), each state measured once."""

    def __init__(self, space: Space, distortion: Callable[[], float]):
        self.space, self.distortion = space, distortion
        self.cache: dict[State, float] = {}
        self.measured = 0

    def __call__(self, state: State) -> float:
        state = self.space.effective(state)
        if state not in self.cache:
            with self.space.silenced(state):
                self.cache[state] = self.distortion()
            self.measured += 1
        return self.cache[state]

    def forget(self) -> None:
        """The model's weights changed: every state is measured afresh."""
        self.cache.clear()


def greedy(space: Space, budget: Budget, score: Scorer, kinds: tuple[str, ...], start: Step,
           on_step: Callable[[Step], None] = lambda step: None) -> list[Step]:
    """Moves of ``kinds`` from ``start`` until ``budget`` is met or no move saves anything more:
    the steps taken (the last meets the budget unless the kinds cannot reach it)."""
    steps, current = [], start
    counter = itertools.count()  # ties go by insertion order (deterministic)
    version = 0
    queue: list[tuple[float, int, int, Move]] = []

    def judge(move: Move) -> tuple[float, State, dict] | None:
        """(distortion added per budget saved, next state, its figures), None if it saves nothing."""
        state = space.after(current.state, move)
        figures = space.figures(state)
        kind = budget.binding(current.figures)
        saved = current.figures[kind] - figures[kind]
        if saved <= 0:
            return None
        return (score(state) - current.distortion) / saved, state, figures

    for move in space.moves(current.state, kinds):
        judged = judge(move)
        if judged is not None:
            heapq.heappush(queue, (judged[0], next(counter), version, move))
    while not budget.met(current.figures):
        if not queue:
            break
        _, _, measured_at, move = heapq.heappop(queue)
        if not space.allowed(current.state, move):
            continue
        judged = judge(move)
        if judged is None:
            continue
        priority, state, figures = judged
        if measured_at != version and queue and priority > queue[0][0]:
            heapq.heappush(queue, (priority, next(counter), version, move))  # no longer the best
            continue
        current = Step(move, state, score(state), figures)
        version += 1
        steps.append(current)
        on_step(current)
        if space.allowed(current.state, move):  # a group's next step: scored as before until measured
            heapq.heappush(queue, (priority, next(counter), -1, move))
    return steps
