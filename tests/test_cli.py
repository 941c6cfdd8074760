"""The LightningCLI front door reads the same YAML files and drives the same runner."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import yaml

from cl_lightning.run_dir import child_run_environment
from tests.helpers.run import REPO

EWC = str(REPO / "configs/method/ewc.yaml")
FINETUNE = str(REPO / "configs/method/finetune.yaml")
SPLIT_MNIST = str(REPO / "configs/benchmark/split_mnist.yaml")


def cli(*args, cwd):
    """``python -m cl_lightning ARGS`` from another folder, importing this checkout (not whatever is installed)."""
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**child_run_environment(os.environ), "PYTHONPATH": path}
    return subprocess.run([sys.executable, "-m", "cl_lightning", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def test_help_is_generated_from_the_signatures(tmp_path):
    out = cli("--model.help", "ContinualModule", cwd=tmp_path).stdout
    assert "--model.lr" in out and "--model.plugins" in out and "cl_lightning.callbacks.EWC" in out
    out = cli("--data.help", "SplitMNIST", cwd=tmp_path).stdout
    assert "--data.num_tasks" in out and "--data.scenario" in out


def test_print_config_of_the_shared_yaml_files(tmp_path):
    proc = cli("--model", EWC, "--data", SPLIT_MNIST,
               "--model.lr", "0.01", "--print_config", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "class_path: cl_lightning.callbacks.EWC" in proc.stdout and "lr: 0.01" in proc.stdout
    assert "class_path: cl_lightning.datamodules.SplitMNIST" in proc.stdout


def test_cli_run_is_a_train_py_run_and_each_door_resumes_the_other(mnist_root, tmp_path):
    out = tmp_path / "run"
    proc = cli("--model", FINETUNE, "--data", SPLIT_MNIST,
               "--data.data_dir", str(mnist_root), "--data.num_tasks", "2",
               "--data.class_order", "[0,1,2,3,4,5,6,7,8,9]",
               "--data.train_samples_per_task", "300", "--trainer.enable_progress_bar", "false",
               "--output_dir", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "LightningModule" not in proc.stdout  # no model summary per task
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["R"]) == 2 and metrics["ACC"] > 0.6 and metrics["method"] == "finetune"
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["method_name"] == "finetune" and saved["benchmark_name"] == "split_mnist"
    assert saved["method"]["class_path"] == "cl_lightning.methods.ContinualModule"
    assert list((out / "wandb").glob("offline-run-*")), "the CLI logs to W&B (offline) by default, as train.py"

    # train.py continues the CLI's run, and the CLI continues it too; both refuse to change what it is
    again = subprocess.run([sys.executable, str(REPO / "train.py"), f"resume={out}", "logger=none"], cwd=tmp_path,
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads((out / "metrics.json").read_text())["R"] == metrics["R"]
    back = cli("--resume", str(out), "--logger", "none", "--trainer.enable_progress_bar", "false", cwd=tmp_path)
    assert back.returncode == 0, back.stderr[-2000:]
    refused = cli("--resume", str(out), "--model.lr", "0.5", cwd=tmp_path)
    assert refused.returncode == 2 and "method.lr=0.5 differs" in refused.stderr and "Traceback" not in refused.stderr


def test_bad_value_is_reported_by_key(tmp_path):
    proc = cli("--model", FINETUNE, "--data", SPLIT_MNIST,
               "--data.num_taks", "3", cwd=tmp_path)
    assert proc.returncode != 0 and "num_taks" in proc.stderr
    proc = cli("--model", FINETUNE, "--data", SPLIT_MNIST, "--data.num_tasks", "3", "--output_dir",
               str(tmp_path / "run"), cwd=tmp_path)
    assert proc.returncode == 2 and "config error" in proc.stderr and "num_tasks=3" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "run").exists()


def test_a_printed_config_runs_again_with_config(tmp_path):
    printed = cli("--model", FINETUNE, "--data", SPLIT_MNIST, "--data.num_tasks", "5", "--model.lr", "0.02",
                  "--print_config", cwd=tmp_path)
    assert printed.returncode == 0, printed.stderr[-2000:]
    (tmp_path / "run.yaml").write_text(printed.stdout)
    again = cli("--config", str(tmp_path / "run.yaml"), "--trainer.max_epochs", "3", "--print_config", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "lr: 0.02" in again.stdout and "max_epochs: 3" in again.stdout
