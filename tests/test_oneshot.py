"""One-shot calibration pruning: Wanda and SparseGPT."""

import copy

import pytest
import torch
from torch import nn

import pangkas
from pangkas.weights.masks import get_mask
from pangkas.weights.sparsegpt import SparseGPT


def skewed_inputs(n=512, features=64):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, features, generator=g) * torch.linspace(0.1, 3, features)  # features differ


def relative_error(model, reference, x):
    with torch.no_grad():
        return float((model(x) - reference).pow(2).mean() / reference.pow(2).mean())


@pytest.mark.parametrize("method", ["wanda", SparseGPT(per_row=True)])
def test_each_row_loses_the_same_share(method):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32))
    x = skewed_inputs()
    pangkas.prune_weights(model, sparsity=0.5, importance=method, data=list(x.split(64)))
    assert ((model[0].weight == 0).sum(1) == 32).all()


def test_sparsegpt_chooses_with_one_threshold_per_block():
    """The paper's rule: each block of 128 inputs loses exactly its share, rows adaptively; the
    first block's mask is the lowest w^2 / [H^-1]_jj^2 across the whole block."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 32, bias=False))
    x = skewed_inputs(features=256)
    w = model[0].weight.detach().clone()
    pangkas.prune_weights(model, sparsity=0.5, importance="sparsegpt", data=list(x.split(64)))
    zero = model[0].weight == 0
    assert (zero.reshape(32, 2, 128).sum((0, 2)) == 32 * 64).all()
    assert zero.sum(1).unique().numel() > 1  # rows differ: adaptive, not the same share per row
    h = x.T @ x / len(x)
    h += 0.01 * h.diag().mean() * torch.eye(256)
    hinv = torch.linalg.cholesky(torch.linalg.inv(h.double()), upper=True).float()
    score = (w[:, :128] / hinv.diag()[:128]).pow(2)
    expected = score <= score.flatten().kthvalue(32 * 64).values
    assert (zero[:, :128] == expected).float().mean() > 0.999  # float rounding may swap a tie


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_n_m_holds(method):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32))
    pangkas.prune_weights(model, pattern="2:4", importance=method, data=list(skewed_inputs().split(64)))
    assert ((model[0].weight != 0).reshape(32, 16, 4).sum(-1) <= 2).all()


def test_calibrated_methods_beat_magnitude_where_inputs_differ():
    torch.manual_seed(0)
    x = skewed_inputs()
    base = nn.Sequential(nn.Linear(64, 32))
    reference = base(x).detach()
    errors = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        model = copy.deepcopy(base)
        options = {} if method == "magnitude" else {"data": list(x.split(64))}
        pangkas.prune_weights(model, sparsity=0.5, importance=method, **options)
        errors[method] = relative_error(model, reference, x)
    assert errors["wanda"] < 0.6 * errors["magnitude"], errors
    assert errors["sparsegpt"] < errors["wanda"] * 1.05, errors


def test_sparsegpt_block_by_block_on_a_transformer():
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    config = transformers.LlamaConfig(vocab_size=100, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=128)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    data = [{"input_ids": torch.randint(0, 100, (4, 16), generator=torch.Generator().manual_seed(i))} for i in range(4)]
    with torch.no_grad():
        reference = model(**data[0]).logits
    errors = {}
    for method in ("magnitude", "sparsegpt"):
        pruned = copy.deepcopy(model)
        report = pangkas.prune_weights(pruned, sparsity=0.5, importance=method, include="model.layers",
                                       **({"data": data} if method != "magnitude" else {}))
        assert report.sparsity == pytest.approx(0.5, abs=1e-3)
        with torch.no_grad():
            logits = pruned(**data[0]).logits
        errors[method] = float((logits - reference).pow(2).mean() / reference.pow(2).mean())
    assert errors["sparsegpt"] < 0.7 * errors["magnitude"], errors


def test_conv_layers_and_existing_masks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
    data = [torch.randn(2, 3, 8, 8) for _ in range(2)]
    pangkas.prune_weights(model, sparsity=0.3, importance="random")
    first = (model[2].weight == 0).clone()
    pangkas.prune_weights(model, sparsity=0.6, importance="sparsegpt", data=data)
    now = model[2].weight == 0
    assert now[first].all(), "a pruned weight came back"
    assert get_mask(model[2]) is not None
    assert int(now.sum()) >= round(0.6 * now.numel()) - 8  # each of 8 rows rounds on its own


BAD = [
    (dict(sparsity=0.5, importance="wanda"), "needs data"),
    (dict(threshold=0.1, importance="wanda", data=[torch.randn(2, 4)]), "threshold"),
    (dict(sparsity=0.5, importance="sparsegpt", scope="global", data=[torch.randn(2, 4)]), "global"),
    (dict(sparsity=0.5, importance="sparsegpt", data=[]), "empty"),
]


@pytest.mark.parametrize("kwargs,message", BAD)
def test_bad_input_leaves_the_model(kwargs, message):
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(pangkas.PangkasError, match=message):
        pangkas.prune_weights(model, **kwargs)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert get_mask(model[0]) is None


def test_unsupported_layer_is_named():
    model = nn.Sequential(nn.Conv1d(3, 4, 3), nn.Flatten(), nn.Linear(8, 2))
    with pytest.raises(pangkas.PangkasError, match="Conv1d"):
        pangkas.prune_weights(model, sparsity=0.5, importance="wanda", data=[torch.randn(2, 3, 4)])


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_calibration_never_uses_a_key_value_cache(tiny_llama, method):
    """README-style batches leave transformers' use_cache on: the masks must be those of a run
    without a cache (a decoder layer run twice on captured arguments would see its own keys)."""
    model, ids = tiny_llama
    assert model.config.use_cache
    batches = [{"input_ids": ids[i * 24:(i + 1) * 24].view(2, 12)} for i in range(4)]
    masks = {}
    for cached in (True, False):
        pruned = copy.deepcopy(model)
        data = batches if cached else [{**b, "use_cache": False} for b in batches]
        pangkas.prune_weights(pruned, pattern="2:4", importance=method, include="model.layers", data=data)
        masks[cached] = [m.weight == 0 for m in pruned.modules() if isinstance(m, nn.Linear)]
        assert pruned.config.use_cache  # restored
    assert all(torch.equal(a, b) for a, b in zip(masks[True], masks[False]))
