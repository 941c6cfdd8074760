"""The task loop on generated data: regression scores, validation, and resuming a finished run."""

from __future__ import annotations

import json

import lightning as L
import numpy as np

from cl_lightning.datamodules import PolynomialRegression
from cl_lightning.methods import ContinualModule
from cl_lightning.nets import MLP
from tests.helpers.run import run_tasks


def poly_method():
    L.seed_everything(0, verbose=False)
    return ContinualModule(MLP(hidden_sizes=[32, 32]), lr=1e-2)


def test_regression_fills_r_with_mse_and_validates_each_task(tmp_path):
    dm = PolynomialRegression(train_samples=40, val_fraction=0.25, batch_size=10)
    metrics = run_tasks(poly_method(), dm, tmp_path, max_epochs=30)
    R = np.asarray(metrics["R"])
    assert metrics["metric"] == "mse" and metrics["higher_is_better"] is False
    assert R.shape == (3, 3) and (R >= 0).all()
    assert np.diag(R).mean() < np.asarray(metrics["baseline"]).mean(), "training lowers the error of each task"
    assert metrics["forgetting"] > 0, "fine-tuning a shared output forgets the earlier polynomials"
    assert len(dm.split(0, "val")) == 10 and len(dm.split(0, "train")) == 30


def test_resuming_a_finished_run_changes_nothing(tmp_path):
    first = run_tasks(poly_method(), PolynomialRegression(), tmp_path, max_epochs=5)
    written = json.loads((tmp_path / "metrics.json").read_text())
    again = run_tasks(poly_method(), PolynomialRegression(), tmp_path, resume=True, max_epochs=5)
    assert again["R"] == first["R"] == written["R"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "after_task_0.ckpt", "after_task_1.ckpt", "after_task_2.ckpt"]
