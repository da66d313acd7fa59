"""timm attentions whose heads are gated, mixed, factorised or attend over channels: whole heads as units.

timm's code for these classes sizes its heads as ``C // num_heads`` with ``C`` the *input* width,
so fewer heads cannot run through it. The tracer follows each as a subclass (same parameters,
same maths) whose forward takes the head count from ``num_heads`` and the head size from its
projections; a module that loses heads takes that class and its new ``num_heads``. Per class,
why removing head ``h`` (with ``proj``'s input columns of head ``h``, which the oracle zeroes)
is exact:

- ConViT ``GPSA``: ``attn_h = norm((1 - g_h) softmax(q_h k_h^T s) + g_h softmax(pos_proj_h(r)))``
  with ``g_h = sigmoid(gating_param[h])``; ``out_h = attn_h v_h``. Every term is per head, so head
  ``h`` takes q/k/v rows, ``gating_param[h]`` and ``pos_proj`` row ``h`` with it. ``MHSA``: plain
  multi-head attention. ``s`` is a constant attribute; whole heads keep ``head_dim`` anyway.
- CaiT ``TalkingHeadAttn``: ``S_h = s q_h k_h^T``, ``L = proj_l(S)`` over heads, ``P = softmax(L)``
  per mixed head, ``A = proj_w(P)``, ``out_h = A_h v_h``. Head ``h``'s scores reach ``L`` only
  through ``proj_l``'s input column ``h`` (a linear read: removing it is exact, like any input
  channel), and ``A_h`` (``proj_w``'s output row ``h``) is read only by ``out_h``. So a head's
  q, k, v rows, ``proj_l``'s column and ``proj_w``'s row go together, exactly. The mixed heads
  (``proj_l``'s rows, ``proj_w``'s columns) are a hidden width of their own that the trace already
  follows (softmax runs along tokens, per mixed head). ``ClassAttn``: the class token's
  multi-head attention (its default scale follows ``head_dim``, which whole heads keep).
- XCiT ``XCA``: per head ``A_h = softmax(t_h q^_h k^_h^T)`` over the head's channels (``q^``, ``k^``:
  q, k normalised along tokens; ``t_h = temperature[h]``), ``out_h = A_h v_h``: head ``h``'s rows
  and ``temperature[h]`` go together. Dims *within* a head are not free: the softmax runs across
  k's (and v's) channels of the head. EdgeNeXt's ``CrossCovarianceAttn`` is the same maths
  (timm's code without a fused path), with the same per-head ``temperature``.
- CoaT ``FactorAttnConvRelPosEnc``: per head ``out_h = s q_h (softmax_N(k_h)^T v_h) + q_h * conv(v_h)``
  (softmax along tokens, ``conv`` its ``crpe``: depthwise, so per channel). Every product stays
  within head ``h``; ``s`` is a constant attribute. The ``crpe`` a stage's blocks share splits v
  by its ``channel_splits`` (windows over groups of heads), which follow the cut (``splits``), so
  those blocks lose the same heads.

Dims within heads where the maths would allow them (GPSA/MHSA/TalkingHeadAttn q-k pairs with
their constant scale, any v dim; XCA's q dims, each the row of ``A_h`` one output channel reads)
need per-head equal counts over (heads, head_dim) the trace does not yet carry: whole heads only.
timm is imported only when a model already uses it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...graph.adapter import Heads
from ...surgery import Undo
from ..integration import Subclasses

CONVIT, CAIT, XCIT = "timm.models.convit", "timm.models.cait", "timm.models.xcit"
EDGENEXT, COAT = "timm.models.edgenext", "timm.models.coat"


# -- the forwards (timm's maths, head size from the projections) ----------------------------------

def _heads_of(t: torch.Tensor, heads: int, parts: int = 1) -> torch.Tensor:
    """(B, N, parts * heads * head_dim) -> (parts, B, heads, N, head_dim), or without ``parts``."""
    if parts == 1:
        return t.unflatten(-1, (heads, -1)).transpose(1, 2)
    return t.unflatten(-1, (parts, heads, -1)).permute(2, 0, 3, 1, 4)


def _gpsa_attention(self, x):
    q, k = _heads_of(self.qk(x), self.num_heads, 2).unbind(0)
    pos_score = self.pos_proj(self.rel_indices.expand(x.shape[0], -1, -1, -1)).permute(0, 3, 1, 2)
    patch_score = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
    gating = torch.sigmoid(self.gating_param.view(1, -1, 1, 1))
    attn = (1.0 - gating) * patch_score + gating * pos_score.softmax(dim=-1)
    attn = attn / attn.sum(dim=-1).unsqueeze(-1)
    return self.attn_drop(attn)


def _gpsa_forward(self, x):
    n = x.shape[1]
    if self.rel_indices is None or self.rel_indices.shape[1] != n:
        self.rel_indices = self.get_rel_indices(n)
    out = self.get_attention(x) @ _heads_of(self.v(x), self.num_heads)
    return self.proj_drop(self.proj(out.transpose(1, 2).flatten(2)))


def _mhsa_forward(self, x):
    q, k, v = _heads_of(self.qkv(x), self.num_heads, 3).unbind(0)
    attn = self.attn_drop(((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1))
    return self.proj_drop(self.proj((attn @ v).transpose(1, 2).flatten(2)))


def _talking_heads_forward(self, x):
    q, k, v = _heads_of(self.qkv(x), self.num_heads, 3).unbind(0)
    attn = (q * self.scale) @ k.transpose(-2, -1)
    attn = self.proj_l(attn.permute(0, 2, 3, 1)).permute(0, 3, 1, 2).softmax(dim=-1)
    attn = self.attn_drop(self.proj_w(attn.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))
    return self.proj_drop(self.proj((attn @ v).transpose(1, 2).flatten(2)))


def _class_attn_forward(self, x):
    q = _heads_of(self.q(x[:, 0]).unsqueeze(1), self.num_heads)
    k, v = _heads_of(self.k(x), self.num_heads), _heads_of(self.v(x), self.num_heads)
    if self.fused_attn:
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0)
    else:
        out = self.attn_drop(((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)) @ v
    return self.proj_drop(self.proj(out.transpose(1, 2).flatten(2)))


def _xca_forward(self, x):
    # (B, heads, head_dim, N): attention runs over each head's channels
    q, k, v = _heads_of(self.qkv(x), self.num_heads, 3).transpose(-2, -1).unbind(0)
    q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    if getattr(self, "fused_attn", False):  # EdgeNeXt's has no fused path
        out = F.scaled_dot_product_attention(q * self.temperature, k, v, scale=1.0)
    else:
        out = self.attn_drop(((q @ k.transpose(-2, -1)) * self.temperature).softmax(dim=-1)) @ v
    return self.proj_drop(self.proj(out.permute(0, 3, 1, 2).flatten(2)))


def _factor_attn_forward(self, x, size):
    q, k, v = _heads_of(self.qkv(x), self.num_heads, 3).unbind(0)
    factor_att = q @ (k.softmax(dim=2).transpose(-1, -2) @ v)  # softmax along tokens
    out = self.scale * factor_att + self.crpe(q, v, size=size)
    return self.proj_drop(self.proj(out.transpose(1, 2).flatten(2)))


# -- which classes, their head counts ------------------------------------------------------------

def _scaled_head_dim(m: nn.Module) -> int:
    return round(m.scale ** -2)


@dataclass(frozen=True)
class Kind:
    """One family class: its subclass's methods, and from a module's current tensors its head
    count, head size and input width; ``shared``: a submodule the module gets its heads viewed
    by that may be registered (hence traced) under another name."""

    methods: dict
    heads: Callable[[nn.Module], int]
    head_dim: Callable[[nn.Module], int]
    width: Callable[[nn.Module], int]
    shared: Callable[[nn.Module], nn.Module | None] = lambda m: None


FAMILY = {  # "module.Class" -> Kind
    f"{CONVIT}.GPSA": Kind({"forward": _gpsa_forward, "get_attention": _gpsa_attention},
                           lambda m: m.gating_param.shape[0], _scaled_head_dim, lambda m: m.qk.in_features),
    f"{CONVIT}.MHSA": Kind({"forward": _mhsa_forward}, lambda m: m.qkv.out_features // (3 * _scaled_head_dim(m)),
                           _scaled_head_dim, lambda m: m.qkv.in_features),
    f"{CAIT}.TalkingHeadAttn": Kind({"forward": _talking_heads_forward}, lambda m: m.proj_l.in_features,
                                    _scaled_head_dim, lambda m: m.qkv.in_features),
    f"{CAIT}.ClassAttn": Kind({"forward": _class_attn_forward}, lambda m: m.q.out_features // _scaled_head_dim(m),
                              _scaled_head_dim, lambda m: m.q.in_features),
    f"{XCIT}.XCA": Kind({"forward": _xca_forward}, lambda m: m.temperature.shape[0],
                        lambda m: m.qkv.out_features // (3 * m.temperature.shape[0]), lambda m: m.qkv.in_features),
    f"{EDGENEXT}.CrossCovarianceAttn": Kind({"forward": _xca_forward}, lambda m: m.temperature.shape[0],
                                            lambda m: m.qkv.out_features // (3 * m.temperature.shape[0]),
                                            lambda m: m.qkv.in_features),
    f"{COAT}.FactorAttnConvRelPosEnc": Kind({"forward": _factor_attn_forward},
                                            lambda m: m.qkv.out_features // (3 * _scaled_head_dim(m)),
                                            _scaled_head_dim, lambda m: m.qkv.in_features, lambda m: m.crpe),
}


def kind(m: nn.Module) -> Kind | None:
    """``m``'s family class (also once it became its subclass), or None."""
    base = _base(m)
    return FAMILY[base] if base else None


def _base(m: nn.Module) -> str | None:
    """The family class ``m`` is (or was, before it became its subclass), as "module.Class"."""
    return next((name for c in type(m).__mro__ if (name := f"{c.__module__}.{c.__qualname__}") in FAMILY), None)


SUBCLASSES = Subclasses(__name__, {name: f"HeadPrunable{name.rpartition('.')[2]}" for name in FAMILY},
                        lambda name, base: ((), FAMILY[name].methods))


def __getattr__(attr: str):  # unpickling a pruned model: make its class
    return SUBCLASSES.find(attr)


def attention_modules(model: nn.Module) -> dict[str, Heads]:
    """The family's modules by name, with their head counts; a shared submodule (CoaT's ``crpe``,
    traced under the name it is first registered by, outside the attention) with its user's, so
    that its views keep the same whole heads."""
    names = {id(m): name for name, m in model.named_modules()}
    found = {}
    for name, m in model.named_modules():
        k = kind(m)
        if k is not None:
            found[name] = Heads(k.heads(m), k.heads(m), k.head_dim(m))
            if (shared := k.shared(m)) is not None and id(shared) in names:
                found.setdefault(names[id(shared)], found[name])
    return found


def fix_mixing_heads(model: nn.Module, undo: Undo) -> None:
    """Surgery fixer: a module that lost heads (or whose input width no longer spans its heads)
    counts its heads and takes its subclass."""
    for m in model.modules():
        k = kind(m)
        if k is None or (k.heads(m) == m.num_heads and k.width(m) == m.num_heads * k.head_dim(m)):
            continue
        undo.remember(m, ("__class__", "num_heads"))
        m.num_heads = k.heads(m)
        m.__class__ = SUBCLASSES(_base(m))


TRACED_AS = SUBCLASSES.traced_as()
