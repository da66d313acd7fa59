"""The calibration passes one-shot pruning runs: statistics shared between layers reading one input,
and statistics passes that stop once every layer has read."""

import torch
from torch import nn

import pangkas
from pangkas import activations
from pangkas.activations import InputStatistics, recording
from pangkas.blockwise import read_by


class Fan(nn.Module):
    """Three layers read x (q/k/v-like); with ``in_place`` x is scaled in place before the third."""

    def __init__(self, in_place=False):
        super().__init__()
        self.a, self.b, self.c, self.out = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.in_place = in_place

    def forward(self, x):
        y = self.a(x) + self.b(x)
        if self.in_place:
            x.mul_(3)
        return self.out(y + self.c(x))


def expected(x, gram=True):
    stats = InputStatistics(gram)
    stats.add(nn.Linear(8, 8), x)
    return stats.total


def test_layers_reading_one_input_share_its_statistics(monkeypatch):
    calls = []
    monkeypatch.setattr(activations, "input_rows", lambda m, x: calls.append(m) or x.reshape(-1, x.shape[-1]))
    model, x = Fan(), torch.randn(4, 8)
    layers = {"a": model.a, "b": model.b, "c": model.c}
    with recording(layers, gram=True) as stats, torch.no_grad():
        model(x)
        model(x * 2)
    assert len(calls) == 2  # once per input, not once per layer
    for name in layers:
        assert torch.allclose(stats[name].gram, expected(x) + expected(x * 2))
        assert stats[name].rows == 8
    assert stats["a"].gram is not stats["b"].gram  # accumulated in place: never one shared tensor


def test_an_input_changed_in_place_is_read_again():
    model, x = Fan(in_place=True), torch.randn(4, 8)
    before = expected(x.clone())
    with recording({"a": model.a, "c": model.c}, gram=True) as stats, torch.no_grad():
        model(x)  # scales x by 3 between a and c
    assert torch.allclose(stats["a"].gram, before)
    assert torch.allclose(stats["c"].gram, 9 * before)


def call_counter(module):
    count = [0]
    module.register_forward_pre_hook(lambda *_: count.__setitem__(0, count[0] + 1))
    return count


def test_statistics_pass_stops_once_every_layer_has_read():
    model = Fan()
    calls = [((torch.randn(4, 8),), {}) for _ in range(3)]
    out = call_counter(model.out)
    layers = [model.a, model.b, model.c]
    with recording(dict(zip("abc", layers))) as stats, torch.no_grad():
        read_by(model, layers, calls)
    assert out[0] == 1  # the first call runs whole (to see each layer reads once), later ones stop
    full = sum(x.pow(2).sum(0) for (x,), _ in calls)
    assert all(torch.allclose(stats[n].squares, full) for n in "abc")


def test_statistics_pass_runs_whole_when_a_layer_reads_twice():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.out = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            return self.out(self.a(self.a(x)))

    model = Twice()
    calls = [((torch.randn(4, 8),), {}) for _ in range(3)]
    out = call_counter(model.out)
    with recording({"a": model.a}) as stats, torch.no_grad():
        read_by(model, [model.a], calls)
    assert out[0] == 3
    with torch.no_grad():
        full = sum(x.pow(2).sum(0) + model.a(x).pow(2).sum(0) for (x,), _ in calls)
    assert torch.allclose(stats["a"].squares, full)


def test_one_shot_masks_are_those_of_full_passes(tiny_llama, monkeypatch):
    """Stopping the statistics pass early and sharing statistics change no mask and no weight."""
    model, ids = tiny_llama
    data = [{"input_ids": ids[i * 24:(i + 1) * 24].view(2, 12)} for i in range(3)]
    results = []
    for fast in (True, False):
        if not fast:  # the plain passes: every call runs whole, every layer reads for itself
            monkeypatch.setattr("pangkas.weights.oneshot.read_by",
                                lambda block, layers, calls: [block(*a, **k) for a, k in calls])
            monkeypatch.setattr(activations, "_reading", lambda module: object())
        pruned = model.__class__(model.config).eval()
        pruned.load_state_dict(model.state_dict())
        pangkas.prune_weights(pruned, sparsity=0.5, importance="sparsegpt", include="model.layers", data=data)
        results.append([t.clone() for t in pruned.state_dict().values()])
    assert all(torch.equal(a, b) for a, b in zip(*results))
