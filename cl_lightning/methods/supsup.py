"""SupSup, Supermasks in Superposition (Wortsman et al., NeurIPS 2020).

A frozen random backbone of masked layers (``cl_lightning.nets.masked``); task t trains only the
scores of its own mask slot (edge-popup), so earlier tasks can never be forgotten. Heads are masked
too: the last masked layer outputs one task's classes.

- GG (task id at test): each sample uses its task's mask (task-IL, or domain-IL with
  ``task_inference=given``).
- GN (no id at test, class-IL or domain-IL): one-shot task inference. Start from the uniform
  superposition ``W * sum_t beta_t M_t`` with ``beta_t = 1/T``, take the gradient of the batch's
  output entropy with respect to ``beta`` and pick the task whose coefficient most decreases it
  (``oneshot``); ``binary`` halves the candidate set with repeated gradients (SupSup's binary search).
  The gradients need autograd inside Lightning's test loop: inference runs under
  ``torch.inference_mode(False)`` + ``torch.enable_grad()`` on a clone of the batch, so the default
  ``trainer.inference_mode=true`` works, and so does ``false``.
- Superfluous neurons (``output_neurons`` wider than a task's classes; the authors' GN runs on
  Permuted-MNIST use 100 outputs for 10 classes): the extra outputs are never a label, so a task's own mask
  learns to keep them low, while a superposition that leans on wrong masks spreads probability over them.
  The inference objective sees every output: ``entropy`` (the paper's H) or ``superfluous`` (its G, the
  log-sum-exp of the outputs with the real classes' logits held constant, so that only the superfluous
  neurons carry the gradient). Predictions use the real classes' outputs only.

Every task is written as a coefficient matrix over the mask slots, ``[slots, layers]`` (one-hot for a
SupSup mask, learned for an ImpressLearn combination), so superposing tasks is one einsum and the same
inference serves both methods. A batch of one task costs one forward pass with its (combined) masks.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor

from cl_lightning.callback import ContinualCallback, TaskLoss
from cl_lightning.methods.base import ContinualModule, per_task_outputs, place_task_logits
from cl_lightning.nets.masked import MaskedLeNet300100, MaskedNet
from cl_lightning.tasks import BenchmarkInfo, Scenario

INFERENCE_MODES = ("auto", "given", "oneshot", "binary")
INFERENCE_OBJECTIVES = ("entropy", "superfluous")


def mean_entropy(logits: Tensor) -> Tensor:
    """Mean over the batch of the entropy of the softmax outputs."""
    logp = F.log_softmax(logits, dim=1)
    return -(logp.exp() * logp).sum(1).mean()


def superfluous_objective(logits: Tensor, real: int) -> Tensor:
    """SupSup's G: the batch mean of the log-sum-exp of all outputs, with the first ``real`` (the task's
    classes) held constant, so its gradient flows only through the superfluous outputs."""
    held = torch.cat([logits[:, :real].detach(), logits[:, real:]], dim=1)
    return held.logsumexp(dim=1).mean()


def mask_bytes(numels: Sequence[int], kept: Sequence[int]) -> dict[str, int]:
    """Bytes of one mask over layers of ``numels`` weights keeping ``kept`` of them: as a bitmap, as a
    list of int32 indices, and as indices of the smallest whole number of bytes that fits the layer."""
    return {
        "bitmap": sum(math.ceil(n / 8) for n in numels),
        "indices_int32": sum(4 * k for k in kept),
        "indices_min": sum(k * max(1, math.ceil(math.ceil(math.log2(max(n, 2))) / 8)) for n, k in zip(numels, kept,
                                                                                                      strict=True)),
    }


class SupermaskModule(ContinualModule, ABC):
    """What SupSup and ImpressLearn share: the masked backbone, task programs (coefficients over mask
    slots), scenario-aware outputs, task inference and mask storage accounting.

    Subclasses define :meth:`num_slots`, :meth:`program` and :meth:`prepare_task`.
    """

    inference_modes: tuple[str, ...] = INFERENCE_MODES
    backbone: MaskedNet  # checked in __init__

    def __init__(self, backbone: MaskedNet | None = None, task_inference: str = "auto",
                 output_neurons: int | None = None, inference_objective: str = "entropy", lr: float = 0.01,
                 optimizer: str = "adam", momentum: float = 0.0, weight_decay: float = 0.0,
                 plugins: Sequence[ContinualCallback] | None = None,
                 compile: bool | str = False):
        super().__init__(backbone=backbone if backbone is not None else MaskedLeNet300100(), lr=lr,
                         optimizer=optimizer, momentum=momentum, weight_decay=weight_decay, plugins=plugins,
                         compile=compile)
        if not isinstance(self.backbone, MaskedNet):
            raise ValueError(f"backbone={type(self.backbone).__name__} must be a MaskedNet "
                             "(e.g. cl_lightning.nets.masked.MaskedLeNet300100)")
        if task_inference not in self.inference_modes:
            raise ValueError(f"task_inference={task_inference!r} is not one of {self.inference_modes}")
        if output_neurons is not None and output_neurons < 1:
            raise ValueError(f"output_neurons={output_neurons} must be positive (or null: the task's classes)")
        if inference_objective not in INFERENCE_OBJECTIVES:
            raise ValueError(f"inference_objective={inference_objective!r} is not one of {INFERENCE_OBJECTIVES}")
        self.output_neurons, self.inference_objective = output_neurons, inference_objective
        self.task_inference = task_inference
        self.inference = task_inference
        self._counts: Tensor | None = None
        #: Per task: fraction of test batches whose task was inferred correctly (last test run; GN only).
        self.last_task_inference: list[float] | None = None

    # ------------------------------------------------------------------ set-up
    def build(self, info: BenchmarkInfo) -> None:
        if info.is_regression:
            raise ValueError(f"{type(self).__name__} is a classification method "
                             f"(benchmark {info.name!r} is regression)")
        self.inference = self.resolve_inference(info.scenario)
        width = self.output_neurons or info.outputs_per_task
        if width < info.outputs_per_task:
            raise ValueError(f"output_neurons={width} is fewer than the {info.outputs_per_task} classes of a task "
                             f"of {info.name!r}")
        if self.inference_objective == "superfluous" and width == info.outputs_per_task:
            raise ValueError("inference_objective='superfluous' needs output_neurons above the task's "
                             f"{info.outputs_per_task} classes (SupSup's GN runs use 100 for 10)")
        self.backbone.set_io(math.prod(info.input_shape), width, self.num_slots(info))

    def resolve_inference(self, scenario: Scenario) -> str:
        mode = self.task_inference
        if mode == "auto":
            return "given" if scenario is Scenario.TASK_IL else "oneshot"
        if mode == "given" and scenario is Scenario.CLASS_IL:
            raise ValueError("task_inference='given' needs the task id at test, which class-IL does not give")
        return mode

    @abstractmethod
    def num_slots(self, info: BenchmarkInfo) -> int:
        """How many masks each layer holds."""

    @abstractmethod
    def program(self, task: int) -> tuple[list[int], Tensor | None]:
        """The slots task ``task`` uses, and their coefficients ``[len(slots), layers]`` (None: one mask)."""

    @abstractmethod
    def prepare_task(self, task: int) -> None:
        """Sets ``requires_grad`` so that fitting ``task`` trains exactly what it may change."""

    def setup(self, stage: str) -> None:
        # before configure_optimizers and the DDP wrapper, which both read requires_grad
        if stage == "fit":
            self.prepare_task(self.current_task)

    def dense_program(self, task: int) -> Tensor:
        """The task's coefficients over all slots, ``[slots, layers]`` (zeros for unused slots)."""
        slots, coeff = self.program(task)
        dense = torch.zeros(self.backbone.num_slots, self.backbone.num_layers, device=self.device)
        dense[slots] = 1.0 if coeff is None else coeff.detach().to(dense.dtype)
        return dense

    # ------------------------------------------------------------------ forward / loss
    def all_outputs(self, x: Tensor, task: int) -> Tensor:
        """Every output of ``task``'s (combined) masks: its classes, then any superfluous neurons."""
        slots, coeff = self.program(task)
        return self.backbone(x, slots, coeff)

    def real_logits(self, outputs: Tensor) -> Tensor:
        """The task's classes among the outputs (superfluous neurons dropped)."""
        assert self.info is not None
        return outputs[:, : self.info.outputs_per_task]

    def task_logits(self, x: Tensor, task: int) -> Tensor:
        """The ``outputs_per_task`` logits of ``task``'s (combined) masks."""
        return self.real_logits(self.all_outputs(x, task))

    def inference_loss(self, outputs: Tensor) -> Tensor:
        """What task inference descends: the mean entropy over all outputs, or SupSup's G."""
        if self.inference_objective == "superfluous":
            assert self.info is not None
            return superfluous_objective(outputs, self.info.outputs_per_task)
        return mean_entropy(outputs)

    def local_labels(self, y: Tensor, task: int) -> Tensor:
        assert self.info is not None
        return y - task * self.info.outputs_per_task if self.info.scenario is Scenario.CLASS_IL else y

    def forward(self, x: Tensor, task_ids: Tensor) -> Tensor:
        info = self.info
        assert info is not None
        return per_task_outputs(x, task_ids, lambda t, rows: place_task_logits(self.task_logits(rows, t), t, info))

    def task_loss(self, batch: tuple[Tensor, Tensor, Tensor]) -> TaskLoss:
        """Cross-entropy of each sample on its own task's outputs (local labels; superfluous neurons
        included, so that training pushes them down)."""
        x, y, task_ids = batch
        total, logits, labels = x.new_zeros(()), [], []
        for t in task_ids.unique().tolist():
            rows = task_ids == t
            outputs = self.all_outputs(x[rows], t)
            logits.append(self.real_logits(outputs))
            labels.append(self.local_labels(y[rows], t))
            total = total + F.cross_entropy(outputs, labels[-1], reduction="sum")
        return TaskLoss(total / len(y), torch.cat(logits), torch.cat(labels))

    # ------------------------------------------------------------------ task inference
    def candidate_tasks(self) -> list[int]:
        """Tasks learned so far (task 0 alone before any training)."""
        assert self.info is not None
        return list(range(min(self.current_task, self.info.num_tasks - 1) + 1))

    def infer_task(self, x: Tensor, mode: str | None = None) -> int:
        """SupSup's one-shot (or binary-search) entropy-gradient task inference on one batch."""
        mode = mode or self.inference
        cands = self.candidate_tasks()
        if len(cands) == 1:
            return cands[0]
        with torch.inference_mode(False), torch.enable_grad():
            x = x.clone()
            programs = torch.stack([self.dense_program(t) for t in cands]).clone()  # [C, S, L]
            used = (programs.abs().sum((0, 2)) > 0).nonzero().flatten()
            programs, slots = programs[:, used], used.tolist()
            active = torch.arange(len(cands), device=programs.device)
            while True:
                beta = torch.full((len(active),), 1.0 / len(active), device=x.device, requires_grad=True)
                coeffs = torch.einsum("c,csl->sl", beta, programs[active])
                (g,) = torch.autograd.grad(self.inference_loss(self.backbone(x, slots, coeffs)), beta)
                if mode == "oneshot" or len(active) <= 2:
                    return cands[int(active[g.argmin()])]
                active = active[g.argsort()[: (len(active) + 1) // 2]]

    def predict_for_eval(self, x: Tensor, task_ids: Tensor) -> Tensor:
        if self.inference == "given":
            return self(x, task_ids)
        task = self.infer_task(x)
        self._record(task, task_ids)
        assert self.info is not None
        with torch.no_grad():
            return place_task_logits(self.task_logits(x, task), task, self.info)

    def _record(self, inferred: int, task_ids: Tensor) -> None:
        if self._counts is None:
            return
        hit = (task_ids == inferred).to(self._counts.dtype)
        self._counts[0].index_add_(0, task_ids, hit)
        self._counts[1].index_add_(0, task_ids, torch.ones_like(hit))

    def on_test_epoch_start(self) -> None:
        super().on_test_epoch_start()
        assert self.info is not None
        self._counts = torch.zeros(2, self.info.num_tasks, device=self.device, dtype=torch.float64)

    def on_test_epoch_end(self) -> None:
        super().on_test_epoch_end()
        if self._counts is not None and self.inference != "given":
            counts = self.trainer.strategy.reduce(self._counts, reduce_op="sum").cpu()
            self.last_task_inference = [float(h / n) if n else float("nan") for h, n in zip(*counts, strict=True)]
        self._counts = None

    # ------------------------------------------------------------------ accounting
    def mask_storage(self) -> dict[str, int]:
        """Bytes of one stored mask over all masked layers."""
        layers = self.backbone.masked_layers
        return mask_bytes([m.weight.numel() for m in layers], [m.k for m in layers])

    def storage_rows(self) -> list[tuple[str, int, int, int, int]]:
        """Per layer: name, weights, kept connections, bitmap bytes, int32 index bytes."""
        rows = []
        for i, m in enumerate(self.backbone.masked_layers):
            b = mask_bytes([m.weight.numel()], [m.k])
            rows.append((f"layer{i} {tuple(m.weight.shape)}", m.weight.numel(), m.k, b["bitmap"], b["indices_int32"]))
        return rows

    def storage_table(self) -> str:
        lines = [f"{'layer':<26}{'weights':>10}{'kept':>10}{'bitmap B':>12}{'int32 idx B':>14}"]
        for name, n, k, bm, ix in self.storage_rows():
            lines.append(f"{name:<26}{n:>10}{k:>10}{bm:>12}{ix:>14}")
        s = self.mask_storage()
        lines.append(f"one mask: {s['bitmap']} B as a bitmap, {s['indices_int32']} B as int32 indices, "
                     f"{s['indices_min']} B as minimal-width indices")
        return "\n".join(lines)

    def on_train_end(self) -> None:
        assert self.info is not None
        if self.current_task == self.info.num_tasks - 1:
            self._print_storage()

    @rank_zero_only
    def _print_storage(self) -> None:
        print(f"{type(self).__name__} storage\n{self.storage_table()}")


class SupSup(SupermaskModule):
    """SupSup: one edge-popup mask per task over a frozen random backbone (GG or one-shot GN).

    Args:
        backbone: a masked network (default: LeNet-300-100 at density 0.5, signed constant weights).
        task_inference: ``auto`` (task-IL: ``given``; domain- and class-IL: ``oneshot``), ``given`` (GG),
            ``oneshot`` (GN, one gradient) or ``binary`` (GN, binary search over the tasks).
        output_neurons: width of the masked output layer; null: a task's classes. Wider adds superfluous
            neurons (never a label), which sharpen GN task inference.
        inference_objective: what GN inference descends: ``entropy`` (H) or ``superfluous`` (G).
        lr, optimizer, momentum, weight_decay: the optimizer of the current task's scores.
        plugins: continual-learning callbacks.
    """

    def num_slots(self, info: BenchmarkInfo) -> int:
        return info.num_tasks

    def program(self, task: int) -> tuple[list[int], Tensor | None]:
        return [task], None

    def prepare_task(self, task: int) -> None:
        for layer in self.backbone.masked_layers:
            for slot, scores in enumerate(layer.scores):
                scores.requires_grad_(slot == task)

    def storage_details(self) -> dict[str, int | float]:
        assert self.info is not None
        s = self.mask_storage()
        T = self.info.num_tasks
        weights = sum(m.weight.numel() for m in self.backbone.masked_layers)
        return {
            "backbone_weights": weights,
            "stored_masks": T,
            "bytes_per_task_bitmap": s["bitmap"],
            "bytes_per_task_indices_int32": s["indices_int32"],
            "bytes_per_task_indices_min": s["indices_min"],
            "bytes_all_tasks_bitmap": T * s["bitmap"],
        }

    def storage_table(self) -> str:
        assert self.info is not None
        s = self.mask_storage()
        return (super().storage_table() + f"\n{self.info.num_tasks} tasks: {self.info.num_tasks * s['bitmap']} B "
                f"of bitmaps (backbone: regenerated from its seed, or "
                f"{4 * sum(m.weight.numel() for m in self.backbone.masked_layers)} B as float32)")
