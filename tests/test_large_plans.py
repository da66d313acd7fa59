"""Planning large models fast: the union-find, grouping and name matching it relies on give what
their plain forms give, a meta model's plan has the structure of the weighted one's, and
``Plan.unit_cost`` counts one unit's parameters and MACs."""

import fnmatch
import gc

import pytest
import torch
from torch import nn

import pangkas
from pangkas.graph import trace as trace_module
from pangkas.graph.labels import components
from pangkas.modules import matches
from pangkas.selection import module_of

import nets


def plain_components(num_ids: int, left: torch.Tensor, right: torch.Tensor) -> list[int]:
    """Union-find one pair at a time; each id's smallest component member."""
    parent = list(range(num_ids))

    def root(i):
        while parent[i] != i:
            i = parent[i]
        return i

    for a, b in zip(left.tolist(), right.tolist()):
        a, b = sorted((root(a), root(b)))
        parent[b] = a
    return [root(i) for i in range(num_ids)]


@pytest.mark.parametrize("seed", range(40))
def test_components_match_a_plain_union_find(seed):
    generator = torch.Generator().manual_seed(seed)
    num_ids = int(torch.randint(1, 300, (1,), generator=generator))
    pairs = int(torch.randint(0, 2 * num_ids, (1,), generator=generator))
    left = torch.randint(0, num_ids, (pairs,), generator=generator)
    right = torch.randint(0, num_ids, (pairs,), generator=generator)
    if seed % 2:  # long chains, as a residual stream makes: many rounds of pointer jumping
        left, right = torch.arange(num_ids - 1).flip(0), torch.arange(1, num_ids).flip(0)
    assert components(num_ids, left, right).tolist() == plain_components(num_ids, left, right)


def test_plain_module_names_match_as_globs_do():
    names = ["", "layer1", "layer1.0", "layer1.0.conv", "layer10", "layer10.conv", "layer", "a.layer1"]
    for pattern in ["layer1", "layer1.0", "layer", "a", "layer1.0.conv"]:
        for name in names:
            parts = name.split(".")
            glob = any(fnmatch.fnmatchcase(".".join(parts[:i]), pattern) for i in range(1, len(parts) + 1))
            assert matches(pattern, name, nn.Identity()) == glob, (pattern, name)


def per_class_groups(plan) -> list[tuple[tuple[str, ...], list[int]]]:
    """The plan's groups as selection once found them, class by class: (producing modules in
    the order of their smallest class, classes)."""
    coupling, classes = plan.coupling, plan.selection.classes
    produced = torch.zeros(coupling.num_ids, dtype=torch.bool)
    produced[coupling.produced] = True
    producers, parent = {}, {}

    def root(c):
        while parent.setdefault(c, c) != c:
            c = parent[c]
        return c

    for name, dims in coupling.tensor_ids.items():
        for ids in dims:
            reps = classes[ids][produced[ids] & (classes[ids] != 0)].tolist()
            for a, b in zip(reps, reps[1:]):
                a, b = sorted((root(a), root(b)))
                parent[b] = a
            for rep in reps:
                producers.setdefault(rep, {})[module_of(name)] = None
    members = {}
    for rep in sorted({int(c) for g in plan.selection.groups for c in g.classes}):
        members.setdefault(root(rep), []).append(rep)
    return [(tuple(dict.fromkeys(m for rep in reps for m in producers.get(rep, ()))), reps)
            for reps in members.values()]


class Overlapping(nn.Module):
    """A layer whose outputs are added to two others' concatenated: the two share no channel,
    yet all three are one group, found only by joining the layers through what they share."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(6, 8), nn.Linear(6, 4), nn.Linear(6, 4)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.a(x) + torch.cat([self.b(x), self.c(x)], dim=1))


@pytest.mark.parametrize("name", ["residual", "concat", "grouped", "shuffle", "attention", "norms", "overlapping"])
def test_groups_are_those_found_class_by_class(name):
    cls, shape = nets.NETS[name] if name in nets.NETS else (Overlapping, torch.Size([2, 6]))
    torch.manual_seed(0)
    plan = pangkas.plan_channels(cls().eval(), torch.randn(shape), ratio=0.5, allow_approximate=True)
    found = [(g.modules, g.classes.tolist()) for g in plan.selection.groups]
    assert found == per_class_groups(plan)
    if name == "overlapping":
        assert [modules for modules, _ in found] == [("a", "b", "c")]


def test_llama_groups_are_those_found_class_by_class(tiny_llama):
    model, ids = tiny_llama
    plan = pangkas.plan_transformer(model, ids[None, :16], heads=0.5, ffn=0.25, hidden=0.25).channels
    found = [(g.modules, g.classes.tolist()) for g in plan.selection.groups]
    assert found == per_class_groups(plan)
    assert any(len(modules) > 3 for modules, _ in found)  # the residual stream: many producers


def test_a_meta_llama_plans_the_structure_its_weighted_twin_does(tiny_llama):
    model, ids = tiny_llama
    with torch.device("meta"):
        twin = type(model)(model.config).eval()
    example = ids[None, :16]
    amounts = dict(heads=0.5, ffn=0.25, hidden=0.25)
    plans = [pangkas.plan_transformer(m, example, **amounts) for m in (model, twin)]
    weighted, meta = ([(g.modules, len(g.classes), int(g.removed.sum()), g.approximate)
                       for g in p.channels.selection.groups] for p in plans)
    assert weighted == meta
    assert sum(removed for *_, removed, _ in meta if removed) > 0
    assert plans[0].params_after == plans[1].params_after and plans[0].macs_after == plans[1].macs_after
    assert plans[0].removed == plans[1].removed


def test_unit_cost_counts_one_key_value_group_one_neuron_one_hidden_channel(tiny_llama):
    model, ids = tiny_llama  # hidden 32, 4 heads of 8 in 2 key/value groups, FFN 64, 3 layers, vocab 64
    tokens = 16
    plan = pangkas.plan_transformer(model, ids[None, :tokens], heads=0.5, ffn=0.25, hidden=0.25)
    groups = plan.channels.selection.groups
    by_module = {m: g for g in groups for m in g.modules}
    heads = by_module["model.layers.0.self_attn.q_proj"]
    assert len(heads.classes) == 2
    # q and o: 2 query heads x 8 rows/columns of 32; k and v: one head of 8 rows of 32
    params = 2 * (2 * 8 * 32) + 2 * (8 * 32)
    # every projection at each token; scores and weighted values: 2 heads x tokens^2 x 8 each
    assert plan.channels.unit_cost(heads) == (params, params * tokens + 2 * (2 * tokens * tokens * 8))
    ffn = by_module["model.layers.0.mlp.up_proj"]
    assert plan.channels.unit_cost(ffn) == (3 * 32, 3 * 32 * tokens)
    hidden = by_module["model.embed_tokens"]
    # embedding and head columns; per layer q/k/v/gate/up columns, o/down rows, two norms; final norm
    params = 2 * 64 + 3 * (32 + 16 + 16 + 32 + 2 * 64 + 64 + 2) + 1
    assert plan.channels.unit_cost(hidden)[0] == params


@pytest.mark.parametrize("enabled", [True, False])
def test_a_trace_leaves_the_garbage_collector_as_it_was(enabled, monkeypatch):
    calls = []
    real = trace_module._run_unpaused

    def spy(*args):
        calls.append(gc.isenabled())
        return real(*args)

    monkeypatch.setattr(trace_module, "_run_unpaused", spy)
    (gc.enable if enabled else gc.disable)()
    try:
        trace_module.trace(nets.Chain(), torch.randn(nets.IMAGES))
        assert calls == [False] and gc.isenabled() == enabled
        with pytest.raises(pangkas.PangkasError):
            trace_module.trace(nets.Chain(), torch.randn(2, 5))  # does not run: raises
        assert gc.isenabled() == enabled
    finally:
        gc.enable()
