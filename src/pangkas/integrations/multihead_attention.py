"""``torch.nn.MultiheadAttention`` (torchvision's ViT, many custom models): whole heads as units.

Its forward derives ``head_dim = embed_dim // num_heads`` from the input width, so fewer heads
of the same size cannot run through it. The tracer therefore follows it as ``HeadPrunable``, a
subclass with the same parameters and maths whose forward takes the head count from its
projection and keeps ``head_dim``; a module that loses heads keeps that class. Inputs it does
not cover (separate q/k/v weights, ``bias_k``, ``add_zero_attn``, per-head 3-D masks) run
through the original forward, which the tracer cannot see into, so its channels stay.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import PangkasError
from ..graph.adapter import Heads
from ..surgery import Undo
from .integration import Integration


class HeadPrunable(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` whose heads may have been removed (see the module docstring)."""

    def _covers(self, attn_mask) -> bool:
        return (self._qkv_same_embed_dim and self.bias_k is None and not self.add_zero_attn
                and (attn_mask is None or attn_mask.dim() == 2))

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if not self._covers(attn_mask):
            if self.in_proj_weight is not None and self.in_proj_weight.shape[0] != 3 * self.embed_dim:
                raise PangkasError("this attention was pruned (its heads no longer span its input "
                                   "width); it takes no per-head (3-D) masks")
            return super().forward(query, key, value, key_padding_mask=key_padding_mask,
                                   need_weights=need_weights, attn_mask=attn_mask,
                                   average_attn_weights=average_attn_weights, is_causal=is_causal)
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = (t.unsqueeze(1) for t in (query, key, value))
            key_padding_mask = key_padding_mask.unsqueeze(0) if key_padding_mask is not None else None
        if not self.batch_first or unbatched:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        q, k, v = self._project(query, key, value)
        out, weights = self._attend(q, k, v, _additive(attn_mask, key_padding_mask, q.dtype),
                                    need_weights, is_causal)
        out = self.out_proj(out.transpose(1, 2).flatten(2))
        if not self.batch_first or unbatched:
            out = out.transpose(0, 1)
        if weights is not None and average_attn_weights:
            weights = weights.mean(1)
        if unbatched:
            out = out.squeeze(1)
            weights = weights.squeeze(0) if weights is not None else None
        return out, weights

    def _attend(self, q, k, v, mask, need_weights: bool, is_causal: bool):
        """Each head's output, and its attention weights if asked for (then unfused, to have them)."""
        dropout = self.dropout if self.training else 0.0
        if not need_weights:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                                  is_causal=is_causal and mask is None), None
        scores = q @ k.transpose(-2, -1) * self.head_dim ** -0.5
        if mask is not None:
            scores = scores + mask
        elif is_causal:
            scores = scores.masked_fill(_causal(scores), float("-inf"))
        weights = F.dropout(scores.softmax(-1), dropout, self.training)
        return weights @ v, weights

    def _project(self, query, key, value):
        """(batch, heads, length, head_dim) queries, keys and values."""
        weights = self.in_proj_weight.chunk(3)
        biases = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None,) * 3
        return [F.linear(x, w, b).unflatten(-1, (-1, self.head_dim)).transpose(1, 2)
                for x, w, b in zip((query, key, value), weights, biases)]


def _additive(attn_mask, key_padding_mask, dtype):
    """One float mask to add to the scores (True in a bool mask: may not attend)."""
    def additive(mask):
        if mask is None or mask.dtype != torch.bool:
            return mask.to(dtype) if mask is not None else None
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))

    attn, padding = additive(attn_mask), additive(key_padding_mask)
    if padding is not None:
        padding = padding[:, None, None, :]
        return padding if attn is None else attn + padding
    return attn


def _causal(scores):
    return torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).triu(1)


def attention_modules(model: nn.Module) -> dict[str, Heads]:
    found = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.MultiheadAttention) and m._qkv_same_embed_dim:
            heads = m.in_proj_weight.shape[0] // (3 * m.head_dim)
            found[name] = Heads(heads, heads, m.head_dim)
    return found


def _update_sizes(m: nn.MultiheadAttention, original: dict) -> None:
    """Surgery updater: the widths follow the projections; head_dim stays (heads go whole)."""
    if m.in_proj_weight is not None:
        m.embed_dim = m.in_proj_weight.shape[1]
    elif m.q_proj_weight is not None:
        m.embed_dim = m.q_proj_weight.shape[1]
    m.kdim = m.embed_dim if m._qkv_same_embed_dim else m.k_proj_weight.shape[1]
    m.vdim = m.embed_dim if m._qkv_same_embed_dim else m.v_proj_weight.shape[1]


def _fix_heads(model: nn.Module, undo: Undo) -> None:
    """Surgery fixer: the head count follows the projection; fewer heads need ``HeadPrunable``."""
    for m in model.modules():
        if not isinstance(m, nn.MultiheadAttention) or not m._qkv_same_embed_dim:
            continue
        heads = m.in_proj_weight.shape[0] // (3 * m.head_dim)
        if heads != m.num_heads or (heads * m.head_dim != m.embed_dim and type(m) is nn.MultiheadAttention):
            undo.remember(m, ("__class__", "num_heads"))
            m.num_heads = heads
            if type(m) is nn.MultiheadAttention:
                m.__class__ = HeadPrunable


INTEGRATION = Integration(
    name="multihead_attention",
    attention=attention_modules,
    traced_as={nn.MultiheadAttention: HeadPrunable},
    updaters={nn.MultiheadAttention: _update_sizes},
    fixers=(_fix_heads,),
)
