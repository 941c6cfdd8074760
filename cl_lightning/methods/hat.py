"""HAT, Hard Attention to the Task (Serra et al., ICML 2018).

A gated MLP (``cl_lightning.nets.hat.HATMLP``) with a task embedding per layer; task t's unit mask is
``sigmoid(s * e_t)``. Training anneals ``s`` within every epoch from ``1/s_max`` to ``s_max``; at test ``s = s_max``
gives (almost) binary masks. What protects old tasks is the plugin ``HardAttention``
(``cl_lightning/callbacks/hat.py``): the gradient of a weight between units i and j is scaled by
``1 - min(a_i^<t, a_j^<t)`` with the cumulative mask of the earlier tasks, plus the mask sparsity regulariser,
the embedding-gradient compensation and the embedding clamp. Task-IL: one head slice per task.

Implemented from our knowledge of the paper and its public code (the paper text is not in
``/work/shared/papers``). Weight decay is refused: it would move the weights the masks protect; for the same
reason SGD (the paper's optimizer) is the default: Adam rescales the tiny gradients that partial masks leave.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from cl_lightning.callback import ContinualCallback
from cl_lightning.callbacks.hat import HardAttention
from cl_lightning.methods.base import ContinualModule, fit_body, per_task_outputs
from cl_lightning.nets.hat import HATMLP, annealed_temperature
from cl_lightning.tasks import BenchmarkInfo, Scenario


class HAT(ContinualModule):
    """Task-conditioned unit masks learned through the task embeddings; old units' weights are held by the
    ``HardAttention`` plugin (added with its defaults when the config has none).

    Args:
        backbone: a ``HATMLP`` (default: two gated layers of 400 units).
        s_max: the gates' temperature at test and at the end of every epoch's annealing (paper: 400).
        lr, optimizer, momentum: the per-task optimizer (paper: SGD, lr 0.05).
        weight_decay: must be 0 (decay would move protected weights).
        plugins: continual-learning callbacks; ``HardAttention`` holds the mechanism.
    """

    supported_scenarios = frozenset({Scenario.TASK_IL})
    required_plugins = (HardAttention,)
    backbone: HATMLP  # checked in __init__

    def __init__(self, backbone: HATMLP | None = None, s_max: float = 400.0, lr: float = 0.05,
                 optimizer: str = "sgd", momentum: float = 0.0, weight_decay: float = 0.0,
                 plugins: Sequence[ContinualCallback] | None = None):
        super().__init__(backbone=backbone if backbone is not None else HATMLP(), lr=lr, optimizer=optimizer,
                         momentum=momentum, weight_decay=weight_decay, plugins=plugins)
        if not isinstance(self.backbone, HATMLP):
            raise ValueError(f"backbone={type(self.backbone).__name__} must be a HATMLP (cl_lightning.nets.hat.HATMLP)")
        if not s_max >= 1.0:
            raise ValueError(f"s_max={s_max} must be at least 1 (the annealing runs from 1/s_max to s_max)")
        if weight_decay != 0:
            raise ValueError(f"weight_decay={weight_decay}: HAT needs 0 (decay would move the weights its masks "
                             "protect)")
        self.s_max = float(s_max)
        #: The training temperature of the current step (annealed in ``on_train_batch_start``).
        self.s = self.s_max
        #: The gates of the last training forward pass, for the sparsity regulariser.
        self.last_gates: list[Tensor] | None = None

    def build(self, info: BenchmarkInfo) -> None:
        self.head = nn.Linear(fit_body(self.backbone, info), info.head_width)
        self.backbone.set_tasks(info.num_tasks)

    # ------------------------------------------------------------------ what the plugin uses
    @property
    def gated_layers(self) -> list[nn.Linear]:
        """The linear layers whose outputs the gates multiply, in order (layer i's inputs: gate i-1's units)."""
        return list(self.backbone.layers)  # type: ignore[arg-type]  # a ModuleList of nn.Linear

    @property
    def task_embeddings(self) -> list[nn.Parameter]:
        """Per layer, the ``[tasks, units]`` embedding parameter."""
        return list(self.backbone.embeddings)

    def gates(self, task: int, s: float | None = None) -> list[Tensor]:
        """Task ``task``'s gates at ``s`` (default: ``s_max``)."""
        return self.backbone.gates(task, self.s_max if s is None else s)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """The gates' temperature for this batch of the epoch: ``1/s_max`` at the first, ``s_max`` at the last."""
        batches = self.trainer.num_training_batches
        self.s = annealed_temperature(batch_idx, int(batches) if math.isfinite(batches) else 1, self.s_max)

    # ------------------------------------------------------------------ forward
    def task_features(self, x: Tensor, task: int) -> Tensor:
        training = self.training and torch.is_grad_enabled()
        gates = self.gates(task, self.s if training else self.s_max)
        if training:
            self.last_gates = gates
        return self.backbone(x, gates)

    def forward(self, x: Tensor, task_ids: Tensor) -> Tensor:
        assert self.head is not None, "setup_tasks builds the head"
        feats = per_task_outputs(x, task_ids, lambda t, rows: self.task_features(rows, t))
        return self.select_head(self.head(feats), task_ids)

    def storage_details(self) -> dict[str, int | float]:
        """Units each task uses at ``s_max`` (gate above 0.5), summed over layers."""
        assert self.info is not None
        with torch.no_grad():
            return {f"units_task_{t}": int(sum((g > 0.5).sum() for g in self.gates(t)))
                    for t in range(self.info.num_tasks)}
