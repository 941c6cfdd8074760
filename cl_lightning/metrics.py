"""Continual-learning metrics from the accuracy matrix R.

``R[i, j]`` is the score on task j after training task i (every task, also future ones, so that forward
transfer can be measured); ``b[j]`` is the score of the untrained model on task j. Definitions follow
Lopez-Paz & Ranzato (2017) for ACC/BWT/FWT and Chaudhry et al. (2018) for forgetting. For a
lower-is-better score (regression MSE) BWT/FWT keep their raw sign (positive = larger error) and
forgetting is measured as the increase of error over its best value.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric


def average_accuracy(R: np.ndarray) -> float:
    """ACC: mean score over all tasks after the last task."""
    return float(np.mean(R[-1]))


def learning_accuracy(R: np.ndarray) -> float:
    """Mean score on each task just after learning it (the diagonal)."""
    return float(np.mean(np.diag(R)))


def backward_transfer(R: np.ndarray) -> float | None:
    """BWT: mean change on old tasks between just after learning them and the end."""
    T = R.shape[0]
    if T < 2:
        return None
    return float(np.mean([R[T - 1, j] - R[j, j] for j in range(T - 1)]))


def forward_transfer(R: np.ndarray, baseline: np.ndarray) -> float | None:
    """FWT: mean score on task j just before learning it, minus the untrained model's score."""
    T = R.shape[0]
    if T < 2:
        return None
    return float(np.mean([R[j - 1, j] - baseline[j] for j in range(1, T)]))


def forgetting(R: np.ndarray, higher_is_better: bool = True) -> float | None:
    """Average forgetting: for each old task, its best score before the last task minus its final one."""
    T = R.shape[0]
    if T < 2:
        return None
    drops = []
    for j in range(T - 1):
        seen, final = R[j:T - 1, j], R[T - 1, j]
        drops.append(seen.max() - final if higher_is_better else final - seen.min())
    return float(np.mean(drops))


def adaptation_rate_integral(errors: Sequence[float] | np.ndarray | Tensor) -> float | np.ndarray:
    """ARI (Srivastava et al., "Lifelong learning of task-parameter relationships", 2023): the step-averaged area
    under the accuracy curve of an adaptation trajectory, ``1 - (1/T) * integral_0^T err(h(t)) dt`` (Eq. 3).

    ``errors`` are ``err_S(theta_t)`` at the ``T + 1`` points ``t = 0..T`` (last axis); the integral is taken
    over the piecewise-linear curve through them (trapezoid rule), so the ARI lies in [0, 1] whenever the errors
    do, and a set that adapts fast scores high. The paper's discrete Eq. 4, ``1 - (1/T) * sum_{t=0..T} err_t``,
    sums ``T + 1`` errors over ``T`` steps: it exceeds Eq. 3's area by ``(err_0 + err_T) / (2T)`` and goes
    negative on a short trajectory that stays wrong (``[1, 1]`` gives -1), which is why we follow Eq. 3. With a
    single point (T = 0) it is ``1 - err_0``. Extra leading axes give one ARI per row (several candidates).
    """
    e = errors.detach().cpu().numpy() if isinstance(errors, Tensor) else np.asarray(errors, dtype=float)
    if e.shape[-1] == 0:
        raise ValueError("an adaptation trajectory needs at least one error value")
    if e.shape[-1] == 1:
        ari = 1.0 - e[..., 0]
    else:
        area = ((e[..., :-1] + e[..., 1:]) / 2).sum(-1)
        ari = 1.0 - area / (e.shape[-1] - 1)
    return float(ari) if np.ndim(ari) == 0 else ari


def summarize(R: np.ndarray, baseline: np.ndarray, higher_is_better: bool = True) -> dict[str, Any]:
    """Every derived metric of a (complete) accuracy matrix."""
    R = np.asarray(R, dtype=float)
    baseline = np.asarray(baseline, dtype=float)
    return {
        "ACC": average_accuracy(R),
        "BWT": backward_transfer(R),
        "FWT": forward_transfer(R, baseline),
        "forgetting": forgetting(R, higher_is_better),
        "learning_accuracy": learning_accuracy(R),
    }


class TaskScores(Metric):
    """Mean per-sample score for each task, summed across processes before it is read.

    The score is 1/0 correctness for classification and the squared error for regression; keeping
    sums and counts (not means) makes the DDP result exactly the single-process one.
    """

    full_state_update = False
    total: Tensor  # per-task sums and counts: states of torchmetrics' add_state
    count: Tensor

    def __init__(self, num_tasks: int):
        super().__init__()
        self.add_state("total", default=torch.zeros(num_tasks, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.zeros(num_tasks, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, scores: Tensor, task_ids: Tensor) -> None:
        self.total.index_add_(0, task_ids, scores.detach().to(torch.float64))
        self.count.index_add_(0, task_ids, torch.ones_like(scores, dtype=torch.float64))

    def compute(self) -> Tensor:
        return self.total / self.count.clamp_min(1)
