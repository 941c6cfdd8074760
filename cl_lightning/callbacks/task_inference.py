"""The two plugins of HNET+TIR's replay model (``cl_lightning.methods.hnet_tir.HNETTIR``).

- :class:`TaskInferenceReplay`: the :class:`cl_lightning.callbacks.generative_replay.Replay` plugin (replay batch
  spread evenly over the past tasks, drawn the same on every rank and after a resume, a teacher copy taken at the
  task start and checkpointed), with the task classifier's loss: cross-entropy of its growing softmax against each
  replayed input's task (hard targets, as the paper's Appendix C and the authors' ``hard_targets`` for HNET+TIR). The
  teacher keeps only what the sampler reads (the decoder's hypernetwork and embeddings), not the whole method.
- :class:`ReplayModelRegularizer`: the :class:`cl_lightning.callbacks.hnet_regularizer.OutputRegularizer` applied to
  the method's replay model (its decoder hypernetwork) instead of the method's own hypernetwork, so that one method
  can carry two protected hypernetworks, each with its own beta (paper, Split-MNIST: 0.01 classifier, 0.05 VAE).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cl_lightning.callback import ContinualCallback, TaskLoss, missing_members
from cl_lightning.callbacks.generative_replay import Replay
from cl_lightning.callbacks.hnet_regularizer import HypernetworkHost, OutputRegularizer

if TYPE_CHECKING:
    from cl_lightning.methods.base import ContinualModule


class ReplayModelHost(Protocol):
    """A method with a replay model (HNET+TIR's task inferrer), whose decoder hypernetwork is protected."""

    replay_model: nn.Module


def _replay_teacher(module: Any, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """What of the method's task-start copy the sampler reads (HNET+TIR's ``replay_teacher``)."""
    return module.replay_teacher(state)


def _replay_model(module: L.LightningModule) -> Any:
    model = getattr(module, "replay_model", None)
    if model is None:
        raise ValueError(f"{type(module).__name__} has no replay_model (these plugins are HNET+TIR's)")
    return model


class TaskInferenceReplay(Replay):
    """Args: as :class:`~cl_lightning.callbacks.generative_replay.Replay` (``targets`` and ``temperature`` do not
    apply: the targets are the replayed inputs' tasks)."""

    host = ReplayModelHost

    def on_task_start(self, trainer: L.Trainer, module: ContinualModule, task_id: int) -> None:
        _replay_model(module)
        super().on_task_start(trainer, module, task_id)
        if self.teacher is not None:
            self.teacher = _replay_teacher(module, self.teacher)

    def classifier_loss(self, module: L.LightningModule, x: Tensor, t: Tensor, y: Tensor | None) -> Tensor:
        """Cross-entropy of the task classifier over the seen tasks against each replayed input's task."""
        return F.cross_entropy(_replay_model(module).task_logits(x), t)


class ReplayModelRegularizer(OutputRegularizer):
    """Args: as :class:`~cl_lightning.callbacks.hnet_regularizer.OutputRegularizer` (paper, Split-MNIST HNET+TIR:
    beta 0.05)."""

    host = ReplayModelHost

    def check_host(self, module: ContinualModule) -> None:
        """The method has a replay model, and that model is what the output regularizer protects."""
        ContinualCallback.check_host(self, module)
        missing = missing_members(module.replay_model, HypernetworkHost)
        if missing:
            raise ValueError(f"plugins: {type(self).__name__} needs a replay model that provides HypernetworkHost "
                             f"({', '.join(missing)}); {type(module.replay_model).__name__} does not")

    def on_task_start(self, trainer: L.Trainer, module: L.LightningModule, task_id: int) -> None:
        super().on_task_start(trainer, _replay_model(module), task_id)

    def penalty(self, module: L.LightningModule, batch: Any, step: TaskLoss | None = None) -> Tensor | None:
        """The method's step is handed on: its loss reaches the decoder's hypernetwork through the VAE term only."""
        return super().penalty(_replay_model(module), batch, step)

    @torch.no_grad()
    def drift(self, module: L.LightningModule) -> Tensor:
        return super().drift(_replay_model(module))
