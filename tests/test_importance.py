"""Importance criteria as registered objects: channel criteria and weight criteria alike."""

import copy

import pytest
import torch
from torch import nn

import pangkas
import pangkas.activations
from pangkas import importance
from pangkas.weights import criteria
from pangkas.weights.criteria import CalibratedImportance, WeightImportance, row_masks


@pytest.fixture
def registry():
    """Registers into a registry for one test, then leaves it as it was."""
    added = []

    def register(where, criterion, **options):
        before = where.resolve(criterion.name) if criterion.name in where.names() else None
        added.append((where, criterion.name, before))
        return where.register(criterion, **options)

    yield register
    for where, name, before in reversed(added):
        if name in where.names():
            where.unregister(name)
        if before is not None:
            where.register(before)


# -- channel importance ------------------------------------------------------------------------

def hidden_net():
    """Linear(4, 6) -> ReLU -> Linear(6, 2) whose hidden unit i has l1 norm decreasing in i."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    with torch.no_grad():
        model[0].weight.copy_(torch.arange(6, 0, -1.0)[:, None].expand(6, 4))
        model[0].bias.zero_()
        model[2].weight.fill_(0.5)
    return model


class LastUnits(importance.Importance):
    """Prefers the hidden units with the highest index: only the first layer's filters have a say."""

    name = "last_units_test"

    def score(self, piece, measured):
        if piece.module_name == "0" and piece.attribute == "weight" and piece.produces:
            return torch.arange(1.0, piece.size + 1)
        return None


def kept_rows(model):
    return model[0].weight[:, 0].tolist()


def test_default_keeps_the_largest_units():
    model = hidden_net()
    pangkas.prune_channels(model, torch.randn(2, 4), ratio=0.5)
    assert kept_rows(model) == [6.0, 5.0, 4.0]


def test_registered_criterion_by_name_decides(registry):
    registry(importance, LastUnits())
    assert "last_units_test" in importance.names()
    model = hidden_net()
    pangkas.prune_channels(model, torch.randn(2, 4), ratio=0.5, importance="last_units_test")
    assert kept_rows(model) == [3.0, 2.0, 1.0]


def test_criterion_object_and_callable_without_registering():
    model = hidden_net()
    pangkas.prune_channels(model, torch.randn(2, 4), ratio=0.5, importance=LastUnits())
    assert kept_rows(model) == [3.0, 2.0, 1.0]
    model = hidden_net()
    pangkas.prune_channels(model, torch.randn(2, 4), ratio=0.5,
                           importance=lambda t, dim: -importance.l1(t, dim))  # keep the smallest
    assert kept_rows(model) == [3.0, 2.0, 1.0]


def test_builtins_are_registered_in_order():
    assert importance.names()[:8] == ("l1", "l2", "fpgm", "bn_scale", "taylor", "wanda", "obs", "random")


def test_duplicate_registration_is_refused(registry):
    class AnotherL1(LastUnits):
        name = "l1"

    with pytest.raises(pangkas.PangkasError, match="'l1' is already registered.*replace=True"):
        importance.register(AnotherL1())
    assert isinstance(importance.resolve("l1"), importance.L1)
    registry(importance, LastUnits())
    with pytest.raises(pangkas.PangkasError, match="already registered"):
        importance.register(LastUnits())
    replacement = LastUnits()
    registry(importance, replacement, replace=True)
    assert importance.resolve("last_units_test") is replacement


@pytest.mark.parametrize("bad,message", [
    (LastUnits, r"an instance: LastUnits\(\)"),
    (lambda t, dim: t, "must be a Importance object"),
    (type("Nameless", (importance.Importance,), {})(), "needs a name"),
])
def test_registering_something_else_is_refused(bad, message):
    with pytest.raises(pangkas.PangkasError, match=message):
        importance.register(bad)


class Needy(importance.Importance):
    name = "needy_test"
    measured = 0

    def measure(self, model, data, loss_fn):
        Needy.measured += 1
        return None

    def score(self, piece, measured):
        return None


@pytest.mark.parametrize("needs,options,message", [
    ("needs_data", {}, r"importance='needy_test' needs data="),
    ("needs_loss", {"data": [torch.randn(2, 4)]}, r"importance='needy_test' needs data= .*and loss_fn="),
])
def test_needs_are_enforced_before_anything_changes(needs, options, message):
    criterion = Needy()
    setattr(criterion, needs, True)
    model = hidden_net()
    state = copy.deepcopy(model.state_dict())
    Needy.measured = 0
    with pytest.raises(pangkas.PangkasError, match=message):
        pangkas.prune_channels(model, torch.randn(2, 4), ratio=0.5, importance=criterion, **options)
    assert Needy.measured == 0
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_unknown_name_lists_the_registered_ones(registry):
    registry(importance, LastUnits())
    with pytest.raises(pangkas.PangkasError, match=r"importance must be one of \['l1', .*'random', "
                                                   r"'last_units_test'\].*got 'nonsense'"):
        pangkas.plan_channels(hidden_net(), torch.randn(2, 4), ratio=0.5, importance="nonsense")


def test_scores_of_the_wrong_shape_are_refused():
    with pytest.raises(pangkas.PangkasError, match=r"importance='<lambda>' returned shape \(1,\) for 0.weight"):
        pangkas.plan_channels(hidden_net(), torch.randn(2, 4), ratio=0.5, importance=lambda t, dim: torch.ones(1))


# -- weight importance -------------------------------------------------------------------------

class KeepSmallest(WeightImportance):
    name = "keep_smallest_test"

    def scores(self, weight):
        return -weight.detach().abs()


class ByInputNorm(CalibratedImportance):
    """Keeps, in every row, the weights reading the inputs with the largest norm."""

    name = "by_input_norm_test"

    def prune_rows(self, weight, inputs, old, sparsity, n_m):
        return None, row_masks(inputs.norms().expand_as(weight), old, sparsity, n_m)


def four_weights():
    linear = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[1.0, 2.0, 3.0, 4.0]]))
    return linear


def test_weight_criterion_by_name_and_as_object(registry):
    registry(criteria, KeepSmallest())
    linear = four_weights()
    report = pangkas.prune_weights(linear, sparsity=0.5, importance="keep_smallest_test")
    assert linear.weight.tolist() == [[1.0, 2.0, 0.0, 0.0]]
    assert "importance=keep_smallest_test" in str(report)
    linear = four_weights()
    pangkas.prune_weights(linear, sparsity=0.5, importance=KeepSmallest())
    assert linear.weight.tolist() == [[1.0, 2.0, 0.0, 0.0]]


def test_calibrated_weight_criterion_reads_the_inputs(registry):
    registry(criteria, ByInputNorm())
    data = [torch.tensor([[5.0, 0.1, 4.0, 0.2]])]  # inputs 0 and 2 are large
    linear = four_weights()
    state = copy.deepcopy(linear.state_dict())
    with pytest.raises(pangkas.PangkasError, match="'by_input_norm_test' needs data="):
        pangkas.prune_weights(linear, sparsity=0.5, importance="by_input_norm_test")
    assert torch.equal(linear.weight, state["weight"])
    pangkas.prune_weights(linear, sparsity=0.5, importance="by_input_norm_test", data=data)
    assert linear.weight.tolist() == [[1.0, 0.0, 3.0, 0.0]]


def test_weight_registry_refuses_duplicates_and_names_the_known(registry):
    assert criteria.names()[:4] == ("magnitude", "random", "wanda", "sparsegpt")
    with pytest.raises(pangkas.PangkasError, match="'magnitude' is already registered"):
        criteria.register(criteria.Magnitude())
    registry(criteria, KeepSmallest())
    with pytest.raises(pangkas.PangkasError, match=r"one of \['magnitude', 'random', 'wanda', 'sparsegpt', "
                                                   r"'keep_smallest_test'\].*got 'nonsense'"):
        pangkas.prune_weights(four_weights(), sparsity=0.5, importance="nonsense")


def test_old_method_name_warns_and_prunes_the_same():
    first, second = nn.Linear(16, 8), nn.Linear(16, 8)
    second.load_state_dict(first.state_dict())
    torch.manual_seed(1)
    new = pangkas.prune_weights(first, sparsity=0.5, importance="random")
    torch.manual_seed(1)
    with pytest.warns(DeprecationWarning, match=r"prune_weights\(method=...\) is now prune_weights\(importance=...\)"):
        old = pangkas.prune_weights(second, sparsity=0.5, method="random")
    assert torch.equal(first.weight, second.weight)
    assert str(old) == str(new)
    with pytest.raises(pangkas.PangkasError, match="both method= and importance="):
        pangkas.prune_weights(second, sparsity=0.5, method="random", importance="random")


# -- Wanda's statistics: one place for channels and one-shot weights ----------------------------

def test_wanda_channels_and_one_shot_share_the_input_statistics(monkeypatch):
    calls = {"add": [], "norms": 0}
    add, norms = pangkas.activations.InputStatistics.add, pangkas.activations.InputStatistics.norms

    def counting_add(self, module, x):
        calls["add"].append(type(module).__name__)
        return add(self, module, x)

    def counting_norms(self):
        calls["norms"] += 1
        return norms(self)

    monkeypatch.setattr(pangkas.activations.InputStatistics, "add", counting_add)
    monkeypatch.setattr(pangkas.activations.InputStatistics, "norms", counting_norms)
    data = [torch.randn(8, 4) for _ in range(2)]
    pangkas.plan_channels(hidden_net(), data[0], ratio=0.5, importance="wanda", data=data)
    assert calls == {"add": ["Linear"] * 4, "norms": 2}  # two layers, two batches
    calls.update(add=[], norms=0)
    pangkas.prune_weights(hidden_net(), sparsity=0.5, importance="wanda", data=data)
    assert calls == {"add": ["Linear"] * 4, "norms": 2}


class SeenWanda(importance.Wanda):
    """Wanda that keeps the scores it gave."""

    def scores(self, slices, measured):
        self.seen = super().scores(slices, measured)
        return self.seen


def test_both_wandas_follow_the_shared_statistics(monkeypatch):
    """Whatever the statistics say decides both paths: make input feature 3 the only loud one."""
    loud = torch.tensor([0.0, 0.0, 0.0, 1.0])
    monkeypatch.setattr(pangkas.activations.InputStatistics, "norms",
                        lambda self: loud if len(self.squares) == 4 else torch.ones(len(self.squares)))
    data = [torch.randn(8, 4)]
    linear = nn.Sequential(nn.Linear(4, 2))
    pangkas.prune_weights(linear, sparsity=0.75, importance="wanda", data=data)
    assert (linear[0].weight[:, :3] == 0).all() and (linear[0].weight[:, 3] != 0).all()

    criterion = SeenWanda()
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    pangkas.plan_channels(model, data[0], ratio=0.5, importance=criterion, data=data)
    reads_loud = model[0].weight.detach().abs()[:, 3]
    assert torch.equal(criterion.seen[("0.weight", 0)], reads_loud / reads_loud.mean())
    assert (criterion.seen[("0.weight", 1)][:3] == 0).all()
    plain = model[2].weight.detach().abs().sum(0)  # norms of ones: plain l1
    assert torch.allclose(criterion.seen[("2.weight", 1)], plain / plain.mean())
