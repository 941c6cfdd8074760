"""ImpressLearn: continual learning via combined task impressions.

A basis of ``M`` supermasks ("impressions") over a frozen random backbone is learned on the first tasks
and then frozen (``cl_lightning.callbacks.mask_basis.MaskBasisFreezing``); every later task learns only a coefficient
matrix ``alpha`` of shape ``[M, layers]`` and uses, in layer l, the weight ``W_l * sum_m alpha[m, l] M_m,l``
(one tensordot over the stacked basis masks). Basis kinds:

- ``heterogeneous``: one mask per basis task (tasks ``0..M-1`` are learned as in SupSup);
- ``homogeneous``: M masks all learned on task 0, differing by their seeds: the score initialisation, and
  the data each mask sees (every step, mask m trains on its own seeded random subset of the batch). The
  M masks train at once, as one batched forward (``forward_each``: one einsum per layer);
- ``random``: M uniform random masks of the same density (never trained); every task learns alpha.

The optional penalty ``lambda * sum_l (sum_m |alpha[m, l]| - 1)^2`` keeps each layer's combination near
unit L1 norm. A task's stored cost is its alpha (``M * layers`` float32 values) against SupSup's one
bitmap per task; :meth:`ImpressLearn.storage` reports both and the amortised compression.

Task inference without an id: ``oneshot`` / ``binary`` superpose the tasks' (real-valued) combined masks
and follow SupSup's entropy gradient; ``basis`` optimises a fresh alpha on the test batch itself, from
uniform, by entropy minimisation (basis-GN, domain-IL only).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cl_lightning.callback import ContinualCallback, TaskLoss
from cl_lightning.callbacks.mask_basis import MaskBasisFreezing
from cl_lightning.methods.supsup import INFERENCE_MODES, SupermaskModule
from cl_lightning.nets.masked import MaskedNet
from cl_lightning.tasks import BenchmarkInfo, Scenario

BASIS_KINDS = ("heterogeneous", "homogeneous", "random")


class ImpressLearn(SupermaskModule):
    """Args:
        backbone: a masked network (default: LeNet-300-100 at density 0.5).
        basis_kind: ``heterogeneous``, ``homogeneous`` or ``random``.
        basis_size: M, the number of basis masks.
        penalty: lambda of the unit-L1 penalty on each layer's coefficients (0: none).
        alpha_lr: learning rate of a new task's coefficients (``lr`` trains the basis masks' scores).
        homogeneous_subsample: fraction of each batch that one homogeneous-basis mask trains on.
        task_inference: ``auto`` (task-IL: ``given``; otherwise ``oneshot``), ``given``, ``oneshot``,
            ``binary`` or ``basis``.
        inference_steps, inference_lr: Adam steps and step size of basis-GN's entropy minimisation.
        output_neurons, inference_objective: superfluous neurons and the inference objective, as for SupSup.
        lr, optimizer, momentum, weight_decay, plugins: as for every method; a ``MaskBasisFreezing``
            plugin is added when none is given.
    """

    inference_modes = (*INFERENCE_MODES, "basis")
    required_plugins = (MaskBasisFreezing,)
    basis_frozen: Tensor  # a buffer (__init__): whether the basis is frozen, saved with the checkpoint

    def __init__(self, backbone: MaskedNet | None = None, basis_kind: str = "heterogeneous", basis_size: int = 5,
                 penalty: float = 0.0, alpha_lr: float = 0.05, homogeneous_subsample: float = 0.5,
                 task_inference: str = "auto", inference_steps: int = 10, inference_lr: float = 0.05,
                 output_neurons: int | None = None, inference_objective: str = "entropy", lr: float = 0.01,
                 optimizer: str = "adam", momentum: float = 0.0, weight_decay: float = 0.0,
                 plugins: Sequence[ContinualCallback] | None = None,
                 compile: bool | str = False):
        super().__init__(backbone=backbone, task_inference=task_inference, output_neurons=output_neurons,
                         inference_objective=inference_objective, lr=lr, optimizer=optimizer,
                         momentum=momentum, weight_decay=weight_decay, plugins=plugins, compile=compile)
        if basis_kind not in BASIS_KINDS:
            raise ValueError(f"basis_kind={basis_kind!r} is not one of {BASIS_KINDS}")
        if basis_size < 1:
            raise ValueError(f"basis_size={basis_size} must be positive")
        if penalty < 0:
            raise ValueError(f"penalty={penalty} must not be negative")
        if not alpha_lr > 0 or not inference_lr > 0:
            raise ValueError(f"alpha_lr={alpha_lr} and inference_lr={inference_lr} must be positive")
        if not 0.0 < homogeneous_subsample <= 1.0:
            raise ValueError(f"homogeneous_subsample={homogeneous_subsample} must be in (0, 1]")
        if inference_steps < 1:
            raise ValueError(f"inference_steps={inference_steps} must be positive")
        self.basis_kind, self.basis_size, self.penalty = basis_kind, basis_size, penalty
        self.alpha_lr, self.homogeneous_subsample = alpha_lr, homogeneous_subsample
        self.inference_steps, self.inference_lr = inference_steps, inference_lr
        self.alphas = nn.ParameterList()
        self.register_buffer("basis_frozen", torch.zeros((), dtype=torch.bool))

    # ------------------------------------------------------------------ set-up
    @property
    def num_basis_tasks(self) -> int:
        """Tasks that learn basis masks: M (heterogeneous), 1 (homogeneous) or 0 (random)."""
        return {"heterogeneous": self.basis_size, "homogeneous": 1, "random": 0}[self.basis_kind]

    @property
    def basis_slots(self) -> list[int]:
        return list(range(self.basis_size))

    def build(self, info: BenchmarkInfo) -> None:
        if self.num_basis_tasks > info.num_tasks:
            raise ValueError(f"basis_size={self.basis_size} heterogeneous basis tasks but the benchmark has "
                             f"num_tasks={info.num_tasks}")
        super().build(info)
        if self.inference == "basis" and info.scenario is Scenario.CLASS_IL:
            raise ValueError("task_inference='basis' gives no task id, which class-IL needs; use oneshot")
        shape = (self.basis_size, self.backbone.num_layers)
        self.alphas = nn.ParameterList(nn.Parameter(torch.full(shape, 1.0 / self.basis_size))
                                       for _ in range(info.num_tasks - self.num_basis_tasks))

    def num_slots(self, info: BenchmarkInfo) -> int:
        return self.basis_size

    def is_alpha_task(self, task: int) -> bool:
        return task >= self.num_basis_tasks

    def program(self, task: int) -> tuple[list[int], Tensor | None]:
        if self.is_alpha_task(task):
            return self.basis_slots, self.alphas[task - self.num_basis_tasks]
        return [task if self.basis_kind == "heterogeneous" else 0], None

    def prepare_task(self, task: int) -> None:
        for alpha in self.alphas:
            alpha.requires_grad_(False)
        trains = set()
        if self.is_alpha_task(task):
            if not bool(self.basis_frozen):
                raise RuntimeError(f"task {task} learns coefficients but the mask basis is not frozen "
                                   "(the MaskBasisFreezing plugin did not run)")
            self.alphas[task - self.num_basis_tasks].requires_grad_(True)
        elif bool(self.basis_frozen):
            raise RuntimeError(f"task {task} is a basis task but the basis is already frozen")
        else:
            trains = {task} if self.basis_kind == "heterogeneous" else set(self.basis_slots)
        for layer in self.backbone.masked_layers:
            for slot, scores in enumerate(layer.scores):
                scores.requires_grad_(slot in trains)

    def freeze_basis(self) -> None:
        """From now on no basis mask (and never the backbone) can change."""
        for layer in self.backbone.masked_layers:
            for scores in layer.scores:
                scores.requires_grad_(False)
                scores.grad = None
        self.basis_frozen.fill_(True)

    def basis_digest(self) -> str:
        """SHA-256 of the backbone weights, the basis scores and the basis masks, bit for bit."""
        h = hashlib.sha256()
        for layer in self.backbone.masked_layers:
            h.update(layer.weight.detach().cpu().contiguous().numpy().tobytes())
            for slot in self.basis_slots:
                h.update(layer.scores[slot].detach().cpu().contiguous().numpy().tobytes())
                h.update(layer.mask(slot).detach().bool().cpu().numpy().tobytes())
        return h.hexdigest()

    def configure_optimizers(self) -> torch.optim.Optimizer | list[torch.optim.Optimizer]:
        if not self.is_alpha_task(self.current_task):
            return super().configure_optimizers()
        return self.optimizer_for(self.alpha_lr)

    # ------------------------------------------------------------------ training
    def alpha_penalty(self, alpha: Tensor) -> Tensor:
        """``lambda * sum_l (sum_m |alpha[m, l]| - 1)^2``."""
        return self.penalty * (alpha.abs().sum(0) - 1.0).pow(2).sum()

    def task_loss(self, batch: tuple[Tensor, Tensor, Tensor]) -> TaskLoss:
        x, y, task_ids = batch
        task = self.current_task
        if self.basis_kind == "homogeneous" and task == 0 and bool((task_ids == 0).all()):
            return self.homogeneous_loss(x, y)
        step = super().task_loss(batch)
        if self.is_alpha_task(task) and self.penalty > 0:
            step = step._replace(value=step.value + self.alpha_penalty(self.alphas[task - self.num_basis_tasks]))
        return step

    def homogeneous_loss(self, x: Tensor, y: Tensor) -> TaskLoss:
        """All M basis masks on task 0 at once; mask m sees its own seeded random subset of the batch.

        The subsets are drawn over the global batch (the datamodule gives rank r the r-th contiguous equal
        shard of it) from a seed that does not depend on the rank, and each rank sums its part of them; the
        sum is scaled so that DDP's gradient average is the 1-process loss's gradient. So DDP learns the
        same masks as one process.
        """
        trainer = self.attached_trainer()
        world = trainer.world_size if trainer is not None else 1
        m, b = self.basis_size, len(y)
        keep = max(1, round(self.homogeneous_subsample * b * world))
        g = torch.Generator().manual_seed((self.steps_before_task + self.global_step) * 65_537 + 17)
        chosen = torch.rand(m, b * world, generator=g).argsort(1)[:, :keep] - self.global_rank * b
        mine = (chosen >= 0) & (chosen < b)                                      # [M, keep]
        first = (~mine).to(torch.uint8).argsort(dim=1, stable=True)[:, : int(mine.sum(1).max())]
        idx, mine = chosen.gather(1, first).clamp(0, b - 1), mine.gather(1, first)  # this rank's, padded
        idx, mine = idx.to(x.device), mine.to(x.device)
        out = self.backbone.forward_each(x[idx], self.basis_slots)              # [M, n, k]
        labels = self.local_labels(y[idx], 0)
        losses = F.cross_entropy(out.flatten(0, 1), labels.flatten(), reduction="none")
        return TaskLoss((losses * mine.flatten()).sum() * world / keep, self.real_logits(out[mine]), labels[mine])

    # ------------------------------------------------------------------ inference
    def predict_for_eval(self, x: Tensor, task_ids: Tensor) -> Tensor:
        if self.inference != "basis":
            return super().predict_for_eval(x, task_ids)
        alpha = self.basis_alpha(x)
        with torch.no_grad():
            return self.real_logits(self.backbone(x, self.basis_slots, alpha))

    def basis_alpha(self, x: Tensor) -> Tensor:
        """basis-GN: coefficients fitted to one unlabelled batch by entropy minimisation, from uniform."""
        with torch.inference_mode(False), torch.enable_grad():
            x = x.clone()
            alpha = torch.full((self.basis_size, self.backbone.num_layers), 1.0 / self.basis_size,
                               device=x.device, requires_grad=True)
            opt = torch.optim.Adam([alpha], lr=self.inference_lr)
            for _ in range(self.inference_steps):
                loss = self.inference_loss(self.backbone(x, self.basis_slots, alpha))
                if self.penalty > 0:
                    loss = loss + self.alpha_penalty(alpha)
                (alpha.grad,) = torch.autograd.grad(loss, alpha)
                opt.step()
            return alpha.detach().clone()

    # ------------------------------------------------------------------ accounting
    def storage_details(self) -> dict[str, int | float]:
        assert self.info is not None
        T, nb, M, L = self.info.num_tasks, self.num_basis_tasks, self.basis_size, self.backbone.num_layers
        bitmap = self.mask_storage()["bitmap"]
        alpha_bytes = 4 * M * L
        impress = M * bitmap + (T - nb) * alpha_bytes
        return {
            "backbone_weights": sum(m.weight.numel() for m in self.backbone.masked_layers),
            "basis_masks": M,
            "bytes_per_basis_mask_bitmap": bitmap,
            "bytes_per_task_alpha": alpha_bytes,
            "bytes_per_task_supsup_bitmap": bitmap,
            "compression_per_task": bitmap / alpha_bytes,
            "bytes_all_tasks_impresslearn": impress,
            "bytes_all_tasks_supsup": T * bitmap,
            "amortised_compression": T * bitmap / impress,
        }

    def storage_table(self) -> str:
        s = self.storage()
        assert self.info is not None
        T, nb, M = self.info.num_tasks, self.num_basis_tasks, self.basis_size
        lines = [super().storage_table(),
                 f"basis: {M} {self.basis_kind} masks, {M * s['bytes_per_basis_mask_bitmap']} B of bitmaps",
                 f"per new task: alpha {M}x{self.backbone.num_layers} float32 = {s['bytes_per_task_alpha']} B "
                 f"vs SupSup {s['bytes_per_task_supsup_bitmap']} B ({s['compression_per_task']:.0f}x smaller)"]
        for tasks in sorted({T, 100, 1000}):
            imp = M * s["bytes_per_basis_mask_bitmap"] + max(0, tasks - nb) * s["bytes_per_task_alpha"]
            sup = tasks * s["bytes_per_task_supsup_bitmap"]
            lines.append(f"{tasks:>5} tasks: SupSup {sup} B, ImpressLearn {imp} B, amortised compression "
                         f"{sup / imp:.2f}x")
        return "\n".join(lines)
