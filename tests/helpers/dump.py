"""A test plugin that saves, on every rank, what the EWC plugin computed at each task end."""

from __future__ import annotations

from pathlib import Path

import torch

from cl_lightning.callback import ContinualCallback
from cl_lightning.callbacks import EWC


class DumpEWCPrecision(ContinualCallback):
    """Runs after EWC (later in the plugin list) and writes its precision to ``folder``."""

    def __init__(self, folder: str):
        super().__init__()
        self.folder = folder

    def on_task_end(self, trainer, module, task_id: int) -> None:
        ewc = next(p for p in module.plugins if isinstance(p, EWC))
        Path(self.folder).mkdir(parents=True, exist_ok=True)
        torch.save({k: v.cpu() for k, v in ewc.precision.items()},
                   Path(self.folder) / f"rank{trainer.global_rank}_task{task_id}.pt")
