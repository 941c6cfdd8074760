"""Backbones: the full CIFAR ResNet-18 (Mammoth's layout and parameter count), pretrained torchvision / timm
bodies built offline from a weights file the test writes (equal outputs, named bad keys, freezing, the input
adapter's renormalisation on a hand-made case, a 2-task run that trains only the head), and ``compile``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cl_lightning.nets import ResNet18

pytestmark = pytest.mark.usefixtures("one_thread")


def test_resnet18_is_mammoths_cifar_layout_with_11_17m_parameters():
    net = ResNet18()
    head = nn.Linear(net.out_features, 10)
    assert sum(p.numel() for p in [*net.parameters(), *head.parameters()]) == 11_173_962
    assert net.stem.kernel_size == (3, 3) and net.stem.stride == (1, 1) and net.stem.bias is None
    assert not any(isinstance(m, nn.MaxPool2d) for m in net.modules())
    convs = [(b.conv1.in_channels, b.conv1.out_channels, b.conv1.stride[0], len(b.shortcut) > 0) for b in net.blocks]
    assert convs == [(64, 64, 1, False), (64, 64, 1, False), (64, 128, 2, True), (128, 128, 1, False),
                     (128, 256, 2, True), (256, 256, 1, False), (256, 512, 2, True), (512, 512, 1, False)]
    x = torch.randn(2, 3, 32, 32)
    assert net(x).shape == (2, 512) and net.out_features == 512
    assert torch.equal(net.eval()(x), net(x.flatten(1)))  # flat inputs are reshaped to 3x32x32
