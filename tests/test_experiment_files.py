"""Experiment files as data: one may build on another (``defaults: {experiment: ...}``), and a value may follow the
run's seed (``${seed}``), so a reproduced row is a file that ``python train.py experiment=<name>`` reruns."""

from __future__ import annotations

import shutil

import pytest

from cl_lightning.config import CONFIG_DIR, ConfigError, compose


@pytest.fixture
def config_dir(tmp_path):
    """The repository's configs, copied, with experiment files of the test's own."""
    shutil.copytree(CONFIG_DIR, tmp_path / "configs")
    return tmp_path / "configs"


def write(config_dir, name: str, text: str) -> None:
    (config_dir / "experiment" / f"{name}.yaml").write_text(text)


def test_an_experiment_builds_on_another_and_its_own_values_win(config_dir):
    write(config_dir, "base", "defaults:\n  method: finetune\n  benchmark: permuted_mnist\n"
                              "method:\n  lr: 0.5\n  optimizer: sgd\nbenchmark:\n  num_tasks: 3\n")
    write(config_dir, "child", "defaults:\n  experiment: base\n  method: er\nmethod:\n  lr: 0.25\n"
                               "  plugins:\n    ExperienceReplay:\n      memory_size: 7\n")
    cfg = compose(["experiment=child", "logger=none"], config_dir=config_dir)
    method = cfg["method"]["init_args"]
    assert cfg["method_name"] == "er" and cfg["benchmark_name"] == "permuted_mnist"
    assert method["lr"] == 0.25 and method["optimizer"] == "sgd"  # the child's value, the base's value
    assert method["plugins"][0]["init_args"]["memory_size"] == 7
    assert cfg["benchmark"]["init_args"]["num_tasks"] == 3
    assert compose(["experiment=child", "logger=none", "method.lr=0.125"],
                   config_dir=config_dir)["method"]["init_args"]["lr"] == 0.125  # overrides still win


def test_a_value_follows_the_run_seed(config_dir):
    write(config_dir, "seeded", "defaults:\n  method: er\n  benchmark: permuted_mnist\n"
                                "benchmark:\n  seed: ${seed}\nmethod:\n  plugins:\n    ExperienceReplay:\n"
                                "      seed: ${seed}\n")
    cfg = compose(["experiment=seeded", "logger=none", "seed=3"], config_dir=config_dir)
    assert cfg["benchmark"]["init_args"]["seed"] == 3
    assert cfg["method"]["init_args"]["plugins"][0]["init_args"]["seed"] == 3


def test_unknown_or_circular_bases_are_named(config_dir):
    write(config_dir, "orphan", "defaults:\n  experiment: no_such_base\n")
    with pytest.raises(ConfigError, match=r"'orphan'.*defaults.experiment='no_such_base'"):
        compose(["experiment=orphan"], config_dir=config_dir)
    write(config_dir, "loop_a", "defaults:\n  experiment: loop_b\n")
    write(config_dir, "loop_b", "defaults:\n  experiment: loop_a\n")
    with pytest.raises(ConfigError, match="loop_a -> loop_b -> loop_a"):
        compose(["experiment=loop_a"], config_dir=config_dir)
    write(config_dir, "typo", "defaults:\n  methd: er\n")
    with pytest.raises(ConfigError, match="'methd'.*'method'"):
        compose(["experiment=typo"], config_dir=config_dir)
