"""A run killed at any point and resumed ends with the same accuracy matrix as an uninterrupted one."""

from __future__ import annotations

import csv
import json

import lightning as L
import numpy as np
import pytest

from cl_lightning.callbacks import EWC
from cl_lightning.datamodules import SplitMNIST
from cl_lightning.methods import ContinualModule
from cl_lightning.nets import MLP
from tests.helpers.crash import CrashAt
from tests.helpers.launch import train_process
from tests.helpers.run import run_tasks


def make(root, marker, crash_task, crash_step):
    L.seed_everything(0, verbose=False)
    model = ContinualModule(MLP(hidden_sizes=[64]), lr=1e-3,
                            plugins=[EWC(strength=100, fisher_samples=200),
                                     CrashAt(crash_task, crash_step, str(marker), hard=False)])
    return model, SplitMNIST(data_dir=str(root), train_samples_per_task=300, batch_size=64)


def test_resume_inside_a_task_matches_an_uninterrupted_run(mnist_root, tmp_path):
    marker = tmp_path / "crashed"
    marker.write_text("never crash")
    reference = run_tasks(*make(mnist_root, marker, 2, 7), tmp_path / "ref", max_epochs=2)

    marker.unlink()  # this time: crash in the second epoch of task 2 (5 steps per epoch)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_tasks(*make(mnist_root, marker, 2, 7), tmp_path / "run", max_epochs=2)
    assert (tmp_path / "run/checkpoints/after_task_1.ckpt").exists()
    assert (tmp_path / "run/checkpoints/task_2/last.ckpt").exists()
    resumed = run_tasks(*make(mnist_root, marker, 2, 7), tmp_path / "run", resume=True, max_epochs=2)

    np.testing.assert_allclose(resumed["R"], reference["R"], rtol=0, atol=1e-6)
    assert resumed["optimizer_steps"] == reference["optimizer_steps"]


def test_killed_after_a_task_and_resumed_with_train_py(mnist_root, tmp_path):
    marker = tmp_path / "crashed"
    plugins = ("method.plugins=[{class_path: cl_lightning.callbacks.EWC, "
               "init_args: {strength: 100, fisher_samples: 200}}, "
               f"{{class_path: tests.helpers.crash.CrashAt, init_args: {{task: 3, step: 0, marker: '{marker}'}}}}]")
    common = ["method=ewc", f"data_dir={mnist_root}", "logger=csv", plugins,
              "method.backbone.hidden_sizes=[64]", "benchmark.train_samples_per_task=300",
              "trainer.enable_progress_bar=false",
              "trainer.log_every_n_steps=1"]

    def train(*extra):
        return train_process(common + list(extra))

    marker.write_text("never crash")
    assert train(f"output_dir={tmp_path / 'ref'}").returncode == 0
    marker.unlink()
    killed = train(f"output_dir={tmp_path / 'run'}")
    assert killed.returncode == 3, killed.stderr[-2000:]  # died at the first step of task 3
    assert not (tmp_path / "run/metrics.json").exists()
    assert json.loads((tmp_path / "run/progress.json").read_text())["tasks_finished"] == 3
    resumed = train(f"resume={tmp_path / 'run'}")
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    ref = json.loads((tmp_path / "ref/metrics.json").read_text())
    got = json.loads((tmp_path / "run/metrics.json").read_text())
    np.testing.assert_allclose(got["R"], ref["R"], rtol=0, atol=1e-6)
    # the CSV log keeps the part before the kill and continues on one monotonic step axis
    parts = sorted((tmp_path / "run/csv").glob("part_*/metrics.csv"))
    assert len(parts) == 2
    rows = [row for part in parts for row in csv.DictReader(part.open())]
    tasks = [float(r["task"]) for r in rows if r.get("acc/task_0")]
    assert tasks == [0.0, 1.0, 2.0, 3.0, 4.0]
    steps = [float(r["step"]) for r in rows if r.get("step")]
    assert steps == sorted(steps)
