"""Hand-built networks, one per coupling rule."""

import torch
from torch import nn


def cbr(c_in, c_out, k=3, groups=1, stride=1):
    return nn.Sequential(nn.Conv2d(c_in, c_out, k, stride, k // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU())


class Chain(nn.Module):
    """conv -> BN -> ReLU -> conv -> flatten -> Linear -> Linear (flatten expands channels)."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(cbr(3, 16), nn.Conv2d(16, 24, 3), nn.ReLU())
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(24 * 6 * 6, 32), nn.ReLU(), nn.Linear(32, 10))

    def forward(self, x):
        return self.head(self.features(x))


class Residual(nn.Module):
    """Residual adds with and without a downsample: all producers of a sum join one group."""

    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 16)
        self.a = nn.Sequential(cbr(16, 16), nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16))
        self.b = nn.Sequential(cbr(16, 32, stride=2), nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32))
        self.down = nn.Sequential(nn.Conv2d(16, 32, 1, 2, bias=False), nn.BatchNorm2d(32))
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.a(x))
        x = torch.relu(self.b(x) + self.down(x))
        return self.head(x.mean((2, 3)))


class Concat(nn.Module):
    """DenseNet/Inception-style concatenation, including the raw input (never prunable)."""

    def __init__(self):
        super().__init__()
        self.b1 = cbr(3, 8)
        self.b2 = cbr(3 + 8, 12)
        self.b3 = cbr(3 + 8 + 12, 16, k=1)
        self.head = nn.Linear(16 + 12, 10)

    def forward(self, x):
        y1 = self.b1(x)
        y2 = self.b2(torch.cat([x, y1], 1))
        y3 = self.b3(torch.cat([x, y1, y2], 1))
        return self.head(torch.cat([y3, y2], 1).amax((2, 3)))


class Shuffle(nn.Module):
    """ShuffleNetV2 unit: chunk in two, transform one half, concat, channel shuffle."""

    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 16)
        self.branch = nn.Sequential(cbr(8, 8, k=1), nn.Conv2d(8, 8, 3, padding=1, groups=8), cbr(8, 8, k=1))
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = self.stem(x)
        a, b = x.chunk(2, dim=1)
        x = torch.cat([a, self.branch(b)], 1)
        n, c, h, w = x.shape
        x = x.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        return self.head(x.mean((2, 3)))


class Slices(nn.Module):
    """Constant slices and an unequal split of a channel dim."""

    def __init__(self):
        super().__init__()
        self.conv = cbr(3, 24)
        self.left = nn.Conv2d(8, 8, 1)
        self.right = nn.Conv2d(16, 8, 1)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = self.conv(x)
        y = torch.cat([self.left(x[:, :8]), self.right(x[:, 8:])], 1)
        return self.head(y.mean((2, 3)))


class Grouped(nn.Module):
    """Depthwise, depthwise with multiplier 2, and grouped convolutions."""

    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 16)
        self.dw = cbr(16, 16, groups=16)
        self.dw2 = nn.Conv2d(16, 32, 3, padding=1, groups=16)
        self.grouped = cbr(32, 24, groups=4)
        self.head = nn.Linear(24, 10)

    def forward(self, x):
        x = self.grouped(self.dw2(self.dw(self.stem(x))))
        return self.head(x.mean((2, 3)))


class Transposed(nn.Module):
    """Transposed convolution (decoder-style upsampling)."""

    def __init__(self):
        super().__init__()
        self.enc = cbr(3, 16, stride=2)
        self.up = nn.ConvTranspose2d(16, 12, 2, stride=2)
        self.out = nn.Conv2d(12, 4, 1)

    def forward(self, x):
        return self.out(torch.relu(self.up(self.enc(x))))


class ChannelsLast(nn.Module):
    """ConvNeXt-style block: permute to channels-last, LayerNorm, MLP, layer scale, permute back."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.dw = nn.Conv2d(16, 16, 7, padding=3, groups=16)
        self.norm = nn.LayerNorm(16)
        self.fc1 = nn.Linear(16, 64)
        self.fc2 = nn.Linear(64, 16)
        self.gamma = nn.Parameter(torch.ones(16))
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = self.stem(x)
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.fc2(nn.functional.gelu(self.fc1(self.norm(y))))
        x = x + (self.gamma * y).permute(0, 3, 1, 2)
        return self.head(x.mean((2, 3)))


class Norms(nn.Module):
    """PReLU and InstanceNorm (exact per channel), GroupNorm (approximate)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.act = nn.PReLU(16)
        self.inorm = nn.InstanceNorm2d(16, affine=True)
        self.c2 = nn.Conv2d(16, 16, 3, padding=1)
        self.gnorm = nn.GroupNorm(4, 16)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = self.inorm(self.act(self.c1(x)))
        x = self.gnorm(self.c2(x))
        return self.head(x.mean((2, 3)))


class Tokens(nn.Module):
    """Parameters used directly: a class token concatenated to the sequence, a position embedding
    added to it; no normalisation, so removing hidden channels is exact."""

    def __init__(self, dim=16, n=9):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 3, stride=3)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.zeros(1, n + 1, dim))
        self.mlp = nn.Sequential(nn.Linear(dim, 32), nn.GELU(), nn.Linear(32, dim))
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos
        x = x + self.mlp(x)
        return self.head(x[:, 0])


class Attention(nn.Module):
    """Hand-written multi-head attention with a fixed scale: head dims are exactly prunable."""

    def __init__(self, dim=24, heads=3):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.scale = self.head_dim ** -0.5
        self.embed = nn.Linear(5, dim)
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        x = self.embed(x)
        b, n, _ = x.shape
        q, k, v = (p(x).view(b, n, self.heads, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        attn = (q @ k.transpose(-2, -1) * self.scale).softmax(-1)
        y = (attn @ v).transpose(1, 2).reshape(b, n, -1)
        return self.head((x + self.o(y)).mean(1))


class TorchMHA(nn.Module):
    """nn.MultiheadAttention in a residual stream without norms: heads go whole, and the
    residual width through its input and output projections."""

    def __init__(self, dim=16):
        super().__init__()
        self.embed = nn.Linear(5, dim)
        self.attn = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 32), nn.ReLU(), nn.Linear(32, dim))
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        x = self.embed(x)
        x = x + self.attn(x, x, x, need_weights=False)[0]
        return self.head((x + self.mlp(x)).mean(1))


class Sequence(nn.Module):
    """Embedding -> Conv1d over time -> Linear."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.conv = nn.Conv1d(16, 24, 3, padding=1)
        self.out = nn.Linear(24, 7)

    def forward(self, ids):
        x = self.conv(self.embed(ids).transpose(1, 2)).relu()
        return self.out(x.transpose(1, 2))


class Unknown(nn.Module):
    """Ops pangkas does not know how to follow through a channel dim: they must block."""

    def __init__(self):
        super().__init__()
        self.a = cbr(3, 8)
        self.b = cbr(3, 8)
        self.c = cbr(3, 8)
        self.head = nn.Linear(24, 10)

    def forward(self, x):
        a = self.a(x).flip(1)                         # reverses channel order
        b = torch.fft.rfft(self.b(x), dim=1).abs()    # mixes channels, no rule
        c = self.c(x)
        c = c - c.sum(1, keepdim=True)                # sums across channels
        feats = torch.cat([a.mean((2, 3)), b.mean((2, 3))[:, :5], c.mean((2, 3)), torch.zeros(x.shape[0], 3)], 1)
        return self.head(feats)


class HardCodedView(nn.Module):
    """Flattening with a constant size: the plan cannot know, the post-surgery check must."""

    def __init__(self):
        super().__init__()
        self.conv = cbr(3, 16)
        self.conv2 = cbr(16, 8)
        self.head = nn.Linear(8 * 8 * 8, 10)

    def forward(self, x):
        return self.head(self.conv2(self.conv(x)).view(-1, 8 * 8 * 8))


class TwoOutputs(nn.Module):
    """Every model output keeps its channels, not just the last one."""

    def __init__(self):
        super().__init__()
        self.body = cbr(3, 16)
        self.mid = cbr(16, 12)
        self.head = nn.Conv2d(12, 5, 1)

    def forward(self, x):
        feats = self.mid(self.body(x))
        return self.head(feats), feats


IMAGES = torch.Size([2, 3, 8, 8])
NETS = {
    "chain": (Chain, IMAGES), "residual": (Residual, IMAGES), "concat": (Concat, IMAGES),
    "shuffle": (Shuffle, IMAGES), "slices": (Slices, IMAGES), "grouped": (Grouped, IMAGES),
    "transposed": (Transposed, IMAGES), "channels_last": (ChannelsLast, IMAGES),
    "norms": (Norms, IMAGES), "tokens": (Tokens, torch.Size([2, 3, 9, 9])),
    "attention": (Attention, torch.Size([2, 6, 5])), "torch_mha": (TorchMHA, torch.Size([2, 6, 5])),
    "unknown": (Unknown, IMAGES), "hard_coded_view": (HardCodedView, IMAGES),
    "two_outputs": (TwoOutputs, IMAGES),
}
