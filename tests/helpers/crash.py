"""A plugin that kills the run once at a chosen task and step, to test resuming."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from cl_lightning.callback import ContinualCallback


class CrashAt(ContinualCallback):
    """Dies at the start of training step ``step`` of task ``task``; ``marker`` makes it happen once.

    ``hard`` ends the process at once (like a kill); otherwise it raises, for in-process tests.
    """

    def __init__(self, task: int, step: int, marker: str, hard: bool = True):
        super().__init__()
        self.task, self.step, self.marker, self.hard = task, step, marker, hard

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if pl_module.current_task == self.task and trainer.global_step == self.step:
            if Path(self.marker).exists():
                return
            Path(self.marker).write_text("crashed")
            if self.hard:
                os._exit(3)
            raise RuntimeError("simulated crash")


class KillSweepAt(CrashAt):
    """Kills the parent process (a sweep) and then this run, once, at ``task``/``step`` of the run whose
    folder name contains ``run``: the state a sweep killed in the middle of one of its runs leaves."""

    def __init__(self, task: int, step: int, marker: str, run: str):
        super().__init__(task, step, marker, hard=True)
        self.run = run

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.run not in Path(os.environ.get("CL_LIGHTNING_RUN_DIR", "")).name:
            return
        if not Path(self.marker).exists() and pl_module.current_task == self.task and trainer.global_step == self.step:
            os.kill(os.getppid(), signal.SIGKILL)
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
