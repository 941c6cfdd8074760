"""What the benchmark scripts share: where the MNIST files are, and a config run to its metrics with its wall time."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def data_dir() -> str:
    """``CL_DATA_DIR``, else the shared data next to the repository, else ``./data`` (downloaded there)."""
    for candidate in (os.environ.get("CL_DATA_DIR"), REPO.parent / "shared" / "data", REPO / "data"):
        if candidate and (Path(candidate) / "MNIST" / "raw" / "train-images-idx3-ubyte").exists():
            return str(candidate)
    return "./data"


def timed_run(cfg: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    """Builds and runs a composed config in a throw-away run folder: (metrics with ``wall_seconds``, model)."""
    from cl_lightning.experiment import build
    from cl_lightning.runner import ContinualRunner

    model, dm = build(cfg)
    with tempfile.TemporaryDirectory() as run_dir:
        runner = ContinualRunner(model, dm, run_dir, trainer_kwargs=cfg["trainer"], seed=cfg["seed"])
        began = time.perf_counter()
        metrics = runner.run()
        metrics["wall_seconds"] = time.perf_counter() - began
    return metrics, model
