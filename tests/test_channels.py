import copy
import dataclasses

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import pangkas
from pangkas import selection
from pangkas.graph import rules
from pangkas.oracle import oracle_error, randomize, silence_removed

import nets

EXACT = 1e-5


def exact_error(model, x, **options):
    model = randomize(model).eval()
    return oracle_error(model, x, lambda m: pangkas.plan_channels(m, x, **options))


# -- the oracle on one net per coupling rule ---------------------------------------------------

@pytest.mark.parametrize("name", [n for n in nets.NETS if n not in ("unknown",)])
def test_oracle_holds_for_every_coupling_rule(name):
    cls, shape = nets.NETS[name]
    torch.manual_seed(0)
    error, plan = exact_error(cls(), torch.randn(shape), ratio=0.5)
    assert plan.channels_removed > 0, str(plan)
    assert error <= EXACT, (error, str(plan))


def test_oracle_on_sequence_model():
    ids = torch.randint(0, 50, (2, 7))
    error, plan = exact_error(nets.Sequence(), ids, ratio=0.5)
    assert plan.channels_removed > 0 and error <= EXACT


def test_oracle_detects_a_wrong_removal():
    """Without silencing the removed channels the outputs differ: the oracle can fail."""
    model = randomize(nets.Residual()).eval()
    x = torch.randn(nets.IMAGES)
    reference = model(x)
    pangkas.prune_channels(model, x, ratio=0.5)
    assert (model(x) - reference).norm() / reference.norm() > 1e-3


def test_physically_smaller_and_attributes_follow():
    model = nets.Chain()
    x = torch.randn(nets.IMAGES)
    report = pangkas.prune_channels(model, x, ratio=0.5)
    conv0 = model.features[0][0]
    assert conv0.weight.shape == (8, 3, 3, 3) and conv0.out_channels == 8
    assert model.features[0][1].num_features == 8 and model.features[0][1].running_mean.shape == (8,)
    assert model.features[1].in_channels == 8 and model.features[1].out_channels == 12
    assert model.head[1].in_features == 12 * 6 * 6 and model.head[1].out_features == 16
    assert model.head[3].out_features == 10  # the classifier's outputs are never pruned
    assert report.params_after == sum(p.numel() for p in model.parameters()) < report.params_before
    assert report.macs_after < report.macs_before
    assert model(x).shape == (2, 10)


def test_grouped_convs_keep_valid_groups():
    model = nets.Grouped()
    x = torch.randn(nets.IMAGES)
    pangkas.prune_channels(model, x, ratio=0.5)
    dw, dw2, grouped = model.dw[0], model.dw2, model.grouped[0]
    assert dw.groups == dw.in_channels == dw.out_channels < 16
    assert dw2.groups == dw2.in_channels and dw2.out_channels == 2 * dw2.in_channels
    assert grouped.groups == 4 and grouped.in_channels % 4 == 0 and grouped.out_channels % 4 == 0


def test_residual_stream_is_one_group():
    model = nets.Residual()
    plan = pangkas.plan_channels(model, torch.randn(nets.IMAGES), ratio=0.5)
    stream = [g for g in plan.selection.groups if "down.0" in g.modules]
    assert len(stream) == 1 and {"b.1", "down.0"} <= set(stream[0].modules)
    plan.apply()
    assert model.b[1].out_channels == model.down[0].out_channels == model.head.in_features == 16


def test_unknown_ops_block_their_channels():
    model = nets.Unknown()
    plan = pangkas.plan_channels(model, torch.randn(nets.IMAGES), ratio=0.5)
    assert plan.channels_removed == 0
    reasons = " ".join(plan.blocked())
    assert "flip along a channel dim" in reasons
    assert "no coupling rule" in reasons  # fft
    assert "sum across channels" in reasons


def test_hard_coded_view_is_caught_after_surgery():
    model = nets.HardCodedView()
    x = torch.randn(nets.IMAGES)
    plan = pangkas.plan_channels(model, x, ratio=0.5)
    report = plan.apply()
    assert plan.retried and "head" in plan.retried[0]  # found while planning, on a weightless copy
    assert model.conv[0].out_channels == 8 and model.conv2[0].out_channels == 8  # the view kept conv2
    assert model(x).shape == (2, 10)
    assert "surgery check" in str(report)


def test_normalisation_over_channels_needs_allow_approximate():
    model = randomize(nets.ChannelsLast())  # LayerNorm weights not all 1: a misplaced cut shows
    x = torch.randn(nets.IMAGES)
    exact = pangkas.plan_channels(model, x, ratio=0.5)
    assert not any("stem" in g.modules for g in exact.selection.groups)  # the stream stays whole
    assert any("fc1" in g.modules and g.removed.any() for g in exact.selection.groups)  # the MLP goes
    assert any("layer norm statistics" in why for why in exact.blocked())
    loose = pangkas.plan_channels(model, x, ratio=0.5, allow_approximate=True)
    stream = next(g for g in loose.selection.groups if "stem" in g.modules)
    assert stream.removed.any() and stream.approximate
    silence_removed(loose)  # the removed channels no longer reach the output; what differs is the norm
    with torch.no_grad():
        reference = model(x)
        loose.apply()
        error = float((model(x) - reference).norm() / reference.norm())
    assert model.norm.normalized_shape == (8,) and model.gamma.shape == (8,)
    # LayerNorm statistics over the 8 kept channels instead of all 16: 0.074 here, 0.015-0.09 over
    # ten seeds; keeping the wrong channels' norm weights and gamma (shifted by one) gives 0.18-0.72.
    assert 1e-3 < error < 0.15, error


def test_torch_multihead_attention_loses_whole_heads():
    model, x = nets.TorchMHA(), torch.randn(2, 6, 5)
    error, plan = oracle_error(model, x, lambda m: pangkas.plan_channels(m, x, ratio=0.5))
    assert error <= 1e-5
    attn = plan.model.attn  # 2 heads of 8 -> 1; the residual width (no norm on it) 16 -> 8
    assert attn.num_heads == 1 and attn.head_dim == 8 and attn.in_proj_weight.shape == (24, 8)
    assert plan.model.mlp[0].out_features == 16


def test_attention_head_dims_prune_consistently():
    x = torch.randn(2, 6, 5)
    model = nets.Attention()
    pangkas.prune_channels(model, x, ratio=0.5)
    q, k, v, o = model.q, model.k, model.v, model.o
    # Query/key head dims meet in the scores, whose scale code may derive from head_dim: kept.
    assert q.out_features == k.out_features == 24
    assert v.out_features == o.in_features < 24 and v.out_features % 3 == 0  # same dims in 3 heads
    model = nets.Attention()
    pangkas.prune_channels(model, x, ratio=0.5, allow_approximate=True)
    assert model.q.out_features == model.k.out_features < 24 and model.q.out_features % 3 == 0
    assert model(x).shape == (2, 10)


def test_every_model_output_keeps_its_channels():
    model = nets.TwoOutputs()
    x = torch.randn(nets.IMAGES)
    pangkas.prune_channels(model, x, ratio=0.5)
    logits, feats = model(x)
    assert logits.shape == (2, 5, 8, 8) and feats.shape == (2, 12, 8, 8)
    assert model.body[0].out_channels == 8


# -- options -----------------------------------------------------------------------------------

def test_plan_changes_nothing_until_applied():
    model = nets.Residual()
    state = copy.deepcopy(model.state_dict())
    plan = pangkas.plan_channels(model, torch.randn(nets.IMAGES), ratio=0.5)
    text = str(plan)
    assert "params" in text and "MACs" in text and "down.0" in text
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key])
    assert plan.params_after < plan.params_before and plan.macs_after < plan.macs_before
    report = plan.apply()
    assert report.macs_after == plan.macs_after
    with pytest.raises(pangkas.PangkasError, match="already applied"):
        plan.apply()


def test_planned_numbers_match_measurement():
    model = nets.Chain()
    x = torch.randn(nets.IMAGES)
    plan = pangkas.plan_channels(model, x, ratio=0.5)
    predicted = (plan.params_after, plan.macs_after)
    plan.apply()
    measured = pangkas.measure(model, x, latency=False)
    assert predicted == (measured.params, measured.macs)


@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.75])
def test_local_ratio_per_group(ratio):
    model = nets.Chain()
    plan = pangkas.plan_channels(model, torch.randn(nets.IMAGES), ratio=ratio)
    for g in plan.selection.groups:
        assert int(g.removed.sum()) == min(round(ratio * len(g.classes)), len(g.classes) - 1)


def test_l1_removes_the_smallest_filters():
    model = nets.Chain()
    conv = model.features[0][0]
    with torch.no_grad():
        # Filter i has norm ~ i; everything else coupled to these channels is uniform.
        perm = torch.randperm(16)
        conv.weight.copy_((perm + 1).float().view(16, 1, 1, 1).expand_as(conv.weight))
        model.features[0][1].weight.fill_(1.0)
        model.features[1].weight.fill_(0.1)
    pangkas.prune_channels(model, torch.randn(nets.IMAGES), ratio=0.25)
    kept = conv.weight[:, 0, 0, 0]
    assert conv.out_channels == 12
    assert torch.equal(kept, (perm[perm >= 4] + 1).float())  # the 4 smallest gone, order kept


def test_global_scope_differs_from_local_and_hits_the_total():
    model = nets.Residual()
    x = torch.randn(nets.IMAGES)
    local = pangkas.plan_channels(model, x, ratio=0.5)
    glob = pangkas.plan_channels(model, x, ratio=0.5, scope="global")
    total = sum(len(g.classes) for g in glob.selection.groups)
    assert glob.channels_removed == round(0.5 * total)
    fractions = [g.removed.float().mean().item() for g in glob.selection.groups]
    assert max(fractions) - min(fractions) > 0.05
    assert [g.kept for g in glob.selection.groups] != [g.kept for g in local.selection.groups]


def test_max_ratio_caps_global_removal():
    model = nets.Residual()
    plan = pangkas.plan_channels(model, torch.randn(nets.IMAGES), ratio=0.5, scope="global", max_ratio=0.6)
    for g in plan.selection.groups:
        assert g.removed.float().mean() <= 0.6


def test_ratios_per_module_and_exclude():
    model = nets.Chain()
    x = torch.randn(nets.IMAGES)
    plan = pangkas.plan_channels(model, x, ratio=0.5, ratios={"features.1": 0.25}, exclude=["head.3"])
    plan.apply()
    assert model.features[0][0].out_channels == 8
    assert model.features[1].out_channels == 18
    assert model.head[1].out_features == 32


def test_include_limits_what_may_lose_channels():
    model = nets.Chain()
    x = torch.randn(nets.IMAGES)
    widths = [m.out_channels for m in model.features.modules() if isinstance(m, nn.Conv2d)]
    plan = pangkas.plan_channels(model, x, ratio=0.5, include=["head"])
    plan.apply()
    assert [m.out_channels for m in model.features.modules() if isinstance(m, nn.Conv2d)] == widths
    assert model.head[1].out_features == 16 and any("not in include=" in why for why in plan.blocked())


def test_ignore_is_the_old_name_of_exclude():
    x, model = torch.randn(nets.IMAGES), nets.Chain()
    new = pangkas.plan_channels(model, x, ratio=0.5, exclude=["head.3"])
    with pytest.warns(DeprecationWarning, match="exclude="):
        old = pangkas.plan_channels(model, x, ratio=0.5, ignore=["head.3"])
    assert torch.equal(old.selection.removed, new.selection.removed)


def test_round_to_keeps_multiples():
    model = nets.Residual()
    pangkas.prune_channels(model, torch.randn(nets.IMAGES), ratio=0.6, round_to=4)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            assert m.out_channels % 4 == 0


@pytest.mark.parametrize("importance", ["l1", "l2", "fpgm", "bn_scale", "random",
                                        lambda t, dim: t.abs().amax([d for d in range(t.ndim) if d != dim]) if t.ndim > 1 else t.abs()])
def test_every_importance_gives_an_exact_plan(importance):
    torch.manual_seed(0)
    error, plan = exact_error(nets.Residual(), torch.randn(nets.IMAGES), ratio=0.5, importance=importance)
    assert plan.channels_removed > 0 and error <= EXACT


def test_bn_scale_follows_gamma():
    model = nets.Chain()
    bn = model.features[0][1]
    with torch.no_grad():
        bn.weight.copy_(torch.linspace(0.1, 1.6, 16))
    plan = pangkas.plan_channels(model, torch.randn(nets.IMAGES), ratio=0.5, importance="bn_scale")
    plan.apply()
    assert torch.allclose(bn.weight, torch.linspace(0.1, 1.6, 16)[8:])


def test_taylor_uses_data_and_leaves_grads_alone():
    model = nets.Chain()
    x = torch.randn(nets.IMAGES)
    data = [(torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))) for _ in range(2)]
    loss = lambda out, batch: nn.functional.cross_entropy(out, batch[1])  # noqa: E731
    error, plan = oracle_error(randomize(model).eval(), x, lambda m: pangkas.plan_channels(
        m, x, ratio=0.5, importance="taylor", data=[b[0] for b in data], loss_fn=lambda out, b: out.square().mean()))
    assert plan.channels_removed > 0 and error <= EXACT
    plan = pangkas.plan_channels(model, x, ratio=0.5, importance="taylor",
                                 data=[(b[0],) for b in data], loss_fn=lambda out, b: out.logsumexp(1).mean())
    assert all(p.grad is None for p in model.parameters())
    assert plan.channels_removed > 0
    del loss


# -- bad input ---------------------------------------------------------------------------------

BAD = [
    (dict(ratio=1.0), "ratio"),
    (dict(ratio=-0.1), "ratio"),
    (dict(ratio="half"), "ratio"),
    (dict(ratio=0.5, scope="everywhere"), "scope"),
    (dict(ratio=0.5, round_to=0), "round_to"),
    (dict(ratio=0.5, round_to=2.5), "round_to"),
    (dict(ratio=0.5, importance="taylor"), "taylor"),
    (dict(ratio=0.5, importance="magic"), "importance"),
    (dict(ratio=0.5, exclude=["nope"]), "nope"),
    (dict(ratio=0.5, include=["nope"]), "nope"),
    (dict(ratio=0.5, ratios={"features": 1.5}), "ratios"),
    (dict(ratio=0.5, scope="global", max_ratio=0.2), "max_ratio"),
]


@pytest.mark.parametrize("kwargs,message", BAD)
def test_bad_input_raises_and_leaves_model_unchanged(kwargs, message):
    model = nets.Chain()
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(pangkas.PangkasError, match=message):
        pangkas.prune_channels(model, torch.randn(nets.IMAGES), **kwargs)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key])


def test_inputs_that_do_not_run():
    model = nets.Chain()
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(pangkas.PangkasError, match="does not run on the example inputs"):
        pangkas.prune_channels(model, torch.randn(2, 5, 8, 8), ratio=0.5)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_failed_surgery_restores_the_model(monkeypatch):
    model = nets.Residual()
    x = torch.randn(nets.IMAGES)
    shapes = {n: p.shape for n, p in model.named_parameters()}
    attrs = model.b[0][0].out_channels
    plan = pangkas.plan_channels(model, x, ratio=0.5)
    monkeypatch.setattr(type(plan), "_verify", lambda self, m: (self.coupling.records[0], "forced failure"))
    with pytest.raises(pangkas.PangkasError, match="model is unchanged"):
        plan.apply()
    assert {n: p.shape for n, p in model.named_parameters()} == shapes
    assert model.b[0][0].out_channels == attrs
    assert model(x).shape == (2, 10)


def test_plan_refuses_a_model_changed_since():
    model = nets.Chain()
    x = torch.randn(nets.IMAGES)
    plan = pangkas.plan_channels(model, x, ratio=0.5)
    pangkas.prune_channels(model, x, ratio=0.25)
    with pytest.raises(pangkas.PangkasError, match="changed since"):
        plan.apply()


# -- interplay -----------------------------------------------------------------------------------

def test_weight_masks_are_cut_with_their_weights():
    model = randomize(nets.Residual()).eval()
    x = torch.randn(nets.IMAGES)
    pangkas.prune_weights(model, sparsity=0.5)
    error, plan = oracle_error(model, x, lambda m: pangkas.plan_channels(m, x, ratio=0.5))
    assert error <= EXACT
    pruned = copy.deepcopy(model)
    pangkas.prune_channels(pruned, x, ratio=0.5)
    mask = pruned.stem[0].parametrizations.weight[0].mask
    assert mask.shape == pruned.stem[0].weight.shape == (8, 3, 3, 3)
    assert pruned.stem[0].out_channels == 8


def test_meta_device_model_can_be_planned_and_cut():
    with torch.device("meta"):
        model = nets.Residual()
    plan = pangkas.plan_channels(model, torch.randn(nets.IMAGES, device="meta"), ratio=0.5)
    plan.apply()
    assert model.stem[0].weight.device.type == "meta" and model.stem[0].out_channels == 8


def test_silence_zeroes_only_consumer_inputs():
    model = nets.Chain()
    plan = pangkas.plan_channels(model, torch.randn(nets.IMAGES), ratio=0.5)
    before = model.features[0][0].weight.clone()
    silence_removed(plan)
    assert torch.equal(model.features[0][0].weight, before)  # producers untouched
    zero_cols = (model.features[1].weight == 0).all(dim=(0, 2, 3))
    assert int(zero_cols.sum()) == 8


# -- random architectures ----------------------------------------------------------------------

class RandomNet(nn.Module):
    """A random stack of conv / grouped conv / norm / residual / concat / split blocks."""

    def __init__(self, spec):
        super().__init__()
        self.spec = spec
        self.blocks = nn.ModuleList()
        c = 3
        widths = []
        for kind, width, groups in spec:
            if kind == "conv":
                block = nets.cbr(c, width)
                c_out = width
            elif kind == "grouped":
                width = max(groups, width - width % groups)
                c_in = c - c % groups if c % groups else c
                block = nn.Sequential(nn.Conv2d(c_in, width, 3, padding=1, groups=groups), nn.ReLU())
                block.c_in = c_in
                c_out = width
            elif kind == "depthwise":
                block = nets.cbr(c, c, groups=c)
                c_out = c
            elif kind == "residual":
                block = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c))
                c_out = c
            elif kind == "concat":
                block = nets.cbr(c, width, k=1)
                c_out = c + width
            else:  # split into halves (chunk when even), transform one, concat back
                half = c // 2
                block = nets.cbr(c - half, c - half)
                c_out = c
            self.blocks.append(block)
            widths.append(c_out)
            c = c_out
        self.head = nn.Linear(c, 4)

    def forward(self, x):
        for (kind, _, _), block in zip(self.spec, self.blocks):
            if kind == "grouped":
                x = block(x[:, :block.c_in])
            elif kind == "residual":
                x = torch.relu(x + block(x))
            elif kind == "concat":
                x = torch.cat([x, block(x)], 1)
            elif kind == "split":
                if x.shape[1] % 2 == 0:
                    a, b = x.chunk(2, 1)
                else:  # sizes computed from the shape: the post-surgery check has to catch it
                    half = x.shape[1] // 2
                    a, b = x[:, :half], x[:, half:]
                x = torch.cat([a, block(b)], 1)
            else:
                x = block(x)
        return self.head(x.mean((2, 3)))


block = st.tuples(st.sampled_from(["conv", "grouped", "depthwise", "residual", "concat", "split"]),
                  st.integers(4, 12), st.sampled_from([2, 4]))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=st.lists(block, min_size=1, max_size=6), ratio=st.sampled_from([0.25, 0.5, 0.7]),
       scope=st.sampled_from(["local", "global"]))
def test_oracle_on_random_architectures(spec, ratio, scope):
    spec = [("conv", 8, 1)] + spec
    torch.manual_seed(0)
    model = RandomNet(spec)
    x = torch.randn(2, 3, 6, 6)
    error, plan = exact_error(model, x, ratio=ratio, scope=scope)
    assert error <= EXACT, (spec, error, str(plan))
    groups = plan.selection.groups
    for g in groups:  # grouped convs: every group (row) keeps as many channels as the others
        if g.rows is not None:
            assert len({int((~g.removed[row]).sum()) for row in g.rows}) == 1
    sizes = [len(g.classes) for g in groups]
    if scope == "local":  # the ratio is applied to every group that remains prunable
        assert plan.channels_removed == sum(_removed_locally(g, ratio) for g in groups)
    else:  # rows share a group's removal equally (each keeps one at least): rounding moves it
        wanted = min(round(ratio * sum(sizes)), sum(n - 1 for n in sizes))
        slack = sum(len(g.rows) - 1 for g in groups if g.rows is not None)
        assert abs(plan.channels_removed - wanted) <= slack


def _removed_locally(group, ratio) -> int:
    size = len(group.classes)
    n = min(round(ratio * size), size - 1)
    if group.rows is None:
        return n
    rows, width = group.rows.shape
    return size - rows * max(1, width - round(n / rows))


def test_wanda_keeps_inputs_with_large_activations():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    with torch.no_grad():
        model[2].weight.fill_(1.0)
        model[0].weight.fill_(0.1)
        model[0].bias.zero_()
        model[0].weight[[1, 4]] = 0.2  # hidden units 1 and 4 carry large activations...
    data = [torch.ones(8, 4) for _ in range(2)]
    plan = pangkas.plan_channels(model, data[0], ratio=0.5, importance="wanda", data=data, exclude=[nn.ReLU])
    plan.apply()
    assert model[2].in_features == 3
    # ...so they score highest and stay (ties among the others go in order: 0, 2, 3 leave).
    assert (model[0].weight[:2] == 0.2).all() and (model[0].weight[2] == 0.1).all()


def test_wanda_plan_is_exact_and_needs_data():
    x = torch.randn(nets.IMAGES)
    with pytest.raises(pangkas.PangkasError, match="wanda"):
        pangkas.plan_channels(nets.Chain(), x, ratio=0.5, importance="wanda")
    data = [torch.randn(nets.IMAGES) for _ in range(2)]
    error, plan = exact_error(nets.Chain(), x, ratio=0.5, importance="wanda", data=data)
    assert plan.channels_removed > 0 and error <= EXACT


# -- the coupling is read-only; selection is a pure function of what the plan holds -------------

class OwnDeviceView(nets.HardCodedView):
    """Builds a tensor of its own device: no rehearsal on a weightless copy, so apply() retries."""

    def forward(self, x):
        return super().forward(x) + torch.zeros(1)


def coupling_contents(coupling):
    """Everything a Coupling holds, as plain values (tensors as lists)."""
    def shaped(items):
        return [(tuple(shape), [(ax.dims, ax.ids.tolist()) for ax in axes]) for shape, axes in items]

    return {
        "num_ids": coupling.num_ids, "on_meta": coupling.on_meta,
        "tensor_ids": {n: [ids.tolist() for ids in dims] for n, dims in coupling.tensor_ids.items()},
        "unions": [t.tolist() for t in coupling.unions],
        "blocks": [(ids.tolist(), why) for ids, why in coupling.blocks],
        "approximations": [(ids.tolist(), why) for ids, why in coupling.approximations],
        "consumed": coupling.consumed.tolist(), "produced": coupling.produced.tolist(),
        "records": [(r.name, r.module, shaped(r.inputs), shaped(r.outputs), repr(r.flop_call))
                    for r in coupling.records],
    }


def traced_couplings(monkeypatch):
    """The couplings plan_channels traces, each with its contents when the trace returned."""
    traced = []

    def recording(*args, **kwargs):
        coupling = pangkas.graph.trace.trace(*args, **kwargs)
        traced.append((coupling, coupling_contents(coupling)))
        return coupling

    monkeypatch.setattr(pangkas.channels, "trace", recording)
    return traced


def forced_failures(monkeypatch, n, at=3):
    """Plan._verify reports a failure at record ``at`` ``n`` times before checking for real: the
    second failure at one op keeps its whole module."""
    check, calls = pangkas.channels.Plan._verify, []

    def failing(plan, model):
        calls.append(model)
        return (plan.coupling.records[at], "forced") if len(calls) <= n else check(plan, model)

    monkeypatch.setattr(pangkas.channels.Plan, "_verify", failing)


@pytest.mark.parametrize("make, forced, retried_when", [
    (nets.HardCodedView, 0, "planning"),  # found while rehearsing on a weightless copy
    (OwnDeviceView, 0, "apply"),  # found by apply() itself
    (OwnDeviceView, 2, "apply"),  # a repeated failure keeps a whole module
])
def test_planning_and_retried_apply_leave_the_coupling_as_traced(monkeypatch, make, forced, retried_when):
    model, x = make(), torch.randn(nets.IMAGES)
    traced = traced_couplings(monkeypatch)
    forced_failures(monkeypatch, forced)
    plan = pangkas.plan_channels(model, x, ratio=0.5)
    assert len(traced) == 1 and traced[0][0] is plan.coupling
    assert bool(plan.retried) == (retried_when == "planning")
    assert coupling_contents(plan.coupling) == traced[0][1]
    report = plan.apply()
    assert plan.retried and "surgery check" in str(report) and model(x).shape == (2, 10)
    assert any(note.startswith("kept every channel of") for note in plan.retried) == (forced == 2)
    assert coupling_contents(plan.coupling) == traced[0][1]
    # What the plan added lives in the plan, with its reasons, and shows in blocked().
    reasons = {why for _, why in plan.blocks}
    assert any(why.startswith("surgery check: ") for why in reasons)
    assert not reasons & {why for _, why in plan.coupling.blocks}
    assert any(why.startswith("surgery check: ") for why in plan.blocked())
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.coupling.blocks = ()


def test_selection_is_a_pure_function_of_what_the_plan_holds():
    model, x = OwnDeviceView(), torch.randn(nets.IMAGES)
    plan = pangkas.plan_channels(model, x, ratio=0.5, scope="global", exclude=["conv.1"])
    plan.apply()
    assert plan.retried and "exclude=conv.1" in {why for _, why in plan.blocks}
    blocks, scores = list(plan.blocks), {k: v.clone() for k, v in plan.scores.items()}
    before = coupling_contents(plan.coupling)
    again, added = selection.select_rectangular(plan.coupling, plan.options, plan.scores, model, plan.blocks)
    assert added == () and torch.equal(again.classes, plan.selection.classes)
    assert torch.equal(again.removed, plan.selection.removed)
    assert [g.removed.tolist() for g in again.groups] == [g.removed.tolist() for g in plan.selection.groups]
    # Its inputs are as they were: the blocks, the scores, the coupling.
    assert [(id(ids), why) for ids, why in plan.blocks] == [(id(ids), why) for ids, why in blocks]
    assert all(torch.equal(scores[k], v) for k, v in plan.scores.items())
    assert coupling_contents(plan.coupling) == before
    # Without the plan's blocks, the same coupling and scores choose differently (exclude= is a block).
    bare = selection.select(plan.coupling, plan.options, plan.scores, model)
    assert not torch.equal(bare.removed, plan.selection.removed)


def test_global_ties_are_broken_the_same_way_every_time():
    """Equal scores in different groups: the choice must not depend on where objects live in memory."""
    chosen = set()
    for _ in range(5):
        torch.manual_seed(0)
        model = nets.Chain()
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.constant_(m.weight, 0.1)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        junk = [object() for _ in range(100)]  # shifts where the next objects are allocated
        plan = pangkas.plan_channels(model, torch.randn(nets.IMAGES), ratio=0.3, scope="global")
        chosen.add(tuple(tuple(g.removed.tolist()) for g in plan.selection.groups))
        del junk
    assert len(chosen) == 1


def test_rule_gaps_name_the_ops_without_a_rule_and_what_they_kept(monkeypatch):
    x = torch.randn(nets.IMAGES)
    plan = pangkas.plan_channels(nets.Unknown(), x, ratio=0.5)
    assert plan.rule_gaps() == {"_fft_r2c": 8}  # b's 8 channels; flip and sum have rules that block
    assert plan.blocked()["no coupling rule for this op (_fft_r2c)"] == 8  # blocked() is unchanged
    assert not pangkas.plan_channels(nets.Chain(), x, ratio=0.5).rule_gaps()

    def broken(e, func, args, kwargs, out):
        raise RuntimeError("cannot follow (this call)")
    monkeypatch.setitem(rules.RULES, torch.ops.aten.flip, broken)
    with rules.strict(False):
        plan = pangkas.plan_channels(nets.Unknown(), x, ratio=0.5)
    assert plan.rule_gaps() == {"_fft_r2c": 8, "flip": 8}


def test_kept_by_rule_gaps_counts_a_channel_two_gaps_froze_once():
    class TwoGaps(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nets.cbr(3, 8)
            self.head = nn.Linear(8, 4)

        def forward(self, x):  # each conv channel meets two ops without a rule
            h = self.conv(x)
            return self.head((h.cumprod(1) + torch.fft.rfft(h, dim=1).abs().sum(1, keepdim=True)).mean((2, 3)))
    plan = pangkas.plan_channels(TwoGaps(), torch.randn(nets.IMAGES), ratio=0.5)
    assert sum(plan.rule_gaps().values()) == 16 and plan.kept_by_rule_gaps() == 8


def test_a_failing_pruned_model_is_blamed_on_the_op_that_failed():
    """Pruning can drop a copy (a reshape of a view that became contiguous): the ops the cut
    model ran before failing are matched to the plan's trace, not counted."""
    from pangkas.graph.trace import OpRecord, TraceFailed
    from pangkas.verify import where_it_fails

    def record(name, module):
        return OpRecord(name, module, [], [])

    expected = [record("aten.clone.default", "a"), record("aten._unsafe_view.default", "a"),
                record("aten.addmm.default", "a.proj"), record("aten.view.default", "b"),
                record("aten.mm.default", "b.wk")]
    ran = [record("aten.view.default", "a"), record("aten.addmm.default", "a.proj")]  # no copy now
    op, why = where_it_fails(expected, TraceFailed("shape '[1, 197, 3, 64]' is invalid", ran))
    assert op is expected[3] and "invalid" in why
