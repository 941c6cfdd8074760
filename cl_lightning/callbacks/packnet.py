"""PackNet's mechanism (Mallya & Lazebnik 2018) as a plugin: claim, prune, retrain, freeze.

- Task start: task t claims every free weight (owner ``FREE`` -> t); task 0 owns all weights from the start.
- Before each optimizer step (gradients already reduced under DDP): only weights owned by t keep their gradient,
  and only task t's rows of the (task-IL) head; so earlier tasks' weights and heads are never updated.
- At step ``(1 - retrain_fraction) * steps`` of the task (``steps``: the task's optimizer steps; or at the end
  of the task when ``retrain_fraction=0``): per layer, the fraction ``prune_fraction`` of t's weights with the
  smallest magnitude is freed (owner ``FREE``) and set to zero; ``equal`` prunes ``1 - 1/(T - t)`` so that every
  task ends with the same share. Ties in magnitude are broken by position, so the count is exact.
- After every step of the retraining: freed weights set to zero again (the optimizer's momentum would move them).

The owners live in the method (buffers, so in every checkpoint); the plugin keeps which task was pruned.
Magnitudes are identical on every DDP rank, so every rank frees the same weights.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Protocol, cast

import lightning as L
import torch
from torch import Tensor, nn

from cl_lightning.callback import ContinualCallback

if TYPE_CHECKING:
    from cl_lightning.methods.base import ContinualModule

#: The owner of a weight no task keeps (pruned, zero): above every task id.
FREE = torch.iinfo(torch.int16).max


class PackNetHost(Protocol):
    """What the plugin needs of its method (``cl_lightning.methods.packnet.PackNet``)."""

    current_task: int
    head: nn.Linear | None

    def prunable(self) -> Iterator[tuple[str, nn.Parameter, Tensor]]:
        """Each prunable weight tensor: its name, the parameter and its int32 owners."""


def prune_smallest(weight: Tensor, owners: Tensor, task: int, fraction: float) -> int:
    """Frees the ``round(fraction * n)`` of ``task``'s ``n`` weights with the smallest magnitude (ties by
    position) and zeroes them; returns how many."""
    mine = (owners == task).flatten().nonzero().flatten()
    k = round(fraction * len(mine))
    if k == 0:
        return 0
    order = torch.sort(weight.detach().flatten()[mine].abs(), stable=True).indices
    drop = mine[order[:k]]
    owners.view(-1)[drop] = FREE
    weight.data.view(-1)[drop] = 0.0
    return k


class PackNetPruning(ContinualCallback):
    """Args:
        prune_fraction: the share of a task's weights freed per layer after its training, in [0, 1)
            (paper: 0.5 for a few tasks), or ``equal``: ``1 - 1/(T - t)``, every task keeping 1/T of each layer.
        retrain_fraction: the share of the task's optimizer steps spent retraining after the pruning, in [0, 1)
            (0: prune at the end of the task, no retraining).
    """

    host = PackNetHost
    #: The owner of a weight no task keeps (``FREE``), for the method's owners buffers.
    FREE: int = FREE

    def __init__(self, prune_fraction: float | str = 0.5, retrain_fraction: float = 0.5):
        super().__init__()
        if isinstance(prune_fraction, str):
            if prune_fraction != "equal":
                raise ValueError(f"prune_fraction={prune_fraction!r} must be a number in [0, 1) or 'equal'")
        elif not 0.0 <= prune_fraction < 1.0:
            raise ValueError(f"prune_fraction={prune_fraction} must be in [0, 1) (or 'equal')")
        if not 0.0 <= retrain_fraction < 1.0:
            raise ValueError(f"retrain_fraction={retrain_fraction} must be in [0, 1)")
        self.prune_fraction, self.retrain_fraction = prune_fraction, retrain_fraction
        #: The last task whose weights were pruned (its retraining holds the freed weights at zero).
        self.pruned_task = -1
        #: Per task: weights freed by its pruning.
        self.freed: dict[int, int] = {}

    def fraction_for(self, task: int, num_tasks: int) -> float:
        if self.prune_fraction == "equal":
            return 1.0 - 1.0 / (num_tasks - task)
        return float(self.prune_fraction)

    # ---------------------------------------------------------------- between tasks
    def on_task_start(self, trainer: L.Trainer, module: ContinualModule, task_id: int) -> None:
        with torch.no_grad():
            for _, _, owners in cast(PackNetHost, module).prunable():
                owners[owners == FREE] = task_id

    def on_task_end(self, trainer: L.Trainer, module: ContinualModule, task_id: int) -> None:
        if self.pruned_task != task_id:
            self.prune(module, task_id)

    def prune(self, module: ContinualModule, task: int) -> None:
        assert module.info is not None
        fraction = self.fraction_for(task, module.info.num_tasks)
        with torch.no_grad():
            self.freed[task] = sum(prune_smallest(p, owners, task, fraction)
                                   for _, p, owners in cast(PackNetHost, module).prunable())
        self.pruned_task = task

    # ---------------------------------------------------------------- per step
    def prune_step(self, trainer: L.Trainer) -> int:
        return round((1.0 - self.retrain_fraction) * int(trainer.estimated_stepping_batches))

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        module = cast("ContinualModule", pl_module)
        task = module.current_task
        if self.retrain_fraction and self.pruned_task != task and trainer.global_step >= self.prune_step(trainer):
            self.prune(module, task)

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        host = cast(PackNetHost, pl_module)
        task = host.current_task
        with torch.no_grad():
            for _, p, owners in host.prunable():
                if p.grad is not None:
                    p.grad.mul_((owners == task).to(p.grad.dtype))
            head, info = host.head, cast("ContinualModule", pl_module).info
            if head is not None and info is not None and info.multi_head:
                k = info.outputs_per_task
                rows = torch.zeros(head.out_features, dtype=torch.bool, device=head.weight.device)
                rows[task * k:(task + 1) * k] = True
                for q in (head.weight, head.bias):
                    if q is not None and q.grad is not None:
                        q.grad[~rows] = 0.0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        host = cast(PackNetHost, pl_module)
        if self.pruned_task != host.current_task:
            return
        with torch.no_grad():
            for _, p, owners in host.prunable():
                p.masked_fill_(owners == FREE, 0.0)

    def plugin_state(self) -> dict[str, Any]:
        return {"pruned_task": self.pruned_task, "freed": dict(self.freed)}

    def load_plugin_state(self, state: dict[str, Any]) -> None:
        self.pruned_task = int(state.get("pruned_task", -1))
        self.freed = {int(k): int(v) for k, v in state.get("freed", {}).items()}
