"""iCaRL's exemplar memory (Rebuffi et al. 2017): herding selection, class means, and the distillation target.

At a task's end every new class gets its share of the budget, chosen by herding (:func:`herding_order`): the
k-th exemplar is the sample that brings the mean of the first k feature vectors closest to the class mean.
Older classes keep the head of their herding order when their share shrinks. Then the mean of every class's
L2-normalised exemplar features is taken with the current network: the nearest-mean-of-exemplars classifier
(``cl_lightning.methods.ICaRL``) compares normalised test features with them.

At each task's start the network is snapshotted; :func:`icarl_loss` then trains with a sigmoid cross-entropy
over the classes seen so far whose targets are the snapshot's sigmoid outputs for the old classes
(distillation) and the one-hot labels for the new ones. The penalty applies that loss to a batch of
exemplars every step (iCaRL trains on the union of the new data and the exemplars).

Every rank holds the whole task data and the same network, so every rank selects the same exemplars.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor

from cl_lightning.callback import TaskLoss
from cl_lightning.callbacks.lwf import raw_outputs
from cl_lightning.callbacks.rehearsal import RehearsalPlugin
from cl_lightning.datamodule import benchmark_of
from cl_lightning.memory import group_keys

if TYPE_CHECKING:
    from cl_lightning.methods.base import ContinualModule


def herding_order(features: Tensor, m: int) -> Tensor:
    """Indices of ``m`` rows of ``features`` ``[n, d]`` in herding order (iCaRL's Algorithm 4): the k-th is
    ``argmin_i || mu - (phi_i + sum_{j<k} phi_{p_j}) / k ||`` over the rows not chosen yet."""
    mu = features.mean(0)
    chosen: list[int] = []
    total = torch.zeros_like(mu)
    free = torch.ones(len(features), dtype=torch.bool, device=features.device)
    for k in range(1, min(m, len(features)) + 1):
        dist = (mu - (total + features) / k).norm(dim=1).masked_fill(~free, float("inf"))
        i = int(dist.argmin())
        chosen.append(i)
        free[i] = False
        total = total + features[i]
    return torch.tensor(chosen, dtype=torch.long)


@torch.no_grad()
def normalized_features(module: ContinualModule, x: Tensor, batch_size: int = 1000) -> Tensor:
    was_training = module.training
    module.eval()
    out = torch.cat([F.normalize(module.backbone(x[i: i + batch_size]), dim=1) for i in range(0, len(x), batch_size)])
    module.train(was_training)
    return out


def icarl_loss(module: ContinualModule, x: Tensor, y: Tensor, known: Tensor, old: Tensor,
               snapshot: dict[str, Tensor] | None, out: Tensor | None = None) -> Tensor:
    """Mean sigmoid cross-entropy over the ``known`` classes: distillation targets on the ``old`` ones,
    one-hot labels on the others (a boolean mask of the head's columns each); ``out``: the network's outputs
    on ``x`` when already computed."""
    out = raw_outputs(module, x) if out is None else out
    targets = F.one_hot(y, out.shape[1]).to(out.dtype)
    if snapshot is not None and bool(old.any()):
        was_training = module.training
        module.eval()
        with torch.no_grad():
            previous = torch.sigmoid(raw_outputs(module, x, {k: v.to(x.device) for k, v in snapshot.items()}))
        module.train(was_training)
        targets = torch.where(old, previous, targets)
    return F.binary_cross_entropy_with_logits(out[:, known], targets[:, known], reduction="none").mean(1)


class ICaRLExemplars(RehearsalPlugin):
    """Args:
        memory_size: the budget K of exemplars across all classes (iCaRL paper: 2000).
        batch_size: exemplars replayed per step (the global batch).
        seed: seeds the replay draws.
    """

    def __init__(self, memory_size: int = 2000, batch_size: int = 128, seed: int = 0):
        super().__init__(memory_size, batch_size, "task_end", "class", seed)
        self.snapshot: dict[str, Tensor] = {}
        self.known: Tensor | None = None  # columns of the classes seen so far, including the current task's
        self.old: Tensor | None = None  # columns of the classes of earlier tasks
        self.means: Tensor | None = None  # [head width, d] normalised class means (rows of unseen classes: 0)

    def on_task_start(self, trainer: L.Trainer, module: ContinualModule, task_id: int) -> None:
        super().on_task_start(trainer, module, task_id)
        assert module.info is not None  # set when the method binds, before any plugin runs
        width = module.info.head_width
        if self.known is None:
            self.known = torch.zeros(width, dtype=torch.bool)
        self.old = self.known.clone()
        labels = benchmark_of(trainer).split(task_id, "train").y.unique()
        self.known = self.known.clone()
        self.known[labels] = True
        if task_id > 0:
            self.snapshot = {f"{part}.{k}": v.detach().clone() for part in ("backbone", "head")
                             for k, v in getattr(module, part).state_dict().items()}

    def loss(self, module: ContinualModule, x: Tensor, y: Tensor, out: Tensor | None = None) -> Tensor:
        """Per-row iCaRL loss of ``x, y`` at the current task."""
        assert self.known is not None and self.old is not None, "set at the task start"
        known, old = self.known.to(x.device), self.old.to(x.device)
        return icarl_loss(module, x, y, known, old, self.snapshot or None, out)

    def penalty(self, module: ContinualModule, batch: Any, step: TaskLoss | None = None) -> Tensor | None:
        drawn = self.replay_batch(module)
        if drawn is None:
            return None
        rows, scale = drawn
        return self.loss(module, rows["x"], rows["y"]).sum() * scale

    def on_task_end(self, trainer: L.Trainer, module: ContinualModule, task_id: int) -> None:
        data = benchmark_of(trainer).split(task_id, "train")
        x, _, _ = data[torch.arange(len(data))]
        feats = normalized_features(module, x.to(module.device))
        labels = data.y.unique().tolist()
        keys = group_keys("class", torch.tensor(labels), torch.full((len(labels),), task_id)).tolist()
        groups = self.memory.groups("class").unique().tolist() if not self.memory.is_empty else []
        quotas = self.memory.quotas(sorted(set(groups) | set(keys)))
        order = []
        for c, key in zip(labels, keys, strict=True):
            rows = (data.y == c).nonzero().squeeze(1)
            order.append(rows[herding_order(feats[rows.to(feats.device)], quotas[key]).to(rows.device)])
        self.insert_task(trainer, module, task_id, torch.cat(order))
        self.update_means(module)

    def update_means(self, module: ContinualModule) -> None:
        """The normalised mean of every class's normalised exemplar features, with the current network."""
        feats = normalized_features(module, self.memory.data["x"])
        y = self.memory.data["y"]
        assert module.info is not None  # set when the method binds, before any plugin runs
        sums = torch.zeros(module.info.head_width, feats.shape[1], device=feats.device).index_add(0, y, feats)
        self.means = F.normalize(sums, dim=1)

    def plugin_state(self) -> dict[str, Any]:
        def cpu(v: Tensor | None) -> Tensor | None:
            return None if v is None else v.cpu()

        return {**super().plugin_state(), "snapshot": {k: v.cpu() for k, v in self.snapshot.items()},
                "known": cpu(self.known), "old": cpu(self.old), "means": cpu(self.means)}

    def load_plugin_state(self, state: dict[str, Any]) -> None:
        super().load_plugin_state(state)
        self.snapshot = dict(state.get("snapshot", {}))
        self.known, self.old, self.means = state.get("known"), state.get("old"), state.get("means")

    def stored_numel(self) -> int:
        extra = sum(v.numel() for v in self.snapshot.values())
        return super().stored_numel() + extra + (0 if self.means is None else self.means.numel())
