"""Small networks, one per building block that issue 12 asks channel pruning to handle exactly.

Each entry of ``BLOCKS`` builds (model, example input). zoo_timm.py runs them beside the timm
models, and tests/test_zoo_blocks.py (loading this file by path) checks them with the oracle.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def conv_bn(c_in: int, c_out: int, k: int = 3, groups: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, k, padding=dilation * (k // 2), dilation=dilation, groups=groups,
                                   bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


class SharedModule(nn.Module):
    """One positional conv registered under two names and called twice (as some vision
    transformers do): both call sites must see the same cut, counted once."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 16)
        self.pos = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.pos_again = self.pos
        self.mid = conv_bn(16, 16)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.pos(x)
        x = self.mid(x)
        x = x + self.pos_again(x)
        return self.head(x.mean((2, 3)))


class HardSwish(nn.Module):
    """A MobileNetV3 block: expand, depthwise, squeeze-excite with hard-sigmoid, project; hard-swish
    activations, in place as torchvision and timm write them."""

    def __init__(self, c: int = 16, expanded: int = 48):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c), nn.Hardswish(inplace=True))
        self.expand = nn.Sequential(nn.Conv2d(c, expanded, 1), nn.BatchNorm2d(expanded), nn.Hardswish(inplace=True))
        self.depthwise = nn.Sequential(nn.Conv2d(expanded, expanded, 3, padding=1, groups=expanded),
                                       nn.BatchNorm2d(expanded), nn.Hardswish())
        self.squeeze = nn.Conv2d(expanded, 12, 1)
        self.excite = nn.Conv2d(12, expanded, 1)
        self.project = nn.Sequential(nn.Conv2d(expanded, c, 1), nn.BatchNorm2d(c))
        self.head = nn.Linear(c, 10)

    def forward(self, x):
        x = self.stem(x)
        h = self.depthwise(self.expand(x))
        scale = F.hardsigmoid(self.excite(F.relu(self.squeeze(h.mean((2, 3), keepdim=True)))))
        x = x + self.project(h * scale)
        return self.head(F.hardswish(x).mean((2, 3)))


class PixelShuffleSR(nn.Module):
    """An ESPCN-style super-resolution net: features, then r*r sub-pixel channels per output
    channel rearranged into space; and a pixel-unshuffled input as some detectors do."""

    def __init__(self, r: int = 2, features: int = 24):
        super().__init__()
        self.unshuffled = nn.Conv2d(3 * r * r, features, 3, padding=1)
        self.body = conv_bn(features, features)
        self.to_pixels = nn.Conv2d(features, 8 * r * r, 3, padding=1)
        self.shuffle = nn.PixelShuffle(r)
        self.refine = nn.Conv2d(8, 3, 3, padding=1)
        self.r = r

    def forward(self, x):
        x = self.body(self.unshuffled(F.pixel_unshuffle(x, self.r)))
        return self.refine(F.relu(self.shuffle(self.to_pixels(x))))


class LSTMClassifier(nn.Module):
    """A text classifier: embedding, a 2-layer bidirectional batch-first LSTM, a GRU with a
    projection-free hidden state, the last step to a linear head."""

    def __init__(self, vocab: int = 50, dim: int = 16, hidden: int = 24):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.lstm = nn.LSTM(dim, hidden, num_layers=2, bidirectional=True, batch_first=True)
        self.gru = nn.GRU(2 * hidden, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 5)

    def forward(self, ids):
        x, _ = self.lstm(self.embed(ids))
        x, _ = self.gru(x)
        return self.head(x[:, -1])


class SelectiveKernel(nn.Module):
    """SKNet: two branches (3x3 and dilated 3x3) summed, squeezed, and re-weighted per channel
    by a softmax over the branches."""

    def __init__(self, c: int = 16, attn: int = 8):
        super().__init__()
        self.stem = conv_bn(3, c)
        self.paths = nn.ModuleList([conv_bn(c, c, groups=4), conv_bn(c, c, groups=4, dilation=2)])
        self.reduce = conv_bn(c, attn, k=1)
        self.select = nn.Conv2d(attn, 2 * c, 1, bias=False)
        self.head = nn.Linear(c, 10)

    def forward(self, x):
        x = self.stem(x)
        paths = torch.stack([p(x) for p in self.paths], dim=1)  # B, 2, C, H, W
        attn = self.select(self.reduce(paths.sum(1).mean((2, 3), keepdim=True)))
        attn = attn.view(x.shape[0], 2, x.shape[1], 1, 1).softmax(dim=1)
        x = x + (paths * attn).sum(1)
        return self.head(x.mean((2, 3)))


class Res2Net(nn.Module):
    """A Res2Net bottleneck: 1x1, split into ``scale`` pieces, each 3x3 conv fed the previous
    piece's output plus its own, the last piece passed through, concatenated, 1x1, residual.
    (The piece size comes from the tensor; timm's keeps it in an attribute, see the timm integration.)"""

    def __init__(self, c: int = 32, width: int = 8, scale: int = 4):
        super().__init__()
        self.stem = conv_bn(3, c)
        self.reduce = conv_bn(c, width * scale, k=1)
        self.convs = nn.ModuleList([conv_bn(width, width) for _ in range(scale - 1)])
        self.expand = nn.Sequential(nn.Conv2d(width * scale, c, 1, bias=False), nn.BatchNorm2d(c))
        self.scale = scale
        self.head = nn.Linear(c, 10)

    def forward(self, x):
        x = self.stem(x)
        pieces = self.reduce(x).chunk(self.scale, 1)
        out, previous = [], None
        for piece, conv in zip(pieces, self.convs):
            previous = conv(piece if previous is None else previous + piece)
            out.append(previous)
        out.append(pieces[-1])
        x = F.relu(x + self.expand(torch.cat(out, 1)))
        return self.head(x.mean((2, 3)))


class ResNeXt(nn.Module):
    """A ResNeXt bottleneck: 1x1, grouped 3x3 (8 groups), 1x1, residual."""

    def __init__(self, c: int = 32, width: int = 32, groups: int = 8):
        super().__init__()
        self.stem = conv_bn(3, c)
        self.body = nn.Sequential(conv_bn(c, width, k=1), conv_bn(width, width, groups=groups),
                                  nn.Conv2d(width, c, 1, bias=False), nn.BatchNorm2d(c))
        self.head = nn.Linear(c, 10)

    def forward(self, x):
        x = self.stem(x)
        x = F.relu(x + self.body(x))
        return self.head(x.mean((2, 3)))


IMAGES = (2, 3, 16, 16)
BLOCKS = {
    "block:shared_module": lambda: (SharedModule(), torch.randn(IMAGES)),
    "block:hardswish": lambda: (HardSwish(), torch.randn(IMAGES)),
    "block:pixel_shuffle": lambda: (PixelShuffleSR(), torch.randn(IMAGES)),
    "block:lstm": lambda: (LSTMClassifier(), torch.randint(0, 50, (2, 7))),
    "block:selective_kernel": lambda: (SelectiveKernel(), torch.randn(IMAGES)),
    "block:res2net": lambda: (Res2Net(), torch.randn(IMAGES)),
    "block:resnext": lambda: (ResNeXt(), torch.randn(IMAGES)),
}
