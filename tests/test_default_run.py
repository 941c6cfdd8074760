"""What ``python train.py`` without arguments composes to (no training): train.yaml's experiment,
``hnet_split_mnist_quick``, applies to the argument-less run and its plain overrides only. A chosen method
or benchmark drops it, and no other experiment's composition changes. Its measured result (ACC >= 99,
BWT >= -0.5 on seeds 0-4) is in benchmarks/hnet.md."""

from __future__ import annotations

import shutil

import pytest
import yaml

from cl_lightning.config import CONFIG_DIR, available, compose


def hnet_settings(cfg):
    args = cfg["method"]["init_args"]
    regularizer = args["plugins"][0]["init_args"]
    return {"activation": args["hypernetwork"]["init_args"]["activation"], "lookahead": regularizer["lookahead"],
            "beta": regularizer["beta"], "lr": args["lr"], "max_epochs": cfg["trainer"]["max_epochs"]}


@pytest.mark.parametrize("overrides", [[], ["seed=3"], ["logger=none", "trainer.log_every_n_steps=10"]])
def test_the_argument_less_run_is_the_quick_hnet_experiment(overrides):
    cfg = compose(overrides)
    assert cfg["experiment"] == "hnet_split_mnist_quick"
    assert (cfg["method_name"], cfg["benchmark_name"]) == ("hnet", "split_mnist")
    assert cfg["benchmark"]["init_args"]["scenario"] == "task" and cfg["benchmark"]["init_args"]["batch_size"] == 128
    assert hnet_settings(cfg) == {"activation": "elu", "lookahead": True, "beta": 0.05, "lr": 0.002, "max_epochs": 5}
    assert "max_steps" not in cfg["trainer"]  # an epoch budget: tests on a few hundred images stay small


def test_overrides_still_win_over_the_default_experiment():
    cfg = compose(["method.lr=0.001", "trainer.max_epochs=1", "method.plugins.OutputRegularizer.beta=0.01"])
    assert cfg["experiment"] == "hnet_split_mnist_quick"
    assert hnet_settings(cfg) == {"activation": "elu", "lookahead": True, "beta": 0.01, "lr": 0.001, "max_epochs": 1}


def test_choosing_a_group_or_experiment_drops_the_default_experiment():
    assert compose(["method=ewc"])["trainer"]["max_epochs"] == 1  # configs/trainer/cpu.yaml's, not HNET's 5
    for overrides in (["method=hnet"], ["benchmark=split_mnist"], ["experiment=none"]):
        cfg = compose(overrides)
        assert cfg["experiment"] is None
        assert hnet_settings(cfg) == {"activation": "relu", "lookahead": False, "beta": 0.01, "lr": 0.001,
                                      "max_epochs": 1}  # configs/method/hnet.yaml's own defaults
    cl1 = compose(["experiment=hnet_split_mnist_cl1"])
    assert cl1["experiment"] == "hnet_split_mnist_cl1"
    assert hnet_settings(cl1)["activation"] == "relu" and cl1["trainer"]["max_steps"] == 2000


def test_other_experiments_compose_as_without_a_default_experiment(tmp_path):
    """Every paper setting (and a method chosen on its own) composes exactly as when train.yaml named none."""
    plain = tmp_path / "configs"
    shutil.copytree(CONFIG_DIR, plain)
    root = yaml.safe_load((plain / "train.yaml").read_text())
    root["experiment"] = None
    (plain / "train.yaml").write_text(yaml.safe_dump(root))
    names = [n for n in available("experiment")
             if n.startswith(("hnet", "online_ewc")) and n != "hnet_split_mnist_quick"]
    assert "hnet_split_mnist_cl1" in names and "hnet_split_mnist_cl3" in names
    for overrides in [[f"experiment={n}"] for n in names] + [["method=finetune"], ["benchmark=permuted_mnist"]]:
        assert compose(overrides) == compose(overrides, config_dir=plain), overrides
