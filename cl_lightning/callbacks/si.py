"""Synaptic intelligence (Zenke, Poole & Ganguli, ICML 2017).

Each parameter's importance is the path integral of the gradient along its training trajectory: at
every optimizer step ``w_i += -g_i * (theta_i(after) - theta_i(before))``, the part of the loss' decrease
that parameter ``i`` is credited with. At the end of a task ``Omega_i += w_i / ((Delta_i)^2 + xi)``, with
``Delta_i`` the parameter's total change over the task and ``xi`` a damping that keeps the ratio finite;
every later step adds ``c * sum_i Omega_i (theta_i - theta*_i)^2`` to the loss, ``theta*`` the parameters
at the end of the last task.

``g`` is the gradient the optimizer steps on (the task loss plus every penalty, as in van de Ven &
Tolias' implementation whose numbers the HNET paper's Table 1 reports), read in ``on_before_optimizer_step``.

The parameter values before a step are held as copies (``clone``): a view (``p.data``, ``p.detach()``)
shares storage with the parameter, which the optimizer updates in place, so the difference would be
zero, the importance zero and SI plain fine-tuning. ``tests/test_si.py`` fails on exactly that.

Under DDP the gradients read here are already all-reduced and the parameters are identical on every
rank, so the path integral, and with it the importance, is the same on every rank without communication.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import lightning as L
import torch
from torch import Tensor, nn

from cl_lightning.callback import ContinualCallback, TaskLoss

if TYPE_CHECKING:
    from cl_lightning.methods.base import ContinualModule


class SI(ContinualCallback):
    """Args:
        strength: ``c``, the weight of the quadratic penalty.
        damping: ``xi``, added to the squared total change of each parameter over a task.
    """

    def __init__(self, strength: float = 1.0, damping: float = 0.1):
        super().__init__()
        if strength < 0:
            raise ValueError(f"strength={strength} must not be negative")
        if not damping > 0:
            raise ValueError(f"damping={damping} must be positive")
        self.strength, self.damping = strength, damping
        #: Importance ``Omega`` summed over finished tasks, and the anchor ``theta*``.
        self.importance: dict[str, Tensor] = {}
        self.anchor: dict[str, Tensor] = {}
        #: This task: parameters at its start and the running path integral ``w``.
        self.start: dict[str, Tensor] = {}
        self.path: dict[str, Tensor] = {}
        #: Within one step: the gradient and the parameters before the optimizer's update.
        self._grad: dict[str, Tensor] = {}
        self._before: dict[str, Tensor] = {}

    @staticmethod
    def snapshot(p: Tensor) -> Tensor:
        """The value of ``p`` now, in storage the optimizer's in-place update does not touch."""
        return p.detach().clone()

    @staticmethod
    def _tracked(module: nn.Module) -> list[tuple[str, Tensor]]:
        return [(n, p) for n, p in module.named_parameters() if p.requires_grad]

    # ------------------------------------------------------------------ the path integral
    def on_task_start(self, trainer: L.Trainer, module: ContinualModule, task_id: int) -> None:
        self.start = {n: self.snapshot(p) for n, p in self._tracked(module)}
        self.path = {n: torch.zeros_like(p) for n, p in self.start.items()}

    def on_before_optimizer_step(self, trainer: L.Trainer, module: L.LightningModule, optimizer: Any) -> None:
        self._grad, self._before = {}, {}
        for n, p in self._tracked(module):
            if n in self.path and p.grad is not None:
                self._grad[n] = self.snapshot(p.grad)
                self._before[n] = self.snapshot(p)

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *args: Any) -> None:
        if not self._grad:  # no optimizer step in this batch (e.g. gradient accumulation)
            return
        params = dict(module.named_parameters())
        for n, g in self._grad.items():
            self.path[n] = self.path[n].to(g.device)
            self.path[n] -= g * (params[n].detach() - self._before[n])
        self._grad, self._before = {}, {}

    def on_task_end(self, trainer: L.Trainer, module: ContinualModule, task_id: int) -> None:
        for n, p in self._tracked(module):
            if n not in self.path:
                continue
            now = self.snapshot(p)
            delta = now - self.start[n].to(now.device)
            omega = self.path[n].to(now.device) / (delta.pow(2) + self.damping)
            self.importance[n] = self.importance[n].to(now.device) + omega if n in self.importance else omega
            self.anchor[n] = now
        self.start, self.path = {}, {}

    # ------------------------------------------------------------------ penalty
    def penalty(self, module: ContinualModule, batch: Any, step: TaskLoss | None = None) -> Tensor | None:
        if not self.importance or self.strength == 0:
            return None
        terms = []
        for n, p in module.named_parameters():
            if n in self.importance:
                if self.importance[n].device != p.device:
                    self.importance[n], self.anchor[n] = self.importance[n].to(p.device), self.anchor[n].to(p.device)
                terms.append((self.importance[n] * (p - self.anchor[n]).pow(2)).sum())
        return self.strength * torch.stack(terms).sum()

    # ------------------------------------------------------------------ state
    def plugin_state(self) -> dict[str, Any]:
        def cpu(d: dict[str, Tensor]) -> dict[str, Tensor]:
            return {n: v.cpu() for n, v in d.items()}
        return {"importance": cpu(self.importance), "anchor": cpu(self.anchor), "start": cpu(self.start),
                "path": cpu(self.path)}

    def load_plugin_state(self, state: dict[str, Any]) -> None:
        self.importance = dict(state.get("importance", {}))
        self.anchor = dict(state.get("anchor", {}))
        self.start = dict(state.get("start", {}))
        self.path = dict(state.get("path", {}))
        self._grad, self._before = {}, {}

    def stored_numel(self) -> int:
        """Between tasks SI keeps the importance and the anchor (``start``/``path`` live within a task)."""
        return sum(v.numel() for v in self.importance.values()) + sum(v.numel() for v in self.anchor.values())
