import copy
import io

import pytest
import torch
from torch import nn

import pangkas
from pangkas.weights.masks import get_mask

from conftest import ConvNet


def pruned_positions(model):
    return {n: (m.weight == 0).clone() for n, m in model.named_modules() if get_mask(m) is not None}


def train_steps(model, optimizer, images, steps=8):
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        model(images).square().mean().backward()
        optimizer.step()


@pytest.mark.parametrize("make_optimizer", [
    lambda p: torch.optim.Adam(p, lr=1e-2),
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-3),
    lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
], ids=["adam", "sgd-momentum", "adamw"])
def test_pruned_weights_stay_zero_through_training(convnet, images, make_optimizer):
    # An optimizer with momentum built up *before* pruning is the hard case: its state would
    # push pruned weights away from zero if masks were applied once.
    optimizer = make_optimizer(convnet.parameters())
    train_steps(convnet, optimizer, images, steps=3)
    pangkas.prune_weights(convnet, sparsity=0.7)
    pruned = pruned_positions(convnet)
    before = {n: m.weight.detach().clone() for n, m in convnet.named_modules() if n in pruned}
    train_steps(convnet, optimizer, images)
    for name, module in convnet.named_modules():
        if name in pruned:
            assert (module.weight[pruned[name]] == 0).all(), name
            assert not torch.equal(module.weight, before[name]), f"{name} did not train"


def test_fresh_optimizer_after_pruning_also_works(convnet, images):
    pangkas.prune_weights(convnet, sparsity=0.5)
    pruned = pruned_positions(convnet)
    train_steps(convnet, torch.optim.SGD(convnet.parameters(), lr=0.1, momentum=0.9), images)
    assert all((m.weight[pruned[n]] == 0).all() for n, m in convnet.named_modules() if n in pruned)


def test_state_dict_keys_unchanged_and_load_into_fresh_instance(convnet, images):
    keys = list(ConvNet().state_dict().keys())
    pangkas.prune_weights(convnet, sparsity=0.6)
    state = convnet.state_dict()
    assert sorted(state) == sorted(keys)
    assert int((state["conv.weight"] == 0).sum()) == round(0.6 * state["conv.weight"].numel())
    fresh = ConvNet()
    fresh.load_state_dict(state, strict=True)
    convnet.eval(), fresh.eval()
    torch.testing.assert_close(fresh(images), convnet(images), rtol=0, atol=0)


def test_dense_state_dict_loads_into_pruned_model(convnet):
    pangkas.prune_weights(convnet, sparsity=0.5)
    mask = get_mask(convnet.conv).clone()
    other = ConvNet()
    convnet.load_state_dict(other.state_dict(), strict=True)
    expected = torch.where(mask, other.conv.weight, 0.0)
    assert torch.equal(convnet.conv.weight, expected)  # mask still applies to loaded values


def test_torch_save_state_dict_round_trip(convnet, images):
    pangkas.prune_weights(convnet, sparsity=0.5)
    buffer = io.BytesIO()
    torch.save(convnet.state_dict(), buffer)
    buffer.seek(0)
    fresh = ConvNet()
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    convnet.eval(), fresh.eval()
    assert torch.equal(fresh(images), convnet(images))


def test_deepcopy_is_independent(convnet, images):
    pangkas.prune_weights(convnet, sparsity=0.5)
    twin = copy.deepcopy(convnet)
    assert get_mask(twin.conv) is not get_mask(convnet.conv)
    assert torch.equal(get_mask(twin.conv), get_mask(convnet.conv))
    pangkas.prune_weights(twin, sparsity=0.9)
    pangkas.finalize(twin)  # changing the copy's machinery must not break the original
    assert get_mask(convnet.conv) is not None
    assert int((convnet.conv.weight == 0).sum()) == round(0.5 * convnet.conv.weight.numel())
    convnet.eval()
    convnet(images)


def test_finalize_leaves_plain_modules_with_zeros(convnet, images):
    optimizer_params = list(convnet.parameters())
    pangkas.prune_weights(convnet, sparsity=0.5)
    convnet.eval()
    out = convnet(images)
    zeros = (convnet.conv.weight == 0).sum()
    param = convnet.conv.parametrizations.weight.original
    pangkas.finalize(convnet)
    assert type(convnet.conv) is nn.Conv2d
    assert not hasattr(convnet.conv, "parametrizations")
    assert (convnet.conv.weight == 0).sum() == zeros
    assert convnet.conv.weight is param  # same Parameter: an optimizer still holds it
    assert {id(p) for p in convnet.parameters()} == {id(p) for p in optimizer_params}
    assert not convnet.conv._state_dict_hooks and not convnet.conv._load_state_dict_pre_hooks
    assert torch.equal(convnet(images), out)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_torch_compile(images):
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))
    pangkas.prune_weights(model, sparsity=0.5)
    compiled = torch.compile(model)
    torch.testing.assert_close(compiled(images), model(images), rtol=1e-5, atol=1e-5)
    # masks still hold when training through the compiled module
    pruned = model[0].weight == 0
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(2):
        optimizer.zero_grad()
        compiled(images).sum().backward()
        optimizer.step()
    assert (model[0].weight[pruned] == 0).all()


def test_mask_refuses_foreign_parametrization():
    linear = nn.Linear(4, 4)
    torch.nn.utils.parametrizations.orthogonal(linear)
    with pytest.raises(pangkas.PangkasError, match="parametrization"):
        pangkas.prune_weights(linear, sparsity=0.5)
