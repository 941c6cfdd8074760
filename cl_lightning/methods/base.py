"""``ContinualModule``: the LightningModule every method builds on, and itself the fine-tuning baseline.

It owns a backbone, the heads its scenario needs (one slice per task for task-IL, one shared head
otherwise), the plugins (between-task and per-step callbacks, see ``cl_lightning.callback``) and the
per-task evaluation that fills a row of the accuracy matrix.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cl_lightning.augment import draw_share, step_generator
from cl_lightning.callback import ContinualCallback, TaskLoss
from cl_lightning.metrics import TaskScores
from cl_lightning.nets import MLP
from cl_lightning.tasks import BenchmarkInfo, Scenario

P = TypeVar("P", bound=ContinualCallback)


@dataclass(frozen=True)
class RequiredPlugin:
    """A plugin a method cannot run without, in its ``required_plugins`` (a bare class there means
    ``RequiredPlugin(cls)``).

    Args:
        plugin: the plugin class (a subclass of it counts).
        add_default: add one, built with ``settings``, when the config gives none; ``False``: the config must give
            one (its settings are the method's main choice, as iCaRL's memory budget).
        settings: attribute values the plugin must have (GDumb's memory: ``insertion: task_end``,
            ``balance: class``).
    """

    plugin: type[ContinualCallback]
    add_default: bool = True
    settings: Mapping[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        extra = " and ".join(f"{k}: {v}" for k, v in self.settings.items())
        return self.plugin.__name__ + (f" with {extra}" if extra else "")


OPTIMIZERS = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD, "adamw": torch.optim.AdamW,
              "rmsprop": torch.optim.RMSprop}  # RMSprop: the SupSup authors' GN runs (torch's defaults, lr 1e-4)
#: Devices whose floating-point parameters torch's fused optimizer kernels take.
FUSED_DEVICES = ("cpu", "cuda")


def make_optimizer(name: str, params: Sequence[Tensor] | Sequence[dict[str, Any]],
                   **kwargs: Any) -> torch.optim.Optimizer:
    """The optimizer ``name`` (a key of ``OPTIMIZERS``) over ``params`` (tensors, or torch's parameter groups),
    with torch's fused kernel where it has one for the parameters' device and dtype: one pass over each parameter
    instead of one per arithmetic step (Adam over a hypernetwork's 465k weights on a CPU: 1.0 instead of 1.6 ms
    per step). Same update rule."""
    cls = OPTIMIZERS[name]
    tensors = [p for g in params for p in (g["params"] if isinstance(g, dict) else [g])]
    if tensors and all(p.is_floating_point() and p.device.type in FUSED_DEVICES for p in tensors):
        try:
            return cls(params, fused=True, **kwargs)
        except (RuntimeError, ValueError, TypeError):  # this torch has no fused kernel for them
            pass
    return cls(params, **kwargs)


def per_task_outputs(x: Tensor, task_ids: Tensor, run: Callable[[int, Tensor], Tensor]) -> Tensor:
    """``run(task, rows)`` on the rows of each task present in the batch, reassembled in batch order
    (one call when the batch holds a single task, the usual case)."""
    tasks = task_ids.unique().tolist()
    if len(tasks) == 1:
        return run(tasks[0], x)
    parts = {t: run(t, x[task_ids == t]) for t in tasks}
    first = next(iter(parts.values()))
    out = first.new_empty(len(x), *first.shape[1:])
    for t, part in parts.items():
        out[task_ids == t] = part
    return out


def fit_body(body: nn.Module, info: BenchmarkInfo, role: str = "backbone") -> int:
    """Sizes ``body``'s input to the benchmark's (bodies with ``set_input_size``, e.g. an MLP), tells a pretrained
    body the benchmark's image normalisation (``set_input_normalization``) and returns its output width, which
    every head built on it needs."""
    set_input_size = getattr(body, "set_input_size", None)
    if set_input_size is not None:
        set_input_size(math.prod(info.input_shape))
    set_input_normalization = getattr(body, "set_input_normalization", None)
    if set_input_normalization is not None:
        set_input_normalization(info.normalization, info.input_shape)
    width = getattr(body, "out_features", None)
    if width is None:
        raise ValueError(f"{role} {type(body).__name__} must expose out_features")
    return int(width)


def place_task_logits(logits: Tensor, task_ids: Tensor | int, info: BenchmarkInfo) -> Tensor:
    """Class-IL: each row's task logits (one task wide) into its task's block of the shared head, ``-inf``
    elsewhere, so that an argmax over the head is a class id. Other scenarios: unchanged."""
    if info.scenario is not Scenario.CLASS_IL:
        return logits
    k = info.outputs_per_task
    if isinstance(task_ids, int):
        out = logits.new_full((len(logits), info.head_width), float("-inf"))
        out[:, task_ids * k:(task_ids + 1) * k] = logits
        return out
    cols = task_ids.unsqueeze(1) * k + torch.arange(k, device=logits.device)
    return logits.new_full((len(logits), info.head_width), float("-inf")).scatter(1, cols, logits)


class ContinualModule(L.LightningModule):
    """Trains a backbone plus heads on one task at a time; with no plugins this is fine-tuning.

    Args:
        backbone: feature extractor; its ``out_features`` sets the head width.
        lr: learning rate of the per-task optimizer (rebuilt for every task).
        optimizer: ``adam``, ``adamw`` or ``sgd``.
        momentum: SGD momentum.
        weight_decay: L2 weight decay.
        plugins: continual-learning callbacks (EWC, replay, ...) that this method runs.
        compile: run the modules named by ``compiled_modules`` (the backbone) through ``torch.compile`` once the
            benchmark has sized them; ``true`` uses the default backend (inductor), a string names another
            (``eager``, ``aot_eager``: graph capture without code generation). In place (``nn.Module.compile``),
            so parameter names, ``state_dict`` keys and checkpoints are those of the uncompiled model.
    """

    #: Scenarios the method can run; others are rejected before training.
    supported_scenarios: frozenset[Scenario] = frozenset(Scenario)
    #: Train stage t on tasks 0..t instead of task t alone (joint training).
    cumulative_data: bool = False
    #: Plugins the method cannot run without (classes or ``RequiredPlugin``): one is added with its defaults when
    #: the config has none, two are refused. The only reason a method names a plugin class.
    required_plugins: ClassVar[tuple[type[ContinualCallback] | RequiredPlugin, ...]] = ()
    #: Attributes whose modules ``compile`` compiles (those the method's forward calls as modules).
    compiled_modules: ClassVar[tuple[str, ...]] = ("backbone",)

    def __init__(self, backbone: nn.Module | None = None, lr: float = 1e-3, optimizer: str = "adam",
                 momentum: float = 0.0, weight_decay: float = 0.0,
                 plugins: Sequence[ContinualCallback] | None = None, compile: bool | str = False):
        super().__init__()
        if not lr > 0:
            raise ValueError(f"lr={lr} must be positive")
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer={optimizer!r} is not one of {sorted(OPTIMIZERS)}")
        if weight_decay < 0 or momentum < 0:
            raise ValueError(f"weight_decay={weight_decay} and momentum={momentum} must not be negative")
        if not isinstance(compile, (bool, str)) or compile == "":
            raise ValueError(f"compile={compile!r} must be true, false or a torch.compile backend name")
        #: The ``torch.compile`` backend, or ``None`` (not compiled).
        self.compile_backend: str | None = "inductor" if compile is True else (compile or None)
        self.backbone = backbone if backbone is not None else MLP()
        self.lr, self.optimizer_name, self.momentum, self.weight_decay = lr, optimizer, momentum, weight_decay
        self.plugins: list[ContinualCallback] = list(plugins or [])
        for p in self.plugins:
            if not isinstance(p, ContinualCallback):
                raise ValueError(f"plugins: {type(p).__name__} is not a ContinualCallback")
        for required in self.required_plugins:
            self.require_plugin(required)
        self.info: BenchmarkInfo | None = None
        self.head: nn.Linear | None = None
        self.current_task = 0
        #: Optimizer steps taken in earlier tasks, so logged curves share one monotonic step axis.
        self.steps_before_task = 0
        self.last_eval: Tensor | None = None
        #: Misclassified samples (a tensor: no device sync per step) and samples of the current training
        #: step, read and reset by the runner.
        self.step_wrong: Tensor | int = 0
        self.step_samples = 0

    # ------------------------------------------------------------------ plugins
    def require_plugin(self, need: type[ContinualCallback] | RequiredPlugin) -> ContinualCallback:
        """Checks that the plugins hold exactly one ``need`` (adding it when allowed) and returns it. Called for
        every entry of ``required_plugins``; a method whose need depends on an argument (MARK's meta-update) calls
        it in its ``__init__``."""
        need = need if isinstance(need, RequiredPlugin) else RequiredPlugin(need)
        name, cls = type(self).__name__, need.plugin
        found = [p for p in self.plugins if isinstance(p, cls)]
        if len(found) > 1:
            raise ValueError(f"plugins: {name} takes one {cls.__name__}, got {len(found)}")
        if not found:
            if not need.add_default:
                raise ValueError(f"plugins: {name} needs exactly one {need.describe()} (the config gives none)")
            found = [cls(**need.settings)]
            self.plugins.append(found[0])
        plugin = found[0]
        wrong = [f"{k}: {getattr(plugin, k, None)}" for k, v in need.settings.items() if getattr(plugin, k, None) != v]
        if wrong:
            raise ValueError(f"plugins: {name} needs exactly one {need.describe()}; "
                             f"{type(plugin).__name__} has {', '.join(wrong)}")
        return plugin

    def plugin_of(self, cls: type[P]) -> P:
        """The one plugin of class ``cls`` (a required one: ``require_plugin`` made sure it is there), for a method
        that reads its plugin's results through the plugin's public methods."""
        for plugin in self.plugins:
            if isinstance(plugin, cls):
                return plugin
        raise LookupError(f"plugins: {type(self).__name__} has no {cls.__name__}")

    # ------------------------------------------------------------------ set-up
    def setup_tasks(self, info: BenchmarkInfo) -> None:
        """Binds the method to a benchmark: checks the scenario and builds the heads (once)."""
        if info.scenario not in self.supported_scenarios:
            valid = ", ".join(sorted(s.value for s in self.supported_scenarios))
            raise ValueError(f"scenario={info.scenario.value!r} is not supported by {type(self).__name__} "
                             f"(supported: {valid})")
        if self.info is not None:
            if self.info != info:
                raise ValueError("setup_tasks was already called with another benchmark")
            return
        self.info = info
        self.build(info)
        self.compile_modules()
        for plugin in self.plugins:  # after build: a contract may name what build creates
            plugin.check_host(self)
        self.scores = TaskScores(info.num_tasks)

    def build(self, info: BenchmarkInfo) -> None:
        """Creates the parameters that depend on the benchmark; subclasses may override."""
        self.head = nn.Linear(fit_body(self.backbone, info), info.head_width)

    def setup(self, stage: str) -> None:
        """Loads a pretrained backbone's weights (``load_pretrained``) when a fit or test starts, never when the
        config is built."""
        load_pretrained = getattr(self.backbone, "load_pretrained", None)
        if load_pretrained is not None:
            load_pretrained()

    def compile_modules(self) -> list[str]:
        """Compiles the ``compiled_modules`` that exist (an ``nn.Identity`` has nothing to compile) with the
        ``compile`` backend, in place; returns their names."""
        if self.compile_backend is None:
            return []
        if self.compile_backend not in torch.compiler.list_backends(exclude_tags=()):
            raise ValueError(f"compile={self.compile_backend!r} is not a torch.compile backend: "
                             f"{', '.join(torch.compiler.list_backends(exclude_tags=()))}")
        done = []
        for name in self.compiled_modules:
            module = getattr(self, name, None)
            if isinstance(module, nn.Module) and not isinstance(module, nn.Identity):
                module.compile(backend=self.compile_backend)
                done.append(name)
        return done

    # ------------------------------------------------------------------ forward / loss
    def forward(self, x: Tensor, task_ids: Tensor) -> Tensor:
        assert self.head is not None, "setup_tasks builds the head"
        return self.select_head(self.head(self.backbone(x)), task_ids)

    def select_head(self, out: Tensor, task_ids: Tensor) -> Tensor:
        """Task-IL: keep each row's own task slice of the packed head output."""
        assert self.info is not None
        if not self.info.multi_head:
            return out
        k = self.info.outputs_per_task
        return out.view(len(out), self.info.num_tasks, k)[torch.arange(len(out), device=out.device), task_ids]

    def criterion(self, out: Tensor, y: Tensor) -> Tensor:
        """Cross-entropy, or the mean squared error on a regression benchmark."""
        assert self.info is not None
        if self.info.is_regression:
            return F.mse_loss(out, y)
        return F.cross_entropy(out, y)

    def count_errors(self, logits: Tensor, y: Tensor) -> None:
        """Counts this training step's misclassified samples: the runner turns the per-step error of a
        task into its adaptation rate integral (ARI), logged for every method. :meth:`training_objective`
        calls it with what :meth:`task_loss` returns; only a method that bypasses it (MARK's phases) calls
        it itself."""
        if not (self.training and torch.is_grad_enabled()) or (self.info is not None and self.info.is_regression):
            return
        self.step_wrong = self.step_wrong + (logits.detach().argmax(-1) != y).sum()  # stays on the device
        self.step_samples += y.numel()

    def scores_of(self, out: Tensor, y: Tensor) -> Tensor:
        """Per-sample evaluation score: correctness, or squared error for regression."""
        assert self.info is not None
        if self.info.is_regression:
            return (out - y).pow(2).flatten(1).mean(1)
        return (out.argmax(1) == y).float()

    def predict_for_eval(self, x: Tensor, task_ids: Tensor) -> Tensor:
        """Outputs used at test time; methods that infer the task id override this."""
        return self(x, task_ids)

    # ------------------------------------------------------------------ Lightning hooks
    def task_loss(self, batch: tuple[Tensor, Tensor, Tensor]) -> TaskLoss:
        """The method's loss on a batch before the plugins' penalties, with its logits and targets; methods
        with their own loss override it."""
        x, y, t = batch
        out = self(x, t)
        return TaskLoss(self.criterion(out, y), out, y)

    def augment_inputs(self, x: Tensor, salt: int = 0, global_n: int | None = None) -> Tensor:
        """``x`` with the benchmark's training augmentation (unchanged when it has none or ``augment=false``),
        applied batch-wise on ``x``'s device. The parameters come from the run's seed, the task, the step and
        ``salt`` (0: the stream's batch, 1: a replay batch), drawn for the global batch of ``global_n`` samples
        (default: this rank's share times the processes) of which this rank takes its share: resume and DDP
        augment every sample as the uninterrupted single-process run does."""
        trainer = self.attached_trainer()
        datamodule = getattr(trainer, "datamodule", None)
        augmentation = getattr(datamodule, "train_augmentation", lambda: None)()
        if augmentation is None or trainer is None:
            return x
        world, rank = trainer.world_size, trainer.global_rank
        generator = step_generator(self.current_task, self.global_step, salt)
        params = draw_share(augmentation, global_n or len(x) * world, generator, rank, world)
        return augmentation.apply(x, params)

    def training_objective(self, batch: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """The task loss plus every plugin's penalty (each given the task loss), and the terms by name (for
        logging); the step's errors are counted here, for every method. The loss and the penalties see the
        augmented batch; the plugins' batch hooks (a rehearsal memory filling) see the batch as loaded."""
        x, y, t = batch
        batch = (self.augment_inputs(x), y, t)
        step = self.task_loss(batch)
        if not isinstance(step, TaskLoss):
            raise TypeError(f"{type(self).__name__}.task_loss must return a TaskLoss (the loss with the logits and "
                            f"targets its errors are counted from), got {type(step).__name__}")
        if step.logits is not None and step.targets is not None:
            self.count_errors(step.logits, step.targets)
        total, logs = step.value, {"train/loss": step.value}
        for plugin in self.plugins:
            extra = plugin.penalty(self, batch, step)
            if extra is not None:
                total = total + extra
                logs[f"train/penalty_{type(plugin).__name__}"] = extra
        return total, logs

    def training_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> Tensor | None:
        # None: a method that steps its optimizers itself (MARK) or does not train on the stream (GDumb)
        total, logs = self.training_objective(batch)
        if self._should_log():
            self.log_dict(logs, batch_size=len(batch[1]))
            self.log("task", float(self.current_task))
            self.log("step", float(self.steps_before_task + self.global_step))
        return total

    def attached_trainer(self) -> L.Trainer | None:
        """The Trainer running this module, or ``None`` outside a fit or test (Lightning's public ``trainer``
        property raises then; its private ``_trainer`` is not ours to read)."""
        try:
            return self.trainer
        except RuntimeError:
            return None

    def _should_log(self) -> bool:
        """Whether this training step is one Lightning writes to the loggers (every ``log_every_n_steps``-th
        batch), so the other steps skip the cost of ``self.log``. Counted from the fit loop's public batch
        progress (batches started in this fit, restored on resume): the count Lightning's logger connector uses,
        batches that stepped, is the same without gradient accumulation, which no config sets."""
        trainer = self.attached_trainer()
        if trainer is None or not trainer.loggers:
            return False
        every: int = trainer.log_every_n_steps  # type: ignore[attr-defined]  # set by Lightning's logger connector
        return trainer.fit_loop.epoch_loop.batch_progress.total.ready % every == 0

    def validation_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> None:
        x, y, t = batch
        score = self.scores_of(self.predict_for_eval(x, t), y).mean()
        assert self.info is not None
        name = "val/mse" if self.info.is_regression else "val/acc"
        self.log(name, score, batch_size=len(y), sync_dist=True)

    def on_test_epoch_start(self) -> None:
        self.scores.reset()

    def test_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        x, y, t = batch
        self.scores.update(self.scores_of(self.predict_for_eval(x, t), y), t)

    def on_test_epoch_end(self) -> None:
        self.last_eval = self.scores.compute().cpu().reshape(-1)  # torchmetrics squeezes one task to 0-d
        self.scores.reset()

    def configure_optimizers(self) -> torch.optim.Optimizer | list[torch.optim.Optimizer]:
        return self.optimizer_for(self.lr)

    def optimizer_for(self, lr: float) -> torch.optim.Optimizer:
        """The configured optimizer (name, momentum, weight decay) over the trainable parameters at ``lr``."""
        params = [p for p in self.parameters() if p.requires_grad]
        kwargs: dict[str, Any] = {"lr": lr, "weight_decay": self.weight_decay}
        if self.optimizer_name == "sgd":
            kwargs["momentum"] = self.momentum
        return make_optimizer(self.optimizer_name, params, **kwargs)

    def configure_callbacks(self) -> list[ContinualCallback]:
        return self.plugins

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["continual"] = {"current_task": self.current_task, "steps_before_task": self.steps_before_task}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("continual", {})
        self.current_task = state.get("current_task", self.current_task)
        self.steps_before_task = state.get("steps_before_task", self.steps_before_task)

    # ------------------------------------------------------------------ accounting
    def storage(self) -> dict[str, int | float]:
        """Numbers of values kept: the method's (:meth:`stored_counts`), what each plugin stores between tasks,
        their ``total``, and the method's figures that are not storage (:meth:`storage_details`)."""
        counts: dict[str, int | float] = dict(self.stored_counts())
        for plugin in self.plugins:
            counts[f"plugin_{type(plugin).__name__}"] = plugin.stored_numel()
        counts["total"] = sum(counts.values())
        return {**counts, **self.storage_details()}

    def stored_counts(self) -> dict[str, int]:
        """Values the method keeps, by part (summed into the total); default: every parameter."""
        return {"model_parameters": sum(p.numel() for p in self.parameters())}

    def storage_details(self) -> dict[str, int | float]:
        """Figures beside the storage that are not summed into it (sizes, ratios, comparisons)."""
        return {}


class JointTraining(ContinualModule):
    """The upper bound: stage t trains on the union of tasks 0..t (so the last row of R is joint
    training on all tasks, warm-started, and R stays a full matrix)."""

    cumulative_data = True
