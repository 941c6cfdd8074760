"""A test-only plugin that SIGKILLs its own ``train.py`` process at named points of a run, once each.

Points: ``baseline`` (the untrained model's evaluation), ``mid_epoch@T`` (a step in the last epoch of
task T, after an epoch-end checkpoint; with a step budget, in its second epoch), ``train_end@T`` (after
the plugins' end-of-task work, before the row of R is evaluated and the boundary checkpoint written),
``row_eval@T`` (evaluating the row after task T), ``checkpoint@T`` (while the boundary checkpoint of task T
is being dumped) and ``finish`` (after the last boundary checkpoint, before the run's files are written).
A point may name the signal to send instead of SIGKILL: ``mid_epoch@1:SIGTERM``. Put it last in the
method's plugins so the other plugins' hooks of the same event run before it. A file per point in
``marker_dir`` makes each fire once.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import yaml

import cl_lightning.runner as runner
from cl_lightning.callback import ContinualCallback
from tests.helpers.run import REPO


class KillAt(ContinualCallback):
    def __init__(self, points: list[str], marker_dir: str):
        super().__init__()
        self.marker_dir = Path(marker_dir)
        self.signals = {p.split(":")[0]: signal.Signals[p.split(":")[1]] if ":" in p else signal.SIGKILL
                        for p in points}
        if "finish" in self.signals:
            write = runner.write_run_files

            def kill_then_write(*args, **kwargs):
                self._kill("finish")
                return write(*args, **kwargs)

            runner.write_run_files = kill_then_write

    def _kill(self, point: str) -> None:
        if point not in self.signals or (self.marker_dir / point).exists():
            return
        self.marker_dir.mkdir(parents=True, exist_ok=True)
        (self.marker_dir / point).write_text("killed")
        os.kill(os.getpid(), self.signals[point])

    def on_test_batch_start(self, trainer, pl_module, *args) -> None:
        if self.task_started == -1:
            self._kill("baseline")
        else:
            self._kill(f"row_eval@{self.task_finished}")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        last = trainer.max_epochs - 1 if trainer.max_epochs and trainer.max_epochs > 0 else 1  # step budget: 2nd
        if trainer.current_epoch == last and batch_idx == 1:
            self._kill(f"mid_epoch@{pl_module.current_task}")

    def on_task_end(self, trainer, module, task_id) -> None:
        self._kill(f"train_end@{task_id}")

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        if self.task_finished == pl_module.current_task:  # the boundary checkpoint, not an epoch-end one
            self._kill(f"checkpoint@{pl_module.current_task}")


def with_killer(method: str, points: list[str], marker_dir) -> str:
    """The method's plugin list with the killer appended, as one override."""
    node = yaml.safe_load((REPO / "configs" / "method" / f"{method}.yaml").read_text())
    plugins = list(node["init_args"].get("plugins") or [])
    plugins.append({"class_path": "tests.helpers.kill.KillAt",
                    "init_args": {"points": points, "marker_dir": str(marker_dir)}})
    return "method.plugins=" + json.dumps(plugins)
