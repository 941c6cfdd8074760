"""HAT's mechanism (Serra et al. 2018) as a plugin: what runs at every step and between tasks.

- The gates' temperature ``s`` is the method's (its annealing within every epoch,
  ``cl_lightning.nets.hat.annealed_temperature``); the plugin reads it for the compensation.
- Penalty: the mask sparsity regulariser ``c * sum_l sum_i a_i^t (1 - a_i^<t) / sum_l sum_i (1 - a_i^<t)``
  (without earlier tasks: ``c * mean a^t``), so new tasks reuse old units and keep free ones for later.
- Before each optimizer step (gradients already reduced under DDP): the weight from unit j to unit i has its
  gradient scaled by ``1 - min(a_i^<t, a_j^<t)`` (the first layer: ``1 - a_i^<t``; a bias: ``1 - a_i^<t``); the
  embedding gradient is compensated for the annealing, times ``s_max [cosh(s e) + 1] / (s [cosh(e) + 1])`` with
  ``s e`` clamped to ``+-thres_cosh``; then the gradient norm is clipped at ``clip_grad``. Embedding rows of other
  tasks get no gradient.
- After each step: the current task's embedding clamped to ``[-thres_emb, thres_emb]``.
- At the end of a task: the cumulative mask ``a^<=t = max(a^<t, a^t at s_max)``, kept in the plugin's state.

The constants' defaults are those of the authors' code as we know it (``thres_cosh=50``, ``thres_emb=6``,
``clipgrad=10000``, ``lamb=c=0.75``); the paper text is not available here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, cast

import lightning as L
import torch
from torch import Tensor, nn

from cl_lightning.callback import ContinualCallback, TaskLoss

if TYPE_CHECKING:
    from cl_lightning.methods.base import ContinualModule


class HATHost(Protocol):
    """What the plugin needs of its method (``cl_lightning.methods.hat.HAT``)."""

    current_task: int
    s_max: float
    #: The training temperature of the current step (the method anneals it; read-only here).
    s: float
    last_gates: list[Tensor] | None

    @property
    def gated_layers(self) -> list[nn.Linear]:
        """The linear layers whose outputs the gates multiply, in order."""

    @property
    def task_embeddings(self) -> list[nn.Parameter]:
        """Per gated layer, the ``[tasks, units]`` embedding."""

    def gates(self, task: int, s: float | None = None) -> list[Tensor]:
        """Task ``task``'s gates at ``s`` (default: ``s_max``)."""


class HardAttention(ContinualCallback):
    """Args:
        c: strength of the mask sparsity regulariser (paper: 0.75).
        thres_emb: the embeddings are clamped to ``[-thres_emb, thres_emb]`` after every step.
        thres_cosh: bound on ``|s e|`` inside the compensation's ``cosh``.
        clip_grad: gradient norm clip after the masking (0: none).
        compensate: the embedding-gradient compensation (off: the ablation).
    """

    host = HATHost

    def __init__(self, c: float = 0.75, thres_emb: float = 6.0, thres_cosh: float = 50.0,
                 clip_grad: float = 10000.0, compensate: bool = True):
        super().__init__()
        if c < 0 or thres_emb <= 0 or thres_cosh <= 0 or clip_grad < 0:
            raise ValueError(f"c={c} and clip_grad={clip_grad} must not be negative, thres_emb={thres_emb} and "
                             f"thres_cosh={thres_cosh} must be positive")
        self.c, self.thres_emb, self.thres_cosh = c, thres_emb, thres_cosh
        self.clip_grad, self.compensate = clip_grad, compensate
        #: Per gated layer, ``max`` over the finished tasks of their gates at ``s_max`` (None before task 0 ends).
        self.cumulative: list[Tensor] | None = None

    # ---------------------------------------------------------------- per step
    def cumulative_on(self, device: torch.device) -> list[Tensor] | None:
        if self.cumulative is None:
            return None
        if self.cumulative[0].device != device:
            self.cumulative = [m.to(device) for m in self.cumulative]
        return self.cumulative

    def penalty(self, module: ContinualModule, batch: Any, step: TaskLoss | None = None) -> Tensor | None:
        host = cast(HATHost, module)
        gates = host.last_gates
        if not self.c or gates is None:
            return None
        previous = self.cumulative_on(gates[0].device)
        if previous is None:
            reg = sum(g.sum() for g in gates) / sum(g.numel() for g in gates)
        else:
            free = [1 - p for p in previous]
            used = sum((g * f).sum() for g, f in zip(gates, free, strict=True))
            reg = used / torch.stack([f.sum() for f in free]).sum().clamp_min(1e-12)
        return self.c * cast(Tensor, reg)

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        host = cast(HATHost, pl_module)
        task = host.current_task
        layers = host.gated_layers
        previous = self.cumulative_on(layers[0].weight.device)
        with torch.no_grad():
            if previous is not None:
                for i, layer in enumerate(layers):
                    post = previous[i]
                    keep = 1 - (post.unsqueeze(1) if i == 0 else torch.minimum(post.unsqueeze(1),
                                                                                  previous[i - 1].unsqueeze(0)))
                    if layer.weight.grad is not None:
                        layer.weight.grad.mul_(keep)
                    if layer.bias is not None and layer.bias.grad is not None:
                        layer.bias.grad.mul_(1 - post)
            for emb in host.task_embeddings:
                if emb.grad is None:
                    continue
                own = emb.grad[task].clone()
                emb.grad.zero_()
                if self.compensate:
                    e = emb[task]
                    num = torch.cosh(torch.clamp(host.s * e, -self.thres_cosh, self.thres_cosh)) + 1
                    own.mul_(host.s_max / host.s * num / (torch.cosh(e) + 1))
                emb.grad[task] = own
        if self.clip_grad:
            torch.nn.utils.clip_grad_norm_([p for p in pl_module.parameters() if p.grad is not None], self.clip_grad)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        host = cast(HATHost, pl_module)
        with torch.no_grad():
            for emb in host.task_embeddings:
                emb[host.current_task].clamp_(-self.thres_emb, self.thres_emb)

    # ---------------------------------------------------------------- between tasks
    def on_task_end(self, trainer: L.Trainer, module: ContinualModule, task_id: int) -> None:
        host = cast(HATHost, module)
        with torch.no_grad():
            now = [g.detach().clone() for g in host.gates(task_id)]
        previous = self.cumulative_on(now[0].device)
        self.cumulative = now if previous is None else [torch.maximum(p, g) for p, g in zip(previous, now,
                                                                                            strict=True)]

    def plugin_state(self) -> dict[str, Any]:
        return {"cumulative": None if self.cumulative is None else [m.cpu() for m in self.cumulative]}

    def load_plugin_state(self, state: dict[str, Any]) -> None:
        cumulative = state.get("cumulative")
        self.cumulative = None if cumulative is None else [m.clone() for m in cumulative]

    def stored_numel(self) -> int:
        return 0 if self.cumulative is None else sum(m.numel() for m in self.cumulative)
