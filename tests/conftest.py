import os

import pytest
import torch
from torch import nn

# A coupling rule that raises fails the test instead of quietly keeping channels (strict mode,
# pangkas.graph.rules.strict); set in the environment so CLI and torchrun subprocesses inherit it.
os.environ.setdefault("PANGKAS_STRICT_RULES", "1")
# round_to="auto" keeps its timings in memory, never in the user's cache (tests that check the
# cache point it at a temporary directory).
os.environ.setdefault("PANGKAS_CACHE_DIR", "")


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


class ConvNet(nn.Module):
    """Every layer type weight pruning supports, in one small model."""

    def __init__(self):
        super().__init__()
        self.conv1d = nn.Conv1d(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.grouped = nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.up = nn.ConvTranspose2d(16, 8, 2, stride=2)
        self.conv3d = nn.Conv3d(1, 4, 3, padding=1)
        self.head = nn.Linear(8 + 8 + 4, 10)

    def forward(self, x):
        a = self.conv1d(x.mean(-1)).mean(-1)
        b = self.up(self.grouped(torch.relu(self.bn(self.conv(x))))).mean((-1, -2))
        c = self.conv3d(x[:, :1].unsqueeze(1)).mean((-1, -2, -3))
        return self.head(torch.cat([a, b, c], 1))


@pytest.fixture
def convnet():
    return ConvNet()


@pytest.fixture
def images():
    return torch.randn(4, 3, 8, 8)


def mlp():
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 10))


def pruned_digits():
    """The demo's digits CNN (eval mode, seeded) with half its channels pruned, and three batches."""
    import pangkas
    from pangkas.demo import digits_cnn

    torch.manual_seed(0)
    model = digits_cnn().eval()
    data = [torch.rand(16, 1, 8, 8) for _ in range(3)]
    pangkas.prune_channels(model, data[0], ratio=0.5)
    return model, data


@pytest.fixture
def tiny_llama():
    """A random LLaMA causal LM (GQA: 4 heads in 2 KV groups) and 96 token ids for it."""
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=64)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval(), torch.randint(0, 64, (96,))
