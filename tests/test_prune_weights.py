import copy
from collections import OrderedDict

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import pangkas
from pangkas.weights.masks import get_mask
from pangkas.weights.prune import PRUNABLE

from conftest import mlp


def prunable(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, PRUNABLE)]


def zeros(module):
    return int((module.weight == 0).sum())


def test_local_sparsity_prunes_exact_count_in_every_layer(convnet):
    report = pangkas.prune_weights(convnet, sparsity=0.7)
    for name, module in prunable(convnet):
        assert zeros(module) == round(0.7 * module.weight.numel()), name
    assert {l.name for l in report.layers} == {n for n, _ in prunable(convnet)}


def test_local_magnitude_removes_the_smallest(convnet):
    before = {n: m.weight.detach().abs().clone() for n, m in prunable(convnet)}
    pangkas.prune_weights(convnet, sparsity=0.5)
    for name, module in prunable(convnet):
        pruned = module.weight == 0
        assert before[name][pruned].max() <= before[name][~pruned].min()


def test_global_uses_one_cut_across_layers(convnet):
    before = {n: m.weight.detach().abs().clone() for n, m in prunable(convnet)}
    total = sum(w.numel() for w in before.values())
    report = pangkas.prune_weights(convnet, sparsity=0.6, scope="global")
    pruned = torch.cat([before[n][m.weight == 0] for n, m in prunable(convnet)])
    kept = torch.cat([before[n][m.weight != 0] for n, m in prunable(convnet)])
    assert pruned.numel() == round(0.6 * total)
    assert pruned.max() <= kept.min()
    per_layer = [l.sparsity for l in report.layers]
    assert max(per_layer) - min(per_layer) > 0.05  # a global cut is not uniform


def test_threshold_keeps_strictly_greater(convnet):
    before = {n: m.weight.detach().clone() for n, m in prunable(convnet)}
    pangkas.prune_weights(convnet, threshold=0.1)
    for name, module in prunable(convnet):
        assert torch.equal(module.weight != 0, before[name].abs() > 0.1)


@pytest.mark.parametrize("pattern", ["2:4", "4:8", "1:3"])
def test_n_m_holds_in_every_group(convnet, pattern):
    n, m = map(int, pattern.split(":"))
    pangkas.prune_weights(convnet, pattern=pattern)
    for name, module in prunable(convnet):
        dim = 0 if isinstance(module, nn.modules.conv._ConvTransposeNd) else 1
        nonzero = (module.weight != 0).movedim(dim, -1)
        length = nonzero.shape[-1]
        for start in range(0, length, m):
            group = nonzero[..., start:start + m].sum(-1)
            assert group.max() <= n, name
            # the best n survive: a full group keeps exactly n (random weights have no zeros)
            assert group.min() == min(n, length - start), name


def test_n_m_keeps_largest_in_group():
    linear = nn.Linear(8, 1, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[0.125, -0.75, 0.5, 0.25, 3.0, -2.0, 0.0, 1.0]]))
    pangkas.prune_weights(linear, pattern="2:4")
    assert linear.weight.tolist() == [[0.0, -0.75, 0.5, 0.0, 3.0, -2.0, 0.0, 0.0]]


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 6), cols=st.integers(1, 20), n=st.integers(1, 4), extra=st.integers(1, 4))
def test_n_m_property(rows, cols, n, extra):
    m = n + extra
    linear = nn.Linear(cols, rows)
    pangkas.prune_weights(linear, pattern=f"{n}:{m}")
    nonzero = linear.weight != 0
    for start in range(0, cols, m):
        assert nonzero[:, start:start + m].sum(1).max() <= n


@settings(max_examples=25, deadline=None)
@given(numel=st.integers(1, 300), sparsity=st.floats(0, 0.999))
def test_local_count_property(numel, sparsity):
    linear = nn.Linear(numel, 1, bias=False)
    pangkas.prune_weights(linear, sparsity=sparsity)
    assert zeros(linear) == round(sparsity * numel)


def test_masks_compose_and_never_resurrect(convnet):
    pangkas.prune_weights(convnet, sparsity=0.5, importance="random")
    first = {n: (m.weight == 0).clone() for n, m in prunable(convnet)}
    report = pangkas.prune_weights(convnet, sparsity=0.8)
    for name, module in prunable(convnet):
        now = module.weight == 0
        assert now[first[name]].all(), "a pruned weight came back"
        assert int(now.sum()) == round(0.8 * now.numel())
    # asking for less than is already pruned changes nothing
    lower = pangkas.prune_weights(convnet, sparsity=0.3)
    assert [l.nonzero_after for l in lower.layers] == [l.nonzero_after for l in report.layers]
    # a threshold on top also only removes more
    pangkas.prune_weights(convnet, threshold=0.05)
    for name, module in prunable(convnet):
        assert (module.weight == 0)[first[name]].all()


def test_random_method_is_not_magnitude(convnet):
    before = convnet.conv.weight.detach().abs().clone()
    pangkas.prune_weights(convnet, sparsity=0.5, importance="random")
    pruned = convnet.conv.weight == 0
    assert zeros(convnet.conv) == round(0.5 * before.numel())
    assert before[pruned].max() > before[~pruned].min()


def test_custom_criterion():
    linear = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[1.0, 2.0, 3.0, 4.0]]))
    pangkas.prune_weights(linear, sparsity=0.5, importance=lambda w: -w.abs())  # keep the smallest
    assert linear.weight.tolist() == [[1.0, 2.0, 0.0, 0.0]]


def test_biases_and_norms_untouched(convnet):
    biases = {n: p.clone() for n, p in convnet.named_parameters() if not n.endswith("weight")}
    bn_weight = convnet.bn.weight.clone()
    pangkas.prune_weights(convnet, sparsity=0.9)
    for name, param in convnet.named_parameters():
        if name in biases:
            assert torch.equal(param, biases[name])
    assert torch.equal(convnet.bn.weight, bn_weight)
    assert get_mask(convnet.bn) is None


def test_include_and_exclude(convnet):
    pangkas.prune_weights(convnet, sparsity=0.5, include=["conv*", nn.Linear], exclude="conv3d")
    assert zeros(convnet.conv) > 0 and zeros(convnet.conv1d) > 0 and zeros(convnet.head) > 0
    assert zeros(convnet.conv3d) == 0 and zeros(convnet.grouped) == 0 and zeros(convnet.up) == 0


def test_include_container_selects_its_children():
    model = nn.Sequential(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)), nn.Linear(4, 2))
    report = pangkas.prune_weights(model, sparsity=0.5, include="0")
    assert [l.name for l in report.layers] == ["0.0", "0.1"]


def test_report_counts(convnet):
    params = sum(p.numel() for p in convnet.parameters())
    nonzero = sum(int(p.count_nonzero()) for p in convnet.parameters())  # BN biases start at 0
    report = pangkas.prune_weights(convnet, sparsity=0.5)
    assert report.params == params
    assert report.nonzero_before == nonzero < params
    weights = sum(l.numel for l in report.layers)
    assert report.nonzero_before - report.nonzero_after == sum(round(0.5 * l.numel) for l in report.layers)
    assert report.sparsity == pytest.approx(sum(round(0.5 * l.numel) for l in report.layers) / weights)
    text = str(report)
    assert "grouped" in text and "whole model" in text


def test_tied_weights_are_skipped_and_reported():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(8, 8)
            self.b = nn.Linear(8, 8)
            self.b.weight = self.a.weight
            self.c = nn.Linear(8, 2)

        def forward(self, x):
            return self.c(self.b(self.a(x)))

    model = Tied()
    report = pangkas.prune_weights(model, sparsity=0.5)
    assert set(report.skipped) == {"a", "b"}
    assert [l.name for l in report.layers] == ["c"]
    assert model.a.weight is model.b.weight and zeros(model.a) == 0


BAD = [
    (dict(sparsity=1.0), "sparsity"),
    (dict(sparsity=-0.1), "sparsity"),
    (dict(sparsity="0.5"), "sparsity"),
    (dict(threshold=-0.01), "threshold"),
    (dict(pattern="3:2"), "N:M"),
    (dict(pattern="a:b"), "N:M"),
    (dict(pattern="0:4"), "N:M"),
    (dict(pattern="2-4"), "N:M"),
    (dict(sparsity=0.5, threshold=0.1), "exactly one"),
    (dict(), "exactly one"),
    (dict(sparsity=0.5, scope="everywhere"), "scope"),
    (dict(threshold=0.1, scope="global"), "global"),
    (dict(sparsity=0.5, importance="wishful"), "importance must be one of .*magnitude"),
    (dict(threshold=0.1, importance="random"), "threshold"),
    (dict(sparsity=0.5, include="nothing_like_this"), "nothing_like_this"),
    (dict(sparsity=0.5, exclude=["conv", nn.LSTM]), "LSTM"),
    (dict(sparsity=0.5, include=[3]), "include/exclude"),
    (dict(sparsity=0.5, include="bn"), "no prunable layer"),
]


@pytest.mark.parametrize("kwargs,message", BAD)
def test_bad_input_raises_and_leaves_model_unchanged(convnet, kwargs, message):
    pangkas.prune_weights(convnet, sparsity=0.3, include="conv")  # existing masks must survive too
    state = copy.deepcopy(convnet.state_dict())
    masks = {n: get_mask(m) is not None for n, m in convnet.named_modules()}
    with pytest.raises(pangkas.PangkasError, match=message):
        pangkas.prune_weights(convnet, **kwargs)
    assert {n: get_mask(m) is not None for n, m in convnet.named_modules()} == masks
    for key, value in convnet.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_model_without_prunable_layer():
    with pytest.raises(pangkas.PangkasError, match="no prunable layer"):
        pangkas.prune_weights(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(3)), sparsity=0.5)


def test_pangkas_error_is_value_error():
    assert issubclass(pangkas.PangkasError, ValueError)


def test_prunes_every_supported_layer_type():
    layers = [nn.Linear(6, 4), nn.Conv1d(2, 4, 3), nn.Conv2d(2, 4, 3), nn.Conv3d(2, 4, 3),
              nn.ConvTranspose1d(2, 4, 3), nn.ConvTranspose2d(2, 4, 3), nn.ConvTranspose3d(2, 4, 3)]
    model = nn.ModuleList(layers)
    report = pangkas.prune_weights(model, sparsity=0.5)
    assert len(report.layers) == len(layers)
    assert all(zeros(layer) == round(0.5 * layer.weight.numel()) for layer in layers)


def test_mlp_output_changes_only_through_masked_weights():
    model = mlp()
    x = torch.randn(5, 32)
    pangkas.prune_weights(model, sparsity=0.5)
    dense = copy.deepcopy(model)
    pangkas.finalize(dense)
    torch.testing.assert_close(model(x), dense(x), rtol=0, atol=0)


# -- non-finite weights and scores ---------------------------------------------------------------

def named_mlp():
    return nn.Sequential(OrderedDict(fc1=nn.Linear(16, 32), act=nn.ReLU(), fc2=nn.Linear(32, 4)))


def snapshot(model):
    """Every tensor as raw bytes (NaN payloads and -0.0 compare exactly), and which modules are masked."""
    state = {k: v.detach().clone().reshape(-1).view(torch.uint8) for k, v in model.state_dict().items()}
    return state, {n: None if get_mask(m) is None else get_mask(m).clone() for n, m in model.named_modules()}


def assert_unchanged(model, before):
    state, masks = snapshot(model)
    assert state.keys() == before[0].keys()
    for key, value in state.items():
        assert torch.equal(value, before[0][key]), key
    assert masks.keys() == before[1].keys()
    for name, mask in masks.items():
        old = before[1][name]
        assert (mask is None) == (old is None) and (mask is None or torch.equal(mask, old)), name


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("rule", [dict(sparsity=0.5), dict(threshold=0.1), dict(pattern="2:4"),
                                  dict(sparsity=0.5, scope="global")])
def test_non_finite_weight_is_refused_naming_the_layer(bad, rule):
    model = named_mlp()
    pangkas.prune_weights(model, sparsity=0.1)  # existing masks must survive the refusal
    with torch.no_grad():
        model.fc2.parametrizations.weight.original[1, 3] = bad
    before = snapshot(model)
    with pytest.raises(pangkas.PangkasError, match=r"fc2\.weight has 1 non-finite"):
        pangkas.prune_weights(model, **rule)
    assert_unchanged(model, before)


def test_non_finite_value_under_an_old_mask_is_no_obstacle():
    """A pruned position reads as 0 whatever the original holds: nothing there to rank."""
    model = named_mlp()
    pangkas.prune_weights(model, sparsity=0.5)
    pruned = model.fc1.weight == 0
    with torch.no_grad():
        model.fc1.parametrizations.weight.original[pruned] = float("nan")
    pangkas.prune_weights(model, sparsity=0.7)
    assert int((model.fc1.weight == 0).sum()) == round(0.7 * model.fc1.weight.numel())


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("rule", [dict(sparsity=0.1), dict(pattern="2:4"), dict(sparsity=0.1, scope="global")])
def test_non_finite_scores_are_refused(bad, rule):
    def criterion(w):
        scores = w.abs().clone()
        if w.shape == (4, 32):
            scores[:, :16] = bad  # half of fc2: counted as "already pruned" when -inf meant that
        return scores

    model = named_mlp()
    pangkas.prune_weights(model, sparsity=0.1)
    before = snapshot(model)
    with pytest.raises(pangkas.PangkasError, match=r"64 non-finite scores .* fc2\.weight"):
        pangkas.prune_weights(model, importance=criterion, **rule)
    assert_unchanged(model, before)


@pytest.mark.parametrize("scope", ["local", "global"])
def test_another_pass_prunes_exactly_the_requested_count(scope):
    model = named_mlp()
    layers = [model.fc1, model.fc2]
    numel = sum(m.weight.numel() for m in layers)

    def zeros_now():
        return [m.weight == 0 for m in layers]

    def count(masks):
        return [int(z.sum()) for z in masks] if scope == "local" else int(sum(z.sum() for z in masks))

    def expected(s):
        return [round(s * m.weight.numel()) for m in layers] if scope == "local" else round(s * numel)

    pangkas.prune_weights(model, sparsity=0.1, scope=scope)
    first = zeros_now()
    assert count(first) == expected(0.1)
    pangkas.prune_weights(model, sparsity=0.1, scope=scope)
    assert count(zeros_now()) == expected(0.1)
    # Scores of order -1e300 are finite in float64 (the criterion's dtype) but -inf in float32:
    # they must neither pass for "already pruned" (which pruned every weight) nor be refused.
    magnitudes = [m.weight.detach().abs().double() for m in layers]
    pangkas.prune_weights(model, sparsity=0.3, scope=scope, importance=lambda w: -1e300 * w.detach().abs().double())
    now = zeros_now()
    assert count(now) == expected(0.3)
    assert all(z[f].all() for z, f in zip(now, first))  # never resurrects
    # the criterion keeps the smallest: every newly pruned weight is >= every kept one
    pruned = [a[z & ~f] for a, z, f in zip(magnitudes, now, first)]
    kept = [a[~z] for a, z in zip(magnitudes, now)]
    if scope == "global":
        pruned, kept = [torch.cat(pruned)], [torch.cat(kept)]
    assert all(p.min() >= k.max() for p, k in zip(pruned, kept))


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_calibrated_methods_refuse_non_finite_activations(method, bad):
    model = named_mlp()
    pangkas.prune_weights(model, sparsity=0.1)
    data = [torch.randn(8, 16) for _ in range(3)]
    data[1][2, 5] = bad
    before = snapshot(model)
    with pytest.raises(pangkas.PangkasError, match=r"cannot prune fc1: .*not finite"):
        pangkas.prune_weights(model, sparsity=0.5, importance=method, data=data)
    assert_unchanged(model, before)


# -- plans and reports -------------------------------------------------------------------------

def test_plan_weights_changes_nothing_until_applied_and_predicts_the_result():
    torch.manual_seed(0)
    model = mlp()
    twin = copy.deepcopy(model)
    state = copy.deepcopy(model.state_dict())
    plan = pangkas.plan_weights(model, sparsity=0.75, scope="global")
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items()) and get_mask(model[0]) is None
    predicted = {l.name: l.nonzero_after for l in plan.layers()}
    assert "weight plan: sparsity=0.75 (global)" in str(plan)
    report = plan.apply()
    assert {l.name: l.nonzero_after for l in report.layers} == predicted
    expected = pangkas.prune_weights(twin, sparsity=0.75, scope="global")
    assert all(torch.equal(v, twin.state_dict()[k]) for k, v in model.state_dict().items())
    assert report.to_dict() == expected.to_dict()
    with pytest.raises(pangkas.PangkasError, match="already applied"):
        plan.apply()


def test_a_weight_plan_refuses_a_model_pruned_since():
    model = mlp()
    plan = pangkas.plan_weights(model, sparsity=0.5)
    pangkas.prune_weights(model, sparsity=0.3)
    with pytest.raises(pangkas.PangkasError, match="changed since this plan"):
        plan.apply()


def test_weight_report_speaks_the_report_protocol():
    model = mlp()
    report = pangkas.prune_weights(model, sparsity=0.5)
    as_dict = report.to_dict()
    assert isinstance(report, pangkas.Report) and as_dict["kind"] == "weights"
    assert as_dict["params_before"] == report.nonzero_before > as_dict["params_after"] == report.nonzero_after
    assert as_dict["macs_before"] is None and as_dict["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert [l["name"] for l in as_dict["layers"]] == ["0", "2", "4"]
