"""Bad input fails before any training, with a message naming the key, value, file or folder."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cl_lightning.config import ConfigError, compose, set_path
from cl_lightning.experiment import run
from cl_lightning.methods import ContinualModule
from cl_lightning.tasks import Scenario
from tests.helpers.run import REPO


class TaskOnlyMethod(ContinualModule):
    """A method that declares it can only run task-IL."""

    supported_scenarios = frozenset({Scenario.TASK_IL})


def error_of(*overrides: str) -> str:
    with pytest.raises(ConfigError) as info:
        run(list(overrides))
    return str(info.value)


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CL_LIGHTNING_RUN_DIR", raising=False)


def test_defaults_compose_to_hnet_on_split_mnist():
    cfg = compose([])
    assert cfg["method_name"] == "hnet" and cfg["benchmark_name"] == "split_mnist"
    assert cfg["benchmark"]["init_args"]["scenario"] == "task"


def test_shorthand_overrides_reach_init_args_and_plugins():
    cfg = compose(["method=ewc", "method.lr=0.01", "method.plugins.EWC.strength=5", "benchmark.batch_size=64",
                   "trainer.max_epochs=3"])
    assert cfg["method"]["init_args"]["lr"] == 0.01
    assert cfg["method"]["init_args"]["plugins"][0]["init_args"]["strength"] == 5
    assert cfg["benchmark"]["init_args"]["batch_size"] == 64
    assert cfg["trainer"]["max_epochs"] == 3


def test_switching_class_drops_the_old_arguments():
    cfg = {"net": {"class_path": "a.B", "init_args": {"x": 1}}}
    set_path(cfg, "net.class_path", "a.C")
    assert cfg["net"] == {"class_path": "a.C", "init_args": {}}


def test_data_dir_follows_the_environment(monkeypatch):
    monkeypatch.setenv("CL_DATA_DIR", "/some/where")
    assert compose([])["benchmark"]["init_args"]["data_dir"] == "/some/where"
    assert compose(["data_dir=/else"])["benchmark"]["init_args"]["data_dir"] == "/else"


@pytest.mark.parametrize(("override", "named", "suggested"), [
    ("method=ewcc", "ewcc", "'ewc'"),
    ("benchmark=split_mnst", "split_mnst", "'split_mnist'"),
    ("experiment=no_such_paper", "no_such_paper", "valid"),
    ("sed=3", "sed", "'seed'"),
    ("method.lrr=0.1", "method.lrr", "'lr'"),
    ("benchmark.num_taks=3", "benchmark.num_taks", "'num_tasks'"),
    ("trainer.max_epoch=2", "trainer.max_epoch", "'max_epochs'"),
    ("method.plugins.OutputRegularizer.bta=1", "bta", "'beta'"),
    ("method.plugins.SI.c=1", "SI", "OutputRegularizer"),
    ("method.target.class_path=cl_lightning.nets.Nope", "cl_lightning.nets.Nope", "MLP"),
])
def test_unknown_names_get_the_nearest_valid_ones(override, named, suggested):
    message = error_of(override)
    assert named in message and suggested in message


@pytest.mark.parametrize(("override", "named"), [
    ("benchmark.num_tasks=7", "num_tasks=7"),
    ("method.lr=-1", "lr=-1"),
    ("benchmark.scenario=bogus", "scenario='bogus'"),
    ("benchmark.batch_size=0", "batch_size=0"),
    ("method.plugins.OutputRegularizer.beta=-5", "beta=-5"),
    ("seed=-1", "seed=-1"),
])
def test_values_out_of_range_name_key_and_value(override, named):
    assert named in error_of(override)


@pytest.mark.parametrize(("override", "named"), [
    ("trainer.max_epochs=abc", "trainer.max_epochs='abc' must be int"),
    ("trainer.devices=abc", "trainer: "),
    ("trainer.accelerator=gpu", "trainer: "),
    ("trainer.callbacks=[]", "trainer.callbacks is set by the runner"),
    ("benchmark.num_tasks=abc", "benchmark.num_tasks='abc' must be int"),
    ("method.lr=abc", "method.lr='abc' must be float"),
    ("method.backbone.hidden_sizes=7", "method.target.hidden_sizes=7 must be"),
    ("checkpoints.keep=some", "checkpoints.keep='some'"),
])
def test_bad_types_and_trainer_arguments_name_the_key_before_a_folder_exists(override, named, tmp_path):
    override = override.replace("method.backbone", "method.target")  # the default method is HNET
    assert named in error_of(override, f"output_dir={tmp_path / 'run'}")
    assert not (tmp_path / "run").exists()


def test_yaml_numbers_read_as_text_become_numbers():
    cfg = compose(["method=ewc", "method.lr=1e-3"])
    assert cfg["method"]["init_args"]["lr"] == 0.001


def test_output_dir_that_is_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    assert "is a file" in error_of(f"output_dir={tmp_path / 'file'}")


def test_unsupported_scenario_for_a_method_is_rejected():
    message = error_of("benchmark.scenario=class", "method.class_path=tests.test_config.TaskOnlyMethod")
    assert "scenario='class'" in message and "TaskOnlyMethod" in message


def test_regression_benchmark_has_no_class_il():
    assert "scenario='class'" in error_of("benchmark=poly_regression", "benchmark.scenario=class")


def test_resume_from_a_folder_without_a_run(tmp_path):
    (tmp_path / "empty").mkdir()
    assert "holds no run" in error_of(f"resume={tmp_path / 'empty'}")


def test_existing_run_folder_is_not_overwritten(tmp_path, mnist_root):
    run_dir = tmp_path / "taken"
    run_dir.mkdir()
    (run_dir / "metrics.json").write_text("{}")
    message = error_of(f"output_dir={run_dir}", f"data_dir={mnist_root}")
    assert "already holds files" in message and "resume=" in message
    assert (run_dir / "metrics.json").read_text() == "{}"


def test_missing_data_names_folder_dataset_and_variable(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), f"data_dir={tmp_path / 'nodata'}",
                           "benchmark.download=false", f"output_dir={tmp_path / 'out'}", "logger=none"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert "MNIST" in proc.stderr and str(tmp_path / "nodata") in proc.stderr and "CL_DATA_DIR" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_cli_exit_code_and_message_for_a_typo(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), "method=fintune"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and "did you mean 'finetune'" in proc.stderr
