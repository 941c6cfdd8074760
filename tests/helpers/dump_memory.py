"""A test plugin that saves, on every rank, the contents of the other plugins' rehearsal memories at each task end."""

from __future__ import annotations

from pathlib import Path

import torch

from cl_lightning.callback import ContinualCallback
from cl_lightning.callbacks.rehearsal import RehearsalPlugin


class DumpMemory(ContinualCallback):
    """Runs after the rehearsal plugins (later in the plugin list) and writes their memories to ``folder``."""

    def __init__(self, folder: str):
        super().__init__()
        self.folder = folder

    def on_task_end(self, trainer, module, task_id: int) -> None:
        Path(self.folder).mkdir(parents=True, exist_ok=True)
        memories = {f"{i}_{type(p).__name__}": {k: v.cpu() for k, v in p.memory.data.items()}
                    for i, p in enumerate(module.plugins) if isinstance(p, RehearsalPlugin)}
        torch.save(memories, Path(self.folder) / f"rank{trainer.global_rank}_task{task_id}.pt")
