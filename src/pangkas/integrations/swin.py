"""torchvision's Swin (V1 and V2) window attention: whole heads as units.

torchvision's ``shifted_window_attention`` derives ``head_dim = C // num_heads`` from the input
width, so fewer heads of the same size cannot run through it. The tracer follows these modules
as subclasses (same parameters, same maths) whose forward takes the head size from the qkv
projection and the head count from the module; a module that loses heads keeps that class and
its relative-position bias (V1's table, V2's bias MLP and logit scale) loses the same heads.
torchvision is imported only when a model already uses it.
"""

from __future__ import annotations

import math
import sys

import torch
import torch.nn.functional as F
from torch import nn

from ..graph.adapter import Heads
from ..surgery import Undo
from .integration import Integration, Subclasses

SWIN = "torchvision.models.swin_transformer"


def _window_attention(m: nn.Module, x: torch.Tensor, bias: torch.Tensor, logit_scale=None) -> torch.Tensor:
    """Shifted-window self-attention of ``x`` (B, H, W, C), as torchvision computes it, with
    ``head_dim`` from the projection instead of ``C // num_heads``."""
    height, width = x.shape[1:3]
    window = tuple(m.window_size)
    x = F.pad(x, (0, 0, 0, (-width) % window[1], 0, (-height) % window[0]))
    size = tuple(x.shape[1:3])
    # a window that covers the map needs no shift
    shift = tuple(0 if w >= n else s for w, n, s in zip(window, size, m.shift_size))
    if any(shift):
        x = x.roll((-shift[0], -shift[1]), (1, 2))
    mask = _shift_mask(x, size, window, shift) if any(shift) else None
    out = _unwindow(_attention(m, _windows(x, window), bias, logit_scale, mask), x.shape[0], size, window)
    if any(shift):
        out = out.roll(shift, (1, 2))
    return out[:, :height, :width, :].contiguous()


def _windows(x: torch.Tensor, window) -> torch.Tensor:
    """(B, H, W, C) -> (B * windows, positions in a window, C)."""
    batch, ph, pw, _ = x.shape
    (wh, ww) = window
    return x.view(batch, ph // wh, wh, pw // ww, ww, -1).permute(0, 1, 3, 2, 4, 5).reshape(-1, wh * ww, x.shape[-1])


def _unwindow(windows: torch.Tensor, batch: int, size, window) -> torch.Tensor:
    (ph, pw), (wh, ww) = size, window
    out = windows.view(batch, ph // wh, pw // ww, wh, ww, -1).permute(0, 1, 3, 2, 4, 5)
    return out.reshape(batch, ph, pw, -1)


def _attention(m: nn.Module, windows: torch.Tensor, bias: torch.Tensor, logit_scale, mask) -> torch.Tensor:
    head_dim = m.qkv.weight.shape[0] // (3 * m.num_heads)
    qkv_bias = m.qkv.bias
    if logit_scale is not None and qkv_bias is not None:  # V2: keys have no bias
        q_bias, k_bias, v_bias = qkv_bias.chunk(3)
        qkv_bias = torch.cat((q_bias, torch.zeros_like(k_bias), v_bias))
    qkv = F.linear(windows, m.qkv.weight, qkv_bias).unflatten(-1, (3, -1, head_dim)).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    if logit_scale is not None:  # V2: cosine attention
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attn = attn * torch.clamp(logit_scale, max=math.log(100.0)).exp()
    else:
        attn = (q * head_dim ** -0.5) @ k.transpose(-2, -1)
    attn = attn + bias
    if mask is not None:
        attn = (attn.unflatten(0, (-1, mask.shape[0])) + mask[None, :, None]).flatten(0, 1)
    attn = F.dropout(attn.softmax(-1), m.attention_dropout, m.training)
    out = (attn @ v).transpose(1, 2).flatten(2)
    return F.dropout(F.linear(out, m.proj.weight, m.proj.bias), m.dropout, m.training)


def _shift_mask(like, size, window, shift) -> torch.Tensor:
    """(windows, n, n): -100 between positions that the cyclic shift brought from different
    regions of the map (three regions along each shifted dim, one along an unshifted one)."""
    def regions(length, w, s):
        i = torch.arange(length, device=like.device)
        return (i >= length - w).long() + (i >= length - s).long() if s else torch.zeros_like(i)

    (ph, pw), (wh, ww) = size, window
    label = regions(ph, wh, shift[0])[:, None] * 3 + regions(pw, ww, shift[1])[None, :]
    label = label.view(ph // wh, wh, pw // ww, ww).permute(0, 2, 1, 3).reshape(-1, wh * ww)
    differs = label[:, None, :] != label[:, :, None]
    return torch.zeros(differs.shape, dtype=like.dtype, device=like.device).masked_fill(differs, -100.0)


def _forward(name: str, base: type) -> tuple[tuple, dict]:
    v2 = name.endswith("V2")

    def forward(self, x):
        return _window_attention(self, x, self.get_relative_position_bias(), self.logit_scale if v2 else None)

    return (), {"forward": forward}


SUBCLASSES = Subclasses(__name__, {f"{SWIN}.{n}": f"HeadPrunable{n}"
                                   for n in ("ShiftedWindowAttention", "ShiftedWindowAttentionV2")}, _forward)


def __getattr__(attr: str):  # unpickling a pruned Swin: make its class
    return SUBCLASSES.find(attr)


def _heads(m: nn.Module) -> int:
    """Heads as the relative-position bias counts them (it is cut with them)."""
    if hasattr(m, "logit_scale"):
        return m.logit_scale.shape[0]
    return m.relative_position_bias_table.shape[1]


def attention_modules(model: nn.Module) -> dict[str, Heads]:
    if SWIN not in sys.modules:
        return {}
    swin = sys.modules[SWIN]
    return {name: Heads(m.num_heads, m.num_heads, m.qkv.weight.shape[0] // (3 * m.num_heads))
            for name, m in model.named_modules() if isinstance(m, swin.ShiftedWindowAttention)}


def _fix_heads(model: nn.Module, undo: Undo) -> None:
    """Surgery fixer: a Swin attention whose heads or head size changed counts its heads and keeps
    the subclass (torchvision's code derives the head size from the input width, which pruning
    the hidden size may change apart from the heads)."""
    if SWIN not in sys.modules:
        return
    swin = sys.modules[SWIN]
    for m in model.modules():
        if not isinstance(m, swin.ShiftedWindowAttention):
            continue
        if _heads(m) == m.num_heads and m.qkv.weight.shape[0] == 3 * m.qkv.weight.shape[1]:
            continue
        undo.remember(m, ("__class__", "num_heads"))
        m.num_heads = _heads(m)
        base = next(c for c in type(m).__mro__ if c.__module__ == SWIN)
        m.__class__ = SUBCLASSES(f"{SWIN}.{base.__name__}")


INTEGRATION = Integration(
    name="swin",
    attention=attention_modules,
    traced_as=SUBCLASSES.traced_as(),
    fixers=(_fix_heads,),
)
