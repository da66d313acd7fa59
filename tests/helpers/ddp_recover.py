"""Run by test_recover.py under torchrun: two CPU ranks recover the same student; each writes its
final weights so the test can check the ranks agree."""

import sys

import torch
import torch.distributed as dist
from torch import nn

import pangkas


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
    student = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
    student.load_state_dict(teacher.state_dict())
    pangkas.prune_weights(student, sparsity=0.7)
    g = torch.Generator().manual_seed(1)
    data = [torch.randn(16, 8, generator=g) for _ in range(8)]
    report = pangkas.recover(student, data, teacher=teacher, epochs=2, lr=1e-2)
    torch.save({k: v.clone() for k, v in student.state_dict().items()}, f"{out_dir}/rank{dist.get_rank()}.pt")
    print(f"rank {dist.get_rank()}: {report}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
