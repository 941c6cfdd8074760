"""Supermask layers: a frozen random backbone whose connections are chosen by learned binary masks.

Every masked layer keeps one frozen weight tensor (Kaiming normal or signed Kaiming constant, no bias)
and ``num_slots`` real-valued score tensors. The mask of a slot keeps the top ``density`` fraction of
its connections by ``|score|`` (edge-popup, Ramanujan et al. 2020); the backward pass goes straight
through to the scores, so training a slot changes only its scores (SupSup, Wortsman et al. 2020).

Several masks are applied as one batched computation: ``masks(slots)`` stacks them into
``[M, *weight.shape]`` and a per-layer coefficient vector combines them with one ``tensordot``
(superposition for task inference, ImpressLearn's basis combination), or ``forward_each`` runs M
masked copies of the layer on M inputs with one einsum / grouped convolution.

Masks of slots that are not being trained are computed once and cached (keyed by the scores'
version counter, so a ``load_state_dict`` or any in-place change invalidates them).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

INITS = ("kaiming_normal", "signed_constant")


class EdgePopup(torch.autograd.Function):
    """Top-k of the scores as a {0, 1} mask; the gradient passes straight through to the scores."""

    @staticmethod
    def forward(ctx, scores: Tensor, k: int) -> Tensor:
        flat = scores.flatten()
        mask = torch.zeros_like(flat)
        mask[flat.topk(k, sorted=False).indices] = 1.0
        return mask.view_as(scores)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


def keep_count(numel: int, density: float) -> int:
    """Number of connections a mask keeps: ``round(density * numel)``, at least one."""
    return max(1, min(numel, round(density * numel)))


class MaskedLayer(nn.Module, ABC):
    """Frozen weight + per-slot scores; subclasses say how a weight is applied to an input."""

    def __init__(self, weight_shape: Sequence[int], fan_in: int, num_slots: int, density: float,
                 init: str = "signed_constant", scale_fan: bool = False, weight_seed: int = 0,
                 score_seed: int = 0):
        super().__init__()
        if not 0.0 < density <= 1.0:
            raise ValueError(f"density={density} must be in (0, 1]")
        if init not in INITS:
            raise ValueError(f"init={init!r} is not one of {INITS}")
        if num_slots < 1:
            raise ValueError(f"num_slots={num_slots} must be positive")
        self.density, self.init = density, init
        fan = fan_in * density if scale_fan else fan_in
        std = math.sqrt(2.0 / fan)  # Kaiming, ReLU gain, fan-in mode
        g = torch.Generator().manual_seed(weight_seed)
        w = torch.randn(*weight_shape, generator=g)
        w = w.sign() * std if init == "signed_constant" else w * std
        self.weight = nn.Parameter(w, requires_grad=False)
        bound = 1.0 / math.sqrt(fan_in)  # kaiming_uniform_(a=sqrt(5)), as edge-popup initialises scores
        scores = []
        for slot in range(num_slots):
            gs = torch.Generator().manual_seed(score_seed * 100_003 + slot)
            scores.append(nn.Parameter((torch.rand(*weight_shape, generator=gs) * 2 - 1) * bound))
        self.scores = nn.ParameterList(scores)
        self.k = keep_count(w.numel(), density)
        self._cache: dict[int, tuple[tuple, Tensor]] = {}
        self._stack_cache: tuple[tuple, Tensor] | None = None

    @property
    def num_slots(self) -> int:
        return len(self.scores)

    # ---------------------------------------------------------------- masks
    def _live(self, slot: int) -> bool:
        return self.scores[slot].requires_grad and torch.is_grad_enabled()

    def _key(self, slot: int) -> tuple:
        s = self.scores[slot]
        return (s._version, s.data_ptr(), s.device, s.dtype)

    def mask(self, slot: int) -> Tensor:
        """The {0, 1} mask of ``slot`` (float, weight-shaped); differentiable while the slot trains."""
        if self._live(slot):
            return EdgePopup.apply(self.scores[slot].abs(), self.k)
        key = self._key(slot)
        hit = self._cache.get(slot)
        if hit is None or hit[0] != key:
            # a normal tensor even inside the test loop's inference mode, so that later autograd can save it
            with torch.inference_mode(False), torch.no_grad():
                m = EdgePopup.apply(self.scores[slot].detach().abs(), self.k)
            self._cache[slot] = hit = (key, m)
        return hit[1]

    def masks(self, slots: Sequence[int]) -> Tensor:
        """Masks of ``slots`` stacked into ``[M, *weight.shape]`` (cached when none is training)."""
        slots = list(slots)
        if any(self._live(s) for s in slots):
            return torch.stack([self.mask(s) for s in slots])
        key = tuple((s, self._key(s)) for s in slots)
        if self._stack_cache is None or self._stack_cache[0] != key:
            with torch.inference_mode(False), torch.no_grad():
                stacked = torch.stack([self.mask(s) for s in slots])
            self._stack_cache = (key, stacked)
        return self._stack_cache[1]

    def effective_weight(self, slots: Sequence[int], coeff: Tensor | None = None) -> Tensor:
        """``W * mask`` of one slot, or ``W * sum_m coeff[m] mask_m`` (one tensordot over the stack)."""
        if coeff is None:
            if len(slots) != 1:
                raise ValueError(f"{len(slots)} slots need coefficients to be combined")
            return self.weight * self.mask(slots[0])
        if coeff.shape != (len(slots),):
            raise ValueError(f"coefficients of shape {tuple(coeff.shape)} for {len(slots)} slots")
        return self.weight * torch.tensordot(coeff.to(self.weight.dtype), self.masks(slots), dims=1)

    def clear_cache(self) -> None:
        self._cache.clear()
        self._stack_cache = None

    def _apply(self, fn, *args, **kwargs):  # moving devices invalidates cached masks
        self.clear_cache()
        return super()._apply(fn, *args, **kwargs)

    @abstractmethod
    def apply_weight(self, x: Tensor, weight: Tensor) -> Tensor:
        """The layer's operation with an already masked weight."""

    @abstractmethod
    def apply_each(self, xs: Tensor, weights: Tensor) -> Tensor:
        """``xs[m]`` through the layer with ``weights[m]``, for all m at once."""

    def forward(self, x: Tensor, slots: Sequence[int], coeff: Tensor | None = None) -> Tensor:
        return self.apply_weight(x, self.effective_weight(slots, coeff))

    def forward_each(self, xs: Tensor, slots: Sequence[int]) -> Tensor:
        """M masked copies of the layer on M inputs: ``xs`` is ``[M, B, ...]``."""
        return self.apply_each(xs, self.weight.unsqueeze(0) * self.masks(slots))


class MaskedLinear(MaskedLayer):
    """A linear layer (no bias) over a frozen weight, masked per slot."""

    def __init__(self, in_features: int, out_features: int, num_slots: int = 1, density: float = 0.5,
                 init: str = "signed_constant", scale_fan: bool = False, weight_seed: int = 0, score_seed: int = 0):
        super().__init__((out_features, in_features), in_features, num_slots, density, init, scale_fan,
                         weight_seed, score_seed)
        self.in_features, self.out_features = in_features, out_features

    def apply_weight(self, x: Tensor, weight: Tensor) -> Tensor:
        return F.linear(x, weight)

    def apply_each(self, xs: Tensor, weights: Tensor) -> Tensor:
        return torch.einsum("mbi,moi->mbo", xs, weights)


class MaskedConv2d(MaskedLayer):
    """A 2-D convolution (no bias) over a frozen weight, masked per slot; ``forward_each`` is one
    grouped convolution over the M masked copies."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0,
                 num_slots: int = 1, density: float = 0.5, init: str = "signed_constant", scale_fan: bool = False,
                 weight_seed: int = 0, score_seed: int = 0):
        super().__init__((out_channels, in_channels, kernel_size, kernel_size), in_channels * kernel_size**2,
                         num_slots, density, init, scale_fan, weight_seed, score_seed)
        self.stride, self.padding = stride, padding

    def apply_weight(self, x: Tensor, weight: Tensor) -> Tensor:
        return F.conv2d(x, weight, stride=self.stride, padding=self.padding)

    def apply_each(self, xs: Tensor, weights: Tensor) -> Tensor:
        m, b = xs.shape[:2]
        x = xs.transpose(0, 1).reshape(b, m * xs.shape[2], *xs.shape[3:])
        out = F.conv2d(x, weights.flatten(0, 1), stride=self.stride, padding=self.padding, groups=m)
        return out.view(b, m, -1, *out.shape[2:]).transpose(0, 1)


class MaskedNet(nn.Module, ABC):
    """A network of masked layers. ``set_io`` builds it once the benchmark is known; ``forward`` takes the
    slots to use and optional coefficients ``[M, num_layers]`` (one column per masked layer)."""

    layers: nn.ModuleList

    @abstractmethod
    def set_io(self, in_features: int, out_features: int, num_slots: int) -> None:
        """Builds the layers for the benchmark's input and output widths, with ``num_slots`` masks each."""

    @abstractmethod
    def forward(self, x: Tensor, slots: Sequence[int], coeffs: Tensor | None = None) -> Tensor:
        """Outputs with the mask of one slot, or the slots combined by ``coeffs`` ``[M, num_layers]``."""

    @abstractmethod
    def forward_each(self, xs: Tensor, slots: Sequence[int]) -> Tensor:
        """``xs`` ``[M, B, ...]``: batch m through the mask of ``slots[m]``, all at once."""

    @property
    def masked_layers(self) -> list[MaskedLayer]:
        return [m for m in self.modules() if isinstance(m, MaskedLayer)]

    @property
    def num_layers(self) -> int:
        return len(self.masked_layers)

    @property
    def num_slots(self) -> int:
        return self.masked_layers[0].num_slots

    def mask_bitmaps(self, slot: int) -> list[Tensor]:
        """The binary masks of ``slot``, one bool tensor per layer (what a stored task costs)."""
        with torch.no_grad():
            return [layer.mask(slot).detach().bool() for layer in self.masked_layers]


class MaskedMLP(MaskedNet):
    """Flatten, then masked linear layers with ReLU; the last layer (the output) is masked too.

    Args:
        hidden_sizes: widths of the hidden layers (LeNet-300-100: ``[300, 100]``).
        density: fraction of connections each mask keeps (edge-popup's ``k``).
        init: backbone weights, ``signed_constant`` (SupSup's default) or ``kaiming_normal``.
        scale_fan: scale the Kaiming fan-in by the density (keeps the masked net's activations in scale).
        weight_seed: seed of the frozen backbone (the same backbone whatever the global seed or rank).
        score_seed: seed of the score initialisation (slot s uses a seed derived from it and s).
    """

    def __init__(self, hidden_sizes: Sequence[int] = (300, 100), density: float = 0.5,
                 init: str = "signed_constant", scale_fan: bool = False, weight_seed: int = 0, score_seed: int = 0):
        super().__init__()
        if any(h < 1 for h in hidden_sizes):
            raise ValueError(f"hidden_sizes={list(hidden_sizes)} must be positive")
        if not 0.0 < density <= 1.0:
            raise ValueError(f"density={density} must be in (0, 1]")
        if init not in INITS:
            raise ValueError(f"init={init!r} is not one of {INITS}")
        self.hidden_sizes, self.density, self.init, self.scale_fan = list(hidden_sizes), density, init, scale_fan
        self.weight_seed, self.score_seed = weight_seed, score_seed
        self.layers = nn.ModuleList()
        self.in_features: int | None = None

    def set_io(self, in_features: int, out_features: int, num_slots: int) -> None:
        if self.in_features is not None:
            if (self.in_features, self.layers[-1].out_features, self.num_slots) != (in_features, out_features,
                                                                                     num_slots):
                raise ValueError("the masked network was already built for another benchmark")
            return
        widths = [in_features, *self.hidden_sizes, out_features]
        self.layers = nn.ModuleList(
            MaskedLinear(a, b, num_slots, self.density, self.init, self.scale_fan,
                         weight_seed=self.weight_seed * 1000 + i, score_seed=self.score_seed * 1000 + i)
            for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)))
        self.in_features = in_features

    def forward(self, x: Tensor, slots: Sequence[int], coeffs: Tensor | None = None) -> Tensor:
        x = x.flatten(1)
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x, slots, None if coeffs is None else coeffs[:, i])
            if i < last:
                x = F.relu(x)
        return x

    def forward_each(self, xs: Tensor, slots: Sequence[int]) -> Tensor:
        """``xs`` ``[M, B, ...]``: sample batch m through the mask of ``slots[m]``, all M at once."""
        x = xs.flatten(2)
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = cast(MaskedLayer, layer).forward_each(x, slots)
            if i < last:
                x = F.relu(x)
        return x


class MaskedLeNet300100(MaskedMLP):
    """LeNet-300-100 with every layer masked: the network of SupSup's and ImpressLearn's MNIST runs."""

    def __init__(self, density: float = 0.5, init: str = "signed_constant", scale_fan: bool = False,
                 weight_seed: int = 0, score_seed: int = 0):
        super().__init__((300, 100), density, init, scale_fan, weight_seed, score_seed)


def _batch_norm(x: Tensor, stacked: bool) -> Tensor:
    """Non-affine batch norm with the batch's own statistics (per mask copy when ``stacked``)."""
    dims = (1, 3, 4) if stacked else (0, 2, 3)
    mean = x.mean(dims, keepdim=True)
    var = x.var(dims, keepdim=True, unbiased=False)
    return (x - mean) * torch.rsqrt(var + 1e-5)


class MaskedResNet18(MaskedNet):
    """ResNet-18 for 32x32 images (3x3 stem, 4 stages of 2 BasicBlocks, global pooling) with every
    convolution and the output layer masked, as in SupSup's Split-CIFAR-100 runs.

    Batch norm is non-affine and uses each batch's statistics (no running statistics), so no trained
    state is shared between tasks: a test batch holds one task, as in SupSup.

    Args:
        width: channels of the first stage (64 in ResNet-18; tests use a few).
        in_channels: image channels (the input is ``[B, in_channels, H, W]``).
        density, init, scale_fan, weight_seed, score_seed: as for :class:`MaskedMLP`.
    """

    def __init__(self, width: int = 64, in_channels: int = 3, density: float = 0.5, init: str = "signed_constant",
                 scale_fan: bool = False, weight_seed: int = 0, score_seed: int = 0):
        super().__init__()
        if width < 1 or in_channels < 1:
            raise ValueError(f"width={width} and in_channels={in_channels} must be positive")
        if not 0.0 < density <= 1.0:
            raise ValueError(f"density={density} must be in (0, 1]")
        if init not in INITS:
            raise ValueError(f"init={init!r} is not one of {INITS}")
        self.width, self.in_channels, self.density, self.init, self.scale_fan = width, in_channels, density, init, \
            scale_fan
        self.weight_seed, self.score_seed = weight_seed, score_seed
        self.layers = nn.ModuleList()
        self.shortcut: list[bool] = []

    def set_io(self, in_features: int, out_features: int, num_slots: int) -> None:
        if len(self.layers):
            if (self.layers[-1].out_features, self.num_slots) != (out_features, num_slots):
                raise ValueError("the masked network was already built for another benchmark")
            return
        if in_features % self.in_channels:
            raise ValueError(f"inputs of {in_features} values do not split into in_channels={self.in_channels}")
        layers: list[MaskedLayer] = []

        def add(layer_cls, *args, **kw) -> None:
            i = len(layers)
            layers.append(layer_cls(*args, num_slots=num_slots, density=self.density, init=self.init,
                                    scale_fan=self.scale_fan, weight_seed=self.weight_seed * 1000 + i,
                                    score_seed=self.score_seed * 1000 + i, **kw))

        add(MaskedConv2d, self.in_channels, self.width, 3, padding=1)
        channels = self.width
        for stage in range(4):
            out = self.width * 2**stage
            for block in range(2):
                stride = 2 if stage > 0 and block == 0 else 1
                add(MaskedConv2d, channels, out, 3, stride=stride, padding=1)
                add(MaskedConv2d, out, out, 3, padding=1)
                needs = stride != 1 or channels != out
                if needs:
                    add(MaskedConv2d, channels, out, 1, stride=stride)
                self.shortcut.append(needs)
                channels = out
        add(MaskedLinear, channels, out_features)
        self.layers = nn.ModuleList(layers)

    def _run(self, x: Tensor, apply, stacked: bool) -> Tensor:
        x = F.relu(_batch_norm(apply(0, x), stacked))
        i = 1
        for needs in self.shortcut:
            out = F.relu(_batch_norm(apply(i, x), stacked))
            out = _batch_norm(apply(i + 1, out), stacked)
            short = _batch_norm(apply(i + 2, x), stacked) if needs else x
            i += 3 if needs else 2
            x = F.relu(out + short)
        return apply(i, x.mean((-2, -1)))

    def forward(self, x: Tensor, slots: Sequence[int], coeffs: Tensor | None = None) -> Tensor:
        def apply(i: int, h: Tensor) -> Tensor:
            return self.layers[i](h, slots, None if coeffs is None else coeffs[:, i])

        return self._run(x, apply, stacked=False)

    def forward_each(self, xs: Tensor, slots: Sequence[int]) -> Tensor:
        return self._run(xs, lambda i, h: cast(MaskedLayer, self.layers[i]).forward_each(h, slots), stacked=True)
