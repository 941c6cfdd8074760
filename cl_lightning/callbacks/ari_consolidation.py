"""Consolidation of the ARI lifelong learner (:mod:`cl_lightning.methods.ari`), run at every task end.

1. The true ARI of every explored candidate on the task (from its per-step errors, summed over ranks)
   goes into the buffer S as (ARI, parameter signature of the candidate's starting point, task
   signature). With ``record_trained`` (ours, off by default) the trained candidates are added too,
   paired with the task they were trained on, with the ARI of a trajectory that stays at their final
   error (the mean error of the last ``trained_tail`` fraction of steps).
   With ``pair_observed`` (Eq. 7 read literally: q is fitted "for all theta_j in Theta_M, tau_i in
   tau_[1:t]") every set of the KB and every trained candidate is also paired with every observed task,
   with the ARI of a trajectory that stays at its error on that task's exemplar memory. These pairs
   describe the current sets, so they replace the previous task end's pairs instead of piling up.
2. ``q`` is fitted on S (MSE, warm-started).
3. The learner ranks the KB sets and the trained candidates and keeps the ``kb_capacity`` sets with the
   highest predicted ARI summed over all observed tasks (random under ``selection=random``), then trains
   ``F`` and the kept sets' embeddings to reproduce them (Adam on the MSE over all weights, until every
   set's error is at most ``tolerance``, relative to its mean square by default, or after ``kb_steps`` steps):
   :meth:`~cl_lightning.methods.ari.ARILearner.consolidate_knowledge_base`, with this plugin's settings.

Under DDP every rank computes the same thing from the same (reduced) errors; the result is then
broadcast from rank 0, so S, ``q`` and the KB are identical on every rank.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, cast

import lightning as L
import torch
from lightning.pytorch.strategies import Strategy
from torch import Tensor

from cl_lightning.callback import ContinualCallback
from cl_lightning.metrics import adaptation_rate_integral
from cl_lightning.nets.ari_estimator import ARIEstimator

if TYPE_CHECKING:
    from cl_lightning.methods.base import ContinualModule


class ARIHost(Protocol):
    """What consolidation needs of the ARI learner: the task's exploration (candidates, their sources and
    errors), the signatures, the estimator ``q``, and the learner's own knowledge-base consolidation."""

    estimator: ARIEstimator
    #: Whether ``q`` has been fitted (read-only here: ``fit_estimator`` sets it).
    estimator_fitted: Tensor
    candidates: Tensor
    candidate_sigs: Tensor
    candidate_sources: list[tuple[str, int]]
    task_sigs: Tensor

    def fit_estimator(self, ari: Tensor, param_sigs: Tensor, task_sigs: Tensor, steps: int, lr: float,
                      weight_decay: float = 0.0) -> float:
        """Fits ``q`` to the observed ARIs and marks it fitted; returns the final training MSE."""

    def exploration_errors(self) -> Tensor:
        """``[steps, Q]`` error of every candidate at every step of the task, over all ranks."""

    def kb_sets(self) -> Tensor:
        """The knowledge base's parameter sets."""

    def memory_errors(self, sets: Tensor, tasks: list[int]) -> Tensor:
        """``[tasks, sets]`` error rate of every set on every task's exemplar memory."""

    def param_signatures(self, sets: Tensor) -> Tensor:
        """Padded signatures of parameter sets."""

    def consolidate_knowledge_base(self, task: int, steps: int, lr: float, tolerance: float,
                                   relative_tolerance: bool, cover_tasks: bool = False) -> dict[str, Any]:
        """Keeps the best sets and trains the knowledge base to reproduce them; returns what it did."""

    def broadcast_consolidation(self, strategy: Strategy) -> None:
        """Rank 0's knowledge base and estimator on every rank."""

    def end_exploration(self, task: int) -> None:
        """Discards the trained candidates; the task counts as learned."""


class ARIConsolidation(ContinualCallback):
    """Args:
        estimator_steps, estimator_lr, estimator_weight_decay: fitting of ``q`` on S at every task end
            (AdamW; decoupled weight decay, ours, off by default, keeps q's weights from memorising a small
            buffer).
        kb_steps, kb_lr: at most this many Adam steps to train ``F`` and the embeddings.
        tolerance: stop when the reproduction error of every kept set is at most this (a bound on the mean
            let a new set among many reproduced ones pass far off).
        relative_tolerance: measure that error as MSE / mean square of the kept weights (default), not the
            raw MSE the paper bounds by 1e-3: default-initialised MNIST weights have a mean square below
            1e-3, so a raw bound of 1e-3 is met by a knowledge base that reproduces nothing (measured:
            relative error 2.1 at raw MSE 9.6e-4 after 6 steps).
        record_trained: also add (trained set, its own task) tuples to S (ours, off by default: on
            Split-MNIST it taught q to prefer trained sets on *new* tasks too; see benchmarks/ari.md).
        trained_tail: fraction of the last steps whose mean error is a trained set's error.
        pair_observed: also fit q on every (KB set or trained candidate, observed task) pair, labelled by the
            set's error on the task's exemplar memory (the paper's Eq. 7; off by default, the behaviour
            measured before it existed). Without it q never sees which stored set solves which task, and
            on Permuted-MNIST picks one set for every task (benchmarks/ari.md).
        cover_tasks: keep each observed task's highest-predicted set before filling the knowledge base by the
            summed rule (ours, off by default; see ``ARILearner.covering_sets``).
    """

    def __init__(self, estimator_steps: int = 500, estimator_lr: float = 1e-3, estimator_weight_decay: float = 0.0,
                 kb_steps: int = 2000, kb_lr: float = 1e-3, tolerance: float = 1e-2, relative_tolerance: bool = True,
                 record_trained: bool = False, trained_tail: float = 0.1, pair_observed: bool = False,
                 cover_tasks: bool = False):
        super().__init__()
        if estimator_steps < 0 or kb_steps < 0:
            raise ValueError(f"estimator_steps={estimator_steps} and kb_steps={kb_steps} must not be negative")
        if not tolerance >= 0:
            raise ValueError(f"tolerance={tolerance} must not be negative")
        if not 0 < trained_tail <= 1:
            raise ValueError(f"trained_tail={trained_tail} must be in (0, 1]")
        if estimator_weight_decay < 0:
            raise ValueError(f"estimator_weight_decay={estimator_weight_decay} must not be negative")
        self.estimator_steps, self.estimator_lr = estimator_steps, estimator_lr
        self.estimator_weight_decay = estimator_weight_decay
        self.kb_steps, self.kb_lr, self.tolerance = kb_steps, kb_lr, tolerance
        self.relative_tolerance = relative_tolerance
        self.record_trained, self.trained_tail = record_trained, trained_tail
        self.pair_observed, self.cover_tasks = pair_observed, cover_tasks
        #: The buffer S: observed ARIs with the padded parameter and task signatures.
        self.ari = torch.zeros(0)
        self.param_sigs = torch.zeros(0, 0)
        self.task_sigs = torch.zeros(0, 0)
        #: With ``pair_observed``: (ARI, parameter signature, task signature) of the current sets on every task,
        #: recomputed at every task end before q is fitted (so neither checkpointed nor counted as storage).
        self.pairs = (torch.zeros(0), torch.zeros(0, 0), torch.zeros(0, 0))
        #: Per task: what consolidation did (candidate ARIs, estimator fit, KB reproduction error).
        self.history: list[dict[str, Any]] = []

    host = ARIHost

    # ------------------------------------------------------------------ the buffer S
    def add(self, ari: torch.Tensor, param_sigs: torch.Tensor, task_sig: torch.Tensor) -> None:
        task_sigs = task_sig.expand(len(ari), -1)
        if self.ari.numel() == 0:
            self.ari, self.param_sigs, self.task_sigs = ari.cpu(), param_sigs.cpu(), task_sigs.cpu()
            return
        self.ari = torch.cat([self.ari, ari.cpu()])
        self.param_sigs = torch.cat([self.param_sigs, param_sigs.cpu()])
        self.task_sigs = torch.cat([self.task_sigs, task_sigs.cpu()])

    # ------------------------------------------------------------------ consolidation
    def on_task_end(self, trainer: L.Trainer, module: ContinualModule, task_id: int) -> None:
        host = cast(ARIHost, module)
        errors = host.exploration_errors()  # [steps, Q], the same on every rank
        true_ari = torch.as_tensor(adaptation_rate_integral(errors.T.cpu()), dtype=torch.float).reshape(-1)
        record: dict[str, Any] = {"task": task_id, "candidates": [list(s) for s in host.candidate_sources],
                                  "candidate_ari": true_ari.tolist()}
        dev = host.task_sigs.device
        self.add(true_ari, host.candidate_sigs, host.task_sigs[task_id])
        if self.record_trained:
            tail = max(1, round(self.trained_tail * len(errors)))
            final = errors[-tail:].mean(0).cpu()
            flat = final.unsqueeze(1).expand(-1, len(errors))
            self.add(torch.as_tensor(adaptation_rate_integral(flat), dtype=torch.float).reshape(-1),
                     host.param_signatures(host.candidates.detach()), host.task_sigs[task_id])
        ari, param_sigs, task_sigs = self.ari, self.param_sigs, self.task_sigs
        if self.pair_observed:
            self.pairs = self.observed_pairs(host, task_id, len(errors))
            ari = torch.cat([ari, self.pairs[0]])
            param_sigs, task_sigs = torch.cat([param_sigs, self.pairs[1]]), torch.cat([task_sigs, self.pairs[2]])
        record["estimator_mse"] = host.fit_estimator(ari.to(dev), param_sigs.to(dev), task_sigs.to(dev),
                                                     self.estimator_steps, self.estimator_lr,
                                                     self.estimator_weight_decay)
        record.update(host.consolidate_knowledge_base(task_id, self.kb_steps, self.kb_lr, self.tolerance,
                                                        self.relative_tolerance, self.cover_tasks))
        if trainer.world_size > 1:
            host.broadcast_consolidation(trainer.strategy)
        host.end_exploration(task_id)
        self.history.append(record)

    @staticmethod
    def observed_pairs(host: ARIHost, task: int, steps: int) -> tuple[Tensor, Tensor, Tensor]:
        """Every KB set and trained candidate on every task so far: the ARI of staying at its memory error."""
        sets = torch.cat([host.kb_sets().detach(), host.candidates.detach()])
        tasks = list(range(task + 1))
        errors = host.memory_errors(sets, tasks).cpu()  # [T, S]
        flat = errors.reshape(-1, 1).expand(-1, steps)
        ari = torch.as_tensor(adaptation_rate_integral(flat), dtype=torch.float).reshape(-1)
        param_sigs = host.param_signatures(sets).cpu().repeat(len(tasks), 1)
        task_sigs = host.task_sigs[tasks].cpu().repeat_interleave(len(sets), 0)
        return ari, param_sigs, task_sigs

    # ------------------------------------------------------------------ state
    def plugin_state(self) -> dict[str, Any]:
        return {"ari": self.ari, "param_sigs": self.param_sigs, "task_sigs": self.task_sigs,
                "history": self.history}

    def load_plugin_state(self, state: dict[str, Any]) -> None:
        self.ari = state.get("ari", torch.zeros(0))
        self.param_sigs = state.get("param_sigs", torch.zeros(0, 0))
        self.task_sigs = state.get("task_sigs", torch.zeros(0, 0))
        self.history = list(state.get("history", []))

    def stored_numel(self) -> int:
        return self.ari.numel() + self.param_sigs.numel() + self.task_sigs.numel()
