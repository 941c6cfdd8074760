"""A test plugin that saves, on every rank, SI's importance and the replay model's task-0 images at each task end."""

from __future__ import annotations

from pathlib import Path

import torch

from cl_lightning.callback import ContinualCallback
from cl_lightning.callbacks import SI


class DumpReplayState(ContinualCallback):
    """Runs after SI (later in the plugin list) and writes what it and the generator hold to ``folder``."""

    def __init__(self, folder: str):
        super().__init__()
        self.folder = folder

    def on_task_end(self, trainer, module, task_id: int) -> None:
        si = next(p for p in module.plugins if isinstance(p, SI))
        z = torch.randn(16, module.latent_dim, generator=torch.Generator().manual_seed(0)).to(module.device)
        state = {f"si/{k}": v.cpu() for k, v in si.importance.items()}
        state["images/task0"] = module.generate_inputs(0, z).cpu()
        Path(self.folder).mkdir(parents=True, exist_ok=True)
        torch.save(state, Path(self.folder) / f"rank{trainer.global_rank}_task{task_id}.pt")
