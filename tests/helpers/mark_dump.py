"""A plugin that saves MARK's state at every task end (per rank), to compare runs and DDP ranks in tests."""

from __future__ import annotations

from pathlib import Path

import torch

from cl_lightning.callback import ContinualCallback


class DumpMARKState(ContinualCallback):
    """Writes ``rank<r>_task<t>.pt``: the KB and every task's F/M/C parameters after task t.
    Without a folder it keeps the snapshots in memory (``snapshots[t]``)."""

    def __init__(self, folder: str | None = None):
        super().__init__()
        self.folder = folder
        self.snapshots: dict[int, dict[str, torch.Tensor]] = {}

    def on_task_end(self, trainer, module, task_id: int) -> None:
        state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
        if self.folder is None:
            self.snapshots[task_id] = state
            return
        Path(self.folder).mkdir(parents=True, exist_ok=True)
        torch.save(state, Path(self.folder) / f"rank{trainer.global_rank}_task{task_id}.pt")
