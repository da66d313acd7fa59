"""Hugging Face transformers: whole attention heads as the pruning unit, and configs that follow.

The channel engine needs two things it cannot see in a trace. Which way to cut attention: HF
code views projections as ``(..., -1, head_dim)``, so heads, not head dims, may go (removing a
head keeps head_dim and the attention scale: exact); with grouped-query attention the unit is a
whole KV group (its query heads with it), so the head-to-KV mapping never breaks. And what the
modules and the config say about sizes: after surgery each attention module's head counts and
the config (``num_attention_heads``, ``num_key_value_heads``, ``intermediate_size``,
``hidden_size``, ``head_dim``) are updated where the pruning was uniform; ``hf_directory``
saves what a config cannot say. ``INTEGRATION`` hands both to the engine.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import PangkasError
from ..graph.adapter import Heads
from ..surgery import Undo
from .hf_directory import config_describes, is_transformers
from .integration import Integration
from .remote_code import BUILT_WITH

HEADS = ("num_heads", "num_attention_heads", "n_head")
HEAD_DIM = ("head_dim", "attention_head_size")
QUERY = ("q_proj", "query", "q", "q_lin")
KEY = ("k_proj", "key", "k", "k_lin")
FFN = ("up_proj", "gate_proj", "fc1", "c_fc", "intermediate.dense", "lin1", "w1", "w3")
CONFIG_SIZES = ("num_attention_heads", "num_key_value_heads", "intermediate_size", "n_inner", "hidden_size", "head_dim")
HEAD_ATTRIBUTES = HEADS + ("num_key_value_heads", "all_head_size", "split_size", "num_key_value_groups")


def _int_attr(owner, names) -> int | None:
    return next((v for n in names if isinstance(v := getattr(owner, n, None), int)), None)


def output_dim(module: nn.Module) -> int:
    """The dim of ``module.weight`` that indexes its outputs (Linear: 0; GPT-2's Conv1D and
    embeddings: 1, the hidden size)."""
    return 1 if type(module).__name__ == "Conv1D" or isinstance(module, nn.Embedding) else 0


def _out_width(module: nn.Module) -> int | None:
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
        return None
    if type(module).__name__ == "Conv1D":  # GPT-2's transposed Linear
        return weight.shape[1]
    return weight.shape[0]


def heads_of(module: nn.Module) -> Heads | None:
    """Head counts of an HF attention module, read from its projections' current sizes."""
    head_dim = _int_attr(module, HEAD_DIM)
    if not head_dim:
        return None
    children = dict(module.named_children())
    q = next((children[n] for n in QUERY if n in children), None)
    k = next((children[n] for n in KEY if n in children), None)
    groups = getattr(module, "num_key_value_groups", None)
    if q is not None:
        q_width, k_width = _out_width(q), _out_width(k) if k is not None else None
    elif "c_attn" in children and _out_width(children["c_attn"]):  # GPT-2: q, k, v fused equally
        q_width = k_width = _out_width(children["c_attn"]) // 3
    elif "qkv_proj" in children and isinstance(groups, int):  # Phi-3: H + 2 KV heads, H = KV * groups
        kv = _out_width(children["qkv_proj"]) // (head_dim * (groups + 2))
        q_width, k_width = kv * groups * head_dim, kv * head_dim
    else:
        return None
    if not q_width:
        return None
    return Heads(q_width // head_dim, (k_width or q_width) // head_dim, head_dim, fused="qkv_proj" in children)


def attention_modules(model: nn.Module) -> dict[str, Heads]:
    if not is_transformers(model):
        return {}
    return {name: h for name, m in model.named_modules() if (h := heads_of(m)) is not None}


def _fix_attention(model: nn.Module, undo: Undo) -> None:
    """Surgery fixer: attention modules learn their new head counts; the config follows."""
    if not is_transformers(model):
        return
    found = {}
    for name, module in model.named_modules():
        h = heads_of(module)
        if h is None:
            continue
        found[name] = h
        undo.remember(module, HEAD_ATTRIBUTES)
        values = {"num_heads": h.heads, "num_attention_heads": h.heads, "n_head": h.heads,
                  "num_key_value_heads": h.kv_heads, "all_head_size": h.heads * h.head_dim,
                  "split_size": h.heads * h.head_dim, "num_key_value_groups": h.heads // max(1, h.kv_heads)}
        for attr, value in values.items():
            if isinstance(getattr(module, attr, None), int):
                setattr(module, attr, value)
    _fix_config(model, found, undo)


def _uniform(values) -> int | None:
    values = set(values)
    return values.pop() if len(values) == 1 else None


def _fix_config(model: nn.Module, found: dict[str, Heads], undo: Undo) -> None:
    """Sizes the same in every layer go into the config; per-layer sizes cannot (see
    ``hf_directory``, which also needs the sizes the modules were first built from)."""
    config = model.config
    if BUILT_WITH not in model.__dict__:
        undo.added.append((model, BUILT_WITH))  # a surgery undone leaves no trace
    built = model.__dict__.setdefault(BUILT_WITH, {})
    for name in CONFIG_SIZES:
        built.setdefault(name, getattr(config, name, None))
    undo.remember(config, CONFIG_SIZES)
    heads = _uniform(h.heads for h in found.values())
    if heads and hasattr(config, "num_attention_heads"):
        config.num_attention_heads = heads
    kv = _uniform(h.kv_heads for h in found.values())
    if kv and getattr(config, "num_key_value_heads", None) is not None:
        config.num_key_value_heads = kv
    head_dim = _uniform(h.head_dim for h in found.values())
    hidden = getattr(config, "hidden_size", None)
    derived = heads and hidden and hidden // heads
    if head_dim and (getattr(config, "head_dim", None) is not None or derived != head_dim):
        config.head_dim = head_dim  # LLaMA-style configs read it; BERT/GPT-2 derive it
    ffn = _uniform(w // (2 if name.endswith("gate_up_proj") else 1)  # Phi-3 fuses gate and up
                   for name, m in model.named_modules() if name.endswith(FFN) and (w := _out_width(m)))
    if ffn:
        if hasattr(config, "n_inner"):
            config.n_inner = ffn
        elif getattr(config, "intermediate_size", None) is not None:
            config.intermediate_size = ffn
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if isinstance(embeddings, nn.Embedding):
        config.hidden_size = embeddings.embedding_dim


def _update_conv1d(m: nn.Module, original: dict) -> None:
    """Surgery updater: GPT-2's ``Conv1D`` (a Linear with a transposed weight) views by ``nf``."""
    m.nx, m.nf = m.weight.shape


def ratios(model: nn.Module, heads: float | None = None, ffn: float | None = None,
           hidden: float | None = None) -> dict[str, float]:
    """``plan_channels(ratios=...)`` entries: heads (by each attention module's query
    projection), FFN neurons (by the MLP's up projections), hidden size (by the embeddings)."""
    if not is_transformers(model):
        raise PangkasError(f"{type(model).__name__} is not a Hugging Face transformers model; use ratio= / ratios=")
    out: dict[str, float] = {}
    if heads is not None:
        modules = attention_modules(model)
        if not modules:
            raise PangkasError(
                f"no attention module of {type(model).__name__} exposes its query/key projections "
                "(q_proj/query, GPT-2's c_attn, Phi-3's qkv_proj) and a head_dim; prune ffn= and "
                "hidden= only, or teach pangkas/integrations/huggingface.py its layout")
        for name, h in modules.items():
            children = dict(model.get_submodule(name).named_children())
            query = next((n for n in QUERY + ("c_attn", "qkv_proj") if n in children))
            out[f"{name}.{query}"] = _whole_units(name, h, heads)
    if ffn is not None:
        for name, _ in model.named_modules():
            if name.endswith(FFN):
                out[name] = ffn
    if hidden is not None:
        embeddings = model.get_input_embeddings()
        names = {id(m): n for n, m in model.named_modules()}
        out[names[id(embeddings)]] = hidden
    return out


def _whole_units(name: str, h: Heads, heads: float) -> float:
    """``heads`` rounded to the nearest whole number of the units that can go (key/value groups,
    or heads without GQA); one that rounds to none or all is refused."""
    if heads == 0:
        return 0.0
    units, what = (h.kv_heads, "key/value groups") if h.kv_heads < h.heads else (h.heads, "heads")
    if units < 2:
        raise PangkasError(f"{name} has one key/value group: removing heads would break its attention; "
                           "use heads=0")
    count = math.floor(heads * units + 0.5)
    if not 0 < count < units:
        raise PangkasError(f"heads={heads} would remove {count} of the {units} {what} of {name} (whole "
                           f"{what} go, in steps of {1 / units:.3g}); give heads= between {1 / units:.3g} "
                           f"and {(units - 1) / units:.3g}")
    return count / units


def config_warning(model: nn.Module) -> str | None:
    """The warning for a pruned model whose plain ``save_pretrained`` would not load, or None."""
    problem = config_describes(model)  # builds a whole model: slow
    if not problem:
        return None
    return (f"{type(model).__name__}'s config cannot say the pruned sizes ({problem}): plain "
            "save_pretrained would write a directory that does not load; use "
            "pangkas.save_pretrained(model, dir), which adds modeling_pangkas.py")


INTEGRATION = Integration(
    name="huggingface",
    attention=attention_modules,
    updaters={"transformers.pytorch_utils.Conv1D": _update_conv1d},
    fixers=(_fix_attention,),
)
