"""Pretrained backbones: a torchvision or timm model by name, without its classifier, fed the benchmark's images.

A pretrained model expects its own input: the resolution it was trained at and its own normalisation (ImageNet's
mean/std for torchvision, often 0.5/0.5 for timm's ViTs), while a benchmark hands over e.g. 32x32 CIFAR images
normalised with CIFAR's statistics. :class:`InputAdapter` bridges the two: the method tells it the benchmark's
normalisation (``BenchmarkInfo.normalization``, through ``set_input_normalization``, called by ``fit_body``), it
undoes it, applies the weights' own and resizes to the weights' input size. ``PromptedViT`` takes the same adapter.

Weights come from the hub (torchvision's weights enum, timm's pretrained tags) or a local state-dict file, and are
loaded lazily (``load_pretrained``, called when a fit or test starts), so configs build without network. Frozen
weights from a source are left out of checkpoints (a ViT-B/16 is 330 MB) and loaded again on resume.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SOURCES = ("torchvision", "timm")
#: Attributes that hold a torchvision model's classifier; its last ``nn.Linear`` is replaced by ``nn.Identity``.
TORCHVISION_CLASSIFIERS = ("fc", "heads", "head", "classifier")
#: What ``InputAdapter`` assumes when the benchmark states no normalisation: pixels in [0, 1].
UNIT_RANGE: tuple[tuple[float, ...], tuple[float, ...]] = ((0.0,), (1.0,))


def import_timm() -> Any:
    try:
        import timm
    except ImportError as e:
        raise ImportError("source='timm' needs timm: pip install cl-lightning[timm]") from e
    return timm


def _stats(values: Sequence[float] | None, name: str) -> Tensor | None:
    if values is None:
        return None
    t = torch.tensor([float(v) for v in values]).view(1, -1, 1, 1)
    if t.numel() == 0 or (name.endswith("std") and (t <= 0).any()):
        raise ValueError(f"{name}={list(values)} must be non-empty (and positive for a std)")
    return t


class InputAdapter(nn.Module):
    """Benchmark images to a pretrained model's input: undo the benchmark's normalisation, apply the weights'
    (``mean``, ``std``), replicate a grey channel to the weights' channels, resize to ``size``.

    Per-channel affine maps commute with bilinear/bicubic resizing (their weights sum to one), so the
    renormalisation is one multiply-add before the resize. ``mean``/``std``/``size`` left ``None`` are filled by
    the owning backbone from its weights (:meth:`set_target`); the benchmark's side comes from
    :meth:`set_input_normalization` and defaults to pixels in [0, 1].

    Args:
        size: the model's input (H, W) or side; ``None``: the owner's weights' size.
        mean, std: the weights' per-channel normalisation; ``None``: the owner's weights'.
        mode: ``F.interpolate`` mode (``bilinear``, ``bicubic``, ``nearest``).
    """

    def __init__(self, size: int | Sequence[int] | None = None, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, mode: str = "bilinear"):
        super().__init__()
        if mode not in ("bilinear", "bicubic", "nearest", "area"):
            raise ValueError(f"mode={mode!r} is not one of bilinear, bicubic, nearest, area")
        self.mode = mode
        self.size: tuple[int, int] | None = None
        self.set_target(size=size)
        self.target_mean, self.target_std = _stats(mean, "mean"), _stats(std, "std")
        self.input_shape: tuple[int, ...] | None = None
        self.set_input_normalization(None)

    def set_target(self, size: int | Sequence[int] | None = None, mean: Sequence[float] | None = None,
                   std: Sequence[float] | None = None) -> None:
        """The weights' input size and normalisation, where the config left them unset."""
        if size is not None and self.size is None:
            pair = (int(size), int(size)) if isinstance(size, int) else tuple(int(s) for s in size)
            if len(pair) != 2 or min(pair) < 1:
                raise ValueError(f"size={size}: give one side or (height, width), positive")
            self.size = (pair[0], pair[1])
        if mean is not None and getattr(self, "target_mean", None) is None:
            self.target_mean = _stats(mean, "mean")
        if std is not None and getattr(self, "target_std", None) is None:
            self.target_std = _stats(std, "std")

    def set_input_normalization(self, normalization: tuple[Sequence[float], Sequence[float]] | None,
                                input_shape: Sequence[int] | None = None) -> None:
        """The benchmark's ``(mean, std)`` (``x = (pixel - mean) / std``; ``None``: pixels in [0, 1]) and image
        shape (C, H, W), for flat inputs."""
        mean, std = normalization if normalization is not None else UNIT_RANGE
        self.source_mean, self.source_std = _stats(mean, "input mean"), _stats(std, "input std")
        if input_shape is not None:
            self.input_shape = tuple(int(s) for s in input_shape)

    def affine(self, channels: int) -> tuple[Tensor, Tensor]:
        """``(scale, shift)`` with ``adapted = x * scale + shift`` per channel, for ``channels`` channels."""
        assert self.source_mean is not None and self.source_std is not None
        t_mean = self.target_mean if self.target_mean is not None else torch.zeros(1, 1, 1, 1)
        t_std = self.target_std if self.target_std is not None else torch.ones(1, 1, 1, 1)
        for name, t in (("input mean", self.source_mean), ("input std", self.source_std), ("mean", t_mean),
                        ("std", t_std)):
            if t.shape[1] not in (1, channels):
                raise ValueError(f"{name} has {t.shape[1]} channels, the model's input {channels}")
        scale = self.source_std / t_std
        shift = (self.source_mean - t_mean) / t_std
        return scale.expand(1, channels, 1, 1), shift.expand(1, channels, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 2:  # flat images: back to (C, H, W)
            if self.input_shape is None or math.prod(self.input_shape) != x.shape[1]:
                raise ValueError(f"flat inputs of {x.shape[1]} values and input shape {self.input_shape}")
            x = x.view(len(x), *self.input_shape)
        target_channels = max(t.shape[1] for t in (self.target_mean, self.target_std) if t is not None) \
            if self.target_mean is not None or self.target_std is not None else x.shape[1]
        if x.shape[1] == 1 and target_channels > 1:
            x = x.expand(-1, target_channels, -1, -1)
        scale, shift = self.affine(x.shape[1])
        x = x * scale.to(x) + shift.to(x)
        if self.size is not None and tuple(x.shape[-2:]) != self.size:
            align = False if self.mode in ("bilinear", "bicubic") else None
            x = F.interpolate(x, size=self.size, mode=self.mode, align_corners=align)
        return x

    def extra_repr(self) -> str:
        return f"size={self.size}, mode={self.mode!r}"


def _replace_last_linear(model: nn.Module, attributes: Sequence[str]) -> tuple[str, int]:
    """Replaces the last ``nn.Linear`` under the first of ``attributes`` that ``model`` has by ``nn.Identity``;
    returns its qualified name and input width."""
    for attr in attributes:
        root = getattr(model, attr, None)
        if not isinstance(root, nn.Module):
            continue
        linears = [(n, m) for n, m in root.named_modules() if isinstance(m, nn.Linear)]
        if not linears:
            continue
        name, linear = linears[-1]
        qualified = f"{attr}.{name}" if name else attr
        parent_name, _, child = qualified.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, nn.Identity())
        return qualified, int(linear.in_features)
    raise ValueError(f"{type(model).__name__} has no linear classifier under {list(attributes)}")


class PretrainedBackbone(nn.Module):
    """A torchvision or timm model by name, its classifier removed (``out_features`` = the feature width).

    Args:
        name: the model, e.g. ``resnet18``, ``resnet50``, ``vit_b_16`` (torchvision) or ``vit_base_patch16_224``,
            ``resnet50`` (timm).
        source: ``torchvision`` or ``timm`` (``pip install cl-lightning[timm]``).
        weights: ``None`` (random initialisation), ``hub`` (torchvision's ``DEFAULT`` weights / timm's default
            pretrained tag, downloaded when training starts) or the path of a state-dict file (with or without
            the classifier's keys), loaded with ``weights_only``.
        freeze: no parameter trains, batch norm stays in eval mode, the forward runs without gradients.
        image_size: resize the benchmark's images to this side instead of the weights' input size (a ResNet
            takes any size; a ViT only the size it was built for, see ``model_kwargs``).
        mean, std: the weights' normalisation, if not the one torchvision / timm state for ``name``.
        resize_mode: interpolation of the resize (``bilinear``, ``bicubic``, ...).
        model_kwargs: passed to the model's constructor (timm: ``img_size``, ``depth``, ... for a tiny ViT).
    """

    def __init__(self, name: str = "resnet18", source: str = "torchvision", weights: str | None = None,
                 freeze: bool = False, image_size: int | None = None, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, resize_mode: str = "bilinear",
                 model_kwargs: dict[str, Any] | None = None):
        super().__init__()
        if source not in SOURCES:
            raise ValueError(f"source={source!r} is not one of {list(SOURCES)}")
        if image_size is not None and image_size < 1:
            raise ValueError(f"image_size={image_size} must be positive")
        self.name, self.source, self.weights, self.freeze = name, source, weights, bool(freeze)
        self.model_kwargs = dict(model_kwargs or {})
        build = self._build_torchvision if source == "torchvision" else self._build_timm
        self.model, self.classifier, self.out_features, size, w_mean, w_std = build()
        if image_size is not None:
            if self.fixed_size is not None and (image_size, image_size) != self.fixed_size:
                raise ValueError(f"image_size={image_size}: {name} takes {self.fixed_size[0]}px inputs only "
                                 f"(build it for another size with model_kwargs)")
            size = image_size
        self.adapter = InputAdapter(size, mean if mean is not None else w_mean, std if std is not None else w_std,
                                    mode=resize_mode)
        if self.freeze:
            for p in self.model.parameters():
                p.requires_grad_(False)
            self.model.eval()
        self.weights_loaded = weights is None
        if weights is not None and self.freeze:  # frozen weights come from their source, not from checkpoints
            self._register_state_dict_hook(_drop_model_weights)
            self.register_load_state_dict_post_hook(_allow_missing_model_weights)
        self.register_load_state_dict_pre_hook(_weights_restored)

    # ------------------------------------------------------------------ building
    fixed_size: tuple[int, int] | None = None

    def _build_torchvision(self) -> tuple[nn.Module, str, int, int, Sequence[float], Sequence[float]]:
        from torchvision import models

        try:
            model = models.get_model(self.name, weights=None, **self.model_kwargs)
        except ValueError as e:
            raise ValueError(f"name={self.name!r} is not a torchvision model: {e}") from e
        classifier, width = _replace_last_linear(model, TORCHVISION_CLASSIFIERS)
        transforms = self._torchvision_weights().transforms()
        size = int(transforms.crop_size[0])
        image_size = getattr(model, "image_size", None)  # ViTs: built for one size
        if image_size is not None:
            self.fixed_size = (int(image_size), int(image_size))
            size = int(image_size)
        return model, classifier, width, size, list(transforms.mean), list(transforms.std)

    def _torchvision_weights(self) -> Any:
        from torchvision import models

        try:
            return models.get_model_weights(self.name).DEFAULT
        except (ValueError, KeyError, AttributeError) as e:
            raise ValueError(f"torchvision has no pretrained weights for name={self.name!r}: {e}") from e

    def _build_timm(self) -> tuple[nn.Module, str, int, int, Sequence[float], Sequence[float]]:
        timm = import_timm()
        try:
            model = timm.create_model(self.name, pretrained=False, num_classes=0, **self.model_kwargs)
        except RuntimeError as e:  # timm: "Unknown model (...)"
            raise ValueError(f"name={self.name!r}: {e}") from e
        cfg = model.pretrained_cfg
        size = int(cfg["input_size"][-1])
        img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
        if img_size is not None:  # ViTs: built for one size
            self.fixed_size = (int(img_size[0]), int(img_size[1]))
            size = self.fixed_size[0]
        width = getattr(model, "head_hidden_size", None) or model.num_features
        return model, str(cfg.get("classifier", "head")), int(width), size, list(cfg["mean"]), list(cfg["std"])

    # ------------------------------------------------------------------ weights
    def load_pretrained(self) -> None:
        """Copies the weights from the hub or the file into the model, once (not after a checkpoint restored
        them)."""
        if self.weights_loaded:
            return
        assert self.weights is not None
        state: Any
        if self.weights == "hub":
            try:
                state = self._hub_state_dict()
            except Exception as e:  # no network, no weights for the name, ...
                raise RuntimeError(f"backbone {self.name!r} ({self.source}): could not load the hub weights "
                                   f"(weights: hub): {e}") from e
            where = f"the {self.source} hub"
        else:
            path = Path(self.weights).expanduser()
            if not path.is_file():
                raise RuntimeError(f"backbone {self.name!r}: weights={self.weights!r} is not a file")
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:
                raise RuntimeError(f"backbone {self.name!r}: weights={self.weights!r} is not a readable state dict "
                                   f"(torch.load, weights_only): {e}") from e
            for wrapper in ("state_dict", "model"):  # a training checkpoint around the weights
                if isinstance(state, dict) and isinstance(state.get(wrapper), dict) and len(state) <= 3:
                    state = state[wrapper]
            if not isinstance(state, dict):
                raise RuntimeError(f"backbone {self.name!r}: weights={self.weights!r} holds a "
                                   f"{type(state).__name__}, not a state dict")
            where = f"weights={self.weights!r}"
        self.load_weights(state, where)
        self.weights_loaded = True

    def _hub_state_dict(self) -> dict[str, Tensor]:
        if self.source == "torchvision":
            return dict(self._torchvision_weights().get_state_dict(progress=True))
        timm = import_timm()
        return dict(timm.create_model(self.name, pretrained=True, num_classes=0, **self.model_kwargs).state_dict())

    def load_weights(self, state: dict[str, Tensor], where: str) -> None:
        """``state`` into the model (the classifier's keys dropped); missing or unexpected keys are named."""
        expected = set(self.model.state_dict())
        prefix = self.classifier + "."
        state = {k: v for k, v in state.items() if k in expected or not (k.startswith(prefix) or k == self.classifier)}
        missing = sorted(expected - set(state))
        unexpected = sorted(set(state) - expected)
        if missing or unexpected:
            def listed(keys: list[str]) -> str:
                return ", ".join(keys[:8]) + (f" (+{len(keys) - 8} more)" if len(keys) > 8 else "")
            raise ValueError(f"backbone {self.name!r}: the weights from {where} do not fit the model: "
                             f"missing keys [{listed(missing)}], unexpected keys [{listed(unexpected)}]")
        try:
            self.model.load_state_dict(state)
        except RuntimeError as e:  # shapes
            raise ValueError(f"backbone {self.name!r}: the weights from {where} do not fit the model: {e}") from e

    # ------------------------------------------------------------------ running
    def set_input_normalization(self, normalization: tuple[Sequence[float], Sequence[float]] | None,
                                input_shape: Sequence[int] | None = None) -> None:
        """The benchmark's normalisation and image shape (from ``fit_body``), for the input adapter."""
        self.adapter.set_input_normalization(normalization, input_shape)

    def train(self, mode: bool = True) -> PretrainedBackbone:
        super().train(mode)
        if self.freeze:
            self.model.eval()  # frozen: batch-norm statistics and dropout as at inference
        return self

    def forward(self, x: Tensor) -> Tensor:
        x = self.adapter(x)
        if self.freeze:
            with torch.no_grad():
                return self.model(x)
        return self.model(x)


def _drop_model_weights(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    for key in [k for k in state_dict if k.startswith(prefix + "model.")]:
        del state_dict[key]


def _allow_missing_model_weights(module: nn.Module, incompatible: Any) -> None:
    incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if ".model." not in f".{k}"]


def _weights_restored(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """A checkpoint that holds the model's weights (a trained, unfrozen backbone) replaces the pretrained ones:
    they are not loaded again over it."""
    if any(k.startswith(prefix + "model.") for k in state_dict):
        module.weights_loaded = True  # type: ignore[assignment]
