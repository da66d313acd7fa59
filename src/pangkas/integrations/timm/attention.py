"""timm attention modules whose forward sizes things from the input width: whole heads as units.

BEiT's ``Attention``, EVA's ``EvaAttention``, PVT-v2's ``Attention`` and Twins'
``GlobalSubSampleAttn`` (PVT's spatial-reduction attention too) end with ``reshape(B, N, C)``,
``C`` being the input width, so fewer heads cannot run through them. The tracer follows them as
``HeadPrunable`` subclasses (same parameters, same maths) whose forward takes the head count from
``num_heads`` and the output width from the projections; head_dim stays, so the attention scale
(``self.scale``, passed explicitly) stays and removing whole heads is exact. Per-head parameters
go with their head: BEiT's relative-position bias table (a column per head), the q/v biases (rows
of the fused projection), EVA's gate; EVA's rotary embedding rotates pairs inside a head, which
whole heads keep. PVT-v2 and Twins project queries (``q``) and keys/values (``kv``, from a
spatially reduced input) apart; the subclass takes the keys as the first ``q.out_features``
outputs of ``kv`` and the values as the rest, so a single head (PVT-v2's first stage), which
cannot go, may still lose value dims: they reach only the output projection (exact), while its
query/key dims change the scores and stay. A module that loses heads or value dims (or that
timm's forward no longer fits) takes the subclass and learns its new sizes.

maxxvit's ``AttentionCl`` (MaxViT) and ``Attention2d`` (CoAtNet) hold each head's q, k and v side
by side in ``qkv`` (``head_first``; else all q, all k, all v) and add a relative-position bias to
the scores, which timm's fused path passes as an attention mask (a mask the tracer does not
follow). Their subclasses add it to the scores instead: head ``h`` takes its q/k/v rows, its
bias column (``RelPosBias``'s table, ``RelPosMlp``'s last layer), and ``proj``'s columns. Head
size stays, so timm's own forward, which views by ``num_heads`` and ``dim_head``, runs the pruned
module once the fixer sets those and the bias module's ``bias_shape``. Nothing of timm is
imported here until a model already uses it.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import nn

from ...graph.adapter import Heads
from ...surgery import Undo
from ..integration import Subclasses, qualname

BEIT, EVA, PVT_V2 = "timm.models.beit.Attention", "timm.models.eva.EvaAttention", "timm.models.pvt_v2.Attention"
TWINS = "timm.models.twins.GlobalSubSampleAttn"  # PVT's spatial-reduction attention, as Twins-PCPVT has it
MAXXVIT_CL, MAXXVIT_2D = "timm.models.maxxvit.AttentionCl", "timm.models.maxxvit.Attention2d"  # MaxViT, CoAtNet
NAMES = {BEIT: "HeadPrunableBeitAttention", EVA: "HeadPrunableEvaAttention", PVT_V2: "HeadPrunablePvtV2Attention",
         TWINS: "HeadPrunableGlobalSubSampleAttn", MAXXVIT_CL: "HeadPrunableAttentionCl",
         MAXXVIT_2D: "HeadPrunableAttention2d"}
# maxxvit's relative-position modules whose bias is per head along its last dim (``get_bias()``:
# (1, heads, N, N)) and whose only head-count attributes are ``bias_shape`` (and ``num_heads``)
REL_POS = ("timm.layers.pos_embed_rel.RelPosBias", "timm.layers.pos_embed_rel.RelPosMlp")


def _attend(m: nn.Module, q, k, v, bias=None, mask=None, is_causal: bool = False):
    """softmax(q k^T * scale + bias) v, per head, with the module's own (fixed) scale."""
    if bias is None:
        dropout = m.attn_drop.p if m.training else 0.0
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                              is_causal=is_causal, scale=m.scale)
    # the bias is per head: added to the scores, not passed as a mask, so it is cut with the heads
    return m.attn_drop(((q * m.scale) @ k.transpose(-2, -1) + bias).softmax(-1)) @ v


def _fused_qkv(m: nn.Module, x):
    """BEiT's and EVA's fused projection, with its q/k/v biases held apart (k's a zero buffer)."""
    if m.q_bias is None:
        return m.qkv(x)
    bias = torch.cat((m.q_bias, m.k_bias, m.v_bias))
    if m.qkv_bias_separate:
        return m.qkv(x) + bias
    return F.linear(x, m.qkv.weight, bias)


def _heads_of(qkv, batch: int, tokens: int, heads: int):
    """(q, k, v), each (batch, heads, tokens, head_dim), from a fused projection's output."""
    return qkv.reshape(batch, tokens, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)


def _beit_forward(self, x, shared_rel_pos_bias=None):
    batch, tokens, _ = x.shape
    q, k, v = _heads_of(_fused_qkv(self, x), batch, tokens, self.num_heads)
    bias = self._get_rel_pos_bias() if self.relative_position_bias_table is not None else None
    if shared_rel_pos_bias is not None:
        bias = shared_rel_pos_bias if bias is None else bias + shared_rel_pos_bias
    x = _attend(self, q, k, v, bias=bias).transpose(1, 2).reshape(batch, tokens, -1)
    return self.proj_drop(self.proj(x))


def _eva_forward(self, x, rope=None, attn_mask=None, is_causal=False):
    from timm.layers import apply_rot_embed_cat  # timm is in use: the model is made of it

    batch, tokens, _ = x.shape
    gate = self.gate(x).sigmoid() if self.gate is not None else None
    if self.qkv is not None:
        q, k, v = _heads_of(_fused_qkv(self, x), batch, tokens, self.num_heads)
    else:
        q, k, v = (p(x).reshape(batch, tokens, self.num_heads, -1).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
    q, k = self.q_norm(q), self.k_norm(k)
    if rope is not None:  # rotates pairs within each head's dims: whole heads keep them
        npt, half = self.num_prefix_tokens, getattr(self, "rotate_half", False)
        q, k = (torch.cat([t[:, :, :npt], apply_rot_embed_cat(t[:, :, npt:], rope, half=half)], dim=2).type_as(v)
                for t in (q, k))
    x = _attend(self, q, k, v, mask=attn_mask, is_causal=is_causal).transpose(1, 2).reshape(batch, tokens, -1)
    x = self.norm(x)
    if gate is not None:
        x = x * gate
    return self.proj_drop(self.proj(x))


def _by_head(t, heads: int):
    """(..., tokens, heads * size) -> (..., heads, tokens, size)."""
    return t.unflatten(-1, (heads, -1)).transpose(-3, -2)


def _pvt_v2_forward(self, x, feat_size):
    """PVT-v2's (and Twins' global sub-sampled) attention; Twins has no ``pool``/``act``. Keys are
    the first ``q.out_features`` outputs of ``kv`` (a bound that follows the cut), values the rest."""
    batch, tokens, width = x.shape
    q = _by_head(self.q(x), self.num_heads)
    if self.sr is not None:  # spatial reduction: keys and values from a pooled or strided map
        pool, act = getattr(self, "pool", None), getattr(self, "act", None)
        x = x.permute(0, 2, 1).reshape(batch, width, *feat_size)
        x = self.sr(pool(x) if pool is not None else x).flatten(2).transpose(1, 2)
        x = self.norm(x)
        x = act(x) if act is not None else x
    kv, keys = self.kv(x), self.q.out_features
    k, v = _by_head(kv[..., :keys], self.num_heads), _by_head(kv[..., keys:], self.num_heads)
    x = _attend(self, q, k, v).transpose(1, 2).reshape(batch, tokens, -1)
    return self.proj_drop(self.proj(x))


def _maxxvit_bias(self, shared_rel_pos):
    """The scores' per-head bias: the module's relative-position bias, else the one passed in."""
    return self.rel_pos.get_bias() if self.rel_pos is not None else shared_rel_pos


def _maxxvit_cl_forward(self, x, shared_rel_pos=None):
    """maxxvit's channels-last attention over (B, ..., C) tokens. ``head_first``: the projection
    holds each head's q, k and v side by side, else all q, then all k, then all v."""
    restore = x.shape[:-1]
    qkv = self.qkv(x).flatten(1, -2)
    if self.head_first:
        q, k, v = qkv.unflatten(-1, (self.num_heads, -1)).transpose(1, 2).chunk(3, dim=3)
    else:
        q, k, v = qkv.unflatten(-1, (3, self.num_heads, -1)).permute(2, 0, 3, 1, 4).unbind(0)
    x = _attend(self, q, k, v, bias=_maxxvit_bias(self, shared_rel_pos))
    return self.proj_drop(self.proj(x.transpose(1, 2).reshape(restore + (-1,))))


def _maxxvit_2d_forward(self, x, shared_rel_pos=None):
    """maxxvit's attention over (B, C, H, W) maps, each head's dims along channels."""
    batch, _, height, width = x.shape
    qkv = self.qkv(x).flatten(2)
    if self.head_first:
        q, k, v = qkv.unflatten(1, (self.num_heads, -1)).chunk(3, dim=2)
    else:
        q, k, v = qkv.unflatten(1, (3, self.num_heads, -1)).unbind(1)
    x = _attend(self, *(t.transpose(-1, -2) for t in (q, k, v)), bias=_maxxvit_bias(self, shared_rel_pos))
    return self.proj_drop(self.proj(x.transpose(-1, -2).reshape(batch, -1, height, width)))


FORWARDS = {BEIT: _beit_forward, EVA: _eva_forward, PVT_V2: _pvt_v2_forward, TWINS: _pvt_v2_forward,
            MAXXVIT_CL: _maxxvit_cl_forward, MAXXVIT_2D: _maxxvit_2d_forward}


SUBCLASSES = Subclasses(__name__, NAMES, lambda name, base: ((), {
    "forward": FORWARDS[name],
    "__doc__": f"{base.__name__} of {base.__module__} with removable heads (see pangkas.integrations.timm.attention)."}))


def __getattr__(attr: str):  # unpickling a pruned model: make its class
    return SUBCLASSES.find(attr)


def _family(m: nn.Module) -> str | None:
    """The timm class (of ``FORWARDS``) that ``m`` is, or whose subclass of ours it is (a user's
    own subclass runs its own forward, which this module knows nothing about)."""
    name = qualname(m)
    if name in FORWARDS:
        return name
    return SUBCLASSES.base_of(type(m))


def _head_dim(m: nn.Module) -> int:
    """Fixed while heads go: EVA's and PVT-v2's ``head_dim``, else from BEiT's and Twins' scale."""
    return m.head_dim if isinstance(getattr(m, "head_dim", None), int) else round(m.scale ** -2)


def _maxxvit_sizes(m: nn.Module) -> tuple[Heads, int] | None:
    """maxxvit's head counts and input width. Its ``Heads.head_dim`` is the size the projection's
    view into heads shows the tracer: q, k and v of a head together where they sit side by side
    (``head_first``), one of them otherwise. A relative-position module not in ``REL_POS`` leaves
    the module to the rules."""
    if m.rel_pos is not None and qualname(m.rel_pos) not in REL_POS:
        return None
    out, width = m.qkv.weight.shape[:2]  # a Linear or a 1x1 Conv2d
    size = out // 3 if m.num_heads == 1 else m.dim_head
    return Heads(out // (3 * size), out // (3 * size), 3 * size if m.head_first else size), width


def _sizes(m: nn.Module) -> tuple[Heads, int] | None:
    """(the module's head counts, its input width), from its projections' current sizes. A single
    head stays single; only its size may change (see ``attention_modules``)."""
    family = _family(m)
    if family is None:
        return None
    if family in (MAXXVIT_CL, MAXXVIT_2D):
        return _maxxvit_sizes(m)
    if family in (PVT_V2, TWINS):  # keys as wide as queries; values may be narrower
        head_dim = m.q.out_features if m.num_heads == 1 else _head_dim(m)
        heads = m.q.out_features // head_dim
        return Heads(heads, heads, head_dim, fused=True), m.q.in_features
    if m.qkv is not None:
        q = kv = m.qkv.out_features // 3
        width = m.qkv.in_features
    else:
        q, kv, width = m.q_proj.out_features, m.k_proj.out_features, m.q_proj.in_features
    head_dim = q if m.num_heads == 1 else _head_dim(m)
    return Heads(q // head_dim, kv // head_dim, head_dim), width


def attention_modules(model: nn.Module) -> dict[str, Heads]:
    """These families' attention modules by name: those with several heads, and PVT-v2's and
    Twins' with one too (their key/value slices must follow the cut). A single BEiT or EVA head is
    left to the rules: its dims count as approximate (they change the scores), so they go only
    where approximation is allowed (the fixer then sets its ``head_dim``; the scale stays)."""
    if not any(base.rpartition(".")[0] in sys.modules for base in FORWARDS):
        return {}
    return {name: sizes[0] for name, m in model.named_modules()
            if (sizes := _sizes(m)) is not None and (sizes[0].heads > 1 or sizes[0].fused)}


def _runs_as_timm(m: nn.Module, heads: Heads, width: int) -> bool:
    """Whether timm's own forward still fits ``m``: its heads span its input width (and the
    reduced input and the keys and values keep it), and its head size is the one its scale was
    made for. maxxvit's sizes follow ``num_heads`` and ``dim_head`` (which the fixer sets); only
    its fused path's default scale follows the head size."""
    if _family(m) in (MAXXVIT_CL, MAXXVIT_2D):
        return round(m.scale ** -2) == heads.head_dim // (3 if m.head_first else 1)
    reduced, kv = getattr(m, "sr", None), getattr(m, "kv", None)
    return (heads.heads * heads.head_dim == width and round(m.scale ** -2) == heads.head_dim
            and (reduced is None or reduced.out_channels == width)
            and (kv is None or kv.out_features == 2 * width))


def _fit_k_bias(m: nn.Module, undo: Undo) -> None:
    """BEiT's and EVA's key bias is a zero buffer kept out of the state dict, so loading a pruned
    model cannot say its size: it follows the query bias (a pruning cut it already)."""
    k_bias, q_bias = getattr(m, "k_bias", None), getattr(m, "q_bias", None)
    if k_bias is not None and q_bias is not None and k_bias.shape != q_bias.shape:
        undo.tensors.append((k_bias, k_bias.data))
        k_bias.data = k_bias.data[:q_bias.shape[0]].clone()


def _attributes(m: nn.Module, heads: Heads, width: int) -> dict[str, int]:
    """The size attributes ``m`` has, with the values its projections now give."""
    if _family(m) in (MAXXVIT_CL, MAXXVIT_2D):  # dim_head: one of q, k, v of a head
        return {"num_heads": heads.heads, "dim_head": heads.head_dim // (3 if m.head_first else 1)}
    wanted = {"num_heads": heads.heads, "dim": width, "head_dim": heads.head_dim}
    return {k: v for k, v in wanted.items() if isinstance(getattr(m, k, None), int)}  # those it has


def _fit_rel_pos(rel_pos: nn.Module | None, heads: int, undo: Undo) -> None:
    """A maxxvit relative-position module whose table (or MLP) lost heads: its bias views and
    counts follow."""
    if rel_pos is None or qualname(rel_pos) not in REL_POS or rel_pos.bias_shape[-1] == heads:
        return
    undo.remember(rel_pos, ("bias_shape", "num_heads"))
    rel_pos.bias_shape = (*rel_pos.bias_shape[:-1], heads)
    if hasattr(rel_pos, "num_heads"):
        rel_pos.num_heads = heads


def fix_heads(model: nn.Module, undo: Undo) -> None:
    """Surgery fixer: a module's size attributes follow its projections (head count; a single
    head's size; PVT-v2's input width), and one that timm's forward no longer fits takes the
    head-prunable subclass."""
    for m in model.modules():
        found = _sizes(m)
        if found is None:
            continue
        heads, width = found
        _fit_k_bias(m, undo)
        wanted = _attributes(m, heads, width)
        needs_subclass = not _runs_as_timm(m, heads, width) and type(m).__module__ != __name__
        _fit_rel_pos(getattr(m, "rel_pos", None), heads.heads, undo)
        if all(getattr(m, k) == v for k, v in wanted.items()) and not needs_subclass:
            continue
        undo.remember(m, ("__class__", *wanted))
        for k, v in wanted.items():
            setattr(m, k, v)
        if needs_subclass:
            m.__class__ = SUBCLASSES(_family(m))


TRACED_AS = SUBCLASSES.traced_as()
