"""Every public verb speaks one vocabulary (README "The vocabulary"); old names still work for a
release, with a DeprecationWarning, and mean exactly the same."""

import copy
import inspect

import pytest
import torch
from torch import nn

import pangkas

VOCABULARY = {
    # verb: the keyword arguments it must take (besides its amount and positional arguments)
    pangkas.plan_weights: {"sparsity", "importance", "include", "exclude", "data"},
    pangkas.plan_channels: {"ratio", "ratios", "importance", "include", "exclude", "data", "loss_fn",
                            "integrations"},
    pangkas.plan_layers: {"n", "ratio", "importance", "include", "exclude", "loss_fn", "metric_fn"},
    pangkas.recover: {"objective", "loss_fn", "teacher"},
    pangkas.sensitivity: {"importance", "include", "exclude", "data", "loss_fn"},
}
RETIRED = {"method", "criterion", "ignore", "candidates", "task_loss", "loss"}
PLANS_AND_PRUNES = [(pangkas.plan_weights, pangkas.prune_weights), (pangkas.plan_channels, pangkas.prune_channels),
                    (pangkas.plan_layers, pangkas.prune_layers), (pangkas.plan_transformer, pangkas.prune_transformer)]


@pytest.mark.parametrize("verb", VOCABULARY, ids=lambda f: f.__name__)
def test_every_verb_takes_the_vocabulary(verb):
    params = inspect.signature(verb).parameters
    assert VOCABULARY[verb] <= params.keys(), VOCABULARY[verb] - params.keys()
    assert not (RETIRED - {"candidates"}) & params.keys()  # old names live only in the deprecation shim


def test_calibration_batches_are_data_and_the_second_positional_is_what_each_verb_needs():
    assert list(inspect.signature(pangkas.plan_layers).parameters)[:2] == ["model", "data"]
    assert list(inspect.signature(pangkas.recover).parameters)[:2] == ["student", "data"]
    assert list(inspect.signature(pangkas.plan_channels).parameters)[:2] == ["model", "example_inputs"]


def test_sensitivity_scores_the_whole_model_with_eval_fn():
    assert list(inspect.signature(pangkas.sensitivity).parameters)[:2] == ["model", "eval_fn"]


@pytest.mark.parametrize("plan,prune", PLANS_AND_PRUNES, ids=lambda f: f.__name__)
def test_every_plan_has_a_prune_that_plans_and_applies(plan, prune):
    assert plan.__name__.replace("plan_", "prune_") == prune.__name__


# -- behaviour: the old names are the new ones -----------------------------------------------------

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Linear(8, 16), nn.ReLU())
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(16, 16), nn.ReLU()) for _ in range(3))
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        x = self.a(x)
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)


def batches():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(6, 8, generator=g) for _ in range(3)]


def same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def cases():
    x = batches()[0]
    blocks = [c.name for c in pangkas.layer_candidates(Net(), x)]
    assert "blocks.0.0" in blocks and "a" not in blocks  # a glob would select nested blocks too
    loss = lambda out, batch: out.square().mean()  # noqa: E731
    return {
        "prune_weights(method=)": (lambda m, **kw: pangkas.prune_weights(m, sparsity=0.5, **kw),
                                   {"method": "random"}, {"importance": "random"}),
        "prune_channels(ignore=)": (lambda m, **kw: pangkas.prune_channels(m, x, ratio=0.5, **kw),
                                    {"ignore": ["a"]}, {"exclude": ["a"]}),
        "prune_layers(criterion=)": (lambda m, **kw: pangkas.prune_layers(m, batches(), n=1, **kw),
                                     {"criterion": "magnitude"}, {"importance": "magnitude"}),
        "prune_layers(candidates=)": (lambda m, **kw: pangkas.prune_layers(m, batches(), n=1, **kw),
                                      {"candidates": ["blocks.0", "blocks.1", "blocks.2"]},
                                      {"include": nn.Sequential}),  # a type selects exactly its instances
        "recover(loss=, task_loss=)": (lambda m, **kw: pangkas.recover(m, batches(), epochs=1, **kw),
                                       {"loss": "task", "task_loss": loss}, {"objective": "task", "loss_fn": loss}),
    }


@pytest.mark.parametrize("name", list(cases()))
def test_old_names_warn_and_do_exactly_what_the_new_ones_do(name):
    run, old, new = cases()[name]
    torch.manual_seed(0)
    model = Net()
    with_new, with_old = copy.deepcopy(model), copy.deepcopy(model)
    torch.manual_seed(1)
    run(with_new, **new)
    torch.manual_seed(1)
    with pytest.warns(DeprecationWarning) as caught:
        run(with_old, **old)
    said = " ".join(str(w.message) for w in caught)
    for old_name, new_name in zip(old, new):
        assert f"{old_name}" in said and f"{new_name}=" in said
    assert same_state(with_old, with_new)


def test_giving_an_old_and_a_new_name_together_is_an_error():
    with pytest.raises(pangkas.PangkasError, match="both"):
        pangkas.prune_weights(Net(), sparsity=0.5, method="magnitude", importance="magnitude")


# -- every plan applies to a report that speaks one protocol ---------------------------------------

def test_every_apply_returns_a_report():
    x = batches()[0]
    reports = [
        pangkas.plan_weights(Net(), sparsity=0.5).apply(),
        pangkas.plan_channels(Net(), x, ratio=0.5).apply(),
        pangkas.plan_layers(Net(), batches(), n=1).apply(),
    ]
    for report in reports:
        assert isinstance(report, pangkas.Report)
        as_dict = report.to_dict()
        assert {"kind", "params_before", "params_after", "macs_before", "macs_after"} <= as_dict.keys()
        assert as_dict["params_after"] < as_dict["params_before"]
        assert str(report).strip()
    assert [r.kind for r in reports] == ["weights", "channels", "layers"]


def test_transformer_plan_applies_to_a_report():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=64)
    model = transformers.LlamaForCausalLM(config).eval()
    report = pangkas.plan_transformer(model, {"input_ids": torch.randint(0, 64, (1, 8))}, heads=0.5).apply()
    assert isinstance(report, pangkas.Report) and report.to_dict()["params_after"] < report.params_before
