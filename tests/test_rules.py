"""The coupling-rule registry: one rule per op, and strict mode for rules that raise."""

import pytest
import torch
from torch import nn

import pangkas
from pangkas.graph import rules
from pangkas.graph.rules import RULES, RuleError, rule, strict

aten = torch.ops.aten


def _unused(e, func, args, kwargs, out):
    pass


def test_a_second_rule_for_an_op_is_refused_and_the_registry_is_unchanged():
    assert aten.cross not in RULES
    before = dict(RULES)
    with pytest.raises(pangkas.PangkasError, match=r"aten\.mm \(by mm\)"):
        rule(aten.cross, aten.mm)(_unused)
    with pytest.raises(pangkas.PangkasError, match=r"aten\.cross listed twice"):
        rule(aten.cross, aten.cross)(_unused)
    assert RULES == before


def test_a_rule_for_a_new_op_registers():
    assert aten.cross not in RULES
    try:
        assert rule(aten.cross)(_unused) is _unused
        assert RULES[aten.cross] is _unused
    finally:
        RULES.pop(aten.cross, None)


def _chain() -> nn.Sequential:
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                         nn.Linear(16, 4))


@pytest.fixture
def broken_in_layer_4(monkeypatch):
    """The addmm rule raises in module "4" (the third Linear) and works everywhere else."""
    working = RULES[aten.addmm]

    def addmm(e, func, args, kwargs, out):
        if e.module == "4":
            raise ZeroDivisionError("deliberately broken")
        working(e, func, args, kwargs, out)

    monkeypatch.setitem(RULES, aten.addmm, addmm)


def test_strict_mode_raises_what_a_rule_raised(broken_in_layer_4):
    model = _chain()
    with strict(), pytest.raises(RuleError, match=r"addmm failed on aten\.addmm.* in 4\).*deliberately broken"):
        pangkas.plan_channels(model, torch.randn(2, 8), ratio=0.5)


def test_strict_mode_raises_when_a_rule_fails_only_on_the_pruned_model(monkeypatch):
    """The re-trace that checks surgery must not mistake a rule's bug for a model that no longer
    runs (which keeps those channels and retries)."""
    working = RULES[aten.addmm]

    def addmm(e, func, args, kwargs, out):
        if e.module == "4" and args[1].shape[-1] != 16:
            raise ZeroDivisionError("deliberately broken on pruned shapes")
        working(e, func, args, kwargs, out)

    monkeypatch.setitem(RULES, aten.addmm, addmm)
    with strict(), pytest.raises(RuleError, match="deliberately broken on pruned shapes"):
        pangkas.prune_channels(_chain(), torch.randn(2, 8), ratio=0.5)
    with strict(False):
        report = pangkas.prune_channels(_chain(), torch.randn(2, 8), ratio=0.5)
    assert report.channels_removed == 24  # the checking re-trace compares shapes, not blocks


def test_without_strict_mode_a_failing_rule_keeps_its_channels_and_the_plan_says_why(broken_in_layer_4):
    with strict(False):
        plan = pangkas.plan_channels(_chain(), torch.randn(2, 8), ratio=0.5)
    pruned = [g.modules for g in plan.selection.groups if g.removed.any()]
    assert pruned == [("0",)]  # "2" and "4" feed or are the broken op: kept
    assert plan.channels_removed == 8
    assert "rule failed: ZeroDivisionError: deliberately broken" in str(plan)


def test_without_the_broken_rule_the_same_plan_prunes_every_hidden_layer():
    plan = pangkas.plan_channels(_chain(), torch.randn(2, 8), ratio=0.5)
    assert plan.channels_removed == 24


def test_strict_mode_follows_the_environment_unless_set(monkeypatch):
    monkeypatch.setenv(rules.STRICT_ENV, "0")
    assert not rules.is_strict()
    with strict():
        assert rules.is_strict()
    monkeypatch.setenv(rules.STRICT_ENV, "1")
    assert rules.is_strict()
    with strict(False):
        assert not rules.is_strict()
    assert rules.is_strict()
    monkeypatch.delenv(rules.STRICT_ENV)
    assert not rules.is_strict()  # off by default for users


def test_the_test_suite_runs_in_strict_mode():
    assert rules.is_strict()
