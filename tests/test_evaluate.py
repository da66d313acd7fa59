"""pangkas.evaluate: perplexity in fixed windows."""

import math

import pytest
import torch
from torch import nn

import pangkas
from pangkas.evaluate import perplexity, token_ids, windows


class Bigram(nn.Module):
    """Logits from a fixed table: the perplexity of a known distribution can be computed by hand."""

    def __init__(self, table):
        super().__init__()
        self.table = nn.Parameter(table)

    def forward(self, ids):
        return self.table[ids]


def test_perplexity_matches_the_definition():
    torch.manual_seed(0)
    table = torch.randn(7, 7)
    ids = torch.randint(0, 7, (103,))
    expected_nll = []
    for w in ids[:100].view(4, 25):  # 4 full windows of 25; the 3 tokens left over are dropped
        logp = table[w[:-1]].log_softmax(-1)
        expected_nll += [-logp[i, w[i + 1]] for i in range(24)]
    expected = math.exp(float(torch.stack(expected_nll).mean()))
    assert perplexity(Bigram(table), ids, window=25, batch_size=3) == pytest.approx(expected, rel=1e-5)
    assert perplexity(Bigram(table), ids.tolist(), window=25, max_windows=1) == pytest.approx(
        math.exp(float(torch.stack(expected_nll[:24]).mean())), rel=1e-5)


def test_a_uniform_model_has_the_vocabulary_size():
    model = Bigram(torch.zeros(11, 11))
    assert perplexity(model, torch.arange(40) % 11, window=8) == pytest.approx(11.0, rel=1e-6)


def test_mode_and_cache_setting_are_restored():
    model = Bigram(torch.zeros(5, 5)).train()
    model.config = type("Config", (), {"use_cache": True})()
    seen = []
    inner = model.forward
    model.forward = lambda ids: (seen.append((model.training, model.config.use_cache)), inner(ids))[1]
    perplexity(model, torch.arange(10) % 5, window=5)
    assert seen == [(False, False)] and model.training and model.config.use_cache


def test_texts_need_a_tokenizer_and_are_joined():
    model = Bigram(torch.zeros(256, 256))
    with pytest.raises(pangkas.PangkasError, match="tokenizer"):
        perplexity(model, ["abc"])
    assert token_ids(["ab", "c"], lambda text: list(text.encode())).tolist() == list(b"ab\n\nc")


@pytest.mark.parametrize("bad, message", [
    (torch.zeros(2, 3, dtype=torch.long), "1-D"), (torch.zeros(4), "integer"), ([], "text"), (3.0, "text"),
])
def test_bad_ids_are_refused(bad, message):
    with pytest.raises(pangkas.PangkasError, match=message):
        token_ids(bad)


def test_windows_are_counted_and_checked():
    ids = torch.arange(10)
    assert windows(ids, 3).tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert windows(ids, 3, count=1, start=2).tolist() == [[6, 7, 8]]
    with pytest.raises(pangkas.PangkasError, match="windows of 3"):
        windows(ids, 3, count=2, start=2)
    with pytest.raises(pangkas.PangkasError, match="window must be"):
        windows(ids, 1)


def test_a_causal_lm(tiny_llama):
    model, ids = tiny_llama
    value = perplexity(model, ids, window=16)
    assert 1.0 < value < 2 * model.config.vocab_size  # random weights: near the vocabulary size
