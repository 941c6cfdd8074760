"""A resume continues exactly the run it names: it refuses overrides that change what the saved checkpoints
mean, survives an unreadable checkpoint, and a run stopped by SIGTERM/SIGINT says how to continue."""

from __future__ import annotations

import json
import os
import re
import warnings

import lightning as L
import numpy as np
import pytest
import yaml

from cl_lightning.callbacks import EWC
from cl_lightning.config import ConfigError, compose
from cl_lightning.datamodules import PermutedMNIST
from cl_lightning.experiment import resolve_config
from cl_lightning.methods import ContinualModule
from cl_lightning.nets import MLP
from tests.helpers.kill import with_killer
from tests.helpers.launch import train_process
from tests.helpers.run import run_tasks


@pytest.fixture
def saved_run(tmp_path):
    """A run folder holding only the config an EWC run saved (resolving a resume reads nothing else)."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = compose(["method=ewc", "benchmark=permuted_mnist", "benchmark.num_tasks=3", "seed=5"])
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return run_dir


@pytest.mark.parametrize(("override", "named"), [
    ("method=finetune", "method=finetune differs from the run's method=ewc"),
    ("benchmark=split_mnist", "benchmark=split_mnist differs"),
    ("benchmark.num_tasks=5", "benchmark.num_tasks=5 differs from the saved benchmark.num_tasks=3"),
    ("method.plugins.EWC.strength=5", "method.plugins.EWC.strength=5 differs"),
    ("seed=1", "seed=1 differs from the saved seed=5"),
    ("trainer.max_epochs=3", "trainer.max_epochs=3 differs"),
])
def test_resume_refuses_what_changes_the_run(saved_run, override, named):
    with pytest.raises(ConfigError, match="resume=") as info:
        resolve_config([f"resume={saved_run}", override])
    assert named in str(info.value)


def test_resume_allows_logging_devices_and_data_root(saved_run, tmp_path):
    cfg = resolve_config([f"resume={saved_run}", "logger=none", "trainer.enable_progress_bar=false",
                          "trainer.devices=2", "trainer.strategy=ddp", f"data_dir={tmp_path}"])
    assert cfg["logger"] is None and cfg["resume"] == str(saved_run) and cfg["output_dir"] == str(saved_run)


def test_resume_needs_a_folder(saved_run, tmp_path):
    with pytest.raises(ConfigError, match="needs the folder"):
        resolve_config(["resume="])
    with pytest.raises(ConfigError, match="continues in its own folder"):
        resolve_config([f"resume={saved_run}", f"output_dir={tmp_path / 'other'}"])


def make(root):
    L.seed_everything(0, verbose=False)
    model = ContinualModule(MLP(hidden_sizes=[32]), lr=1e-3, plugins=[EWC(strength=100, fisher_samples=100)])
    return model, PermutedMNIST(num_tasks=3, data_dir=str(root), train_samples_per_task=128, batch_size=64)


def test_an_unreadable_boundary_checkpoint_is_named_and_the_one_before_used(mnist_root, tmp_path):
    reference = run_tasks(*make(mnist_root), tmp_path / "ref")
    run_tasks(*make(mnist_root), tmp_path / "run")
    last = tmp_path / "run/checkpoints/after_task_2.ckpt"
    last.write_bytes(last.read_bytes()[:1000])  # what a disk failure would leave
    (tmp_path / "run/metrics.json").unlink()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed = run_tasks(*make(mnist_root), tmp_path / "run", resume=True)
    assert any(str(last) in str(w.message) and "cannot be read" in str(w.message) for w in caught)
    np.testing.assert_allclose(resumed["R"], reference["R"], rtol=0, atol=1e-6)


def test_keep_last_leaves_only_the_newest_boundary(mnist_root, tmp_path):
    from cl_lightning.runner import ContinualRunner

    model, dm = make(mnist_root)
    ContinualRunner(model, dm, tmp_path / "run", keep_checkpoints="last",
                    trainer_kwargs={"accelerator": "cpu", "max_epochs": 1, "enable_progress_bar": False}).run()
    assert sorted(p.name for p in (tmp_path / "run/checkpoints").iterdir()) == ["after_task_2.ckpt"]


@pytest.mark.slow
@pytest.mark.parametrize("budget", [["trainer.max_epochs=2"], ["trainer.max_epochs=-1", "trainer.max_steps=6"]],
                         ids=["epochs", "steps"])
def test_sigterm_and_sigint_leave_a_resumable_run_that_says_how(budget, mnist_root, tmp_path):
    # a step budget resumes through another path of Lightning's loop (the saved epoch is ended again)
    common = ["method=ewc", "benchmark=permuted_mnist", "benchmark.num_tasks=2", "benchmark.train_samples_per_task=128",
              "benchmark.batch_size=64", "method.backbone.hidden_sizes=[32]", "method.plugins.EWC.fisher_samples=100",
              *budget, "logger=none"]  # the bar: one line per epoch, stdout is no terminal
    env = {**os.environ, "CL_DATA_DIR": str(mnist_root), "PYTHONWARNINGS": "ignore"}

    def train(*args):
        return train_process(list(args), env)

    ref = train(with_killer("ewc", [], tmp_path / "never"), *common, f"output_dir={tmp_path / 'ref'}")
    assert ref.returncode == 0, ref.stderr[-2000:]
    run_dir = tmp_path / "run"
    points = ["mid_epoch@1:SIGTERM", "train_end@0:SIGINT"]
    first = train(with_killer("ewc", points, tmp_path / "markers"), *common, f"output_dir={run_dir}")
    assert first.returncode == 130, first.stderr[-2000:]
    assert "Stopped by SIGINT" in first.stderr and f"python train.py resume={run_dir}" in first.stderr
    second = train(f"resume={run_dir}")
    assert second.returncode == 130, second.stderr[-2000:]
    assert "Stopped by SIGTERM after 1 of 2 tasks" in second.stderr
    third = train(f"resume={run_dir}")
    assert third.returncode == 0, third.stderr[-2000:]
    # one line per epoch trained after the resume (the epoch ended again on restore has none), each timing its epoch
    lines = re.findall(r"^  Task 2/2 · epoch ([0-9]+)\S* · .* · ([0-9.]+) s$", third.stdout, re.M)
    assert [epoch for epoch, _ in lines] == (["2"] if "trainer.max_epochs=2" in budget else ["2", "3"]), third.stdout
    assert max(float(seconds) for _, seconds in lines) < 300, third.stdout
    got = json.loads((run_dir / "metrics.json").read_text())
    expected = json.loads((tmp_path / "ref/metrics.json").read_text())
    np.testing.assert_allclose(got["R"], expected["R"], rtol=0, atol=1e-6)
