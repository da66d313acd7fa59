"""``pangkas.compress``: budgets met on this machine, and what the search buys over uniform recipes.

Sections (each writes its own page under docs/compress/; run them one by one or together):

- ``cnn``: ResNet-50, MobileNetV2 and ViT-B/16 (random weights: no pretrained weights install
  offline, so no accuracy here), ``latency=0.5`` at batch 1 and 8 (224x224): the measured latency
  ratio with its 95% interval, whether its upper end meets the limit, and the search time.
  Calibration: 3 batches of 2 random images (one held back for the default score).
- ``minilm``: pretrained all-MiniLM-L6-v2, ``latency=0.5`` at batch 8 x 128 tokens, mean cosine of
  sentence embeddings to the full model on 600 sentences (``minilm.py``), against the best uniform
  recipes of about that latency (docs/transformers.md, docs/layers.md), rebuilt and timed here.
  The finalist is chosen on 200 further sentences (``minilm.selection``), not the 600.
- ``minilm_int8``: the same model, sentences and selection, ``latency=0.3`` with
  ``quantize="int8-dynamic"`` (int8 alone is about 0.45x in eager mode here, so pruning must do the
  rest), against the same search for a float result, the float model, int8 alone and heads + FFN
  50% + int8, timed against the float model in eager mode; file as ``pangkas.save`` writes it.
- ``llm``: SmolLM2-135M (``llm.py``), ``params=0.75``, perplexity on *Persuasion*, against uniform
  FFN and heads + FFN cuts and layer removal of the same size (all with reconstruction; layers with
  a linear map). The finalist is chosen by perplexity on the 16 Emma windows after calibration's.
- ``digits``: the demo's digits CNN (trained here), ``macs=0.25`` and ``0.1`` with ``recover_steps``
  only for the finalists or also between search rounds (``recover_rounds``), and with ``evolve``:
  test accuracy against the dense model's, the finalist chosen on 300 held-out training images.

Every model is compared with its dense original in the same process; threads: 1.

    .venv/bin/python benchmarks/compress.py                   # every section
    .venv/bin/python benchmarks/compress.py --sections digits  # one
"""

from __future__ import annotations

import copy
import time
import warnings

import torch

from common import environment, run_sections, trained_digits
import pangkas
from pangkas.measure import latency_ratios
from pangkas.tables import human_count, render_table

LIMIT = 0.5
LIMIT_INT8 = 0.3  # minilm_int8: below what int8-dynamic alone reaches on MiniLM
SELECTION_IMAGES = 300  # digits: training images the finalist is chosen on
SELECTION_SENTENCES = 200  # MiniLM: sentences the finalist is chosen on
SELECTION_WINDOWS = 16  # SmolLM2: Emma windows (after the calibration ones) the finalist is chosen on
CALIBRATION_WINDOWS = 32
EVOLVE = 200  # proxy measurements for compress's evolutionary search (about what its greedy searches make here)


def _row_figures(model, dense, x) -> tuple[str, str]:
    params = sum(p.numel() for p in model.parameters()) / sum(p.numel() for p in dense.parameters())
    macs = pangkas.measure(model, x, latency=False).macs / pangkas.measure(dense, x, latency=False).macs
    return f"{params:.2f}", f"{macs:.2f}"


def _held_out(dense, select, report_score):
    """``(eval_fn, reported)`` for choosing on a selection split and reporting on another.
    ``eval_fn`` scores by ``select`` and keeps what it scored; ``reported(report, model)``
    (``model`` the one compress returned) gives each finalist's ``report_score``, by ``id`` of the
    finalist. compress scores search checkpoints on ``dense`` itself (cuts applied in place) and
    each finalist once, on its own built model, in the order of ``report.finalists``; checked."""
    scored = []

    def eval_fn(model):
        value = float(select(model))
        scored.append((value, model))
        return value

    def reported(report, chosen):
        built = [(value, m) for value, m in scored if m is not dense]
        assert [value for value, _ in built] == [f.score for f in report.finalists], "finalists not matched"
        assert built[report.finalists.index(report.chosen)][1] is chosen, "chosen model not matched"
        scored.clear()
        return {id(f): report_score(m) for f, (_, m) in zip(report.finalists, built)}

    return eval_fn, reported


def cnn(rounds: int) -> str:
    import torchvision

    rows = []
    for name, build in (("ResNet-50", torchvision.models.resnet50), ("MobileNetV2", torchvision.models.mobilenet_v2),
                        ("ViT-B/16", torchvision.models.vit_b_16)):
        torch.manual_seed(0)
        dense = build().eval()
        data = [torch.randn(2, 3, 224, 224) for _ in range(3)]
        for batch in (1, 8):
            x = torch.randn(batch, 3, 224, 224)
            start = time.perf_counter()
            small, report = pangkas.compress(dense, data, latency=LIMIT, example_inputs=x, proxy_batches=1,
                                             rounds=rounds)
            seconds = time.perf_counter() - start
            c = report.chosen
            params, macs = _row_figures(small, dense, x)
            rows.append((name, batch, c.latency.format(), "yes" if c.met else "no", params, macs, c.strategy,
                         f"{c.split['width']:.0%} / {c.split['depth']:.0%}", c.corrections, f"{seconds:.0f}"))
            print(rows[-1], flush=True)
    table = render_table(f"latency={LIMIT} on this CPU (random weights)",
                         ("model", "batch", "latency vs dense (95% interval)", "meets", "params", "MACs", "chosen",
                          "saving from width / depth", "re-timings", "search s"), rows, markdown=True)
    notes = (f"Measured with {environment()}. `latency vs dense`: the median of per-round ratios over interleaved "
             "rounds, with its distribution-free 95% interval; `meets`: the interval's upper end is within the limit. "
             "`chosen`: the finalist (width+depth, width only, depth only) with the best default score (fidelity "
             "on a held-back batch; meaningless with random weights, so which one is chosen says nothing here). "
             "`re-timings`: finalists timed again after the search went on (a miss) or stepped back (cut more than "
             "needed). `search s`: the whole call, finalists built, re-fitted and timed included.")
    return "\n\n".join([table, notes])


def _minilm():
    """Pretrained MiniLM, its calibration and timing batches, the test score, and the held-out
    finalist choice (see ``_held_out``)."""
    import minilm

    warnings.filterwarnings("ignore")
    dense, calibration, evaluation, reference, timing = minilm.setup()
    selection, selection_reference = minilm.selection(dense, SELECTION_SENTENCES)
    score = lambda m: minilm.fidelity(m, evaluation, reference)  # noqa: E731
    choose, reported = _held_out(dense, lambda m: minilm.fidelity(m, selection, selection_reference), score)
    return dense, calibration, timing, score, choose, reported


def minilm_section(rounds: int) -> str:
    dense, calibration, timing, score, choose, reported = _minilm()
    rows = []
    start = time.perf_counter()
    small, report = pangkas.compress(dense, calibration, latency=LIMIT, example_inputs=timing, eval_fn=choose,
                                     replace="linear", rounds=rounds)
    seconds = time.perf_counter() - start
    print(report, flush=True)
    on_evaluation = reported(report, small)
    uniform = {
        "heads 50% + FFN 50%, obs + reconstruct": lambda m: pangkas.prune_transformer(
            m, calibration[0], heads=0.5, ffn=0.5, data=calibration, reconstruct=True),
        "heads 50% + FFN 50%, obs + reconstruct, by sensitivity": lambda m: pangkas.prune_transformer(
            m, calibration[0], heads=0.5, ffn=0.5, data=calibration, reconstruct=True, allocation="sensitivity"),
        "3 layers removed, linear_fit + linear map": lambda m: pangkas.prune_layers(m, calibration, n=3,
                                                                                  replace="linear"),
    }
    models = {}
    for label, prune in uniform.items():
        m = copy.deepcopy(dense)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            prune(m)
        models[label] = m
    ratios = latency_ratios([dense, small, *models.values()], timing, rounds=rounds)
    c = report.chosen
    rows.append((f"compress latency={LIMIT} ({c.strategy})", ratios[1].format(), "yes" if ratios[1].meets(LIMIT) else "no",
                 human_count(sum(p.numel() for p in small.parameters())), f"{on_evaluation[id(c)]:.3f}"))
    for (label, m), ratio in zip(models.items(), ratios[2:]):
        rows.append((label, ratio.format(), "yes" if ratio.meets(LIMIT) else "no",
                     human_count(sum(p.numel() for p in m.parameters())), f"{score(m):.3f}"))
    table = render_table("MiniLM, batch 8 x 128 tokens: compress against uniform recipes",
                         ("model", "latency vs full (95% interval)", f"meets {LIMIT}", "params", "mean cosine to full"),
                         rows, markdown=True)
    finalists = _finalists(report, on_evaluation)
    notes = (f"Measured with {environment()}. compress: `latency={LIMIT}`, `replace=\"linear\"` (removed post-norm "
             "layers get fitted linear stand-ins), defaults otherwise (obs importance, re-fit of the layers reading "
             f"removed channels); `eval_fn` the mean cosine to the full model on a held-out selection split of "
             f"{SELECTION_SENTENCES} further sentences (the ones after the 700 of `minilm.setup()`, so disjoint from "
             "both the 100 calibration and the 600 evaluation sentences): the finalist is chosen on those, and every "
             "row, compress's included, is reported on the 600 evaluation sentences, which no choice saw. Every "
             f"finalist is listed below with both scores. Search {seconds:.0f} s ({report.measurements} distortion "
             "measurements). Uniform recipes as in docs/transformers.md and docs/layers.md, rebuilt and timed in the "
             "same interleaved rounds as the compressed model.")
    return "\n\n".join([table, finalists, notes])


def _finalists(report, on_evaluation) -> str:
    """The search's finalists: measured latency, both scores, what each cuts."""
    return render_table("the search's finalists (timed when built); chosen by the selection score",
                        ("finalist", "latency vs full", "mean cosine, selection", "mean cosine, evaluation", "cuts"),
                        [(f.strategy + (" (chosen)" if f is report.chosen else ""), f.latency.format(),
                          f"{f.score:.3f}", f"{on_evaluation[id(f)]:.3f}",
                          f"blocks {', '.join(f.cuts['blocks']) or '-'}; widths "
                          + (", ".join(f"{k} {v}" for k, v in f.cuts["widths"].items()) or "-"))
                         for f in report.finalists], markdown=True)


def minilm_int8_section(rounds: int) -> str:
    from pangkas.measure import file_sizes

    dense, calibration, timing, score, choose, reported = _minilm()
    start = time.perf_counter()
    small, report = pangkas.compress(dense, calibration, latency=LIMIT_INT8, quantize="int8-dynamic",
                                     example_inputs=timing, eval_fn=choose, replace="linear", rounds=rounds)
    seconds = time.perf_counter() - start
    print(report, flush=True)
    on_evaluation = reported(report, small)
    start = time.perf_counter()
    plain, plain_report = pangkas.compress(dense, calibration, latency=LIMIT_INT8, example_inputs=timing,
                                           eval_fn=choose, replace="linear", rounds=rounds)  # the same, float
    plain_seconds = time.perf_counter() - start
    plain_cosine = reported(plain_report, plain)[id(plain_report.chosen)]
    uniform = copy.deepcopy(dense)
    pangkas.prune_transformer(uniform, calibration[0], heads=0.5, ffn=0.5, data=calibration, reconstruct=True)
    c = report.chosen
    models = {"full (float)": dense,
              "full + int8-dynamic": pangkas.quantize(dense, calibration, "int8-dynamic")[0],
              f"compress latency={LIMIT_INT8}, quantize=\"int8-dynamic\" ({c.strategy})": small,
              f"compress latency={LIMIT_INT8}, float ({plain_report.chosen.strategy})": plain,
              "heads 50% + FFN 50%, obs + reconstruct, + int8-dynamic": pangkas.quantize(uniform, calibration,
                                                                                         "int8-dynamic")[0]}
    ratios = latency_ratios(list(models.values()), timing, rounds=rounds)
    rows = []
    for i, ((label, m), ratio) in enumerate(zip(models.items(), ratios)):
        cosine = on_evaluation[id(c)] if m is small else plain_cosine if m is plain else score(m)
        rows.append((label, "1.00x (baseline)" if i == 0 else ratio.format(),
                     "" if i == 0 else "yes" if ratio.meets(LIMIT_INT8) else "no",
                     human_count(sum(p.numel() for p in m.parameters())), f"{file_sizes(m)[1] / 1024:.0f} KiB",
                     f"{cosine:.3f}"))
        print(rows[-1], flush=True)
    table = render_table(f"MiniLM, batch 8 x 128 tokens: latency={LIMIT_INT8} by pruning and int8 together",
                         ("model", "latency vs full float eager (95% interval)", f"meets {LIMIT_INT8}", "params",
                          "file (pangkas.save)", "mean cosine to full"), rows, markdown=True)
    estimate = next(n for n in report.notes if "estimated at" in n)  # compress's note on its start
    notes = (f"Measured with {environment()}, eager mode. compress: `latency={LIMIT_INT8}`, "
             "`quantize=\"int8-dynamic\"`, `replace=\"linear\"`, defaults otherwise, finalist chosen on the "
             f"{SELECTION_SENTENCES}-sentence selection split and every row reported on the 600 evaluation sentences "
             "(as in docs/compress/minilm.md). The search estimates latency from the profile of the dense model "
             f"quantized, scaled by its measured time over the float model's (its note: \"{estimate}\"); each "
             "finalist is quantized, then timed. "
             f"Search {seconds:.0f} s ({report.measurements} distortion measurements); without `quantize` (the "
             f"float row, same options) {plain_seconds:.0f} s. Params: the int8 layers' weights count as before "
             "(one per value). Every row timed in the same interleaved rounds against the float model.")
    return "\n\n".join([table, _finalists(report, on_evaluation), notes])


def llm_section(rounds: int) -> str:
    import llm
    from corpus import novels
    from pangkas.evaluate import perplexity, token_ids, windows

    warnings.filterwarnings("ignore")
    dense, tokenizer = llm.load_model()
    books = novels()
    emma = token_ids(books["emma"], tokenizer)
    calib_windows = windows(emma, llm.WINDOW, CALIBRATION_WINDOWS, start=llm.SKIP)
    # the windows right after calibration's; windows() slices consecutive windows from `start`, so
    # together they must be one stretch of Emma, no token in both
    selection = windows(emma, llm.WINDOW, SELECTION_WINDOWS, start=llm.SKIP + CALIBRATION_WINDOWS)
    span = emma[llm.SKIP * llm.WINDOW:(llm.SKIP + CALIBRATION_WINDOWS + SELECTION_WINDOWS) * llm.WINDOW]
    assert torch.equal(torch.cat([calib_windows, selection]).flatten(), span), "selection overlaps calibration"
    calib = [{"input_ids": w[None]} for w in calib_windows]
    evaluation = windows(token_ids(books["persuasion"], tokenizer), llm.WINDOW, 24, start=llm.SKIP).flatten()
    ppl = lambda m, ids=evaluation: perplexity(m, ids, window=llm.WINDOW, batch_size=8)  # noqa: E731
    choose, reported = _held_out(dense, lambda m: -ppl(m, selection.flatten()), ppl)
    total = sum(p.numel() for p in dense.parameters())
    start = time.perf_counter()
    small, report = pangkas.compress(dense, calib, params=0.75, eval_fn=choose, example_inputs=calib[0],
                                     step=0.25, rounds=rounds)
    seconds = time.perf_counter() - start
    print(report, flush=True)
    on_persuasion = reported(report, small)
    ffn_params = sum(p.numel() for n, p in dense.named_parameters() if ".mlp." in n)
    attn_params = sum(p.numel() for n, p in dense.named_parameters() if ".self_attn." in n)
    need = total * 0.25
    per_layer = sum(p.numel() for p in dense.model.layers[0].parameters())
    uniform = {
        f"FFN {need / ffn_params:.0%} + reconstruct": dict(ffn=need / ffn_params),
        f"FFN {need / ffn_params:.0%} + reconstruct, by sensitivity": dict(ffn=need / ffn_params,
                                                                          allocation="sensitivity"),
        f"1 of 3 KV groups + FFN {(need - attn_params / 3) / ffn_params:.0%} + reconstruct": dict(
            heads=1 / 3, ffn=(need - attn_params / 3) / ffn_params),
    }
    rows = [(f"compress params=0.75 ({report.chosen.strategy})", human_count(sum(p.numel() for p in small.parameters())),
             f"{on_persuasion[id(report.chosen)]:.2f}")]
    for label, options in uniform.items():
        m = copy.deepcopy(dense)
        options = dict(options)
        pangkas.prune_transformer(m, calib[0], data=calib, reconstruct=True, **options)
        rows.append((label, human_count(sum(p.numel() for p in m.parameters())), f"{ppl(m):.2f}"))
        print(rows[-1], flush=True)
        del m
    n = round(need / per_layer)
    m = copy.deepcopy(dense)
    pangkas.prune_layers(m, calib, n=n, replace="linear")
    rows.append((f"{n} layers removed + linear map", human_count(sum(p.numel() for p in m.parameters())),
                 f"{ppl(m):.2f}"))
    del m
    dense_ppl = ppl(dense)
    table = render_table(f"SmolLM2-135M, params=0.75 ({human_count(total)} -> {human_count(0.75 * total)}); "
                         f"dense perplexity {dense_ppl:.2f}", ("model", "params", "perplexity"), rows, markdown=True)
    finalists = render_table("the search's finalists; chosen by the selection perplexity",
                             ("finalist", "params", "perplexity, Emma selection", "perplexity, Persuasion",
                              "blocks removed"),
                             [(f.strategy + (" (chosen)" if f is report.chosen else ""),
                               human_count(f.absolute["params"]), f"{-f.score:.2f}", f"{on_persuasion[id(f)]:.2f}",
                               ", ".join(f.cuts["blocks"]) or "-") for f in report.finalists], markdown=True)
    notes = (f"Measured with {environment()}. compress: `params=0.75`, `step=0.25`, defaults otherwise (obs "
             f"importance, re-fit of the layers reading removed channels); calibration {CALIBRATION_WINDOWS} x "
             f"{llm.WINDOW} tokens of Emma; `eval_fn` minus the perplexity on a held-out selection split, the "
             f"{SELECTION_WINDOWS} x {llm.WINDOW} tokens of Emma that follow the calibration windows (disjoint from "
             "them, checked in the script, and from Persuasion): the finalist is chosen on those, and every row, "
             "compress's included, is reported on 24 x 256 tokens of Persuasion, which no choice saw. Every finalist "
             f"is listed with both perplexities. Search {seconds:.0f} s ({report.measurements} distortion "
             "measurements). Uniform rows: `prune_transformer(..., reconstruct=True)` at the ratio that removes a "
             "quarter of the parameters; layers: `prune_layers(n=..., replace=\"linear\")`. No fine-tuning anywhere.")
    return "\n\n".join([table, finalists, notes])


def digits_section(rounds: int) -> str:
    from pangkas.demo import accuracy

    dense, data = trained_digits()
    score = lambda m: accuracy(m, data.x_test, data.y_test)  # noqa: E731
    held = SELECTION_IMAGES  # the finalist is chosen on these training images, reported on the test set
    choose = lambda m: accuracy(m, data.x_train[-held:], data.y_train[-held:])  # noqa: E731
    batches = list(data.x_train[:-held].split(64))
    rows = [("dense", human_count(sum(p.numel() for p in dense.parameters())), "1.00", f"{score(dense):.2%}", "")]
    for macs, steps, recover_rounds, evolve in ((0.25, 0, 0, 0), (0.25, 0, 0, EVOLVE), (0.25, 300, 0, 0),
                                                (0.25, 100, 2, 0), (0.1, 300, 0, 0), (0.1, 100, 2, 0)):
        start = time.perf_counter()
        small, report = pangkas.compress(dense, batches, macs=macs, recover_steps=steps, recover_rounds=recover_rounds,
                                         evolve=evolve, eval_fn=choose, example_inputs=data.x_test[:1], rounds=rounds)
        seconds = time.perf_counter() - start
        params, relative = _row_figures(small, dense, data.x_test[:1])
        recovery = f"recover_steps={steps}" + (f", recover_rounds={recover_rounds}" if recover_rounds else "") \
            + (f", evolve={evolve}" if evolve else "")
        rows.append((f"compress macs={macs}, {recovery} ({report.chosen.strategy})",
                     human_count(sum(p.numel() for p in small.parameters())), relative, f"{score(small):.2%}",
                     f"{seconds:.0f}"))
        print(rows[-1], flush=True)
    table = render_table("digits CNN (trained here, 40 epochs), test accuracy on 450 images",
                         ("model", "params", "MACs vs dense", "accuracy", "search s"), rows, markdown=True)
    notes = (f"Measured with {environment()}. compress defaults otherwise; calibration: the first "
             f"{len(data.y_train) - held} training images (batches of 64); the finalist is chosen by accuracy on the "
             f"last {held} training images, and the table reports the test set. `recover_steps`: each finalist "
             "fine-tuned that many batches, distilling from the dense model; with `recover_rounds=2` the search "
             "also fine-tunes that many batches at a third and two thirds of the way to the budget (the model as "
             "cut so far, without re-fit), so a finalist has had the same 300 batches in all as with "
             f"`recover_steps=300` alone. `evolve={EVOLVE}`: one more finalist from an evolutionary search seeded with "
             "the greedy searches' end states (docs/compress/evolution.md). One test image is "
             f"{1 / len(data.y_test):.2%} of accuracy.")
    return "\n\n".join([table, notes])


SECTIONS = {"cnn": cnn, "minilm": minilm_section, "minilm_int8": minilm_int8_section, "llm": llm_section,
            "digits": digits_section}
TITLES = {"cnn": "compress: latency budgets on CNNs and a ViT", "minilm": "compress: MiniLM at half the latency",
          "minilm_int8": "compress: MiniLM at 0.3 of the latency, pruned and int8",
          "llm": "compress: SmolLM2 at three quarters of the parameters",
          "digits": "compress: the digits CNN at a quarter and a tenth of the MACs, recovered"}


def main() -> None:
    run_sections(__doc__, "compress", SECTIONS, TITLES, "compress.py")


if __name__ == "__main__":
    main()
