"""A cosine learning-rate decay that restarts with every task, for any method.

Each task gets a fresh Trainer and optimizer (the runner's rule), so a schedule is per task: the rate of every
optimizer parameter group starts at its configured value and decays over the task's epochs or steps. It is a
plugin rather than a ``lr_scheduler`` from ``configure_optimizers`` so that it works for every method, those with
their own ``configure_optimizers`` (MARK, ImpressLearn, DGR) included, without each re-declaring it.

The rate is a function of the task's progress alone (``trainer.current_epoch`` / ``trainer.global_step``, which
Lightning restores on resume) and of the group's configured rate, kept as ``initial_lr`` in the group (as
PyTorch's schedulers keep it, so it travels in the optimizer's checkpointed state): a run resumed anywhere gets
the rate the uninterrupted run had, with no state of its own.
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L

from cl_lightning.callback import ContinualCallback

SHAPES = ("annealing", "quarter")
INTERVALS = ("step", "epoch")


class CosineLR(ContinualCallback):
    """Per-task cosine decay of every optimizer group's learning rate.

    Args:
        shape: ``annealing``: ``lr * (1 + cos(pi * i / n)) / 2`` (``torch.optim.lr_scheduler.CosineAnnealingLR``
            with ``eta_min=0``, ``T_max=n``); ``quarter``: ``lr * cos(0.495 * pi * i / (n - 1))``, the CODA-Prompt
            authors' ``CosineSchedule`` (from the configured rate at the first epoch to 1.6 % of it at the last).
        interval: ``epoch``: ``i`` is the epoch of the task and ``n`` ``trainer.max_epochs`` (the rate changes
            once per epoch, as in the CODA-Prompt code); ``step``: ``i`` is the optimizer step of the task and
            ``n`` ``trainer.estimated_stepping_batches``.
    """

    def __init__(self, shape: str = "annealing", interval: str = "step"):
        super().__init__()
        if shape not in SHAPES:
            raise ValueError(f"CosineLR: shape={shape!r} is not one of {list(SHAPES)}")
        if interval not in INTERVALS:
            raise ValueError(f"CosineLR: interval={interval!r} is not one of {list(INTERVALS)}")
        self.shape, self.interval = shape, interval

    def factor(self, i: int, n: int) -> float:
        """The fraction of the configured rate at position ``i`` of ``n`` (epochs or steps)."""
        if self.shape == "annealing":
            return 0.5 * (1.0 + math.cos(math.pi * min(i, n) / n))
        return math.cos(0.495 * math.pi * min(i, n - 1) / (n - 1)) if n > 1 else 1.0

    def progress(self, trainer: L.Trainer) -> tuple[int, int]:
        if self.interval == "epoch":
            if trainer.max_epochs is None or trainer.max_epochs < 1:
                raise ValueError(f"CosineLR: interval='epoch' needs trainer.max_epochs >= 1, not "
                                 f"{trainer.max_epochs} (use interval='step' for a step budget)")
            return trainer.current_epoch, trainer.max_epochs
        total = trainer.estimated_stepping_batches
        if not math.isfinite(total) or total < 1:
            raise ValueError("CosineLR: interval='step' needs a finite number of steps per task "
                             "(trainer.max_steps or trainer.max_epochs)")
        return trainer.global_step, int(total)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        factor = self.factor(*self.progress(trainer))
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                group.setdefault("initial_lr", group["lr"])
                group["lr"] = group["initial_lr"] * factor
