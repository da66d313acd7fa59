"""Does channel pruning's MAC reduction turn into CPU speed?

Dense vs channel-pruned (ratio 0.5, local, L1) ResNet-50, MobileNetV2, ConvNeXt-T and ViT-B/16,
batch 1 and 8, in two modes:

- eager: the model as PyTorch runs it;
- deployed: BatchNorm folded into the convolutions, channels-last memory format, then
  ``torch.jit.trace`` + ``torch.jit.freeze`` + ``torch.jit.optimize_for_inference``.

Dense and pruned are timed in interleaved rounds in one process (``torch.utils.benchmark``); the
speedup (dense time / pruned time) is the median of per-round ratios with a 95% interval, and
"efficiency" is the speedup divided by the MAC reduction (1.0: speed follows MACs).

    .venv/bin/python benchmarks/latency.py        # writes docs/latency.md
"""

from __future__ import annotations

import copy
import statistics
import warnings

import torch
import torch.fx.experimental.optimization
import torchvision

from common import arguments, environment, latency_note, publish
from pangkas import prune_channels
from pangkas.measure import count_macs, ratios_from_samples, time_rounds
from pangkas.tables import render_table

MODELS = ("resnet50", "mobilenet_v2", "convnext_tiny", "vit_b_16")
BATCHES = (1, 8)


@torch.no_grad()
def deployed(model: torch.nn.Module, x: torch.Tensor) -> torch.nn.Module:
    """BN folded, channels-last, traced and frozen: how a CPU deployment would run it."""
    model = copy.deepcopy(model).eval()
    try:
        model = torch.fx.experimental.optimization.fuse(model)  # conv+BN folding
    except Exception:  # models fx cannot trace (ViT) have no BN to fold anyway
        pass
    layout = torch.channels_last if x.ndim == 4 else torch.contiguous_format
    model = model.to(memory_format=layout)
    traced = torch.jit.trace(model, x.to(memory_format=layout), check_trace=False)
    return torch.jit.optimize_for_inference(torch.jit.freeze(traced))


def main() -> None:
    args = arguments(__doc__, "latency.md").parse_args()
    warnings.filterwarnings("ignore")
    rows = []
    for name in MODELS:
        torch.manual_seed(0)
        dense = torchvision.models.get_model(name, weights=None).eval()
        pruned = copy.deepcopy(dense)
        prune_channels(pruned, torch.randn(1, 3, 224, 224), ratio=0.5)
        for batch in BATCHES:
            x = torch.randn(batch, 3, 224, 224)
            macs = count_macs(dense, x) / count_macs(pruned, x)
            for mode in ("eager", "deployed"):
                pair = [dense, pruned] if mode == "eager" else [deployed(dense, x), deployed(pruned, x)]
                inputs = x if mode == "eager" else x.to(memory_format=torch.channels_last)
                # time_rounds + ratios_from_samples (what latency_ratios does) to keep the times too
                samples = time_rounds(pair, inputs, rounds=args.rounds)
                t_dense, t_pruned = (statistics.median(times) for times in zip(*samples))
                speedup = ratios_from_samples(samples, baseline=1)[0]  # dense / pruned, round by round
                rows.append((name, batch, mode, f"{t_dense * 1e3:.1f}", f"{t_pruned * 1e3:.1f}",
                             speedup.format(), f"{macs:.2f}x",
                             f"{speedup.value / macs:.2f} ({speedup.low / macs:.2f}-{speedup.high / macs:.2f})"))
                print(rows[-1], flush=True)
    table = render_table("channel pruning ratio 0.5: CPU latency, dense vs pruned",
                         ("model", "batch", "mode", "dense ms", "pruned ms", "speedup (95% interval)",
                          "MACs reduction", "efficiency (95% interval)"), rows, markdown=True)
    publish(args.out, "Latency after channel pruning",
            table,
            f"Measured with {environment()}. dense ms, pruned ms: each model's median over the rounds. "
            f"Speedup = dense time / pruned time, {latency_note(args.rounds)}. Efficiency = speedup / MACs "
            "reduction, its interval scaled alike. ViT-B/16 loses whole attention heads and MLP channels in "
            "exact mode (LayerNorm keeps the hidden size), hence its smaller MACs reduction.",
            script="latency.py")


if __name__ == "__main__":
    main()
