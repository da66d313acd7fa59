"""Run under torchrun by test_recover.py: ``recover(shard=True)`` (FSDP2) on two ranks. A tiny
LLaMA (vocabulary 61, so its embedding and head split unevenly), weight-pruned, distils from the
dense one on 7 batches dealt out as DDP deals them. Each rank saves its final weights and a JSON of
what it saw: its losses, how much of each parameter and optimizer moment it held while training,
whether the masks survived, and what recover said to bad calls; ``build`` and ``rounds`` let the
test repeat the training in one process."""

import copy
import json
import math
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from transformers import LlamaConfig, LlamaForCausalLM

import pangkas
from pangkas.weights.masks import masks_by_key

BATCHES, RANKS, EPOCHS, LR = 7, 2, 2, 1e-2
# a feature term too: its hooks must go on the sharded copy, the model that runs
OPTIONS = dict(epochs=EPOCHS, lr=LR, features={"model.layers.1.mlp": "model.layers.1.mlp"})


def build():
    """Teacher, pruned student and token batches, the same in every process; float64, so that the
    comparison with one process tests the arithmetic (in float32 Adam magnifies the different
    summation order of the averaged gradients to ~3e-4 after 6 steps; in float64 it stays ~1e-14)."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=61, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16)
    teacher = LlamaForCausalLM(config).double().eval()
    student = copy.deepcopy(teacher)
    pangkas.prune_weights(student, sparsity=0.5)
    g = torch.Generator().manual_seed(1)
    return teacher, student, [torch.randint(0, 61, (2, 8), generator=g) for _ in range(BATCHES)]


def rounds(batches):
    """One process's equivalent: each complete round of RANKS batches as one batch (FSDP averages
    the ranks' gradients of their mean losses: the gradient of the round's mean)."""
    return [torch.cat(batches[i:i + RANKS]) for i in range(0, len(batches) - RANKS + 1, RANKS)]


def pruned_still_zero(student, masks) -> bool:
    return all(not student.get_submodule(key.rpartition(".")[0]).weight[~mask].any() for key, mask in masks.items())


def train(out: str, rank: int) -> dict:
    teacher, student, batches = build()
    masks = {key: m.clone() for key, m in masks_by_key(student).items()}
    held = {}

    def adam(params):  # sees the parameters recover trains: how much of each does this rank hold?
        params = list(params)
        held["params"] = [p.to_local().numel() for p in params], [p.numel() for p in params]
        held["optimizer"] = torch.optim.Adam(params, lr=LR)
        return held["optimizer"]

    report = pangkas.recover(student, batches, teacher=teacher, shard=True, optimizer=adam, **OPTIONS)
    torch.save(student.state_dict(), f"{out}/rank{rank}.pt")
    moments = [s["exp_avg"] for s in held["optimizer"].state.values()]
    return {"losses": report.epoch_losses, "steps": report.steps, "params": held["params"],
            "moments": [sum(m.to_local().numel() for m in moments), sum(m.numel() for m in moments)],
            "masks": len(masks_by_key(student)) == len(masks), "pruned_zero": pruned_still_zero(student, masks),
            "plain": all(type(t) is torch.nn.Parameter for t in student.parameters())}


def refusal(call) -> str:
    try:
        call()
        return "trained"
    except pangkas.PangkasError as exc:
        return f"PangkasError: {exc}"


def refusals(out: str, rank: int) -> dict:
    """What recover(shard=True) says to bad calls on this rank (every rank must say it, not hang),
    and whether the student is as it was after a failure midway."""
    teacher, student, batches = build()
    before = {k: v.clone() for k, v in student.state_dict().items()}
    said = {"short": refusal(lambda: pangkas.recover(student, batches[:1], teacher=teacher, shard=True)),
            "checkpoint": refusal(lambda: pangkas.recover(student, batches, teacher=teacher, shard=True,
                                                          checkpoint=f"{out}/ckpt")),
            "meta": refusal(lambda: pangkas.recover(copy.deepcopy(student).to("meta"), batches, teacher=teacher,
                                                    shard=True)),
            "sharded": refusal(lambda: pangkas.recover(fully_shard(copy.deepcopy(student)), batches,
                                                       teacher=teacher, shard=True))}
    calls = []

    def nan_on_rank1(output, batch):  # the second step's loss is nan on rank 1 only
        calls.append(1)
        bad = rank == 1 and len(calls) == 2
        return output.logits.sum() * 0.0 + (math.nan if bad else 0.0)

    try:
        pangkas.recover(student, batches, teacher=teacher, loss_fn=nan_on_rank1, alpha=0.5, lr=LR, shard=True)
        said["nan"] = "trained"
    except pangkas.OperationFailed as exc:
        said["nan"] = str(exc)
    said["unchanged"] = all(torch.equal(v, before[k]) for k, v in student.state_dict().items())
    return said


def main(out: str) -> None:
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))  # a hang fails, not blocks
    rank = dist.get_rank()
    outcome = {"train": train(out, rank), "refusals": refusals(out, rank)}
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump(outcome, f)
    dist.barrier()  # gloo can abort a rank that tears down while another still works
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
