"""Run under torchrun by test_recover.py. Every rank passes the same 7 batches; recover deals them
out, so the ranks train on different batches (and one is left over). Two epochs, then a fresh
student resumes from the checkpoint rank 0 wrote for a third. Each rank saves its final weights
and its reports; ``build`` and ``rounds`` let the test repeat it all in one process."""

import copy
import json
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

import pangkas

BATCHES, RANKS, EPOCHS, LR = 7, 2, 3, 1e-2


def build():
    """Teacher, pruned student and batches, the same in every process; float64 so that the
    single-process run matches to 1e-6 and differences come from the arithmetic, not rounding."""
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4)).double().eval()
    student = copy.deepcopy(teacher)
    pangkas.prune_weights(student, sparsity=0.7)
    g = torch.Generator().manual_seed(1)
    return teacher, student, [torch.randn(4, 8, generator=g, dtype=torch.float64) for _ in range(BATCHES)]


def rounds(batches):
    """What one process must train on to match the ranks: each complete round of RANKS batches as
    one batch (DDP averages the ranks' mean-loss gradients, the gradient of the round's mean)."""
    return [torch.cat(batches[i:i + RANKS]) for i in range(0, len(batches) - RANKS + 1, RANKS)]


class OneBatch:
    """One batch, without a len(): too few for two ranks, found out only while iterating."""

    def __init__(self, batch):
        self.batch = batch

    def __iter__(self):
        return iter([self.batch])


def refusals(teacher, student, batches) -> list[str]:
    """What recover says on this rank to data too short for the ranks (it must say it on every
    rank, not hang)."""
    said = []
    for data in (batches[:1], OneBatch(batches[0])):
        try:
            pangkas.recover(student, data, teacher=teacher)
            said.append("trained")
        except pangkas.PangkasError as exc:
            said.append(str(exc))
    return said


def main(out: str) -> None:
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))  # a hang fails, not blocks
    rank = dist.get_rank()
    teacher, student, batches = build()
    first = pangkas.recover(student, batches, teacher=teacher, epochs=EPOCHS - 1, lr=LR, checkpoint=f"{out}/ckpt")
    teacher, fresh, batches = build()  # as a restarted job: every rank must resume from rank 0's checkpoint
    second = pangkas.recover(fresh, batches, teacher=teacher, epochs=EPOCHS, lr=LR, checkpoint=f"{out}/ckpt")
    torch.save(fresh.state_dict(), f"{out}/rank{rank}.pt")
    reports = [{"steps": r.steps, "resumed_from": r.resumed_from, "losses": r.epoch_losses} for r in (first, second)]
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump({"reports": reports, "refusals": refusals(*build())}, f)
    dist.barrier()  # gloo can abort a rank that tears down while another still works
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
