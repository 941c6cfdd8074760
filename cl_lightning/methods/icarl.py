"""iCaRL (Rebuffi et al. 2017, "iCaRL: incremental classifier and representation learning").

The network is trained with iCaRL's sigmoid loss (one-hot targets for the new classes, the previous
network's sigmoid outputs for the old ones) on the new data and, through the ``ICaRLExemplars`` plugin, on
a batch of exemplars every step. At test time it classifies by the nearest mean of exemplars: the class whose
normalised mean exemplar feature is closest to the sample's normalised feature (before the first task ends,
by the head's outputs). Herding, the means and the snapshot live in the plugin (``cl_lightning/callbacks/icarl.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cl_lightning.callback import ContinualCallback, TaskLoss
from cl_lightning.callbacks.icarl import ICaRLExemplars
from cl_lightning.methods.base import ContinualModule, RequiredPlugin
from cl_lightning.tasks import Scenario


class ICaRL(ContinualModule):
    """Class-IL. Takes the arguments of ``ContinualModule``; ``plugins`` must hold one ``ICaRLExemplars`` (its
    memory budget is iCaRL's main setting: not added with a default). The loss and the class means are the
    plugin's (``ICaRLExemplars.loss``, ``.means``), read here, never changed."""

    supported_scenarios = frozenset({Scenario.CLASS_IL})
    required_plugins = (RequiredPlugin(ICaRLExemplars, add_default=False),)

    def __init__(self, backbone: nn.Module | None = None, lr: float = 1e-3, optimizer: str = "adam",
                 momentum: float = 0.0, weight_decay: float = 0.0,
                 plugins: Sequence[ContinualCallback] | None = None,
                 compile: bool | str = False):
        super().__init__(backbone, lr, optimizer, momentum, weight_decay, plugins, compile=compile)

    @property
    def exemplars(self) -> ICaRLExemplars:
        return self.plugin_of(ICaRLExemplars)

    def task_loss(self, batch: tuple[Tensor, Tensor, Tensor]) -> TaskLoss:
        x, y, t = batch
        assert self.head is not None
        out = self.head(self.backbone(x))
        return TaskLoss(self.exemplars.loss(self, x, y, out).mean(), out, y)

    def predict_for_eval(self, x: Tensor, task_ids: Tensor) -> Tensor:
        means = self.exemplars.means
        if means is None:
            return self(x, task_ids)
        feats = F.normalize(self.backbone(x), dim=1)
        means = means.to(feats.device)
        scores = -torch.cdist(feats, means)
        return scores.masked_fill(means.norm(dim=1).eq(0).unsqueeze(0), float("-inf"))
