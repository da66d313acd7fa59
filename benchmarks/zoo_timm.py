"""Prunability beyond torchvision: timm architectures and one small net per building block.

Channel pruning at ratio 0.5 (local, L1) of timm models (``timm.create_model(name,
pretrained=False)``, randomised so the oracle is sensitive; nothing downloaded), small variants at
small inputs, plus the nets of benchmarks/blocks.py. Per model: params and MACs before/after,
plan + apply time, the oracle error (fp32, and fp64 where fp32 fails: an ill-conditioned random
network can fail on rounding alone), and the channels kept by rule gaps (ops without a coupling
rule, or whose rule failed) with the op that kept most.

    .venv/bin/python benchmarks/zoo_timm.py            # writes docs/zoo_timm.md (about 20 minutes)
"""

from __future__ import annotations

import gc
import warnings
from collections import Counter

import timm
import torch

from blocks import BLOCKS
from common import (ZOO_COLUMNS, ZOO_RATIO, ZOO_TOLERANCE, arguments, environment, exact, failure_row,
                    prune_and_check, publish, result_row, why_kept_row)
from pangkas.oracle import randomize
from pangkas.tables import render_table

# Small variants covering the families people use; each family name appears in the table.
MODELS = """
resnet18 resnet10t resnet26d seresnet18 ecaresnet26t resnext26ts gernet_s skresnet18 selecsls42b resnest14d
resnest26d res2net50_26w_4s res2next50 dla60_res2net regnetx_002 regnety_002 regnetz_b16 efficientnet_b0
efficientnet_lite0 efficientnetv2_rw_t tinynet_e mixnet_s mnasnet_050 fbnetc_100 hardcorenas_a
mobilenetv2_050 mobilenetv3_small_050 mobilenetv3_large_100 lcnet_050 ghostnet_050 ghostnetv2_100 rexnet_100
repvgg_a0 mobileone_s0 repvit_m1 hrnet_w18_small dla34 dla46_c dpn48b densenet121 vovnet39a ese_vovnet19b_dw
cspresnet50 cspdarknet53 cs3darknet_s darknet17 hgnetv2_b0 nf_resnet26 xception41 legacy_xception
inception_v3 tresnet_m bat_resnext26ts botnet26t_256 halonet26t lambda_resnet26t convnext_atto
convnextv2_atto edgenext_xx_small inception_next_tiny starnet_s1 mambaout_femto poolformer_s12
poolformerv2_s12 efficientformer_l1 efficientformerv2_s0 efficientvit_b0 efficientvit_m0 fastvit_t8
mobilevit_xxs mobilevitv2_050 levit_128s coat_lite_tiny coatnet_nano_rw_224 maxvit_nano_rw_256
tiny_vit_5m_224 vit_tiny_patch16_224 deit_tiny_distilled_patch16_224 beit_base_patch16_224
eva02_tiny_patch14_224 cait_xxs24_224 xcit_nano_12_p16_224 pit_ti_224 convit_tiny crossvit_tiny_240 pvt_v2_b0
swin_tiny_patch4_window7_224 mixer_s16_224 resmlp_12_224
""".split()
SMALL = 96  # input side for models that take any size
# Models whose size is fixed at creation are built for a smaller one where timm allows it.
BUILT_FOR = {"vit_tiny_patch16_224": 96, "deit_tiny_distilled_patch16_224": 96, "beit_base_patch16_224": 96,
             "eva02_tiny_patch14_224": 98, "cait_xxs24_224": 96, "xcit_nano_12_p16_224": 96, "pit_ti_224": 96,
             "convit_tiny": 96, "mixer_s16_224": 96, "resmlp_12_224": 96,
             "levit_128s": 96, "efficientvit_m0": 96, "coat_lite_tiny": 96}
LARGER = {"inception_v3": 160, "xception41": 128, "legacy_xception": 128, "tresnet_m": 128,
          "maxvit_nano_rw_256": 256, "botnet26t_256": 256, "halonet26t": 256, "lambda_resnet26t": 256,
          "coatnet_nano_rw_224": 224, "swin_tiny_patch4_window7_224": 224,
          "pvt_v2_b0": 224, "bat_resnext26ts": 256, "efficientformer_l1": 224, "efficientformerv2_s0": 224,
          "tiny_vit_5m_224": 224, "crossvit_tiny_240": 240}


def build(name: str) -> tuple[torch.nn.Module, torch.Tensor]:
    """A randomised timm model (or block net) and an example input for it."""
    if name in BLOCKS:
        model, x = BLOCKS[name]()
        return randomize(model.eval()), x
    if name in BUILT_FOR:
        model, side = timm.create_model(name, pretrained=False, img_size=BUILT_FOR[name]), BUILT_FOR[name]
    else:
        model, side = timm.create_model(name, pretrained=False), LARGER.get(name, SMALL)
    return randomize(model.eval()), torch.randn(1, 3, side, side)


def run(name: str) -> tuple[tuple, dict | None]:
    """(table row, result or None if it failed) for one model."""
    torch.manual_seed(0)
    try:
        model, x = build(name)
        r = prune_and_check(model, x)
        return result_row(name, r), r
    except Exception as exc:  # a failure is a result here: record it and go on
        return failure_row(name, exc), None


def summary(names: list[str], results: dict[str, dict]) -> str:
    exact_models = [n for n, r in results.items() if exact(r)]
    by_fp64 = [n for n in exact_models if not results[n]["error"] <= ZOO_TOLERANCE]
    unpruned = [n for n in exact_models if results[n]["macs"][1] >= results[n]["macs"][0]]
    no_gaps = [n for n, r in results.items() if not r["gaps"]]
    short = [n for n in no_gaps if results[n]["macs"][1] > 0.6 * results[n]["macs"][0]]
    gaps = sum((r["gaps"] for r in results.values()), Counter())
    top = ", ".join(f"{op} ({n} channels)" for op, n in gaps.most_common(6)) or "none"
    seconds = sum(r["seconds"] for r in results.values())
    return (f"**{len(exact_models)}/{len(names)} models pass the oracle** (error <= {ZOO_TOLERANCE:g}; "
            f"{len(by_fp64)} only in fp64; {len(unpruned)} of them prune nothing: {', '.join(unpruned) or '-'}); "
            f"{len(names) - len(results)} failed to plan or apply. {len(no_gaps)} models have no channels kept "
            f"by rule gaps; {len(no_gaps) - len(short)} of those reach MACs <= 0.6 of dense, not: "
            f"{', '.join(short) or '-'} (why: the second table). Rule gaps over the whole zoo, most channels "
            f"first: {top}. Plan + apply took {seconds:.0f} s for all models together.")


def main() -> None:
    parser = arguments(__doc__, "zoo_timm.md", rounds=None)
    parser.add_argument("models", nargs="*", help="subset of models (default: all, then the block nets)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    names = args.models or MODELS + list(BLOCKS)
    rows, results = [], {}
    for name in names:
        row, r = run(name)
        rows.append(row)
        if r is not None:
            results[name] = r
        print(row, flush=True)
        gc.collect()
    table = render_table(f"channel pruning, ratio {ZOO_RATIO} local L1, timm {timm.__version__} and block nets",
                         ZOO_COLUMNS, rows, markdown=True)
    kept = [why_kept_row(n, r) for n, r in results.items() if r["gaps"] or r["macs"][1] > 0.6 * r["macs"][0]]
    why = render_table("where channels are kept: models with rule gaps or MACs > 0.6 of dense",
                       ("model", "MACs after/before", "rule gaps (op channels)", "top reasons kept [channels]"),
                       kept, markdown=True)
    publish(args.out, "Prunability beyond torchvision: timm and building blocks", summary(names, results), table, why,
            f"Measured with {environment()}. Random weights (randomised). Inputs 1x3x{SMALL}x{SMALL} "
            "where a model takes any size; models built for a fixed size are built smaller where timm "
            "allows (`img_size`), else run at their own size (see BUILT_FOR and LARGER in the script). "
            "\"kept by rule gaps\": channels of conv/linear/embedding outputs kept because an op has no "
            "coupling rule or its rule failed (`Plan.rule_gaps()`), with the op that kept most. "
            "Block nets: benchmarks/blocks.py.",
            script="zoo_timm.py")


if __name__ == "__main__":
    main()
