"""Rotation-based hidden-size pruning (SliceGPT-style) of pre-norm RMSNorm decoders."""

import copy
import re

import pytest
import torch

import pangkas
from pangkas import rotate
from pangkas.oracle import randomize

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

SMALL = dict(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=128, rms_norm_eps=0.05)  # an eps large enough that scaling it matters
CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**SMALL),
    "llama-tied": lambda: transformers.LlamaConfig(**SMALL, tie_word_embeddings=True),
    "mistral": lambda: transformers.MistralConfig(**SMALL),
    "qwen2": lambda: transformers.Qwen2Config(**SMALL),  # q/k/v biases
    "qwen3": lambda: transformers.Qwen3Config(**SMALL, head_dim=16, attention_bias=True),  # per-head q/k norms
}


def build(name):
    torch.manual_seed(0)
    model = randomize(transformers.AutoModelForCausalLM.from_config(CONFIGS[name]()).eval())
    with torch.no_grad():  # norms that are not all ones, so folding them matters
        for norm in (m for m in model.modules() if type(m).__name__.endswith("RMSNorm")):
            norm.weight.uniform_(0.5, 1.5)
    return model


def ids(seed, batch=2, length=12):
    return {"input_ids": torch.randint(0, 100, (batch, length), generator=torch.Generator().manual_seed(seed))}


X = ids(0)
DATA = [ids(seed) for seed in range(1, 5)]


@torch.no_grad()
def logits(model, x=X):
    return model(**x).logits.double()


def relative(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_rotation_without_slicing_changes_nothing(name):
    model = build(name)
    before = logits(model)
    pangkas.prune_transformer(model, X, hidden=0.0, data=DATA, rotate=True)
    assert relative(logits(model), before) < 1e-5
    assert relative(logits(model, DATA[0]), logits(build(name), DATA[0])) < 1e-5  # not only on X


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_slicing_is_the_full_model_with_trailing_directions_zeroed(name):
    """The norm compensation (weights sqrt(d/d'), eps d/d', Qwen3's q/k scaled) is exact: the sliced
    model computes what the full-width one does with the dropped directions set to zero."""
    model = build(name)
    plan = pangkas.plan_transformer(model, X, hidden=0.25, data=DATA, rotate=True)
    zeroed = copy.deepcopy(model)
    parts = rotate.parts_of(zeroed)
    if parts.tied:
        parts.head.weight = torch.nn.Parameter(parts.head.weight.detach().clone())
    q = plan.q.clone()
    q[:, plan.kept:] = 0
    original = {p: p.data for p in rotate.changed_tensors(parts)}
    for p, value in rotate.rotated(parts, original, q):
        p.data = value
    plan.apply()
    assert model.config.hidden_size == 48 and model.model.embed_tokens.weight.shape == (100, 48)
    assert relative(logits(model), logits(zeroed)) < 1e-5
    assert relative(logits(model), logits(build(name))) > 1e-3  # slicing is not free: the check can fail


def test_rotated_directions_keep_more_than_index_selection():
    """PCA's leading directions carry more of the residual stream than any 48 coordinates do."""
    model = build("llama")
    plan = pangkas.plan_transformer(model, X, hidden=0.25, data=DATA, rotate=True)
    gram = rotate.residual_covariance(model, plan.parts, DATA)
    best_coordinates = gram.diagonal().sort(descending=True).values[:plan.kept].sum() / gram.diagonal().sum()
    assert plan.energy_kept > float(best_coordinates)


@pytest.mark.parametrize("name", ["llama", "llama-tied", "qwen3"])
def test_round_trips_through_save_pretrained(name, tmp_path):
    model = build(name)
    pangkas.prune_transformer(model, X, hidden=0.25, data=DATA, rotate=True)
    pangkas.save_pretrained(model, tmp_path / "m")
    assert not (tmp_path / "m" / "modeling_pangkas.py").exists()  # the config says every size
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert loaded.config.hidden_size == 48
    assert torch.allclose(logits(loaded), logits(model), atol=1e-5)


def test_the_width_left_is_a_multiple_of_the_heads_so_the_config_loads(tmp_path):
    model = build("llama")
    plan = pangkas.plan_transformer(model, X, hidden=0.1, data=DATA, rotate=True)  # 64 - 6.4: 56, not 58
    assert plan.kept == 56 and "multiple of the 4 attention heads" in str(plan)
    plan.apply()
    model.save_pretrained(tmp_path / "m")  # plain save_pretrained
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert torch.allclose(logits(loaded), logits(model), atol=1e-5)


def test_tied_embeddings_are_untied_and_counted():
    model = build("llama-tied")
    params = sum(p.numel() for p in model.parameters())
    plan = pangkas.plan_transformer(model, X, hidden=0.25, data=DATA, rotate=True)
    assert "untied" in str(plan) and plan.params_added == 100 * 48
    report = plan.apply()
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert model.config.tie_word_embeddings is False
    assert report.params_before == params
    assert report.params_after == plan.params_after == sum(p.numel() for p in model.parameters())
    assert report.to_dict()["params_added_by_untying"] == 100 * 48
    assert "+4.80k" in str(report)


@pytest.mark.parametrize("name,config", [
    ("bert", lambda: transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                             num_attention_heads=4, intermediate_size=64)),
    ("gpt2", lambda: transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4)),
    ("gemma", lambda: transformers.GemmaConfig(**SMALL, head_dim=16)),
])
def test_refuses_layouts_a_rotation_does_not_commute_with(name, config):
    cls = transformers.AutoModel if name == "bert" else transformers.AutoModelForCausalLM
    model = cls.from_config(config()).eval()
    with pytest.raises(pangkas.PangkasError, match=re.escape(rotate.REFUSED[name])):
        pangkas.prune_transformer(model, X, hidden=0.25, data=DATA, rotate=True)


def test_refuses_a_model_without_its_head():
    model = transformers.LlamaModel(CONFIGS["llama"]()).eval()
    with pytest.raises(pangkas.PangkasError, match="head"):
        pangkas.prune_transformer(model, X, hidden=0.25, data=DATA, rotate=True)


@pytest.mark.parametrize("kwargs,message", [
    (dict(hidden=0.25), "data="),
    (dict(hidden=1.0, data=DATA), "fraction"),
    (dict(heads=0.5, hidden=0.25, data=DATA), "hidden= only"),
    (dict(ffn=0.5, data=DATA), "hidden="),
    (dict(hidden=0.25, data=DATA, importance="l1"), "importance"),
])
def test_bad_input(kwargs, message):
    model = build("llama")
    with pytest.raises(pangkas.PangkasError, match=message):
        pangkas.prune_transformer(model, X, rotate=True, **kwargs)


@pytest.mark.parametrize("name", ["llama-tied", "qwen3"])
@pytest.mark.parametrize("stage", ["check", "resize"])
def test_model_unchanged_when_it_fails_midway(name, stage, monkeypatch):
    model = build(name)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    config = model.config.to_dict()
    before = logits(model)

    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    if stage == "check":  # after folding, untying and rotating every weight
        monkeypatch.setattr(rotate, "_relative_error", fail)
    else:  # after slicing, halfway through the attributes
        monkeypatch.setattr(rotate, "_head_dim", fail)
    with pytest.raises(KeyboardInterrupt):
        pangkas.prune_transformer(model, X, hidden=0.25, data=DATA, rotate=True)
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], v) for k, v in state.items())
    assert model.config.to_dict() == config
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == (name == "llama-tied")
    assert torch.equal(logits(model), before)


def test_a_wrong_layout_is_caught_by_the_exactness_check(monkeypatch):
    """A norm that is not weight * x / rms (here: one that also adds its weight) breaks the rotation;
    the check refuses and leaves the model as it was."""
    model = build("llama")
    norm_cls = type(model.model.norm)
    monkeypatch.setattr(norm_cls, "forward", lambda self, x: self.weight * x * torch.rsqrt(
        x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon) + self.weight)
    before = logits(model)
    with pytest.raises(pangkas.PangkasError, match="changed its outputs"):
        pangkas.prune_transformer(model, X, hidden=0.25, data=DATA, rotate=True)
    assert torch.equal(logits(model), before)
