"""MARK (Hurtado, Raymond-Saez & Soto, "Optimizing Reusable Knowledge for Continual Learning via
Metalearning", NeurIPS 2021), as the authors' code does it (``approach.training_procedure``).

A knowledge base (KB, :class:`cl_lightning.nets.mark.KnowledgeBase`) shared by all tasks; per task a feature
extractor F_t, mask functions M_t (a per-sample, per-channel mask on each KB block from F_t's features) and a
head C_t. Every stage of a task is a phase of the task's one Lightning ``fit``, a range of epochs:

1. ``features``: F_t with a temporary classifier (SGD ``lr``, momentum 0.9, weight decay 0.01, gradients
   clipped to norm 0.5), then frozen, its batch-norm statistics recomputed over the task's whole training
   split with those final weights, and kept in eval mode (see :meth:`MARK.refresh_feature_statistics`);
2. ``pretrain`` (first task only): the KB and C_0 without masks;
3. ``masks``: M_t and C_t with the KB fixed;
4. ``meta``: ``meta_steps`` outer steps of the KB meta-update (plugin
   :class:`cl_lightning.callbacks.mark_meta_update.MARKMetaUpdate`, outer SGD ``outer_lr``, weight decay 0.1; one step
   per batch index from the phase's first batch on, the remaining batches of its last epoch do nothing);
   or, with ``kb_update=normal``, ``kb_epochs`` of ordinary training of the KB and C_t (the ablations and
   the report's Baselines 1 and 3), or nothing with ``kb_update=none``;
5. ``final``: M_t and C_t re-trained (a fresh optimizer, as the authors').

The phase is a function of the epoch (and, in the meta phase, of the batch index), every optimizer is
Lightning's (so checkpointed), dropout keep-masks and the meta-update's randomness come from generators
seeded by (run seed, epoch, batch) over the *global* batch, so a resume from any epoch ends where an
uninterrupted run does and DDP equals one process. The method owns its per-task budget: it sets the
Trainer's ``max_epochs`` to the schedule's length (``trainer.max_epochs`` is not used).

Optimisation is manual: each step computes the gradients of the phase's parameters only, averages them
over DDP ranks itself and steps the phase's optimizer; old tasks' F/M/C are never in an optimizer.
Task-IL only (each task is evaluated with its own F/M/C and the current KB).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from cl_lightning.callback import ContinualCallback
from cl_lightning.callbacks.mark_meta_update import MARKMetaUpdate
from cl_lightning.datamodule import benchmark_of
from cl_lightning.methods.base import ContinualModule, make_optimizer, per_task_outputs
from cl_lightning.nets.mark import (
    FeatureExtractor,
    KnowledgeBase,
    MaskFunctions,
    SupermaskHead,
    SupermaskMaskFunctions,
)
from cl_lightning.tasks import BenchmarkInfo, Scenario

KB_UPDATES = ("meta", "normal", "none")
TASK_MODULES = ("separate", "supsup")
PHASES = ("features", "pretrain", "masks", "meta", "kb", "final")


def _seed(*parts: int) -> int:
    seed = 0
    for p in parts:
        seed = (seed * 1_000_003 + int(p)) % (2**63 - 1)
    return seed


class MARK(ContinualModule):
    """Args:
        kb_channels: the KB blocks' channels (authors: 64, 128, 256).
        latent_dim: the KB's output size (authors: 128 on CIFAR-100, 256 on MiniImageNet).
        dropout: dropout after the KB's linear layer (authors: 0.5).
        feature_channels: F_t's two conv widths (authors: 32, 32 on CIFAR-100; 8, 8 on MiniImageNet).
        feature_dim: F_t's output size (None: ``latent_dim``, as the authors).
        mask_activation: ``relu`` (authors' default) or ``sigmoid``.
        task_modules: ``separate`` (the authors': M_t and C_t per task) or ``supsup`` (the report's SupSup
            variant, its section 6: one M and one C for all tasks over frozen signed-constant weights, each task
            an edge-popup supermask of them; F_t stays per task, as in the report).
        supermask_density: fraction of connections a ``supsup`` task mask keeps.
        use_masks: False drops F_t and M_t: the KB runs unmasked (the masks-off ablation, Baselines 1/2).
        train_features: False leaves each F_t at its random initialisation (the random-F ablation).
        pretrain_kb: train the KB (with C_0, no masks) on the first task (False with ``kb_update=none``:
            the random-KB ablation).
        kb_update: ``meta`` (the plugin's meta-update), ``normal`` (KB and C_t trained on the task) or
            ``none`` (KB frozen after the first task).
        feature_epochs, pretrain_epochs, mask_epochs, kb_epochs, final_epochs: epochs of the phases
            (authors: 50 each).
        meta_steps: outer steps of the meta-update per task (the authors' ``meta_epochs``: 10; 0 freezes the KB
            after the first task).
        lr: the task stages' SGD learning rate (authors' ``lr_task``), momentum 0.9, weight decay
            ``weight_decay`` (authors: 0.01).
        outer_lr, outer_weight_decay: the KB's SGD in the meta and ``normal`` phases (authors: ``lr_meta * 0.1``
            and 0.1, no momentum).
        plugins: must include :class:`cl_lightning.callbacks.mark_meta_update.MARKMetaUpdate` when ``kb_update=meta``.
    """

    supported_scenarios = frozenset({Scenario.TASK_IL})
    shared_head: SupermaskHead  # task_modules=supsup
    shared_masks: SupermaskMaskFunctions

    def __init__(self, kb_channels: Sequence[int] = (64, 128, 256), latent_dim: int = 128, dropout: float = 0.5,
                 feature_channels: Sequence[int] = (32, 32), feature_dim: int | None = None,
                 mask_activation: str = "relu", task_modules: str = "separate", supermask_density: float = 0.5,
                 use_masks: bool = True, train_features: bool = True,
                 pretrain_kb: bool = True, kb_update: str = "meta", feature_epochs: int = 50,
                 pretrain_epochs: int = 50, mask_epochs: int = 50, kb_epochs: int = 50, final_epochs: int = 50,
                 meta_steps: int = 10, lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 0.01,
                 outer_lr: float = 0.001, outer_weight_decay: float = 0.1,
                 plugins: Sequence[ContinualCallback] | None = None,
                 compile: bool | str = False):
        super().__init__(backbone=nn.Identity(), lr=lr, optimizer="sgd", momentum=momentum,
                         weight_decay=weight_decay, plugins=plugins, compile=compile)
        if kb_update not in KB_UPDATES:
            raise ValueError(f"kb_update={kb_update!r} is not one of {list(KB_UPDATES)}")
        for name, value in (("feature_epochs", feature_epochs), ("pretrain_epochs", pretrain_epochs),
                            ("mask_epochs", mask_epochs), ("kb_epochs", kb_epochs), ("final_epochs", final_epochs),
                            ("meta_steps", meta_steps)):
            if value < 0:
                raise ValueError(f"{name}={value} must not be negative")
        if not outer_lr > 0 or outer_weight_decay < 0:
            raise ValueError(f"outer_lr={outer_lr} must be positive and outer_weight_decay={outer_weight_decay} "
                             "not negative")
        if feature_dim is not None and feature_dim < 1:
            raise ValueError(f"feature_dim={feature_dim} must be positive (or null)")
        if kb_update == "meta":  # required by the meta update (added with its defaults)
            self.require_plugin(MARKMetaUpdate)
        elif any(isinstance(p, MARKMetaUpdate) for p in self.plugins):
            raise ValueError(f"kb_update={kb_update!r} does not use the MARKMetaUpdate plugin: remove it")
        if use_masks and mask_activation not in ("relu", "sigmoid"):
            raise ValueError(f"mask_activation={mask_activation!r} is not one of ['relu', 'sigmoid']")
        if task_modules not in TASK_MODULES:
            raise ValueError(f"task_modules={task_modules!r} is not one of {list(TASK_MODULES)}")
        if not 0.0 < supermask_density <= 1.0:
            raise ValueError(f"supermask_density={supermask_density} must be in (0, 1]")
        self.task_modules, self.supermask_density = task_modules, supermask_density
        self.kb_channels, self.latent_dim, self.dropout = tuple(kb_channels), latent_dim, dropout
        self.feature_channels = tuple(feature_channels)
        self.feature_dim = feature_dim or latent_dim
        self.mask_activation, self.use_masks, self.train_features = mask_activation, use_masks, train_features
        self.pretrain_kb, self.kb_update = pretrain_kb, kb_update
        self.epochs = {"features": feature_epochs, "pretrain": pretrain_epochs, "masks": mask_epochs,
                       "kb": kb_epochs, "final": final_epochs}
        self.meta_steps = meta_steps
        self.outer_lr, self.outer_weight_decay = outer_lr, outer_weight_decay
        self.automatic_optimization = False
        #: The meta step whose optimizer step is under way (``current_meta_step``), else None; set here only.
        self.meta_step_now: int | None = None
        self.run_seed = 0
        self.batches_per_epoch = 1
        #: Relative change of the KB over each task, ``||theta_end - theta_start|| / ||theta_start||``.
        self.kb_drift: dict[int, float] = {}

    # ------------------------------------------------------------------ set-up
    def build(self, info: BenchmarkInfo) -> None:
        if len(info.input_shape) != 3 or info.input_shape[1] != info.input_shape[2]:
            raise ValueError(f"MARK needs square images [C, H, H]; the benchmark gives {list(info.input_shape)}")
        c, size, _ = info.input_shape
        self.kb = KnowledgeBase(c, size, self.kb_channels, self.latent_dim, self.dropout)
        k, T = info.outputs_per_task, info.num_tasks
        supsup = self.task_modules == "supsup"
        if supsup:
            self.shared_head = SupermaskHead(self.latent_dim, k, T, self.supermask_density)
        else:
            self.heads = nn.ModuleList(nn.Linear(self.latent_dim, k) for _ in range(T))
        if self.use_masks:
            self.extractors = nn.ModuleList(FeatureExtractor(c, size, self.feature_channels, self.feature_dim)
                                            for _ in range(T))
            if supsup:
                self.shared_masks = SupermaskMaskFunctions(self.feature_dim, self.kb.channels, T,
                                                           self.supermask_density, self.mask_activation)
            else:
                self.mask_functions = nn.ModuleList(MaskFunctions(self.feature_dim, self.kb.channels,
                                                                  self.mask_activation) for _ in range(T))
            self.feature_head = nn.Linear(self.feature_dim, k)  # F_t's temporary classifier
        self.register_buffer("kb_start", self.kb_vector().clone())
        for p in self.parameters():
            p.requires_grad_(False)

    # ------------------------------------------------------------------ the task's M and C (separate or supermasks)
    def head_output(self, task: int, h: Tensor) -> Tensor:
        """C_t(h)."""
        return self.shared_head(h, task) if self.task_modules == "supsup" else self.heads[task](h)

    def mask_output(self, task: int, features: Tensor) -> list[Tensor]:
        """M_t(features): the KB blocks' masks."""
        if self.task_modules == "supsup":
            return self.shared_masks(features, task)
        return self.mask_functions[task](features)

    def head_params(self, task: int) -> list[nn.Parameter]:
        """What training C_t changes: its layer, or its supermask's scores."""
        if self.task_modules == "supsup":
            return [self.shared_head.layer.scores[task]]
        return list(self.heads[task].parameters())

    def mask_params(self, task: int) -> list[nn.Parameter]:
        """What training M_t changes: its layers, or its supermasks' scores."""
        if self.task_modules == "supsup":
            return self.shared_masks.scores(task)
        return list(self.mask_functions[task].parameters())

    def kb_vector(self) -> Tensor:
        return torch.cat([p.detach().flatten() for p in self.kb.parameters()])

    def schedule(self, task: int) -> list[tuple[str, int]]:
        """The phases of ``task`` and their lengths in epochs."""
        out = []
        if self.use_masks and self.train_features:
            out.append(("features", self.epochs["features"]))
        if task == 0 and self.pretrain_kb:
            out.append(("pretrain", self.epochs["pretrain"]))
        if self.use_masks:
            out.append(("masks", self.epochs["masks"]))
        if self.kb_update == "meta":
            out.append(("meta", math.ceil(self.meta_steps / self.batches_per_epoch)))
        elif self.kb_update == "normal":
            out.append(("kb", self.epochs["kb"]))
        out.append(("final", self.epochs["final"]))
        return [(name, n) for name, n in out if n > 0]

    def phase_at(self, epoch: int, batch_idx: int) -> tuple[str | None, int]:
        """(phase, index) of a training batch; index is the outer step in the meta phase. None: nothing to do."""
        start = 0
        for name, n in self.schedule(self.current_task):
            if epoch < start + n:
                if name == "meta":
                    step = (epoch - start) * self.batches_per_epoch + batch_idx
                    return (name, step) if step < self.meta_steps else (None, -1)
                return name, epoch - start
            start += n
        return None, -1

    def phase_params(self, phase: str) -> list[nn.Parameter]:
        t = self.current_task
        head = self.head_params(t)
        if phase == "features":
            return [*self.extractors[t].parameters(), *self.feature_head.parameters()]
        if phase in ("pretrain", "kb"):
            return [*self.kb.parameters(), *head]
        if phase == "meta":
            return list(self.kb.parameters())
        if self.use_masks:
            return [*self.mask_params(t), *head]
        return head

    def setup(self, stage: str) -> None:
        """Before the optimizers and the DDP wrapper: the current task's parameters train, all others are
        frozen; the fit's length is the schedule's; the temporary classifier and the KB snapshot are fresh
        (a resume overwrites both with the checkpoint's)."""
        if stage != "fit":
            return
        t = self.current_task
        self.run_seed = torch.initial_seed()
        self.batches_per_epoch = max(1, len(benchmark_of(self.trainer).train_dataloader()))
        total = sum(n for _, n in self.schedule(t))
        if total == 0:
            raise ValueError("MARK's schedule has no epoch for this task: set final_epochs >= 1")
        self.trainer.fit_loop.max_epochs = total
        for p in self.parameters():
            p.requires_grad_(False)
        for phase, _ in self.schedule(t):
            for p in self.phase_params(phase):
                p.requires_grad_(True)
        if self.use_masks:
            g = torch.Generator().manual_seed(_seed(self.run_seed, 101))
            bound = 1.0 / math.sqrt(self.feature_dim)
            with torch.no_grad():
                for p in self.feature_head.parameters():
                    p.copy_((torch.rand(p.shape, generator=g) * 2 - 1) * bound)
        self.kb_start = self.kb_vector().clone()

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        """One optimizer per phase of this task, in schedule order (each keeps its own momentum)."""
        opts = []
        for phase, _ in self.schedule(self.current_task):
            params = self.phase_params(phase)
            if phase in ("meta", "kb"):
                opts.append(make_optimizer("sgd", params, lr=self.outer_lr, weight_decay=self.outer_weight_decay))
            else:
                opts.append(make_optimizer("sgd", params, lr=self.lr, momentum=self.momentum,
                                           weight_decay=self.weight_decay))
        return opts

    # ------------------------------------------------------------------ forward
    @torch.no_grad()
    def task_masks(self, task: int, x: Tensor) -> list[Tensor] | None:
        """M_t(F_t(x)) with F_t in eval mode, no gradient (None without masks)."""
        if not self.use_masks:
            return None
        f = self.extractors[task]
        was = f.training
        f.eval()
        masks = self.mask_output(task, f(x))
        f.train(was)
        return masks

    def task_output(self, task: int, x: Tensor, keep: Tensor | None = None, masks: Any = "auto") -> Tensor:
        if isinstance(masks, str):
            masks = None
            if self.use_masks:
                with torch.no_grad():
                    f = self.extractors[task]
                    f.eval()
                    feats = f(x)
                masks = self.mask_output(task, feats)
        return self.head_output(task, self.kb(x, masks, keep))

    def forward(self, x: Tensor, task_ids: Tensor) -> Tensor:
        return per_task_outputs(x, task_ids, lambda t, rows: self.task_output(t, rows))

    def keep_mask(self, batch_idx: int, rows: int) -> Tensor | None:
        """Dropout keep-mask of this rank's rows of the global batch, from a seeded generator."""
        if self.dropout == 0:
            return None
        trainer = self.attached_trainer()
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        g = torch.Generator().manual_seed(_seed(self.run_seed, 7, self.current_epoch, batch_idx))
        u = torch.rand(rows * world, self.latent_dim, generator=g)[rank * rows:(rank + 1) * rows]
        return (u >= self.dropout).float().to(self.device)

    # ------------------------------------------------------------------ training
    def on_train_epoch_start(self) -> None:
        """At the first epoch after F_t's own phase (epoch 0 when F_t is not trained), its batch-norm
        statistics are made those of its final weights."""
        if not self.use_masks:
            return
        names = [name for name, _ in self.schedule(self.current_task)]
        first_after = self.epochs["features"] if "features" in names else 0
        if self.current_epoch == first_after:
            self.refresh_feature_statistics(self.current_task)

    @torch.no_grad()
    def refresh_feature_statistics(self, task: int) -> None:
        """F_t's batch-norm running statistics recomputed over the task's whole training split (a cumulative
        average over batches, ``torch.optim.swa_utils.update_bn``), then F_t in eval mode.

        Why: the running statistics of the features phase average over its last few steps while the weights
        still move, so they do not describe the final weights; the masks computed from those eval-mode features
        came out 1.5-2x too small and at seed 1 of Split-MNIST two tasks never left chance (benchmarks/mark.md,
        "Against the authors' code"). The authors leave F_t in train mode instead (batch statistics, running
        ones still updating); recomputing keeps a task's masks a function of the sample alone, and is a pure
        function of F_t's frozen weights and the split, the same on every DDP rank and after any resume."""
        f = self.extractors[task]
        data = benchmark_of(self.trainer).split(task, "train")
        size = benchmark_of(self.trainer).batch_size
        batches = (data[torch.arange(i, min(i + size, len(data)))][0] for i in range(0, len(data), size))
        torch.optim.swa_utils.update_bn(batches, f, device=self.device)
        f.eval()

    def current_meta_step(self) -> int | None:
        """The index of the meta step whose optimizer step is under way, or None (any other step)."""
        return self.meta_step_now

    def training_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> None:
        phase, index = self.phase_at(self.current_epoch, batch_idx)
        if phase is None:
            return
        names = [name for name, _ in self.schedule(self.current_task)]
        opts = self.optimizers()
        opt = (opts if isinstance(opts, list) else [opts])[names.index(phase)]
        if phase == "meta":
            self.meta_step_now = index  # the plugin asks for it and writes the KB's gradient before the step
            try:
                opt.step()
            finally:
                self.meta_step_now = None
            opt.zero_grad(set_to_none=True)
            return
        x, y, _ = batch
        t = self.current_task
        if phase == "features":
            self.extractors[t].train()
            out = self.feature_head(self.extractors[t](x))
        elif phase == "pretrain":
            out = self.head_output(t, self.kb(x, None, self.keep_mask(batch_idx, len(x))))
        else:
            out = self.task_output(t, x, self.keep_mask(batch_idx, len(x)))
        self.count_errors(out, y)  # MARK's phases bypass training_objective
        loss = F.cross_entropy(out, y)
        params = self.phase_params(phase)
        grads = self._average_over_ranks(torch.autograd.grad(loss, params))
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        if phase == "features":  # the authors clip F's and the classifier's gradients separately
            n_f = sum(1 for _ in self.extractors[t].parameters())
            torch.nn.utils.clip_grad_norm_(params[:n_f], 0.5)
            torch.nn.utils.clip_grad_norm_(params[n_f:], 0.5)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if self._should_log():
            self.log("train/loss", loss.detach(), batch_size=len(y))
            self.log("task", float(t))
            self.log("step", float(self.steps_before_task + self.global_step))

    def _average_over_ranks(self, grads: Sequence[Tensor]) -> list[Tensor]:
        """Mean over DDP ranks (equal shards: the gradient of the global batch's mean loss)."""
        trainer = self.attached_trainer()
        if trainer is None or trainer.world_size < 2:
            return list(grads)
        flat = torch.cat([g.flatten() for g in grads])
        dist.all_reduce(flat)
        flat /= trainer.world_size
        out, offset = [], 0
        for g in grads:
            out.append(flat[offset: offset + g.numel()].view_as(g))
            offset += g.numel()
        return out

    def on_train_end(self) -> None:
        start = self.kb_start
        self.kb_drift[self.current_task] = float((self.kb_vector() - start).norm() / start.norm().clamp_min(1e-12))
        for p in self.parameters():
            p.requires_grad_(False)

    # ------------------------------------------------------------------ checkpoints and accounting
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["continual"]["mark"] = {"kb_drift": dict(self.kb_drift)}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("continual", {}).get("mark")
        if state is not None:
            self.kb_drift = {int(k): float(v) for k, v in state["kb_drift"].items()}

    def per_task_numel(self, task: int) -> int:
        """Values kept for one task: F_t (parameters and batch-norm statistics), M_t and C_t; in the ``supsup``
        variant M_t and C_t are binary masks, counted as bitmaps in 32-bit words (the frozen signed-constant
        weights under them are regenerated from their seed, as SupSup's backbone)."""
        modules: list[nn.Module] = [self.extractors[task]] if self.use_masks else []
        if self.task_modules == "supsup":
            masked = [self.shared_head.layer, *(self.shared_masks.layers if self.use_masks else [])]
            bits = sum(math.ceil(layer.weight.numel() / 32) for layer in masked)
        else:
            modules += [self.heads[task], *([self.mask_functions[task]] if self.use_masks else [])]
            bits = 0
        return bits + sum(p.numel() for m in modules for p in m.parameters()) + sum(
            b.numel() for m in modules for b in m.buffers() if b.is_floating_point())

    def stored_counts(self) -> dict[str, int]:
        """The KB and what the seen tasks add (F, M, C of each)."""
        return {"knowledge_base": sum(p.numel() for p in self.kb.parameters()),
                "task_modules": sum(self.per_task_numel(t) for t in range(self.current_task + 1))}

    def storage_details(self) -> dict[str, int | float]:
        """What one task adds, the number of tasks seen, and one KB-sized network per task for comparison."""
        seen = self.current_task + 1
        kb = sum(p.numel() for p in self.kb.parameters())
        head = self.latent_dim * self.info.outputs_per_task + self.info.outputs_per_task if self.info else 0
        return {"per_task": self.per_task_numel(0), "tasks": seen, "one_network_per_task": seen * (kb + head)}
