import torch

import pangkas
from pangkas.oracle import oracle_error, randomize
from pangkas.widths import candidates, fastest

import nets


def test_candidates_stay_near_the_target():
    assert candidates(50, 64) == [50, 56]
    assert candidates(60, 64) == [60, 64]
    assert candidates(7, 7) == [7]
    assert all(100 <= w <= 112 for w in candidates(100, 200))


def test_fastest_prefers_fewer_channels_unless_clearly_faster():
    times = {50: 1.0, 56: 0.5}
    assert fastest(50, 64, times.__getitem__) == 56
    times = {50: 1.0, 56: 0.99}
    assert fastest(50, 60, times.__getitem__) == 50


def test_round_to_auto_keeps_near_target_and_exact():
    x = torch.randn(nets.IMAGES)
    model = randomize(nets.Chain()).eval()
    error, plan = oracle_error(model, x, lambda m: pangkas.plan_channels(m, x, ratio=0.5, round_to="auto"))
    assert error <= 1e-5
    for g in plan.selection.groups:
        target = len(g.classes) - round(0.5 * len(g.classes))
        assert target <= g.kept <= max(target, int(target * 1.125))
