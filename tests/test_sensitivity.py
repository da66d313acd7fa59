import copy

import pytest
import torch
from torch import nn

import pangkas
from pangkas.demo import accuracy, digits_cnn, load_digits_split, train


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    data = load_digits_split()
    model = digits_cnn()
    train(model, data, 4, desc="training")
    return model, data


def test_channel_sensitivity_matches_real_removal(trained):
    model, data = trained
    x = data.x_test
    state = copy.deepcopy(model.state_dict())
    evaluate = lambda m: accuracy(m, data.x_test, data.y_test)  # noqa: E731
    result = pangkas.sensitivity(model, evaluate, example_inputs=x[:2], ratios=(0.25, 0.5, 0.75))
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # left as it was
    assert set(result.metrics) >= {"0.0", "1.0", "3.0", "4.0", "7"}
    # silencing is removal: pruning that group for real gives the recorded metric
    real = copy.deepcopy(model)
    pangkas.prune_channels(real, x[:2], ratio=0.0, ratios={"3.0": 0.5})
    assert evaluate(real) == pytest.approx(result.metrics["3.0"][1])
    assert result.baseline == pytest.approx(evaluate(model))


def test_weight_sensitivity_and_ratios_for_a_target(trained, tmp_path):
    model, data = trained
    evaluate = lambda m: accuracy(m, data.x_test, data.y_test)  # noqa: E731
    result = pangkas.sensitivity(model, evaluate, kind="weights", ratios=(0.3, 0.6, 0.9))
    assert len(result.metrics) == 6 and all(len(v) == 3 for v in result.metrics.values())
    drops = {u: result.drops(u)[-1] for u in result.metrics}
    assert max(drops.values()) > 0.05  # removing 90% of some layer hurts
    ratios = result.ratios_for(0.6)
    total = sum(result.sizes.values())
    assert sum(ratios[u] * result.sizes[u] for u in ratios) / total >= 0.6
    fragile = max(drops, key=drops.get)
    assert ratios[fragile] < 0.9  # the layer that suffers most at 90% is not cut that far
    assert result.plot(tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
    assert "baseline" in str(result)


@pytest.mark.parametrize("kwargs,message", [
    (dict(ratios=(0.5, 1.2)), "ratios"),
    (dict(kind="heads"), "kind"),
    (dict(), "example_inputs"),
])
def test_bad_input(kwargs, message):
    with pytest.raises(pangkas.PangkasError, match=message):
        pangkas.sensitivity(nn.Sequential(nn.Linear(4, 2)), lambda m: 0.0, **kwargs)
