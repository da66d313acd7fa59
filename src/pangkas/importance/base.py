"""The channel importance protocol: what a criterion is shown, and what it answers."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import PangkasError

Scores = dict[tuple[str, int], torch.Tensor]  # (tensor name, dim) -> one score per position


@dataclass(frozen=True)
class Slice:
    """One dim of one traced tensor of the model: the positions a criterion scores.

    ``name`` is the tensor's state-dict key; ``tensor`` the parameter, detached (None for a
    buffer: nothing to judge); ``module`` the module owning it (for a masked weight, the masked
    module) and ``module_name`` its name; ``size`` the positions along ``dim``.
    """

    name: str
    dim: int
    size: int
    tensor: torch.Tensor | None
    module_name: str
    module: nn.Module | None
    ids: torch.Tensor = None        # the tracer's ids of the positions (internal)
    produced: torch.Tensor = None   # ids of every dim that creates channels (internal)

    @property
    def produces(self) -> bool:
        """Whether this dim creates channels (a layer's outputs) rather than only reading them."""
        return bool(torch.isin(self.ids, self.produced).any())

    @property
    def attribute(self) -> str:
        """The tensor's name inside its module: ``"weight"``, ``"parametrizations.weight.original"``."""
        return self.name[len(self.module_name) + 1:] if self.module_name else self.name

    @property
    def others(self) -> list[int]:
        """The tensor's dims other than ``dim`` (what a per-position score sums over)."""
        return [d for d in range(self.tensor.ndim) if d != self.dim]


class Importance:
    """How much each channel matters (higher = keep), for channel, head and FFN pruning.

    To add a criterion: subclass, set ``name`` (and ``needs_data`` / ``needs_loss`` if it reads
    calibration batches / a loss), implement :meth:`score` (and :meth:`measure` if it needs
    the model's behaviour on data), then ``pangkas.importance.register(MyImportance())`` to use
    it as ``importance="my_name"``, or pass the object itself as ``importance=``.

    A channel's importance sums the scores of every tensor it touches (a conv's filter, the
    BatchNorm entry after it, the next conv's input slice), each made scale-free first.
    """

    name: str = ""
    needs_data: bool = False  # needs data= (calibration batches)
    needs_loss: bool = False  # needs data= and loss_fn=(output, batch) -> loss

    def measure(self, model: nn.Module, data: Iterable | None, loss_fn: Callable | None):
        """What :meth:`score` needs from the model's behaviour (gradients, activation norms),
        computed once before scoring and passed to it as ``measured``. Default: nothing."""
        return None

    def score(self, piece: Slice, measured) -> torch.Tensor | None:
        """One score per position of ``piece`` (``piece.size`` of them), or None when this
        tensor should have no say."""
        raise NotImplementedError(f"{type(self).__name__} must implement score(piece, measured)")

    def scores(self, slices: Iterable[Slice], measured) -> Scores:
        """Scores of every parameter's slices, each divided by its mean so that every tensor
        weighs alike. Override only for scores that are not made slice by slice."""
        result = {}
        for piece in slices:
            if piece.tensor is None:
                continue
            s = self.score(piece, measured)
            if s is None:
                continue
            s = self._checked(piece, s)
            mean = s.mean()
            result[(piece.name, piece.dim)] = s / mean if mean > 0 else s
        return result

    def _checked(self, piece: Slice, s) -> torch.Tensor:
        s = torch.as_tensor(s, dtype=torch.float32)
        if s.shape != (piece.size,):
            raise PangkasError(f"importance={self.name!r} returned shape {tuple(s.shape)} for "
                               f"{piece.name} dim {piece.dim}; expected ({piece.size},)")
        return s

    def __repr__(self) -> str:
        return f"<{type(self).__name__} importance {self.name!r}>"

    def __str__(self) -> str:
        return self.name  # how reports name it: importance=l1


class FromFunction(Importance):
    """A plain ``fn(tensor, dim) -> scores`` as a criterion (the tensor as stored, detached)."""

    def __init__(self, fn: Callable[[torch.Tensor, int], torch.Tensor]):
        self.fn = fn
        self.name = getattr(fn, "__name__", "custom")

    def score(self, piece: Slice, measured) -> torch.Tensor:
        return self.fn(piece.tensor, piece.dim)
