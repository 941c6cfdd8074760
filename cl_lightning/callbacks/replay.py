"""Replay of a rehearsal memory as a loss term: experience replay and dark experience replay.

- **ER** (experience replay; e.g. Chaudhry et al. 2019, "On tiny episodic memories"): every step adds
  ``alpha * CE(f(x_m), y_m)`` on a batch drawn from a reservoir memory of the stream.
- **DER / DER++** (Buzzega et al. 2020, "Dark experience for general continual learning"): the memory
  also stores the network's outputs at insertion time; every step adds ``alpha * MSE(f(x_m), z_m)`` on
  one replay batch and, for DER++, ``beta * CE(f(x_m'), y_m')`` on a second, independent one.

Outputs are compared as the method's forward returns them (task-IL: the sample's own task head), and
stored from the network in eval mode, so a stored row depends on the sample alone, not on the rank or on
the rest of the batch. Each term is a mean over the global replay batch (see ``cl_lightning.callbacks.rehearsal``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from cl_lightning.callback import TaskLoss
from cl_lightning.callbacks.rehearsal import RehearsalPlugin

if TYPE_CHECKING:
    from cl_lightning.methods.base import ContinualModule


def replay_cross_entropy(module: ContinualModule, rows: dict[str, Tensor], scale: float) -> Tensor:
    """Cross-entropy of the network on replayed rows, as a share of the global-batch mean."""
    return F.cross_entropy(module(rows["x"], rows["t"]), rows["y"], reduction="sum") * scale


class ExperienceReplay(RehearsalPlugin):
    """Args:
        alpha: weight of the replay loss.
        memory_size, batch_size, insertion, balance, seed: see ``RehearsalPlugin``.
    """

    def __init__(self, memory_size: int = 500, batch_size: int = 128, alpha: float = 1.0,
                 insertion: str = "reservoir", balance: str = "class", seed: int = 0):
        super().__init__(memory_size, batch_size, insertion, balance, seed)
        if alpha < 0:
            raise ValueError(f"alpha={alpha} must not be negative")
        self.alpha = alpha

    def penalty(self, module: ContinualModule, batch: Any, step: TaskLoss | None = None) -> Tensor | None:
        drawn = self.replay_batch(module)
        if drawn is None or self.alpha == 0:
            return None
        return self.alpha * replay_cross_entropy(module, *drawn)


class DarkExperienceReplay(RehearsalPlugin):
    """Args:
        alpha: weight of the logit-matching (MSE) term.
        beta: weight of the label term on a second replay batch (0: DER, > 0: DER++).
        memory_size, batch_size, seed: see ``RehearsalPlugin`` (insertion is the reservoir).
    """

    def __init__(self, memory_size: int = 500, batch_size: int = 128, alpha: float = 0.3, beta: float = 0.0,
                 seed: int = 0):
        super().__init__(memory_size, batch_size, "reservoir", "class", seed)
        if alpha < 0 or beta < 0:
            raise ValueError(f"alpha={alpha} and beta={beta} must not be negative")
        self.alpha, self.beta = alpha, beta

    @torch.no_grad()
    def extra_fields(self, module: ContinualModule, x: Tensor, t: Tensor) -> dict[str, Tensor]:
        was_training = module.training
        module.eval()
        logits = module(x, t)
        module.train(was_training)
        return {"logits": logits}

    def penalty(self, module: ContinualModule, batch: Any, step: TaskLoss | None = None) -> Tensor | None:
        drawn = self.replay_batch(module)
        if drawn is None:
            return None
        rows, scale = drawn
        out = module(rows["x"], rows["t"])
        total = self.alpha * F.mse_loss(out, rows["logits"], reduction="none").mean(1).sum() * scale
        if self.beta > 0:
            again = self.replay_batch(module, draw=1)
            assert again is not None  # the memory is not empty
            total = total + self.beta * replay_cross_entropy(module, *again)
        return total
