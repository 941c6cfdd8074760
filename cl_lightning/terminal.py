"""What a run tells its terminal: a banner, one line per task, the matrix and the summary at the end.

A run builds one Lightning ``Trainer`` per task, so everything Lightning prints per Trainer would come
back at every task. :func:`quiet_run` is the context the runner trains in: the device lines once per
run, Lightning's per-fit notices and known dependency deprecation warnings not at all, the filters
removed again when the run ends (nothing is filtered at import). On a terminal the progress bar is
Lightning's tqdm bar titled with the task; when stdout is not a terminal (CI, ``nohup``, a cluster log)
a redrawn bar would write a frame per step into the log, so :class:`EpochLines` writes a line per epoch.
Only rank 0 prints.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ProgressBar, TQDMProgressBar

from cl_lightning.outputs import short_task_names

#: Lightning's loggers whose per-Trainer lines are filtered during a run.
LIGHTNING_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
                     "lightning.pytorch.accelerators.cuda")
#: Printed by every Trainer: let through once per run.
ONCE_PER_RUN = ("GPU available:", "TPU available:", "HPU available:", "LOCAL_RANK:")
#: Printed by every Trainer or fit, and said better by the run's own lines (or not actionable): dropped.
NEVER = ("The following callbacks returned in `LightningModule.configure_callbacks`", "💡 Tip",
         "`Trainer.fit` stopped:")
#: (message regex, category) of warnings that every run would print and nobody can act on.
KNOWN_WARNINGS: tuple[tuple[str, type[Warning]], ...] = (
    # torch >= 2.10 deprecates LeafSpec; Lightning's own _pytree.py still checks for it
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning),
    # tensors already in memory need no loader workers
    (r".*does not have many workers", UserWarning),
    # per-task checkpoint folders are reused on resume
    (r".*exists and is not empty", UserWarning),
    # a benchmark without a validation split
    (r".*Total length of `list` across ranks is zero", UserWarning),
    # frozen modules kept in eval mode on purpose (MARK's trained feature extractors, frozen backbones)
    (r".*module\(s\) in eval mode at the start of training", UserWarning),
    # GDumb skips the stream's steps on purpose (it trains from its memory at the task end)
    (r".*`training_step` returned `None`", UserWarning),
)


class _RunLogFilter(logging.Filter):
    """Drops :data:`NEVER` and repeats of :data:`ONCE_PER_RUN` (a new filter per run, so each run says it once)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.msg)
        if msg.startswith(NEVER):
            return False
        if msg.startswith(ONCE_PER_RUN):
            if msg in self.seen:
                return False
            self.seen.add(msg)
        return True


@contextlib.contextmanager
def quiet_run() -> Iterator[None]:
    """The filters of one run: installed on entry, removed (and the warning filters restored) on exit."""
    log_filter = _RunLogFilter()
    loggers = [logging.getLogger(name) for name in LIGHTNING_LOGGERS]
    with warnings.catch_warnings():
        for message, category in KNOWN_WARNINGS:
            warnings.filterwarnings("ignore", message, category)
        for logger in loggers:
            logger.addFilter(log_filter)
        try:
            yield
        finally:
            for logger in loggers:
                logger.removeFilter(log_filter)


def is_terminal(stream: Any = None) -> bool:
    stream = sys.stdout if stream is None else stream
    return bool(getattr(stream, "isatty", lambda: False)())


def _metrics_without_version(bar: ProgressBar, trainer: L.Trainer, module: L.LightningModule) -> dict[str, Any]:
    items = ProgressBar.get_metrics(bar, trainer, module)
    items.pop("v_num", None)  # the logger's version: the same on every step of every task
    return items


class TaskProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar (for a terminal), titled with the task (``Task 2/5 · Epoch 0``), without ``v_num``."""

    def __init__(self, task: int, num_tasks: int, refresh_rate: int = 1):
        super().__init__(refresh_rate=refresh_rate)
        self.task, self.num_tasks = task, num_tasks

    def on_train_epoch_start(self, trainer: L.Trainer, *args: Any) -> None:
        super().on_train_epoch_start(trainer, *args)
        title = f"Task {self.task + 1}/{self.num_tasks} · Epoch {trainer.current_epoch}"
        self.train_progress_bar.set_description(title)

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        return _metrics_without_version(self, trainer, pl_module)


class EpochLines(ProgressBar):
    """The progress bar for a log file: one line at the end of each training epoch (steps so far, the epoch's
    mean training loss with penalties, values logged to the bar, time), nothing per step or while testing."""

    def __init__(self, task: int, num_tasks: int, stream: Any = None):
        super().__init__()
        self.task, self.num_tasks = task, num_tasks
        self.stream = stream
        self.enabled = True
        self._began = 0.0
        self._loss_sum: Any = 0.0
        self._losses = self._batches = 0

    def disable(self) -> None:
        self.enabled = False

    def enable(self) -> None:
        self.enabled = True

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._began = time.perf_counter()
        self._loss_sum, self._losses, self._batches = 0.0, 0, 0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, *args: Any) -> None:
        self._batches += 1
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is not None:  # summed on the device: no synchronisation per step
            self._loss_sum = self._loss_sum + loss.detach()
            self._losses += 1

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # a fit resumed from an epoch-end checkpoint ends that epoch again without running it: no line for it
        if not self.enabled or not self._batches:
            return
        epochs = trainer.max_epochs if trainer.max_epochs is not None and trainer.max_epochs >= 0 else None
        epoch = f"epoch {trainer.current_epoch + 1}" + (f"/{epochs}" if epochs and trainer.max_steps < 0 else "")
        values = [f"{k} {format_number(v)}" for k, v in self.get_metrics(trainer, pl_module).items()
                  if isinstance(v, (int, float)) or hasattr(v, "item")]
        loss = [f"loss {format_number(self._loss_sum / self._losses)}"] if self._losses else []
        parts = [f"Task {self.task + 1}/{self.num_tasks}", epoch, f"step {trainer.global_step}", *loss, *values,
                 f"{time.perf_counter() - self._began:.1f} s"]
        print("  " + " · ".join(parts), file=self.stream or sys.stdout, flush=True)

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        return _metrics_without_version(self, trainer, pl_module)


def progress_callback(task: int, num_tasks: int) -> ProgressBar:
    """The bar on a terminal, a line per epoch otherwise."""
    return TaskProgressBar(task, num_tasks) if is_terminal() else EpochLines(task, num_tasks)


def format_number(value: Any) -> str:
    value = float(value.item() if hasattr(value, "item") else value)
    if value == 0 or not math.isfinite(value):
        return f"{value:g}"
    return f"{value:.4f}" if 1e-3 <= abs(value) < 1e4 else f"{value:.3e}"


class Terminal:
    """The run's own lines on stdout (rank 0 only; the others print nothing)."""

    def __init__(self, enabled: bool = True, stream: Any = None):
        self.enabled = enabled
        self.stream = stream

    def print(self, text: str = "") -> None:
        if self.enabled:
            print(text, file=self.stream or sys.stdout, flush=True)

    # ------------------------------------------------------------------ the three moments of a run
    def banner(self, method: str, benchmark: str, scenario: str, num_tasks: int, seed: int, run_dir: Path,
               resumed_after: int | None = None) -> None:
        """``HNET on split_mnist (task-IL) · 5 tasks · seed 0`` and the run folder; on a resume, where it resumes."""
        head = f"{method} on {benchmark} ({scenario}-IL) · {num_tasks} tasks · seed {seed}"
        self.print(f"== {head}")
        self.print(f"   run folder: {run_dir}")
        if resumed_after is not None:
            if resumed_after < 0:
                self.print("   resumed: no task had finished, starting at task 1")
            elif resumed_after + 1 >= num_tasks:
                self.print(f"   resumed after task {resumed_after + 1}: every task has finished")
            else:
                self.print(f"   resumed after task {resumed_after + 1} of {num_tasks}")

    def task_line(self, task: int, num_tasks: int, name: str, row: Sequence[float], regression: bool,
                  seconds: float) -> None:
        """``Task 2/5 (2-3) done · acc 99.41 · mean over seen tasks 99.60 · 12.3 s`` (MSE for regression)."""
        seen = [float(v) for v in row[: task + 1]]
        mean = sum(seen) / len(seen)
        score = f"MSE {format_score(row[task], True)} · mean MSE over seen tasks {format_score(mean, True)}" \
            if regression else f"acc {format_score(row[task], False)} · mean acc over seen tasks " \
                               f"{format_score(mean, False)}"
        self.print(f"Task {task + 1}/{num_tasks} ({name}) done · {score} · {seconds:.1f} s")

    def summary(self, metrics: dict[str, Any], task_names: list[str], paths: dict[str, Path] | None) -> None:
        """The matrix as a table, the summary metrics rounded, and where the heatmap and metrics.json are."""
        regression = metrics["metric"] != "accuracy"
        self.print()
        self.print(matrix_table(metrics["R"], task_names, regression))
        self.print(summary_line(metrics))
        if paths:
            self.print(f"heatmap: {paths['png']}")
            self.print(f"metrics: {paths['json']}")


def format_score(value: float | None, regression: bool) -> str:
    """Accuracy in percent with 2 decimals; MSE with 3 significant digits."""
    if value is None:
        return "-"
    return f"{value:.3g}" if regression else f"{100 * value:.2f}"


#: Above this many tasks the table shows only the last row (the whole matrix is in accuracy_matrix.csv).
MAX_TABLE_TASKS = 12


def matrix_table(R: Sequence[Sequence[float]], task_names: list[str], regression: bool) -> str:
    """R as a small text table: a row per finished task, a column per task (% or MSE)."""
    T = len(R[0]) if R else len(task_names)
    names = short_task_names(task_names, T)
    what = "MSE" if regression else "accuracy (%)"
    rows = list(enumerate(R))
    head = f"{what}, row: after training task, column: evaluated on task"
    if T > MAX_TABLE_TASKS:
        rows = rows[-1:]
        head += " (last row only; the whole matrix is in accuracy_matrix.csv)"
    cells = [["after"] + names] + [[names[i]] + [format_score(v, regression) for v in row] for i, row in rows]
    widths = [max(len(r[j]) for r in cells) for j in range(len(cells[0]))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join([head, *lines])


def summary_line(metrics: dict[str, Any]) -> str:
    """``ACC 99.12 · BWT -0.31 · FWT ... · forgetting 0.35 · learning acc 99.40 · ARI 0.912 · 45.2 s`` (% points
    for accuracy; MSE and its differences as they are for regression)."""
    regression = metrics["metric"] != "accuracy"

    def pts(value: float | None) -> str:  # a difference of scores
        if value is None:
            return "-"
        return f"{value:+.3g}" if regression else f"{100 * value:+.2f}"

    aris = [a for a in metrics.get("ARI") or [] if a is not None]
    parts = [f"{'MSE' if regression else 'ACC'} {format_score(metrics['ACC'], regression)}",
             f"BWT {pts(metrics.get('BWT'))}", f"FWT {pts(metrics.get('FWT'))}",
             f"forgetting {pts(metrics.get('forgetting')).lstrip('+')}",
             f"{'learning MSE' if regression else 'learning acc'} "
             f"{format_score(metrics.get('learning_accuracy'), regression)}"]
    if aris:
        parts.append(f"mean ARI {sum(aris) / len(aris):.3f}")
    parts.append(f"train {metrics.get('train_seconds', 0.0):.1f} s")
    return " · ".join(parts)
