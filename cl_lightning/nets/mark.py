"""The networks of MARK (Hurtado, Raymond-Saez & Soto, NeurIPS 2021), as in the authors' code
(``models/conv.py`` of ``JuliousHurtado/meta-training-setup``).

- :class:`KnowledgeBase`: the shared KB, three blocks ``maxpool(ReLU(conv))`` (64/128/256 channels), each
  block's output multiplied channel-wise by a mask, then flatten, Linear to the latent size, ReLU and
  dropout. Kernel sizes follow the input size as the authors' ``[size // 8, size // 10, 2]``. The KB has no
  buffers, so it is a pure function of its parameters: the meta-update runs K copies of it with
  ``torch.func.functional_call`` under ``vmap``. Dropout takes an explicit keep-mask, so that the
  randomness comes from seeded generators (exact resume, identical on every DDP rank).
- :class:`FeatureExtractor`: the per-task F_t, two conv-BN-ReLU-maxpool blocks, a Linear and ReLU.
- :class:`MaskFunctions`: the per-task M_t, one Linear + ReLU (or sigmoid) per KB block, giving a
  per-sample, per-channel mask from F_t's features.
- :class:`SupermaskMaskFunctions`, :class:`SupermaskHead`: the report's SupSup variant, one M and one C for
  all tasks over frozen signed-constant weights, a task being one supermask per layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cl_lightning.nets.batchnorm import convert_to_global_batchnorm
from cl_lightning.nets.masked import MaskedLinear

MASK_ACTIVATIONS = ("relu", "sigmoid")


def conv_out(size: int, kernel: int) -> int:
    """Spatial size after a valid convolution with ``kernel``."""
    return size - kernel + 1


def kb_kernel_sizes(size: int) -> tuple[int, int, int]:
    """The authors' kernel sizes for an input of ``size`` pixels: ``[size // 8, size // 10, 2]``
    (32: 4, 3, 2; 84: 10, 8, 2; 28: 3, 2, 2)."""
    return max(1, size // 8), max(1, size // 10), 2


def _check_channels(name: str, channels: Sequence[int], count: int) -> tuple[int, ...]:
    channels = tuple(int(c) for c in channels)
    if len(channels) != count or min(channels) < 1:
        raise ValueError(f"{name}={list(channels)} must be {count} positive channel counts")
    return channels


class KnowledgeBase(nn.Module):
    """The shared KB (module docstring). ``forward(x, masks, keep)``: ``masks`` a list of three
    ``[B, C_i]`` tensors or None (no masks), ``keep`` a ``[B, latent]`` dropout keep-mask of 0/1 or None
    (no dropout)."""

    def __init__(self, in_channels: int, image_size: int, channels: Sequence[int] = (64, 128, 256),
                 latent_dim: int = 128, dropout: float = 0.5):
        super().__init__()
        self.channels = _check_channels("kb_channels", channels, 3)
        if latent_dim < 1:
            raise ValueError(f"latent_dim={latent_dim} must be positive")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout={dropout} must be in [0, 1)")
        self.latent_dim, self.dropout = latent_dim, dropout
        kernels = kb_kernel_sizes(image_size)
        s, c_in = image_size, in_channels
        convs = []
        for c, k in zip(self.channels, kernels, strict=True):
            s = conv_out(s, k) // 2
            if s < 1:
                raise ValueError(f"an input of {image_size} pixels is too small for the KB's kernels {kernels}")
            convs.append(nn.Conv2d(c_in, c, kernel_size=k))
            c_in = c
        self.convs = nn.ModuleList(convs)
        self.fc = nn.Linear(self.channels[-1] * s * s, latent_dim)

    def forward(self, x: Tensor, masks: Sequence[Tensor] | None = None, keep: Tensor | None = None) -> Tensor:
        h = x
        for i, conv in enumerate(self.convs):
            h = F.max_pool2d(F.relu(conv(h)), 2)
            if masks is not None:
                h = h * masks[i][..., None, None]
        h = F.relu(self.fc(h.flatten(1)))
        if keep is not None and self.dropout > 0:
            h = h * keep / (1.0 - self.dropout)
        return h


class FeatureExtractor(nn.Module):
    """F_t: conv-BN-ReLU-maxpool twice (kernels ``size // 8`` and ``size // 10``), flatten, Linear, ReLU.
    Batch norm uses the global batch's statistics under DDP (:mod:`cl_lightning.nets.batchnorm`)."""

    def __init__(self, in_channels: int, image_size: int, channels: Sequence[int] = (32, 32), out_dim: int = 128):
        super().__init__()
        c1, c2 = _check_channels("feature_channels", channels, 2)
        k1, k2 = max(1, image_size // 8), max(1, image_size // 10)
        s = conv_out(conv_out(image_size, k1) // 2, k2) // 2
        if s < 1:
            raise ValueError(f"an input of {image_size} pixels is too small for F's kernels ({k1}, {k2})")
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, c1, k1), nn.BatchNorm2d(c1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, k2), nn.BatchNorm2d(c2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(c2 * s * s, out_dim), nn.ReLU())
        convert_to_global_batchnorm(self.net)
        self.out_dim = out_dim

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class MaskFunctions(nn.Module):
    """M_t: one ``Linear(features -> C_i)`` + activation per KB block; returns the list of ``[B, C_i]`` masks."""

    def __init__(self, in_dim: int, channels: Sequence[int], activation: str = "relu"):
        super().__init__()
        if activation not in MASK_ACTIVATIONS:
            raise ValueError(f"mask_activation={activation!r} is not one of {list(MASK_ACTIVATIONS)}")
        self.activation = activation
        self.layers = nn.ModuleList(nn.Linear(in_dim, c) for c in channels)

    def forward(self, features: Tensor) -> list[Tensor]:
        act = torch.relu if self.activation == "relu" else torch.sigmoid
        return [act(layer(features)) for layer in self.layers]


class SupermaskMaskFunctions(nn.Module):
    """The report's SupSup variant of M (its section 6): one set of mask functions for all tasks, each block's
    ``Linear(features -> C_i)`` a frozen signed-constant weight with one edge-popup supermask per task
    (:class:`cl_lightning.nets.masked.MaskedLinear`, slot = task). A task adds a binary mask, not a network."""

    def __init__(self, in_dim: int, channels: Sequence[int], num_tasks: int, density: float = 0.5,
                 activation: str = "relu", weight_seed: int = 0):
        super().__init__()
        if activation not in MASK_ACTIVATIONS:
            raise ValueError(f"mask_activation={activation!r} is not one of {list(MASK_ACTIVATIONS)}")
        self.activation = activation
        self.layers = nn.ModuleList(MaskedLinear(in_dim, c, num_tasks, density, weight_seed=weight_seed * 1000 + i,
                                                 score_seed=weight_seed * 1000 + i) for i, c in enumerate(channels))

    def forward(self, features: Tensor, task: int) -> list[Tensor]:
        act = torch.relu if self.activation == "relu" else torch.sigmoid
        return [act(layer(features, [task])) for layer in self.layers]

    def scores(self, task: int) -> list[nn.Parameter]:
        """What training task ``task``'s mask functions changes: its supermask scores in every layer."""
        return [cast(MaskedLinear, layer).scores[task] for layer in self.layers]


class SupermaskHead(nn.Module):
    """The SupSup variant's one classifier for all tasks: ``Linear(latent -> k)`` over a frozen signed-constant
    weight, one supermask per task."""

    def __init__(self, in_dim: int, classes: int, num_tasks: int, density: float = 0.5, weight_seed: int = 0):
        super().__init__()
        self.layer = MaskedLinear(in_dim, classes, num_tasks, density, weight_seed=weight_seed,
                                  score_seed=weight_seed)

    def forward(self, h: Tensor, task: int) -> Tensor:
        return self.layer(h, [task])
