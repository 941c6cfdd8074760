"""Runs the ARI learner on generated blobs with 1 or 2 CPU processes and saves, per rank, the buffer S,
the estimator and the knowledge base after the last task (used by tests/test_ari.py).

    python tests/helpers/ari_ddp.py <run_dir> <devices>
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from cl_lightning.callback import ContinualCallback  # noqa: E402
from cl_lightning.callbacks import ARIConsolidation  # noqa: E402
from cl_lightning.runner import ContinualRunner  # noqa: E402
from tests.helpers.ari_learner import blobs, small_learner  # noqa: E402


class DumpARIState(ContinualCallback):
    def __init__(self, folder: str):
        super().__init__()
        self.folder = folder

    def on_task_end(self, trainer, module, task_id: int) -> None:
        plugin = next(p for p in module.plugins if isinstance(p, ARIConsolidation))
        state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()
                 if k.startswith(("knowledge_base", "estimator", "kb_"))}
        state.update({"S_ari": plugin.ari, "S_param": plugin.param_sigs, "S_task": plugin.task_sigs})
        torch.save(state, Path(self.folder) / f"rank{trainer.global_rank}_task{task_id}.pt")


def main() -> None:
    run_dir, devices = Path(sys.argv[1]), int(sys.argv[2])
    run_dir.mkdir(parents=True, exist_ok=True)
    model = small_learner(extra_plugins=[DumpARIState(str(run_dir))])
    kwargs = {"accelerator": "cpu", "devices": devices, "max_epochs": 1, "enable_progress_bar": False}
    if devices > 1:
        kwargs["strategy"] = "ddp"
    ContinualRunner(model, blobs(), run_dir, trainer_kwargs=kwargs, seed=0).run()


if __name__ == "__main__":
    main()
