"""Full precision for boundary statistics under mixed-precision training.

Under ``trainer.precision=bf16-mixed`` / ``16-mixed`` Lightning runs the forward passes inside ``torch.autocast``,
so matrix products come out in bf16/fp16. Statistics that are accumulated over a task and kept for the next ones
(EWC's Fisher, SI's importance, GEM's QP, a hypernetwork's regularizer targets, entropies for task inference)
lose their small terms in 8 (bf16) or 10 (fp16) mantissa bits, and squared fp16 gradients underflow. Code that
computes them wraps the computation in :func:`full_precision` and casts its results with :func:`fp32`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import TypeVar

import lightning as L
import torch
from torch import Tensor

T = TypeVar("T", Tensor, dict)


@contextlib.contextmanager
def full_precision(device: torch.device | str | None = None) -> Iterator[None]:
    """Autocast off (on every device type in use) for the block: its products run in the tensors' own dtype,
    fp32 for the parameters Lightning's mixed precision keeps in fp32."""
    kinds = {"cpu", "cuda"}
    if device is not None:
        kinds.add(torch.device(device).type)
    with contextlib.ExitStack() as stack:
        for kind in sorted(kinds):
            if kind == "cuda" and not torch.cuda.is_available():
                continue
            stack.enter_context(torch.autocast(device_type=kind, enabled=False))
        yield


def fp32(value: T) -> T:
    """A tensor (or a mapping of name to tensor) as fp32; integer and fp64 tensors are left as they are."""
    if isinstance(value, Mapping):
        return {k: fp32(v) for k, v in value.items()}
    if value.is_floating_point() and value.dtype in (torch.float16, torch.bfloat16):
        return value.float()
    return value


class UnscaledGradients(L.Callback):
    """Makes every optimizer's gradients unscaled in ``on_before_optimizer_step`` under ``16-mixed``.

    Lightning's ``MixedPrecision.optimizer_step`` unscales the GradScaler's gradients after the closure and
    before ``on_before_optimizer_step``, except for optimizers that unscale inside ``step()`` (torch's fused
    Adam/AdamW/SGD set ``_step_supports_amp_scaling``; ``make_optimizer`` picks those kernels). Plugins that read
    or edit ``.grad`` in that hook (GEM/A-GEM's projection, gradient sign, SI's path integral) would then see
    gradients multiplied by the loss scale. Clearing the flag on the instance makes Lightning unscale first; the
    scaler's ``step`` then checks for infs and calls the (same, fused) update on unscaled gradients.
    The runner adds it to every task's Trainer; it acts at fit start, when the optimizers exist."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if "16" not in str(trainer.precision) or "bf16" in str(trainer.precision):
            return
        for opt in trainer.optimizers:
            if getattr(opt, "_step_supports_amp_scaling", False):
                opt._step_supports_amp_scaling = False  # type: ignore[attr-defined]
