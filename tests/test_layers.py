import copy
import re

import pytest
import torch
from torch import nn

import pangkas
from pangkas.layers import block_influence, layer_candidates

torchvision = pytest.importorskip("torchvision")


class Residual(nn.Module):
    def __init__(self, dim=16, silent=False):
        super().__init__()
        self.f = nn.Sequential(nn.Linear(dim, 32), nn.GELU(), nn.Linear(32, dim))
        if silent:  # f(x) = 0: the block does nothing
            nn.init.zeros_(self.f[2].weight)
            nn.init.zeros_(self.f[2].bias)

    def forward(self, x):
        return x + self.f(x)


class Stack(nn.Module):
    """Six residual blocks in a ModuleList; block ``silent`` does nothing."""

    def __init__(self, silent=3):
        super().__init__()
        self.embed = nn.Linear(8, 16)
        self.blocks = nn.ModuleList(Residual(silent=i == silent) for i in range(6))
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def data(n=3):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(8, 8, generator=g) for _ in range(n)]


def images(size=64):
    return [torch.randn(2, 3, size, size) for _ in range(2)]


# -- candidates --------------------------------------------------------------------------------

@pytest.mark.parametrize("name,expected", [
    ("resnet18", ["layer1.0", "layer1.1", "layer2.1", "layer3.1", "layer4.1"]),
    ("resnet50", ["layer1.1", "layer1.2", "layer2.1", "layer2.2", "layer2.3"] + [f"layer3.{i}" for i in range(1, 6)]
     + ["layer4.1", "layer4.2"]),
    ("mobilenet_v2", [f"features.{i}" for i in (3, 5, 6, 8, 9, 10, 12, 13, 15, 16)]),
    ("convnext_tiny", [f"features.{s}.{i}" for s, n in ((1, 3), (3, 3), (5, 9), (7, 3)) for i in range(n)]),
])
def test_candidates_on_torchvision_cnns(name, expected):
    model = torchvision.models.get_model(name, weights=None)
    found = [c.name for c in layer_candidates(model, torch.randn(1, 3, 64, 64)) if "residual" in c.kinds]
    assert found == expected


def test_candidates_on_vit():
    model = torchvision.models.vit_b_16(weights=None, image_size=32)
    found = layer_candidates(model, torch.randn(1, 3, 32, 32))
    assert [c.name for c in found] == [f"encoder.layers.encoder_layer_{i}" for i in range(12)]
    assert all(c.kinds == ("residual",) and c.shape == (1, 5, 768) for c in found)
    assert all(c.params == sum(p.numel() for p in model.encoder.layers[0].parameters()) for c in found)
    assert all(c.macs > 0 for c in found)


def bert():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=4,
                                     num_attention_heads=2, intermediate_size=64)
    return transformers.BertModel(config).eval()


def llama():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=64)
    return transformers.LlamaForCausalLM(config).eval()


def tokens(n=2):
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(0, 100, (2, 12), generator=g),
             "attention_mask": torch.ones(2, 12, dtype=torch.long)} for _ in range(n)]


def test_candidates_on_hugging_face():
    found = {c.name: c.kinds for c in layer_candidates(bert(), tokens()[0])}
    assert all(found[f"encoder.layer.{i}"] == ("layer list",) for i in range(4))  # post-norm: a list entry
    found = {c.name: c.kinds for c in layer_candidates(llama(), tokens()[0])}
    assert found == {f"model.layers.{i}": ("residual", "layer list") for i in range(4)}


# -- scoring -----------------------------------------------------------------------------------

@pytest.mark.parametrize("importance", ["block_influence", "angular", "magnitude", "loss", "metric"])
def test_every_importance_ranks_a_do_nothing_block_lowest(importance):
    torch.manual_seed(0)
    model = Stack(silent=3)
    teacher = copy.deepcopy(model)
    fidelity = lambda out, batch: (out - teacher(batch)).square().mean()  # noqa: E731
    options = {"loss": {"loss_fn": fidelity}, "metric": {"metric_fn": lambda o, b: -fidelity(o, b)}}
    plan = pangkas.plan_layers(model, data(), n=1, importance=importance, **options.get(importance, {}))
    assert plan.chosen == ["blocks.3"], str(plan)


def test_block_influence_of_a_do_nothing_block_is_zero():
    model = Stack(silent=2)
    scores = block_influence(model, layer_candidates(model, data()[0]), data())
    assert scores["blocks.2"] == pytest.approx(0, abs=1e-6)
    assert min(v for k, v in scores.items() if k != "blocks.2") > 1e-3


def test_angular_picks_a_contiguous_run():
    model = Stack(silent=3)
    with torch.no_grad():
        model.blocks[4].f[2].weight.zero_()
        model.blocks[4].f[2].bias.zero_()
    plan = pangkas.plan_layers(model, data(), n=2, importance="angular")
    assert plan.chosen == ["blocks.3", "blocks.4"]


# -- removal -----------------------------------------------------------------------------------

def test_removing_a_do_nothing_block_changes_nothing():
    model = Stack(silent=3)
    x = data()[0]
    before = model(x)
    report = pangkas.prune_layers(model, data(), n=1)
    assert len(model.blocks) == 5
    assert torch.equal(model(x), before)
    assert report.params_after < report.params_before and report.macs_after < report.macs_before


def test_resnet_blocks_really_go():
    model = torchvision.models.resnet50(weights=None).eval()
    x = images()[0]
    shape = model(x).shape
    plan = pangkas.prune_layers(model, images(), n=4)
    assert sum(len(getattr(model, f"layer{i}")) for i in range(1, 5)) == 16 - 4
    assert model(x).shape == shape
    measured = pangkas.measure(model, x, latency=False)
    assert measured.macs == plan.macs_after and measured.params == plan.params_after


def test_residual_attribute_becomes_skip():
    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(8, 16)
            self.block = Residual()
            self.out = nn.Linear(16, 2)

        def forward(self, x):
            return self.out(self.block(self.inp(x)))

    model = Holder()
    pangkas.prune_layers(model, data(), n=1)
    assert isinstance(model.block, pangkas.surgery.blocks.Skip)
    assert model(data()[0]).shape == (8, 2)


def test_hugging_face_config_and_cache_follow(tmp_path):
    model = llama()
    pangkas.prune_layers(model, tokens(), n=2)
    assert model.config.num_hidden_layers == 2 and len(model.model.layers) == 2
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1]
    prompt = torch.randint(0, 100, (1, 5))
    out = model.generate(prompt, max_new_tokens=4, do_sample=False)  # KV cache sized by config
    assert out.shape == (1, 9)
    model.save_pretrained(tmp_path)
    transformers = pytest.importorskip("transformers")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(again(prompt).logits, model(prompt).logits)


def test_bert_layer_removal_round_trips_through_save_pretrained(tmp_path):
    model = bert()
    batch = tokens()[0]
    pangkas.prune_layers(model, tokens(), n=1, include=type(model.encoder.layer[0]))
    assert model.config.num_hidden_layers == 3
    model.save_pretrained(tmp_path)
    transformers = pytest.importorskip("transformers")
    again = transformers.AutoModel.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(again(**batch).last_hidden_state, model(**batch).last_hidden_state)


@pytest.mark.parametrize("order", ["layers then channels", "channels then layers"])
def test_with_channel_pruning_and_save_load(order, tmp_path):
    model = torchvision.models.resnet18(weights=None).eval()
    x = images()[0]
    steps = [lambda: pangkas.prune_layers(model, images(), n=2),
             lambda: pangkas.prune_channels(model, x, ratio=0.5)]
    for step in (steps if order.startswith("layers") else steps[::-1]):
        step()
    path = pangkas.save(model, tmp_path / "r18.safetensors")
    fresh = pangkas.load(path, torchvision.models.resnet18(weights=None).eval())
    assert torch.equal(fresh(x), model(x))
    assert sum(len(getattr(fresh, f"layer{i}")) for i in range(1, 5)) == 6


# -- bad input -----------------------------------------------------------------------------------

BAD = [
    (dict(n=7), "only 6 removable"),
    (dict(n=2, ratio=0.5), "exactly one"),
    (dict(), "exactly one"),
    (dict(n=0), "positive"),
    (dict(ratio=1.0), "ratio"),
    (dict(n=1, importance="loss"), "loss_fn"),
    (dict(n=1, importance="metric"), "metric_fn"),
    (dict(n=1, importance="vibes"), "importance"),
    (dict(n=1, include=["embed"]), "no removable block"),
    (dict(n=1, exclude=["nope"]), "no removable block"),
    (dict(n=1, exclude=Residual), "only 0 removable"),
]


@pytest.mark.parametrize("kwargs,message", BAD)
def test_bad_input_raises_and_leaves_model_unchanged(kwargs, message):
    model = Stack()
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(pangkas.PangkasError, match=message):
        pangkas.prune_layers(model, data(), **kwargs)
    after = model.state_dict()
    assert after.keys() == state.keys() and len(model.blocks) == 6
    for key, value in after.items():
        assert torch.equal(value, state[key]), key


def test_empty_or_single_batch_data():
    model = Stack()
    with pytest.raises(pangkas.PangkasError, match="empty"):
        pangkas.prune_layers(model, [], n=1)
    with pytest.raises(pangkas.PangkasError, match="iterable of batches"):
        pangkas.prune_layers(model, data()[0], n=1)
    assert len(model.blocks) == 6


def test_failed_removal_restores_the_model():
    class NeedsAll(Stack):
        def forward(self, x):
            assert len(self.blocks) == 6, "this model insists on its depth"
            return super().forward(x)

    model = NeedsAll()
    with pytest.raises(pangkas.PangkasError, match="unchanged"):
        pangkas.prune_layers(model, data(), n=1)
    assert len(model.blocks) == 6 and [type(b) for b in model.blocks] == [Residual] * 6


def test_include_and_exclude_select_blocks_like_everywhere_else():
    model = Stack()
    found = [c.name for c in layer_candidates(model, data()[0])]
    plan = pangkas.plan_layers(model, data(), n=1, include="blocks.2")  # a glob: the block and inside it
    assert [c.name for c in plan.candidates] == [n for n in found if n == "blocks.2" or n.startswith("blocks.2.")]
    plan = pangkas.plan_layers(model, data(), n=1, include=Residual, exclude=["blocks.0", "blocks.1"])
    assert [c.name for c in plan.candidates] == [f"blocks.{i}" for i in range(2, 6)]


def test_old_names_warn_and_mean_the_same():
    torch.manual_seed(0)
    model = Stack(silent=3)
    new = pangkas.plan_layers(model, data(), n=1, importance="magnitude", include=Residual)
    with pytest.warns(DeprecationWarning) as caught:
        old = pangkas.plan_layers(model, data(), n=1, criterion="magnitude",
                                  candidates=[c.name for c in new.candidates])
    assert ["importance=" in str(w.message) or "include=" in str(w.message) for w in caught] == [True, True]
    assert old.chosen == new.chosen and old.scores == new.scores
    with pytest.raises(pangkas.PangkasError, match="both"):
        pangkas.plan_layers(model, data(), n=1, criterion="magnitude", importance="magnitude")


def test_apply_returns_a_report():
    model = Stack(silent=3)
    report = pangkas.prune_layers(model, data(), n=1)
    assert isinstance(report, pangkas.LayerReport) and report.chosen == ["blocks.3"]
    as_dict = report.to_dict()
    assert as_dict["kind"] == "layers" and as_dict["removed"] == ["blocks.3"]
    assert as_dict["params_after"] == sum(p.numel() for p in model.parameters()) < as_dict["params_before"]
    assert "layers removed" in str(report)


# -- importance criteria as objects -------------------------------------------------------------

class Pick(pangkas.layer_importance.LayerImportance):
    """Scores one given block lowest: whatever the data says, that block goes first."""

    needs_data = False

    def __init__(self, block, name="pick"):
        self.block, self.name = block, name
        self.calls = 0

    def scores(self, model, candidates, data, **fns):
        self.calls += 1
        return {c.name: 0.0 if c.name == self.block else 1.0 + i for i, c in enumerate(candidates)}


@pytest.fixture
def registry():
    """``pangkas.layer_importance``; what a test registers is removed afterwards."""
    before = set(pangkas.layer_importance.names())
    yield pangkas.layer_importance
    for name in set(pangkas.layer_importance.names()) - before:
        pangkas.layer_importance.unregister(name)


def test_builtins_are_registered_objects():
    assert pangkas.layer_importance.names()[:5] == ("block_influence", "angular", "loss", "metric", "magnitude")
    model = Stack(silent=3)
    plan = pangkas.plan_layers(model, data(), n=1, importance=pangkas.layer_importance.BlockInfluence())
    assert plan.scores == block_influence(model, layer_candidates(model, data()[0]), data())
    assert plan.chosen == ["blocks.3"] and plan.importance == "block_influence"


def test_a_registered_criterion_is_used_by_name(registry):
    registry.register(Pick("blocks.1", name="mine"))
    model = Stack(silent=3)  # block_influence would remove blocks.3
    plan = pangkas.plan_layers(model, data(), n=1, importance="mine")
    assert plan.chosen == ["blocks.1"] and plan.scores["blocks.1"] == 0.0
    assert plan.importance == "mine" and "layer plan: importance=mine" in str(plan)
    report = plan.apply()
    assert len(model.blocks) == 5 and report.to_dict()["importance"] == "mine"


def test_an_object_or_a_function_works_without_registering(registry):
    pick = Pick("blocks.4")
    plan = pangkas.plan_layers(Stack(), data(), n=1, importance=pick)
    assert plan.chosen == ["blocks.4"] and pick.calls == 1 and "pick" not in registry.names()
    assert "importance=pick" in str(plan)

    def deepest(model, candidates, data):
        return {c.name: -i for i, c in enumerate(candidates)}

    plan = pangkas.plan_layers(Stack(), data(), n=2, importance=deepest)
    assert plan.chosen == ["blocks.5", "blocks.4"] and plan.importance == "deepest"


def test_a_taken_name_is_refused_unless_replaced(registry):
    registry.register(Pick("blocks.1", name="mine"))
    for name in ("mine", "block_influence"):
        with pytest.raises(pangkas.PangkasError, match=f"'{name}' is already registered"):
            registry.register(Pick("blocks.2", name=name))
    assert pangkas.plan_layers(Stack(), data(), n=1, importance="mine").chosen == ["blocks.1"]
    assert pangkas.plan_layers(Stack(silent=3), data(), n=1).chosen == ["blocks.3"]
    registry.register(Pick("blocks.2", name="mine"), replace=True)
    assert pangkas.plan_layers(Stack(), data(), n=1, importance="mine").chosen == ["blocks.2"]
    with pytest.raises(pangkas.PangkasError, match=r"an instance: Pick\(\)"):
        registry.register(Pick)


def test_needs_are_checked_before_the_model_runs():
    class NeedsLoss(Pick):
        needs_loss = True

    class NeedsMetric(Pick):
        needs_metric = True

    model = Stack()
    runs = []
    model.register_forward_pre_hook(lambda module, args: runs.append(1))
    for criterion, missing in ((NeedsLoss("blocks.1", "lossy"), "loss_fn"),
                               (NeedsMetric("blocks.1", "metricky"), "metric_fn")):
        with pytest.raises(pangkas.PangkasError, match=f"importance='{criterion.name}' needs {missing}="):
            pangkas.plan_layers(model, data(), n=1, importance=criterion)
        assert criterion.calls == 0
    assert runs == []
    plan = pangkas.plan_layers(model, data(), n=1, importance=NeedsLoss("blocks.1"), loss_fn=lambda o, b: 0.0)
    assert plan.chosen == ["blocks.1"]


def test_an_unknown_name_lists_the_registered_ones(registry):
    registry.register(Pick("blocks.1", name="mine"))
    listed = list(registry.names())
    assert listed[:5] == ["block_influence", "angular", "loss", "metric", "magnitude"] and "mine" in listed
    with pytest.raises(pangkas.PangkasError, match=re.escape(str(listed)) + r".*got 'vibes'"):
        pangkas.plan_layers(Stack(), data(), n=1, importance="vibes")
    with pytest.raises(pangkas.PangkasError, match=r"an instance: importance=Pick\(\)"):
        pangkas.plan_layers(Stack(), data(), n=1, importance=Pick)


@pytest.mark.parametrize("answer,message", [
    (lambda found: ({}, ["embed"]), "not candidate blocks"),
    (lambda found: ({"head": 0.0}, [found[0].name, found[1].name]), "not candidate blocks"),
    (lambda found: ({}, [found[0].name, found[0].name]), "expected 2 distinct blocks"),
    (lambda found: ({}, [found[0].name]), "expected 2 distinct blocks"),
    (lambda found: [found[0].name, found[1].name], "must return"),
])
def test_a_criterion_that_chooses_wrongly_is_refused_and_the_model_kept(answer, message):
    class Wrong(pangkas.layer_importance.LayerImportance):
        name = "wrong"

        def choose(self, model, candidates, data, n, **fns):
            return answer(candidates)

    model = Stack()
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(pangkas.PangkasError, match=message):
        pangkas.prune_layers(model, data(), n=2, importance=Wrong())
    assert len(model.blocks) == 6 and isinstance(model.embed, nn.Linear)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_n_counts_whole_layers_where_the_model_has_a_layer_list():
    """A BERT (post-norm) has attention and MLP sublayers among the candidates; by default n
    counts whole layers, and granularity='any' lets sublayers compete."""
    model = bert()
    everything = pangkas.plan_layers(model, tokens(), n=2, granularity="any")
    plan = pangkas.plan_layers(model, tokens(), n=2)
    assert {c.name for c in plan.candidates} == {f"encoder.layer.{i}" for i in range(4)}
    assert len(everything.candidates) > len(plan.candidates)
    plan.apply()
    assert model.config.num_hidden_layers == 2 and len(model.encoder.layer) == 2


def test_a_cnn_keeps_its_residual_blocks_as_candidates():
    model = torchvision.models.resnet18(weights=None).eval()
    plan = pangkas.plan_layers(model, images(), n=1)
    assert [c.name for c in plan.candidates] == [c.name for c in layer_candidates(model, images()[0])]
    assert plan.candidates and all(c.kinds == ("residual",) for c in plan.candidates)


@pytest.mark.parametrize("target", ["target_macs", "target_params"])
def test_a_target_removes_blocks_until_it_is_met(target):
    model = llama()
    plan = pangkas.plan_layers(model, tokens(), **{target: 0.6})
    before, after = ((plan.macs_before, plan.macs_after) if target == "target_macs"
                     else (plan.params_before, plan.params_after))
    assert after <= 0.6 * before
    one_less = after + next(getattr(c, target.split("_")[1]) for c in plan.candidates if c.name == plan.chosen[-1])
    assert one_less > 0.6 * before  # it stops as soon as the target is met
    scores = plan.scores
    # equal-cost layers: the lowest scores go
    assert sorted(plan.chosen) == sorted(sorted(scores, key=scores.get)[:len(plan.chosen)])


def test_a_target_cheaper_layers_go_first_per_unit_of_cost():
    from pangkas.layers import _within_budget
    from pangkas.layer_importance import Candidate
    found = [Candidate(name, ("residual",), None, None, (1,), params, macs, 0)
             for name, params, macs in (("a", 10, 100), ("b", 10, 10), ("c", 10, 300))]
    # damage per MAC saved: a 0.002, c 0.003, b 0.025; by score alone b would go before c
    assert _within_budget({"a": 0.2, "b": 0.25, "c": 0.9}, found, "macs", 0.85, 1000) == ["a", "c"]
    with pytest.raises(pangkas.PangkasError, match="cannot be met"):
        _within_budget({"a": 0.2, "b": 0.25, "c": 0.9}, found, "macs", 0.1, 1000)


@pytest.mark.parametrize("kwargs, message", [
    (dict(n=1, target_macs=0.5), "exactly one"), (dict(), "exactly one"), (dict(target_macs=1.5), r"\(0, 1\)"),
    (dict(n=1, granularity="heads"), "granularity"),
])
def test_bad_amounts_are_refused(kwargs, message):
    with pytest.raises(pangkas.PangkasError, match=message):
        pangkas.plan_layers(Stack(), data(), **kwargs)


def test_replace_linear_beats_removal_alone(tiny_llama):
    """Removing layers with replace='linear' folds a fitted map into the layer before: the model
    keeps its architecture and stays closer to the dense one than removal alone."""
    dense, ids = tiny_llama
    batches = [{"input_ids": ids[i * 24:(i + 1) * 24].view(2, 12)} for i in range(4)]
    with torch.no_grad():
        reference = dense(**batches[0]).logits
    errors = {}
    for replace in (None, "linear"):
        model = copy.deepcopy(dense)
        plan = pangkas.plan_layers(model, batches, n=1, importance=lambda m, c, d: {c[-1].name: 0.0},
                                   replace=replace)
        assert plan.chosen == ["model.layers.2"]
        plan.apply()
        with torch.no_grad():
            errors[replace] = float((model(**batches[0]).logits - reference).norm() / reference.norm())
        assert len(model.model.layers) == 2 and model.config.num_hidden_layers == 2
    assert errors["linear"] < 0.9 * errors[None], errors
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, dense.get_submodule("").state_dict()[n])]
    assert changed == ["model.layers.1.mlp.down_proj.weight"]


def test_replace_linear_refuses_what_it_cannot_fold(tiny_llama):
    dense, ids = tiny_llama
    batches = [{"input_ids": ids[:24].view(2, 12)}]
    with pytest.raises(pangkas.PangkasError, match="first of model.layers"):
        pangkas.plan_layers(dense, batches, n=1, importance=lambda m, c, d: {c[0].name: 0.0}, replace="linear")
    with pytest.raises(pangkas.PangkasError, match="replace must be"):
        pangkas.plan_layers(dense, batches, n=1, replace="mlp")


# -- replace="linear" where nothing can be folded: a fitted stand-in module ----------------------

class Chain(nn.Module):
    """Layers that are affine maps (a layer list, not residual): what a run of them does, an
    affine stand-in can do exactly."""

    def __init__(self, width=16, depth=4):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(8, width)
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.head = nn.Sequential(nn.GELU(), nn.Linear(width, 4))

    def forward(self, x):
        x = self.embed(x)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def last_two(model, candidates, data):
    return {c.name: 0.0 if i >= len(candidates) - 2 else 1.0 for i, c in enumerate(candidates)}


def test_a_stand_in_for_affine_layers_is_exact():
    from pangkas.reconstruct import fit_stand_in
    model = Chain()
    x = data()[0]
    end = model.layers[1](model.layers[0](model.embed(x)))
    stand_in = fit_stand_in(model, "layers.0", "layers.1", data(), damp=1e-10)
    torch.testing.assert_close(stand_in(model.embed(x)), end, atol=1e-5, rtol=1e-5)
    # through prune_layers (the first layers: nothing before them to fold into), with the default ridge
    before = model(x)
    pangkas.prune_layers(model, data(), n=2, replace="linear", include=nn.Linear,
                         importance=lambda m, c, d: {n.name: float(i) for i, n in enumerate(c)})
    assert [type(m).__name__ for m in model.layers] == ["LinearStandIn", "Linear", "Linear"]
    with torch.no_grad():
        assert float((model(x) - before).norm() / before.norm()) < 1e-2


def test_bert_layers_get_a_stand_in_that_beats_removal():
    dense, batch = bert(), tokens()[0]
    with torch.no_grad():
        reference = dense(**batch).last_hidden_state
    errors = {}
    for replace in (None, "linear"):
        model = copy.deepcopy(dense)
        plan = pangkas.plan_layers(model, tokens(4), n=2, importance=last_two, replace=replace)
        report = plan.apply()
        with torch.no_grad():
            errors[replace] = float((model(**batch).last_hidden_state - reference).norm() / reference.norm())
    layers = model.encoder.layer
    assert [type(m).__name__ for m in layers] == ["BertLayer", "BertLayer", "LinearStandIn"]
    assert model.config.num_hidden_layers == 3 and plan.stand_ins == ["encoder.layer.2"]
    assert report.params_after == sum(p.numel() for p in model.parameters())
    assert errors["linear"] < 0.5 * errors[None], errors
    # a fresh stand-in (zero weights) is a Skip: the fit is what makes the difference
    with torch.no_grad():
        layers[2].linear.weight.zero_()
        layers[2].linear.bias.zero_()
        skipped = float((model(**batch).last_hidden_state - reference).norm() / reference.norm())
    assert skipped == pytest.approx(errors[None], rel=1e-5)


def test_stand_ins_round_trip_through_save_and_load(tmp_path):
    model, batch = bert(), tokens()[0]
    config = copy.deepcopy(model.config)
    pangkas.prune_layers(model, tokens(), n=2, importance=lambda m, c, d: {c[1].name: 0.0, c[3].name: 0.0},
                         replace="linear")  # two runs of one layer: two stand-ins
    assert [type(m).__name__ for m in model.encoder.layer] == ["BertLayer", "LinearStandIn", "BertLayer",
                                                               "LinearStandIn"]
    path = pangkas.save(model, tmp_path / "bert.safetensors")
    transformers = pytest.importorskip("transformers")
    fresh = pangkas.load(path, transformers.BertModel(config).eval())
    assert [type(m).__name__ for m in fresh.encoder.layer] == [type(m).__name__ for m in model.encoder.layer]
    assert torch.equal(fresh(**batch).last_hidden_state, model(**batch).last_hidden_state)
    with pytest.raises(pangkas.PangkasError, match=r"stand-ins.*pangkas.save\(model, path\).*pangkas.load"):
        pangkas.save_pretrained(model, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_a_corrupt_stand_in_edit_is_refused_and_the_model_kept(tmp_path):
    model = bert()
    pangkas.prune_layers(model, tokens(), n=1, importance=lambda m, c, d: {c[-1].name: 0.0}, replace="linear")
    edits = model._pangkas_edits
    edits[0]["stand_ins"]["encoder.layer.3"]["width"] = 0
    path = pangkas.save(model, tmp_path / "bad.safetensors")
    fresh = bert()
    state = copy.deepcopy(fresh.state_dict())
    with pytest.raises(pangkas.PangkasError, match="edits"):
        pangkas.load(path, fresh)
    assert len(fresh.encoder.layer) == 4 and all(torch.equal(v, state[k]) for k, v in fresh.state_dict().items())


class Interrupt(KeyboardInterrupt):
    pass


# apply() runs the last block: 1 output shapes, 2 finding the projection to fold into, 3-4 fitting
# that map, 5 checking it with the map folded in (refused: post-norm), 6-7 fitting the stand-in
@pytest.mark.parametrize("when", [3, 5, 6, "applying"])
def test_an_interrupt_while_standing_in_leaves_the_model_unchanged(when, monkeypatch):
    model = bert()
    state = copy.deepcopy(model.state_dict())
    plan = pangkas.plan_layers(model, tokens(), n=2, importance=last_two, replace="linear")
    if when != "applying":
        calls = []

        def hook(module, args, output):
            calls.append(1)
            if len(calls) == when:
                raise Interrupt

        model.encoder.layer[3].register_forward_hook(hook)
    else:  # after the stand-in is in place: the check that the model still runs
        shapes = pangkas.layers._output_shapes

        def interrupted(m, x):
            if len(m.encoder.layer) < 4:
                raise Interrupt
            return shapes(m, x)

        monkeypatch.setattr(pangkas.layers, "_output_shapes", interrupted)
    with pytest.raises(Interrupt):
        plan.apply()
    assert [type(m).__name__ for m in model.encoder.layer] == ["BertLayer"] * 4
    assert model.config.num_hidden_layers == 4 and not getattr(model, "_pangkas_edits", [])
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_what_a_stand_in_cannot_replace_is_refused(tiny_llama):
    dense, ids = tiny_llama
    batches = [{"input_ids": ids[:24].view(2, 12)}]
    with pytest.raises(pangkas.PangkasError, match="first of model.layers.*KV cache"):
        pangkas.plan_layers(dense, batches, n=1, importance=lambda m, c, d: {c[0].name: 0.0}, replace="linear")
    resnet = torchvision.models.resnet18(weights=None).eval()
    with pytest.raises(pangkas.PangkasError, match="4-d feature maps"):
        pangkas.plan_layers(resnet, images(32), n=1, importance=lambda m, c, d: {c[0].name: 0.0}, replace="linear")


class AlmostLinear(Residual):
    """A residual block whose branch is affine (no activation): a map can stand in exactly."""

    def __init__(self, dim=16):
        super().__init__(dim)
        self.f = nn.Sequential(nn.Linear(dim, dim), nn.Linear(dim, dim))
        with torch.no_grad():
            self.f[0].weight.mul_(4)


def test_linear_fit_ranks_the_block_a_map_can_replace_lowest():
    torch.manual_seed(0)
    model = Stack(silent=-1)
    model.blocks[4] = AlmostLinear()  # changes its input a lot, but linearly
    influence = block_influence(model, layer_candidates(model, data()[0]), data())
    assert min(influence, key=influence.get) != "blocks.4"
    plan = pangkas.plan_layers(model, data(), n=1, importance="linear_fit", include=Residual)
    assert plan.chosen == ["blocks.4"] and plan.scores["blocks.4"] < 1e-3


def test_replace_linear_scores_with_the_map_where_it_stands_in(tiny_llama):
    assert pangkas.plan_layers(bert(), tokens(), n=1, replace="linear").importance == "linear_fit"
    assert pangkas.plan_layers(bert(), tokens(), n=1).importance == "block_influence"
    dense, ids = tiny_llama  # pre-norm: its maps are folded, chosen as before
    batches = [{"input_ids": ids[:24].view(2, 12)}]
    assert pangkas.plan_layers(dense, batches, n=1, replace="linear",
                               exclude="model.layers.0").importance == "block_influence"


def test_padding_tokens_do_not_shape_the_fit():
    from pangkas.activations import AffineFit
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 40, 6, generator=g)
    a, c = torch.randn(6, 6, generator=g), torch.randn(6, generator=g)
    y = x @ a + c
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[:, 30:] = 0  # padding, where the hidden states are anything
    y[:, 30:] = torch.randn(2, 10, 6, generator=g) * 10
    keep = pangkas.layer_importance.real_tokens({"attention_mask": mask}, x)
    for rows, exact in ((keep, True), (None, False)):
        fit = AffineFit()
        fit.add(x, y, rows)
        b = fit.solve(damp=1e-12).float()
        close = torch.allclose(b[:-1] + torch.eye(6), a, atol=1e-4) and torch.allclose(b[-1], c, atol=1e-4)
        assert close == exact and (fit.unexplained(1e-12) < 1e-8) == exact


def test_undoing_a_block_removal_puts_back_every_layer_index(tiny_llama):
    """Layers after a removed one learn their new position (KV cache slots); undo restores it, or
    a later forward would write two layers into one cache slot."""
    from pangkas.surgery.blocks import remove_blocks

    model, ids = tiny_llama
    before = [layer.self_attn.layer_idx for layer in model.model.layers]
    undo = remove_blocks(model, ["model.layers.0"])
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1]
    undo.restore()
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == before == [0, 1, 2]
    assert model.config.num_hidden_layers == 3
