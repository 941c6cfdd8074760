"""Every shipped config composes, validates and builds: each experiment file (a paper setting we claim), each
method on its own default benchmark, and each benchmark with the default method. Building binds the method to
the benchmark (scenario checks, heads, plugin contracts) without loading data or training."""

from __future__ import annotations

import pytest

from cl_lightning.config import CONFIG_DIR, available, compose, import_class
from cl_lightning.experiment import build
from cl_lightning.tasks import Scenario
from tests.helpers.image_folders import WITHOUT_DATA


def built(*overrides: str):
    cfg = compose([*overrides, "logger=none", "data_dir=/nonexistent"])
    model, datamodule = build(cfg)
    assert model.info == datamodule.info
    return cfg


@pytest.mark.parametrize("name", available("experiment"))
def test_every_experiment_config_builds(name):
    cfg = built(f"experiment={name}")
    assert cfg["experiment"] == name


@pytest.mark.parametrize("name", available("method"))
def test_every_method_config_builds(name):
    """On Split-MNIST, in the method's scenario if it is not task-IL (e.g. class-IL only: ER-ACE, iCaRL)."""
    node = compose([f"method={name}"])["method"]
    supported = import_class(node["class_path"], "method").supported_scenarios
    scenario = Scenario.TASK_IL if Scenario.TASK_IL in supported else sorted(supported, key=str)[0]
    assert built(f"method={name}", f"benchmark.scenario={scenario.value}")["method_name"] == name


@pytest.mark.parametrize("name", available("benchmark"))
def test_every_benchmark_config_builds_with_fine_tuning(name):
    assert built(f"benchmark={name}", "method=finetune", *WITHOUT_DATA.get(name, []))["benchmark_name"] == name


def test_the_config_folder_is_the_repository_one():
    assert (CONFIG_DIR / "train.yaml").exists() and len(available("experiment")) >= 27
