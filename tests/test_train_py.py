"""``python train.py``, as a user runs it: the default experiment on real MNIST writes every output,
and W&B never stops a run."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import numpy as np
import torch
import yaml

from cl_lightning.run_dir import child_run_environment
from tests.helpers.run import REPO


def train(tmp_path, *overrides, env=None, timeout=600):
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), *overrides], cwd=tmp_path, capture_output=True,
                          text=True, timeout=timeout, env={**child_run_environment(os.environ), **(env or {})})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def wandb_run_files(run_dir):
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert runs, "no offline W&B run was written"
    return runs[-1]


def test_default_experiment_writes_every_output(mnist_root, tmp_path):
    """The default experiment (HNET on Split-MNIST task-IL), unchanged but for where it writes and one epoch
    per task instead of its five (the suite's time; its composition: tests/test_default_run.py)."""
    out = tmp_path / "run"
    proc = train(tmp_path, f"output_dir={out}", "trainer.log_every_n_steps=20", "trainer.max_epochs=1",
                 env={"CL_DATA_DIR": str(mnist_root)})
    assert "ACC" in proc.stdout
    assert "Task 1/5" in proc.stdout and "Task 5/5" in proc.stdout  # the progress bar names the task

    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["method_name"] == "hnet" and config["benchmark_name"] == "split_mnist"
    metrics = json.loads((out / "metrics.json").read_text())
    R = np.asarray(metrics["R"])
    assert R.shape == (5, 5)
    assert metrics["ACC"] > 0.9, "HNET on task-IL Split-MNIST should keep all five tasks"
    for key in ("BWT", "FWT", "forgetting", "learning_accuracy", "baseline", "storage"):
        assert metrics[key] is not None
    assert metrics["storage"]["plugin_OutputRegularizer"] > 0  # the stored targets are counted
    assert len(metrics["ARI"]) == 5 and all(0 < a <= 1 for a in metrics["ARI"])  # adaptation per task

    rows = list(csv.reader((out / "accuracy_matrix.csv").open()))
    assert rows[0][0] == "after_task" and len(rows) == 6
    np.testing.assert_allclose(np.asarray(rows[1:])[:, 1:].astype(float), R, atol=1e-6)
    assert (out / "accuracy_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for t in range(5):
        ckpt = torch.load(out / "checkpoints" / f"after_task_{t}.ckpt", map_location="cpu", weights_only=False)
        assert ckpt["continual"]["current_task"] == t and "RunRecord" in ckpt["callbacks"]

    # W&B (offline) holds the per-task accuracies, the CL metrics, the loss curve and the matrix table
    run = wandb_run_files(out)
    log = next(run.glob("*.wandb")).read_bytes()
    for key in (b"acc/task_0", b"acc/task_4", b"cl/ACC", b"cl/BWT", b"cl/FWT", b"cl/ARI", b"train/loss", b"task"):
        assert key in log, key
    assert json.dumps(metrics["ACC"]).encode() in log
    table = json.loads(next(run.glob("files/media/table/accuracy_matrix*.json")).read_text())
    np.testing.assert_allclose(np.asarray([r[1:] for r in table["data"]], dtype=float), R)
    assert list(run.glob("files/media/images/accuracy_matrix_heatmap*.png"))


def test_unreachable_wandb_server_falls_back_to_offline(mnist_root, tmp_path):
    out = tmp_path / "run"
    proc = train(tmp_path, f"output_dir={out}", f"data_dir={mnist_root}", "logger.offline=false",
                 "benchmark.num_tasks=2", "benchmark.train_samples_per_task=200", "trainer.enable_progress_bar=false",
                 env={"WANDB_BASE_URL": "http://127.0.0.1:9", "WANDB_API_KEY": "0" * 40, "WANDB_INIT_TIMEOUT": "5",
                      "WANDB_MODE": "online"}, timeout=300)
    assert "logging offline" in proc.stderr
    assert (out / "metrics.json").exists()
    assert b"acc/task_1" in next(wandb_run_files(out).glob("*.wandb")).read_bytes()


def test_wandb_without_login_never_prompts_in_a_terminal_and_a_resume_keeps_the_run_id(mnist_root, tmp_path):
    """In a terminal with no W&B login, wandb would ask `Enter your choice:` and wait forever: the run must
    go offline at once, say so once, and a resume must continue the same W&B run id."""
    import pty

    out = tmp_path / "run"
    env = {**child_run_environment(os.environ), "HOME": str(tmp_path), "WANDB_MODE": "online",
           "WANDB_CONFIG_DIR": str(tmp_path / "cfg")}
    env.pop("WANDB_API_KEY", None)
    primary, secondary = pty.openpty()
    try:
        proc = subprocess.run([sys.executable, str(REPO / "train.py"), f"output_dir={out}", f"data_dir={mnist_root}",
                               "logger.offline=false", "benchmark.num_tasks=2", "benchmark.train_samples_per_task=200",
                               "trainer.enable_progress_bar=false"], cwd=tmp_path, stdin=secondary,
                              capture_output=True, text=True, timeout=300, env=env)
    finally:
        os.close(primary)
        os.close(secondary)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("no W&B login") == 1 and "logging offline" in proc.stderr
    first = wandb_run_files(out)
    resumed = train(tmp_path, f"resume={out}", "logger.offline=true", env={"HOME": str(tmp_path)})
    assert "ACC" in resumed.stdout
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and {r.name.rsplit("-", 1)[-1] for r in runs} == {first.name.rsplit("-", 1)[-1]}
