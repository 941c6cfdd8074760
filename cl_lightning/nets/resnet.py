"""The CIFAR ResNet-18s of continual learning: ResNet-18's layout for 32x32 images (3x3 stem at stride 1, no
max-pool, 4 stages of 2 BasicBlocks, global average pool). ``ReducedResNet18`` is GEM's (Lopez-Paz & Ranzato
2017) with ``width`` (20) channels in the first stage; ``ResNet18`` is the full one at 64-128-256-512, the
layout of Mammoth's ``resnet18`` (DER, X-DER, ER-ACE papers): 11,173,962 parameters with a 10-class head.
Backbones: the method adds its heads.

``running_stats=False`` makes batch norm use each batch's statistics, also at test time, and keep no
buffers: the network is then a pure function of its parameters, which is what methods that vectorise
many parameter sets (the ARI learner) or generate weights need.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class BasicBlock(nn.Module):
    def __init__(self, channels_in: int, channels_out: int, stride: int, running_stats: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(channels_in, channels_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels_out, track_running_stats=running_stats)
        self.conv2 = nn.Conv2d(channels_out, channels_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels_out, track_running_stats=running_stats)
        self.shortcut = nn.Sequential()
        if stride != 1 or channels_in != channels_out:
            self.shortcut = nn.Sequential(nn.Conv2d(channels_in, channels_out, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(channels_out, track_running_stats=running_stats))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ReducedResNet18(nn.Module):
    """Args:
        width: channels of the first stage (GEM: 20; ResNet-18: 64).
        in_channels: image channels; flat inputs are reshaped to ``[in_channels, side, side]``.
        running_stats: batch norm with running statistics (the usual) or batch statistics only.
    """

    def __init__(self, width: int = 20, in_channels: int = 3, running_stats: bool = True):
        super().__init__()
        if width < 1 or in_channels < 1:
            raise ValueError(f"width={width} and in_channels={in_channels} must be positive")
        self.in_channels = in_channels
        self.stem = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width, track_running_stats=running_stats)
        blocks, channels = [], width
        for stage in range(4):
            out = width * 2**stage
            for block in range(2):
                blocks.append(BasicBlock(channels, out, 2 if stage > 0 and block == 0 else 1, running_stats))
                channels = out
        self.blocks = nn.Sequential(*blocks)
        self.out_features = channels

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 2:
            side = int(round((x.shape[1] / self.in_channels) ** 0.5))
            x = x.view(len(x), self.in_channels, side, side)
        x = self.blocks(F.relu(self.bn(self.stem(x))))
        return x.mean((-2, -1))


class ResNet18(ReducedResNet18):
    """The full CIFAR ResNet-18 (Mammoth's layout): ``ReducedResNet18`` at width 64, 11.17M parameters with a
    10-class head (11.16M without)."""

    def __init__(self, in_channels: int = 3, running_stats: bool = True):
        super().__init__(width=64, in_channels=in_channels, running_stats=running_stats)
