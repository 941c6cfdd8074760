"""ER-ACE (Caccia et al. 2022, "New insights on reducing abrupt representation change in online continual
learning"): experience replay whose loss on the incoming batch is asymmetric.

From the second task on, the cross-entropy of the incoming batch only competes among the classes present
in that batch: the logits of classes seen before but absent from it are masked out, so new data does not
push the old classes' logits down; the replayed batch (``cl_lightning.callbacks.ExperienceReplay``) keeps the full
softmax. Under DDP the classes present are those of the global batch (gathered), as in one process.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor

from cl_lightning.callback import TaskLoss
from cl_lightning.methods.base import ContinualModule
from cl_lightning.tasks import BenchmarkInfo, Scenario


class ERACE(ContinualModule):
    """Class-IL only (the asymmetry is between classes of different tasks in one head); takes the same
    arguments as ``ContinualModule`` and expects an ``ExperienceReplay`` plugin."""

    supported_scenarios = frozenset({Scenario.CLASS_IL})
    seen_classes: Tensor  # a buffer (build): the classes of the tasks trained so far

    def build(self, info: BenchmarkInfo) -> None:
        super().build(info)
        self.register_buffer("seen_classes", torch.zeros(info.head_width, dtype=torch.bool))

    def task_loss(self, batch: tuple[Tensor, Tensor, Tensor]) -> TaskLoss:
        x, y, t = batch
        out = self(x, t)
        trainer = self.attached_trainer()
        distributed = trainer is not None and trainer.world_size > 1
        labels = cast(Tensor, self.all_gather(y)).reshape(-1) if distributed else y  # a tensor's: a tensor
        present = torch.zeros_like(self.seen_classes)
        present[labels] = True
        if self.current_task > 0:
            out_masked = out.masked_fill((self.seen_classes & ~present).unsqueeze(0), torch.finfo(out.dtype).min)
        else:
            out_masked = out
        self.seen_classes |= present
        return TaskLoss(F.cross_entropy(out_masked, y), out, y)
