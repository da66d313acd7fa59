"""Model-family integrations: explicit objects, registered by name or given per call."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pangkas
from pangkas.graph.adapter import Heads
from pangkas.integrations import Integration
from pangkas.oracle import oracle_error, randomize

SOURCE = Path(pangkas.__file__).parent


class ToyAttention(nn.Module):
    """Self-attention that reads its own head count, ``n_heads``, which pangkas knows nothing of."""

    def __init__(self, dim=16, n_heads=4):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, dim // n_heads
        self.qkv = nn.Parameter(torch.randn(3 * dim, dim))
        self.out = nn.Linear(dim, dim)

    def forward(self, x):
        qkv = F.linear(x, self.qkv).view(*x.shape[:2], 3, self.n_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        return self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))


class ToyModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.attention, self.head = nn.Linear(8, 16), ToyAttention(), nn.Linear(16, 2)

    def forward(self, x):
        return self.head(torch.relu(self.attention(self.embed(x))))


def _toy_heads(model):
    return {name: Heads(m.qkv.shape[0] // (3 * m.head_dim), m.qkv.shape[0] // (3 * m.head_dim), m.head_dim)
            for name, m in model.named_modules() if isinstance(m, ToyAttention)}


def _toy_fix(model, undo):
    for m in model.modules():
        if isinstance(m, ToyAttention):
            undo.remember(m, ("n_heads",))
            m.n_heads = m.qkv.shape[0] // (3 * m.head_dim)


TOY = Integration("toy", attention=_toy_heads, fixers=[_toy_fix])


def toy():
    torch.manual_seed(0)
    return randomize(ToyModel().eval()), torch.randn(2, 5, 8)


def test_a_family_given_per_call_loses_whole_heads_exactly():
    model, x = toy()
    error, plan = oracle_error(model, x, lambda m: pangkas.plan_channels(m, x, ratio=0.5, integrations=[TOY]))
    attention = plan.model.attention
    assert error <= 1e-5
    assert attention.n_heads == 2 and attention.head_dim == 4 and attention.qkv.shape == (3 * 2 * 4, 8)
    assert plan.model(x).shape == (2, 5, 2)
    assert model.attention.n_heads == 4  # the original is left alone


def test_without_its_integration_the_heads_stay():
    model, x = toy()
    error, plan = oracle_error(model, x, lambda m: pangkas.plan_channels(m, x, ratio=0.5))
    attention = plan.model.attention
    assert error <= 1e-5 and attention.n_heads == 4 and attention.qkv.shape == (48, 8)


@pytest.fixture
def registered_toy():
    pangkas.integrations.register(TOY)
    yield
    pangkas.integrations.unregister(TOY.name)


def test_a_registered_family_is_known_to_every_call(registered_toy):
    model, x = toy()
    pangkas.prune_channels(model, x, ratio=0.5)
    assert model.attention.n_heads == 2
    assert pangkas.integrations.active([TOY]).members.count(TOY) == 1  # given again: used once


def test_pruned_toy_saves_and_loads_into_a_fresh_instance(tmp_path, request):
    model, x = toy()
    pangkas.prune_channels(model, x, ratio=0.5, integrations=[TOY])
    path = pangkas.save(model, tmp_path / "toy.safetensors")
    assert pangkas.load(path, toy()[0]).attention.n_heads == 4  # load knows the registered families only
    torch.testing.assert_close(pangkas.load(path, toy()[0], integrations=[TOY])(x), model(x), rtol=0, atol=0)
    request.getfixturevalue("registered_toy")
    torch.testing.assert_close(pangkas.load(path, toy()[0])(x), model(x), rtol=0, atol=0)


def test_names_are_unique():
    with pytest.raises(pangkas.PangkasError, match="already registered"):
        pangkas.integrations.register(Integration("huggingface"))
    with pytest.raises(pangkas.PangkasError, match="another name"):
        pangkas.integrations.active([Integration("swin")])
    assert pangkas.integrations.names() == ("huggingface", "multihead_attention", "recurrent", "swin", "timm")
    assert [i.name for i in pangkas.integrations.registered()] == list(pangkas.integrations.names())


@pytest.mark.parametrize("make,message", [
    (lambda: Integration(""), "name"),
    (lambda: Integration("x", traced_as={nn.MultiheadAttention: nn.Linear}), "subclass"),
    (lambda: Integration("x", updaters={3: print}), "map classes"),
    (lambda: Integration("x", fixers=print), "fixers"),
    (lambda: pangkas.integrations.register("toy"), "must be a Integration object"),
    (lambda: pangkas.plan_channels(*toy(), ratio=0.5, integrations=TOY), "list"),
])
def test_bad_integrations_are_refused(make, message):
    with pytest.raises(pangkas.PangkasError, match=message):
        make()


def test_importing_a_family_module_registers_nothing():
    script = (
        "import importlib, pangkas.integrations as i\n"
        "before = [(x.name, id(x)) for x in i.registered()]\n"
        "for name in ('huggingface', 'multihead_attention', 'swin'):\n"
        "    importlib.reload(importlib.import_module('pangkas.integrations.' + name))\n"
        "assert [(x.name, id(x)) for x in i.registered()] == before\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True)


def _imports(path: Path) -> set[str]:
    """Absolute names of the modules ``path`` imports (relative imports resolved)."""
    package = ".".join(path.relative_to(SOURCE.parent).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(filter(None, (base, node.module)))
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


@pytest.mark.parametrize("folder,forbidden", [
    ("graph", ("pangkas.integrations",)),
    ("surgery", ("pangkas.integrations",)),
    ("integrations", ("pangkas.channels", "pangkas.transformer")),  # they are built on integrations
])
def test_lower_layers_do_not_reach_up(folder, forbidden):
    for path in (SOURCE / folder).glob("*.py"):
        bad = {m for m in _imports(path) if m.startswith(forbidden)}
        assert not bad, f"{path.name} imports {bad}"


class Fragile(nn.Module):
    """Its own forward insists on the width it was built with; its traced form does not."""

    def __init__(self):
        super().__init__()
        self.fc, self.width = nn.Linear(8, 8), 8

    def forward(self, x):
        assert x.shape[-1] == self.width, "built for another width"
        return self.fc(x)


class Tolerant(Fragile):
    def forward(self, x):
        return self.fc(x)


def test_a_cut_that_verifies_only_as_traced_is_refused_and_undone():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), Fragile(), nn.ReLU(), nn.Linear(8, 2)).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    family = Integration("tolerant", traced_as={Fragile: Tolerant})
    with pytest.raises(pangkas.OperationFailed, match="does not run as itself.*built for another width"):
        pangkas.prune_channels(model, torch.randn(2, 4), ratio=0.5, integrations=[family])
    assert type(model[2]) is Fragile and model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
