"""Short fine-tunes between search rounds (NetAdapt's short-term fine-tune).

With ``recover_rounds=R``, each search stops R times on its way to the budget (at evenly spread
shares of its gap) and fine-tunes the model as cut so far, distilling from the dense model, so
that the cuts after it are judged on weights that have adapted to the cuts before. The search
then runs on its own copy of the model (training changes weights the user gave). The fine-tune
runs on the silenced model with the silenced weights held at zero (their gradients masked), so
that the silenced model still computes exactly what the pruned one would; afterwards those
weights get their old values back, as if nothing but the kept weights had been trained.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

from ..distortion import _output
from ..recover import recover
from .budget import Budget
from .space import Space, State


def objective(model: nn.Module, batch) -> str:
    """What ``recover`` distils with for ``model``: KL on logits (and class scores), else MSE."""
    y, logits = _output(model, batch)
    return "kd" if logits or y.ndim == 2 else "mse"


def stages(budget: Budget, figures: dict[str, float], rounds: int) -> list[Budget]:
    """``rounds`` intermediate budgets between ``figures`` (where a search starts) and ``budget``,
    evenly spread over each limit's gap, then ``budget`` itself."""
    parts = rounds + 1
    return [Budget({kind: limit + max(0.0, figures[kind] - limit) * (1 - r / parts)
                    for kind, limit in budget.limits.items()}, budget.asked) for r in range(1, parts)] + [budget]


class RoundRecovery:
    """Fine-tunes ``space.model`` (a copy of ``dense``) for ``steps`` batches of ``batches`` as a
    state cuts it; ``reset()`` puts the dense weights back (each search starts from them)."""

    def __init__(self, dense: nn.Module, space: Space, forget, batches: list, steps: int, rounds: int):
        self.dense, self.space, self.forget = dense, space, forget
        self.batches, self.steps, self.rounds = batches, steps, rounds
        self.objective = objective(dense, batches[0])
        self.reset()

    def reset(self) -> None:
        self.space.model.load_state_dict(self.dense.state_dict())
        self.stream = itertools.cycle(self.batches)
        self._changed()

    def _changed(self) -> None:
        self.space.forget()
        self.forget()

    def __call__(self, state: State) -> None:
        model = self.space.model
        was_training = model.training
        with self.space.silenced(state) as saved:
            tensors = list({id(t): t for t, _ in saved}.values())
            frozen = [t == 0 for t in tensors]  # what silencing zeroed (and zeros already there)
            hooks = [t.register_hook(lambda g, m=m: g.masked_fill(m, 0.0))
                     for t, m in zip(tensors, frozen) if t.requires_grad]
            try:
                recover(model, list(itertools.islice(self.stream, self.steps)), teacher=self.dense,
                        objective=self.objective)
            finally:
                for hook in hooks:
                    hook.remove()
            trained = [t.detach().clone() for t in tensors]
        with torch.no_grad():  # silencing put the old values back everywhere: keep the trained ones
            for t, m, new in zip(tensors, frozen, trained):
                t.copy_(torch.where(m, t, new))
        model.train(was_training)
        self._changed()
