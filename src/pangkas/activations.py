"""What layers read on calibration data, gathered one way for every criterion that needs it.

Wanda (channel importance and one-shot weight pruning alike) needs each input feature's
``sum x^2`` over all tokens; SparseGPT needs ``X^T X``. Both see a layer's input as the rows of
the matrix its weight multiplies: tokens for Linear and GPT-2's Conv1D, im2col patches for Conv2d.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


def input_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module``'s input ``x`` as float rows of the matrix its weight multiplies."""
    if isinstance(module, nn.Conv2d):
        patches = nn.functional.unfold(x.float(), module.kernel_size, module.dilation, module.padding, module.stride)
        return patches.transpose(1, 2).reshape(-1, patches.shape[1])
    return x.reshape(-1, x.shape[-1]).float()


class InputStatistics:
    """Running statistics of one layer's inputs: per-feature sums of squares (Wanda's
    ``||X_j||^2``) or, with ``gram=True``, ``X^T X`` (SparseGPT's Hessian, up to ``rows``);
    ``constant=True`` appends a feature that is always 1 (what a bias multiplies)."""

    def __init__(self, gram: bool = False, constant: bool = False):
        self.with_gram = gram
        self.constant = constant
        self.squares: torch.Tensor | None = None
        self.gram: torch.Tensor | None = None
        self.rows = 0

    def add(self, module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Add what ``module`` reads in ``x``; returns that part and its row count (see :meth:`add_part`)."""
        rows = input_rows(module, x.detach())
        if self.constant:
            rows = torch.cat([rows, torch.ones(rows.shape[0], 1, dtype=rows.dtype, device=rows.device)], 1)
        part = rows.T @ rows if self.with_gram else rows.pow(2).sum(0)
        self.add_part(part, rows.shape[0])
        return part, rows.shape[0]

    def add_part(self, part: torch.Tensor, rows: int) -> None:
        """Add a part another layer computed from the same input (never written to: it is shared)."""
        if self.with_gram:
            self.gram = part.clone() if self.gram is None else self.gram.add_(part)
        else:
            self.squares = part.clone() if self.squares is None else self.squares.add_(part)
        self.rows += rows

    @property
    def total(self) -> torch.Tensor | None:
        """What was gathered (None: the layer never ran)."""
        return self.gram if self.with_gram else self.squares

    def norms(self) -> torch.Tensor:
        """Each input feature's L2 norm over every row seen (Wanda's ``||X_j||``)."""
        return self.squares.sqrt()

    def reordered(self, order: torch.Tensor) -> InputStatistics:
        """The same statistics with input features in ``order``."""
        other = InputStatistics(self.with_gram, self.constant)
        other.rows = self.rows
        if self.squares is not None:
            other.squares = self.squares[order]
        if self.gram is not None:
            other.gram = self.gram[order][:, order]
        return other


@contextmanager
def recording(layers: dict[str, nn.Module], gram: bool = False,
              constant: bool = False) -> Iterator[dict[str, InputStatistics]]:
    """Statistics of every layer's inputs, by name, for the forward passes run inside the block.
    Layers called one after the other on the same input tensor (a transformer's q/k/v, gate/up)
    share one computation of its statistics."""
    stats = {name: InputStatistics(gram, constant) for name in layers}
    last: list = [None, None, None]  # the input tensor, how it was read (its version too), (part, rows)

    def hook(module, args, name):
        x, how = args[0], (_reading(module), args[0]._version)  # the version: not changed in place since
        if last[0] is x and last[1] == how:
            stats[name].add_part(*last[2])
        else:
            last[:] = x, how, stats[name].add(module, x)

    hooks = [module.register_forward_pre_hook(lambda mod, args, name=name: hook(mod, args, name))
             for name, module in layers.items()]
    try:
        yield stats
    finally:
        last.clear()  # no reference to the last activation outlives the recording
        for hook_ in hooks:
            hook_.remove()


def _reading(module: nn.Module):
    """What decides how ``input_rows`` reads an input: the patch geometry for Conv2d, else nothing."""
    if isinstance(module, nn.Conv2d):
        return module.kernel_size, module.dilation, module.padding, module.stride
    return None


DAMP = 0.01  # ridge term, relative to the mean of the diagonal (SparseGPT's choice)


def damped_(gram: torch.Tensor, damp: float = DAMP) -> torch.Tensor:
    """``gram`` with ``damp`` times its mean diagonal added to the diagonal, in place: a ridge term
    that keeps a rank-deficient least-squares fit (dead or repeated inputs) solvable."""
    gram.diagonal().add_(damp * gram.diagonal().mean().clamp_min(1e-12))
    return gram


class AffineFit:
    """Streamed ridge least squares of an affine residual map, ``y ~ x + x W^T + b``, from the
    rows ``x`` one layer (or run of layers) reads to the rows ``y`` it writes: float64 sums of
    ``[x 1]^T [x 1]`` and ``[x 1]^T (y - x)``, never the activations themselves. The ridge pulls
    ``W, b`` towards zero, so an ill-determined map stays close to doing nothing."""

    def __init__(self):
        self.gram: torch.Tensor | None = None
        self.cross: torch.Tensor | None = None
        self.y_squares = 0.0  # ||Y||^2, the yardstick of ``unexplained``
        self.change_squares = 0.0  # ||Y - X||^2

    def add(self, x: torch.Tensor, y: torch.Tensor, keep: torch.Tensor | None = None) -> None:
        """Rows of ``x`` and ``y`` (features last); ``keep`` (bool, one per row) drops padding."""
        x, y = x.detach().reshape(-1, x.shape[-1]), y.detach().reshape(-1, y.shape[-1])
        if keep is not None:
            x, y = x[keep.reshape(-1)], y[keep.reshape(-1)]
        x, y = x.double(), y.double()
        ones = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)], 1)
        change = y - x
        gram, cross = ones.T @ ones, ones.T @ change
        self.gram = gram if self.gram is None else self.gram + gram
        self.cross = cross if self.cross is None else self.cross + cross
        self.y_squares += float(y.square().sum())
        self.change_squares += float(change.square().sum())

    def solve(self, damp: float = DAMP) -> torch.Tensor:
        """``[W^T; b]`` ((width + 1) x width), the fitted correction."""
        if self.gram is None:
            raise ValueError("no rows were added")
        gram = damped_(self.gram.clone(), damp)
        return torch.cholesky_solve(self.cross, torch.linalg.cholesky(gram))

    def unexplained(self, damp: float = DAMP) -> float:
        """The fraction of ``||Y||^2`` the fitted map leaves: ``||Y - X - [X 1] B||^2 / ||Y||^2``,
        from the sums alone."""
        b = self.solve(damp)
        left = self.change_squares - 2 * float((b * self.cross).sum()) + float((b * (self.gram @ b)).sum())
        return max(left, 0.0) / max(self.y_squares, 1e-30)


def wanda_scores(weight: torch.Tensor, norms: torch.Tensor, input_dim: int) -> torch.Tensor:
    """Wanda (Sun et al. 2023): ``|W_ij| * ||X_j||``, a weight matters as much as what it reads;
    ``norms`` has one entry per index of the weight's ``input_dim``."""
    shape = [1] * weight.ndim
    shape[input_dim] = -1
    return weight.abs() * norms.reshape(shape).to(weight.device)
