"""Channel identities: every position of every prunable dimension carries an integer id.

Each parameter and buffer dimension gets fresh ids; tensors computed from them carry *axes*, an
axis being some dims of the tensor with an id array over those dims (several dims when a reshape
merged or split channels, e.g. ``(heads, head_dim)``). Ops that tie positions together (a residual
add, a conv reading its input's channels) record a *union* of ids; ops that cannot survive the
removal of channels record a *block*. After tracing, union-find turns ids into *classes*: sets of
positions that must be removed together. Id 0 is FIXED: a class joined to it can never be removed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FIXED = 0


@dataclass(frozen=True)
class Axis:
    """Ids over some dims of a tensor: ``ids.shape == tuple(tensor.shape[d] for d in dims)``."""

    dims: tuple[int, ...]
    ids: torch.Tensor

    def over(self, dims: tuple[int, ...], sizes: dict[int, int]) -> torch.Tensor:
        """This axis's ids broadcast to ``dims`` (a superset of ``self.dims``, sorted)."""
        shape = [sizes[d] if d in self.dims else 1 for d in dims]
        return self.ids.reshape(shape).expand([sizes[d] for d in dims])

    def moved(self, mapping: dict[int, int]) -> "Axis":
        """The axis after dims are renumbered by ``mapping`` (old -> new); ids follow the new order."""
        new = [mapping[d] for d in self.dims]
        order = sorted(range(len(new)), key=new.__getitem__)
        return Axis(tuple(new[i] for i in order), self.ids.permute(order) if len(order) > 1 else self.ids)


@dataclass(frozen=True)
class Partition:
    """Positions split into rows (a grouped convolution's groups, GroupNorm's groups) of which
    every row must keep the same *number*; which ones may differ per row. ``rows`` holds the ids
    (groups, n). ``per_row``: ids of a weight dim whose position i stands, in the weight's
    row-block g, for the channel ``rows[g, i]`` (a grouped conv's input dim), or None.

    Where selection cannot keep counts per row (a class spanning rows, a row partly fixed, two
    different partitions of the same channels), the partition falls back to :meth:`ties`:
    every row keeps the same offsets, which is always valid."""

    rows: torch.Tensor
    why: str
    per_row: torch.Tensor | None = None

    def ties(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(left, right) unions joining offset i of every row (and of ``per_row``)."""
        first = self.rows[:1].expand_as(self.rows[1:])
        left, right = [first.reshape(-1)], [self.rows[1:].reshape(-1)]
        if self.per_row is not None:
            left.append(self.rows[0])
            right.append(self.per_row)
        return torch.cat(left), torch.cat(right)


Labels = tuple  # tuple[Axis, ...] with disjoint dims; () when the tensor carries no channel ids


def components(num_ids: int, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """Connected components of ids ``0..num_ids-1`` joined pairwise by ``left[i] == right[i]``:
    returns each id's representative, the smallest id in its component (so FIXED stays 0)."""
    # int32 where ids fit: a large model has tens of millions of ids, and int32 gathers take
    # half the memory and about half the time
    dtype = torch.int32 if num_ids < 2 ** 31 else torch.long
    parent = torch.arange(num_ids, dtype=dtype)
    left, right = left.to(dtype), right.to(dtype)
    while left.numel():
        a, b = parent.index_select(0, left), parent.index_select(0, right)  # roots: parent is fully jumped
        differ = a != b
        count = int(differ.sum())
        if count == 0:
            break
        if count < differ.numel() // 2:  # pairs already joined stay joined: stop looking at them
            left, right, a, b = left[differ], right[differ], a[differ], b[differ]
        low = torch.minimum(a, b)
        parent.scatter_reduce_(0, a.long(), low, "amin")
        parent.scatter_reduce_(0, b.long(), low, "amin")
        while True:  # pointer jumping: every id points straight at its root
            jumped = parent.index_select(0, parent)
            if torch.equal(jumped, parent):
                break
            parent = jumped
    return parent.long()
