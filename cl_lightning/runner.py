"""The task loop: one fresh Lightning ``Trainer`` and one ``fit`` per task, evaluation of every task
after every task, and a checkpoint at each task boundary to resume from.

A fresh Trainer per task rebuilds the optimizer and the DDP wrapper (new task parameters, frozen old
ones) and gives each task its own budget (``max_epochs`` / ``max_steps``). The model, the datamodule,
the loggers and the method's plugins live across tasks. Every rank of a ``strategy=ddp`` run executes
this whole loop.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import time
import warnings
import zipfile
from pathlib import Path
from typing import Any, cast

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import Logger
from torch import Tensor

from cl_lightning.config import RUNNER_OWNED_TRAINER_KEYS
from cl_lightning.datamodule import ContinualDataModule
from cl_lightning.methods.base import ContinualModule
from cl_lightning.metrics import adaptation_rate_integral, summarize
from cl_lightning.outputs import log_final, log_task_row, write_run_files
from cl_lightning.precision import UnscaledGradients
from cl_lightning.terminal import Terminal, progress_callback, quiet_run


def rng_states() -> dict[str, Any]:
    """The global random states (torch, CUDA, numpy, Python), in types ``torch.load(weights_only=True)`` reads."""
    np_state = np.random.get_state(legacy=False)
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
            "numpy": {"key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                      "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                      "gauss": float(np_state["gauss"])},
            "python": random.getstate()}


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    n = states["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))


def synchronized_clock() -> float:
    """``time.perf_counter()`` once the GPU has finished the work queued so far (CUDA runs asynchronously: without
    this, a timed fit or test would stop its clock while kernels still run)."""
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter()


class RunRecord(L.Callback):
    """The runner's own state (rows of R, the untrained baseline, steps so far), kept in checkpoints so
    that the checkpoint written at a task boundary is the single point a resume starts from.

    Inside a task it also carries the global random states: a run resumed from an epoch-end checkpoint
    continues with the random numbers (dropout, sampled subsets, candidates) the uninterrupted run drew.
    """

    def __init__(self) -> None:
        self.baseline: list[float] | None = None
        self.rows: list[list[float]] = []
        self.steps = 0
        self.train_seconds = 0.0
        #: Wall time of every evaluation (the untrained baseline and one row of R per task), apart from training.
        self.eval_seconds = 0.0
        #: Adaptation rate integral of each finished task's training trajectory (None: regression).
        self.ari: list[float | None] = []
        #: This task's per-step misclassified samples on this rank, as the method counted them, and samples.
        self.trajectory: list[Tensor | int] = []
        self.trajectory_samples: list[int] = []

    @property
    def state_key(self) -> str:
        return "RunRecord"

    def state_dict(self) -> dict[str, Any]:
        return {"baseline": self.baseline, "rows": self.rows, "steps": self.steps,
                "train_seconds": self.train_seconds,
                "eval_seconds": self.eval_seconds, "ari": self.ari, "trajectory": self._counts().cpu(),
                "rng": rng_states()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.baseline = state_dict["baseline"]
        self.rows = [list(r) for r in state_dict["rows"]]
        self.steps = int(state_dict["steps"])
        self.train_seconds = float(state_dict.get("train_seconds", 0.0))
        self.eval_seconds = float(state_dict.get("eval_seconds", 0.0))
        self.ari = list(state_dict.get("ari", []))
        counts = state_dict.get("trajectory", torch.zeros(0, 2))
        self.trajectory = list(counts[:, 0].unbind(0))
        self.trajectory_samples = [int(n) for n in counts[:, 1].tolist()]
        if "rng" in state_dict:
            set_rng_states(state_dict["rng"])

    # ------------------------------------------------------------------ the training trajectory (ARI)
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        module = cast(ContinualModule, pl_module)
        module.step_wrong, module.step_samples = 0, 0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        module = cast(ContinualModule, pl_module)
        self.trajectory.append(module.step_wrong)
        self.trajectory_samples.append(module.step_samples)

    def _counts(self) -> Tensor:
        """``[steps, 2]``: (misclassified, samples) per step of this task on this rank."""
        if not self.trajectory:
            return torch.zeros(0, 2)
        wrong = torch.stack([torch.as_tensor(w).float().cpu() for w in self.trajectory])
        samples = torch.tensor(self.trajectory_samples, dtype=torch.float)
        return torch.stack([wrong, samples], 1)

    def finish_task(self, trainer: L.Trainer) -> float | None:
        """The ARI of the task just trained, from the per-step errors of all ranks; starts a new trajectory."""
        counts = self._counts()
        self.trajectory, self.trajectory_samples = [], []
        if trainer.world_size > 1:
            counts = trainer.strategy.reduce(counts.to(trainer.strategy.root_device), reduce_op="sum")
        counts = counts[counts[:, 1] > 0].cpu()
        ari = float(adaptation_rate_integral(counts[:, 0] / counts[:, 1])) if len(counts) else None
        self.ari.append(ari)
        return ari


class TaskCheckpoint(ModelCheckpoint):
    """Lightning's checkpoint inside a task: one file, overwritten at every epoch end but the task's last.

    A checkpoint written when the fit has nothing left to train would make Lightning skip the whole loop on
    restore, and with it ``on_train_end``: every plugin's end-of-task work (Fisher, consolidation, basis
    freeze) would be lost for a run killed between that epoch end and the task's boundary checkpoint. So the
    last epoch is not saved: such a run retrains it from the previous epoch's checkpoint (or the task from
    the previous boundary) and reaches the end of the task for real.
    """

    def __init__(self, dirpath: Path):
        super().__init__(dirpath=dirpath, filename="last", save_top_k=1, enable_version_counter=False,
                         save_on_train_epoch_end=True)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        loop = trainer.fit_loop
        if loop.restarted_on_epoch_end:
            # Restored from this very save in a step-budget fit, Lightning (2.6) ends the saved epoch a second
            # time and counts it processed twice; samplers then get every later epoch's number one too high, and
            # the resumed run draws other batches than the uninterrupted one. Undo the count; the file is current.
            for progress in (loop.epoch_progress.current, loop.epoch_progress.total):
                progress.processed = progress.completed + 1  # type: ignore[attr-defined]  # a _ProcessedTracker
            return
        if not fit_will_end(trainer):
            super().on_train_epoch_end(trainer, pl_module)


def fit_will_end(trainer: L.Trainer) -> bool:
    """Whether the epoch ending now is the fit's last (epoch or step budget reached, or a stop requested)."""
    loop = trainer.fit_loop
    epochs = loop.max_epochs
    done: int = loop.epoch_progress.current.processed  # type: ignore[attr-defined]  # a _ProcessedTracker, typed as its base
    if epochs is not None and epochs >= 0 and done >= epochs:
        return True
    return (loop.max_steps >= 0 and trainer.global_step >= loop.max_steps) or trainer.should_stop


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be read (truncated, corrupt, or not ours)."""


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint read without unpickling arbitrary objects (plain containers and tensors only)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, EOFError, RuntimeError, zipfile.BadZipFile, OSError) as err:
        raise CheckpointError(f"checkpoint {path} cannot be read ({str(err).splitlines()[0][:200]})") from None


class ContinualRunner:
    """Runs a continual experiment into ``run_dir``; :meth:`run` returns the metrics it wrote."""

    def __init__(self, model: ContinualModule, datamodule: ContinualDataModule, run_dir: str | Path,
                 trainer_kwargs: dict[str, Any] | None = None, loggers: list[Logger] | None = None,
                 seed: int = 0, method_name: str | None = None, config: dict[str, Any] | None = None,
                 keep_checkpoints: str = "all"):
        if keep_checkpoints not in ("all", "last"):
            raise ValueError(f"checkpoints.keep={keep_checkpoints!r} must be 'all' or 'last'")
        self.keep_checkpoints = keep_checkpoints
        self.model, self.dm = model, datamodule
        self.run_dir = Path(run_dir)
        self.trainer_kwargs = dict(trainer_kwargs or {})
        bad = [k for k in RUNNER_OWNED_TRAINER_KEYS if k in self.trainer_kwargs]
        if bad:
            raise ValueError(f"trainer.{bad[0]} is set by the runner and cannot be configured "
                             "(loggers: logger=wandb|csv|none; plugins: the method's plugins)")
        self.loggers = list(loggers or [])
        self.seed = seed
        self.method_name = method_name or type(model).__name__
        self.config = config or {}
        self.record = RunRecord()
        #: The banner, task lines and final table on stdout (rank 0 only).
        self.terminal = Terminal(enabled=self.is_global_zero)
        self.info = datamodule.info
        L.seed_everything(seed, verbose=False)  # parameters created by setup_tasks start from the seed too
        model.setup_tasks(self.info)

    @property
    def is_global_zero(self) -> bool:
        return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0

    # ------------------------------------------------------------------ paths
    @property
    def ckpt_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    def boundary_ckpt(self, task: int) -> Path:
        return self.ckpt_dir / f"after_task_{task}.ckpt"

    def task_ckpt_dir(self, task: int) -> Path:
        return self.ckpt_dir / f"task_{task}"

    # ------------------------------------------------------------------ trainers
    def make_trainer(self, task: int, train: bool = True) -> L.Trainer:
        # under 16-mixed, plugins editing .grad before the step must see unscaled gradients (precision.py)
        callbacks: list[L.Callback] = [self.record, UnscaledGradients()]
        if self.trainer_kwargs.get("enable_progress_bar", True):
            # a tqdm bar on a terminal, a line per epoch in a log (terminal.py)
            callbacks.append(progress_callback(task, self.info.num_tasks))
        if train:
            # one file, overwritten at every epoch end: the point to resume inside this task
            callbacks.append(TaskCheckpoint(self.task_ckpt_dir(task)))
        kwargs = {"enable_model_summary": False, **self.trainer_kwargs}
        return L.Trainer(callbacks=callbacks, logger=self.loggers or False, default_root_dir=self.run_dir,
                         use_distributed_sampler=False, enable_checkpointing=train, num_sanity_val_steps=0,
                         **kwargs)

    def evaluate(self, trainer: L.Trainer) -> list[float]:
        """One row of R: the score on every task (past and future), synced across ranks."""
        began = synchronized_clock()
        trainer.test(self.model, datamodule=self.dm, verbose=False)
        self.record.eval_seconds += synchronized_clock() - began
        assert self.model.last_eval is not None
        return [float(v) for v in self.model.last_eval]

    # ------------------------------------------------------------------ resume
    def finished_tasks(self) -> list[int]:
        """Tasks whose boundary checkpoint exists, in order."""
        return sorted(int(p.stem.removeprefix("after_task_")) for p in self.ckpt_dir.glob("after_task_*.ckpt"))

    def restore(self, task: int) -> None:
        """Loads model, plugins, datamodule and run record from the boundary checkpoint of ``task``."""
        ckpt = load_checkpoint(self.boundary_ckpt(task))
        self.model.load_state_dict(ckpt["state_dict"])
        self.model.on_load_checkpoint(ckpt)
        states = ckpt.get("callbacks", {})
        for cb in [*self.model.plugins, self.record]:
            if cb.state_key in states:
                cb.load_state_dict(states[cb.state_key])
        dm_key = type(self.dm).__qualname__
        if dm_key in ckpt:
            self.dm.load_state_dict(ckpt[dm_key])

    def restore_latest(self) -> int:
        """Restores the newest readable boundary checkpoint and returns its task (-1: none); an unreadable one
        is reported by name and the one before it is used (its tasks are trained again)."""
        for task in reversed(self.finished_tasks()):
            try:
                self.restore(task)
                return task
            except CheckpointError as err:
                warnings.warn(f"{err}; resuming from the checkpoint before it", stacklevel=2)
        return -1

    def mid_task_checkpoint(self, task: int) -> Path | None:
        """Lightning's checkpoint inside ``task`` when there is a readable one."""
        path = self.task_ckpt_dir(task) / "last.ckpt"
        if not path.exists():
            return None
        try:
            load_checkpoint(path)
        except CheckpointError as err:
            warnings.warn(f"{err}; training task {task} again from its start", stacklevel=2)
            return None
        return path

    def save_boundary(self, trainer: L.Trainer, task: int) -> None:
        """Writes the task-boundary checkpoint atomically, then drops the task's mid-task checkpoints (and,
        with ``keep_checkpoints='last'``, the earlier boundaries: the newest is all a resume needs)."""
        tmp = self.boundary_ckpt(task).with_suffix(".tmp")
        trainer.save_checkpoint(tmp, weights_only=False)
        trainer.strategy.barrier()
        if trainer.is_global_zero:
            os.replace(tmp, self.boundary_ckpt(task))
            shutil.rmtree(self.task_ckpt_dir(task), ignore_errors=True)
            if self.keep_checkpoints == "last":
                for old in self.finished_tasks():
                    if old < task:
                        self.boundary_ckpt(old).unlink(missing_ok=True)
        trainer.strategy.barrier()

    # ------------------------------------------------------------------ the loop
    def run(self, resume: bool = False) -> dict[str, Any]:
        """Trains the tasks not finished yet (all, unless ``resume``) and writes the run's outputs."""
        with quiet_run():  # Lightning's per-Trainer lines and known warnings, for this run only (terminal.py)
            return self._run(resume)

    def _run(self, resume: bool) -> dict[str, Any]:
        T = self.info.num_tasks
        start = self.restore_latest() + 1 if resume else 0
        self.terminal.banner(self.method_name, self.info.name, self.info.scenario.value, T, self.seed, self.run_dir,
                             resumed_after=start - 1 if resume else None)
        trainer = None
        if self.record.baseline is None:  # scores of the untrained model, for FWT
            L.seed_everything(self.seed, verbose=False)
            trainer = self.make_trainer(0, train=False)
            self.record.baseline = self.evaluate(trainer)
        for t in range(start, T):
            L.seed_everything(self.seed + 1 + t, verbose=False)
            self.dm.set_task(t, cumulative=self.model.cumulative_data)
            self.model.current_task = t
            self.model.steps_before_task = self.record.steps
            trainer = self.make_trainer(t)
            mid_task = self.mid_task_checkpoint(t) if resume else None
            began = synchronized_clock()
            trainer.fit(self.model, datamodule=self.dm, ckpt_path=mid_task, weights_only=True)
            self.record.train_seconds += synchronized_clock() - began
            self.record.steps += trainer.global_step
            ari = self.record.finish_task(trainer)
            row = self.evaluate(trainer)
            self.record.rows.append(row)
            self.save_boundary(trainer, t)
            if trainer.is_global_zero:
                R = np.asarray(self.record.rows)
                log_task_row(self.loggers, t, row, self.metric_prefix, self.record.steps,
                             {"ACC_seen": float(np.mean(R[-1, : t + 1])), "ARI": ari})
                self.write_progress()
                self.terminal.task_line(t, T, self.info.tasks[t].name.rsplit("/", 1)[-1], row,
                                        self.info.is_regression, time.perf_counter() - began)
        if trainer is None:  # resumed a finished run
            trainer = self.make_trainer(T - 1, train=False)
        return self.finish(trainer)

    # ------------------------------------------------------------------ outputs
    @property
    def metric_prefix(self) -> str:
        return "mse" if self.info.is_regression else "acc"

    def write_progress(self) -> None:
        (self.run_dir / "progress.json").write_text(json.dumps(
            {"tasks_finished": len(self.record.rows), "num_tasks": self.info.num_tasks,
             "rows": self.record.rows}, indent=2))

    def metrics(self) -> dict[str, Any]:
        R = np.asarray(self.record.rows, dtype=float)
        higher = not self.info.is_regression
        return {
            "method": self.method_name,
            "benchmark": self.info.name,
            "scenario": self.info.scenario.value,
            "metric": "mse" if self.info.is_regression else "accuracy",
            "higher_is_better": higher,
            "tasks": [t.name for t in self.info.tasks],
            "R": R.tolist(),
            "baseline": self.record.baseline,
            **summarize(R, np.asarray(self.record.baseline), higher),
            "ARI": self.record.ari,
            "storage": self.model.storage(),
            "train_seconds": self.record.train_seconds,
            "eval_seconds": self.record.eval_seconds,
            "optimizer_steps": self.record.steps,
            "seed": self.seed,
        }

    def finish(self, trainer: L.Trainer) -> dict[str, Any]:
        metrics = self.metrics()
        if trainer.is_global_zero:
            names = [t.name for t in self.info.tasks]
            paths = write_run_files(self.run_dir, metrics, names)
            log_final(self.loggers, metrics, names, paths["png"], self.config)
            self.terminal.summary(metrics, names, paths)
        return metrics
