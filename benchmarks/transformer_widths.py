"""Pruning the widths of a pretrained transformer: MiniLM's heads, FFN neurons, hidden size.

all-MiniLM-L6-v2 (``minilm.py``: BERT, 6 layers, 12 heads, hidden 384, FFN 1536), no fine-tuning
after pruning. Cases: 25% and 50% of the heads and of the FFN neurons removed, and
the hidden size cut from 384 to 320. Importance: magnitude (l1), Wanda (|w| x activation norm)
and Taylor (|w x grad| of an unsupervised SimCSE-style loss: each sentence against a copy with
15% of its tokens dropped), and structured OBS with reconstruction (``reconstruct=True``: the
layers reading what was removed are re-fitted by least squares), all on 100 calibration sentences.
Measured: parameters, CPU latency (batch 8 x 128 tokens, relative to the full model, with a 95%
interval), and on 600 other sentences the mean cosine of mean-pooled embeddings to the full model's
(for the hidden-size case, to the full model's embeddings restricted to the kept dims) and top-1
retrieval agreement (a sentence's nearest neighbour among the 600 is the same as with the full
model). Each pruned model is then written with ``pangkas.save_pretrained`` and read back with
``transformers.AutoModel.from_pretrained`` (the first 50 sentences' embeddings compared).
Sentences: the documentation that ships with CPython (``pydoc_data.topics``, ``minilm.py``).

    .venv/bin/python benchmarks/transformer_widths.py    # writes docs/transformers.md
"""

from __future__ import annotations

import copy
import tempfile
import warnings
from pathlib import Path

import torch

import minilm
from common import arguments, environment, latency_note, publish
from pangkas import prune_transformer, save_pretrained
from pangkas.measure import latency_ratios
from pangkas.tables import human_count, render_table

CASES = (("heads 25% + FFN 25%", dict(heads=0.25, ffn=0.25)),
         ("heads 50% + FFN 50%", dict(heads=0.5, ffn=0.5)),
         ("hidden 384 -> 320", dict(hidden=64 / 384)))
# (label, importance, reconstruct, allocation): reconstruct re-fits the layers that read what was
# removed; allocation "sensitivity" spreads the cut over the layers by their measured effect
IMPORTANCE = (("l1", "l1", False, "uniform"), ("wanda", "wanda", False, "uniform"),
              ("taylor", "taylor", False, "uniform"), ("obs + reconstruct", "obs", True, "uniform"),
              ("obs + reconstruct, by sensitivity", "obs", True, "sensitivity"))


def contrastive_loss(model, batch):
    """SimCSE-style: pooled embeddings of the batch vs the same sentences with 15% of tokens
    dropped; each sentence should be closest to its own copy."""
    mask = batch["attention_mask"]
    keep = (torch.rand(mask.shape, generator=torch.Generator().manual_seed(0)) > 0.15).long()
    keep[:, 0] = 1
    views = []
    for m in (mask, mask * keep):
        hidden = model(**{**batch, "attention_mask": m}).last_hidden_state
        views.append(torch.nn.functional.normalize((hidden * m[..., None]).sum(1) / m.sum(1, keepdim=True), dim=-1))
    logits = views[0] @ views[1].T / 0.05
    return torch.nn.functional.cross_entropy(logits, torch.arange(len(logits)))


def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Share of sentences whose nearest neighbour (cosine, excluding itself) is the same."""
    def nearest(e):
        sim = e @ e.T
        sim.fill_diagonal_(-2)
        return sim.argmax(1)
    return float((nearest(a) == nearest(b)).float().mean())


def reloaded(pruned, batches, embeddings: torch.Tensor) -> str:
    """How the saved directory loads, and the largest embedding difference after loading."""
    import transformers

    with tempfile.TemporaryDirectory() as tmp:
        directory = save_pretrained(pruned, Path(tmp) / "pruned")
        code = (directory / "modeling_pangkas.py").exists()
        again = transformers.AutoModel.from_pretrained(directory, trust_remote_code=code).eval()
        diff = float((minilm.embed(again, batches[:1]) - embeddings[:len(batches[0]["input_ids"])]).abs().max())
    return f"{'trust_remote_code' if code else 'plain'}, max diff {diff:.0e}"


def main() -> None:
    args = arguments(__doc__, "transformers.md").parse_args()
    warnings.filterwarnings("ignore")
    model, calibration, evaluation, reference, timing = minilm.setup()
    params = sum(p.numel() for p in model.parameters())
    rows = []
    for label, sizes in CASES:
        for label_importance, importance, reconstruct, allocation in IMPORTANCE:
            if allocation != "uniform" and "hidden" in sizes:
                continue  # one residual stream: nothing to spread
            pruned = copy.deepcopy(model)
            options = ({"data": calibration, "reconstruct": reconstruct, "allocation": allocation}
                       if importance != "l1" else {})
            if importance == "taylor":
                options["loss_fn"] = lambda output, batch, m=pruned: contrastive_loss(m, batch)
            hidden_case = "hidden" in sizes
            report = prune_transformer(pruned, calibration[0], importance=importance,
                                       prune_outputs=hidden_case, **sizes, **options)
            got = minilm.embed(pruned, evaluation)
            want = reference
            if hidden_case:  # compare in the hidden dims the pruned model kept
                kept = report.plan.keep()["embeddings.word_embeddings.weight"][1]
                want = torch.nn.functional.normalize(reference[:, kept], dim=-1)
            cosine = float((got * want).sum(1).mean())
            latency = latency_ratios([model, pruned], timing, rounds=args.rounds)[1]
            rows.append((label, label_importance, human_count(sum(p.numel() for p in pruned.parameters())),
                         latency.format(), f"{cosine:.3f}", f"{agreement(got, reference):.1%}",
                         reloaded(pruned, evaluation, got)))
            print(rows[-1], flush=True)
    table = render_table(
        f"MiniLM ({human_count(params)} params), pruned without fine-tuning",
        ("case", "importance", "params", "latency vs full (95% interval)", "mean cosine to full",
         "top-1 retrieval agreement", "from_pretrained"),
        rows, markdown=True)
    publish(args.out, "Pruning a pretrained transformer", table,
            f"Measured with {environment()}. Latency vs full: {latency_note(args.rounds)}. Heads are "
            "removed whole (12 -> 9 or 6 per layer), so head_dim and the attention scale are unchanged; "
            "removing heads and FFN neurons is exact with respect to the silenced model (the oracle), the "
            "loss of fidelity is the information those channels carried. Hidden-size pruning also changes "
            "every LayerNorm's statistics (approximate). from_pretrained: how the directory "
            "`pangkas.save_pretrained` wrote loads (BERT derives head_dim from hidden_size / "
            "num_attention_heads, so with fewer heads or a narrower hidden size the directory carries "
            "modeling_pangkas.py), and the largest difference of the reloaded model's embeddings.",
            script="transformer_widths.py")


if __name__ == "__main__":
    main()
