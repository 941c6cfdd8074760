"""Every shipped config composes, validates and builds: each experiment file (a paper setting we claim), each
method on its own default benchmark, and each benchmark with the default method. Building binds the method to
the benchmark (scenario checks, heads, plugin contracts) without loading data or training."""

from __future__ import annotations

import pytest

from cl_lightning.config import CONFIG_DIR, available, compose
from cl_lightning.experiment import build


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
    assert built(f"method={name}")["method_name"] == name


@pytest.mark.parametrize("name", available("benchmark"))
def test_every_benchmark_config_builds_with_fine_tuning(name):
    assert built(f"benchmark={name}", "method=finetune")["benchmark_name"] == name


def test_the_config_folder_is_the_repository_one():
    assert (CONFIG_DIR / "train.yaml").exists() and len(available("experiment")) >= 27
