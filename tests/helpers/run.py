"""Running the task loop in tests: in-process on small data (``run_tasks``) or as ``python train.py`` (``train_py``),
and where the real MNIST files are."""

from __future__ import annotations

import json
import os
from pathlib import Path

from cl_lightning.runner import ContinualRunner
from tests.helpers.launch import REPO, train_process


def find_mnist_root() -> Path | None:
    for candidate in (os.environ.get("CL_DATA_DIR"), REPO.parent / "shared" / "data", REPO / "data"):
        if candidate and (Path(candidate) / "MNIST" / "raw" / "train-images-idx3-ubyte").exists():
            return Path(candidate)
    return None


def run_tasks(model, datamodule, run_dir, seed: int = 0, resume: bool = False, **trainer) -> dict:
    """Runs the whole task loop in-process on CPU without loggers or progress bars."""
    kwargs = {"accelerator": "cpu", "devices": 1, "max_epochs": 1, "enable_progress_bar": False,
              "log_every_n_steps": 10, **trainer}
    return ContinualRunner(model, datamodule, run_dir, trainer_kwargs=kwargs, seed=seed).run(resume=resume)


def train_py(args: list[str], out: Path, mnist_root: Path | None = None, threads: int | None = None) -> dict:
    """``python train.py ARGS`` on CPU without logger or progress bar, writing to ``out``; returns the run's
    ``metrics.json``. With ``mnist_root``: on 2 tasks of 512 MNIST images from there, in batches of 64.
    ``threads``: torch's CPU threads (Lightning's DDP gives each of 2 processes one thread on this 2-core
    machine, so a one-process run compared with DDP bit for bit needs ``threads=1``: float summation order
    depends on the thread count)."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    mnist: list[str] = []
    if mnist_root is not None:
        env["CL_DATA_DIR"] = str(mnist_root)
        mnist = ["benchmark.num_tasks=2", "benchmark.train_samples_per_task=512", "benchmark.batch_size=64",
                 "benchmark.eval_batch_size=500"]
    proc = train_process([*args, *mnist, "logger=none", "trainer.accelerator=cpu",
                          "trainer.enable_progress_bar=false", f"output_dir={out}"], env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "metrics.json").read_text())
