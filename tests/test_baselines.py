"""The baselines on real MNIST: fine-tuning forgets, EWC forgets less, joint training is the upper bound.

Small budgets (1,000-2,000 samples per task) keep each run to seconds; the effects are large enough to
be measured at that scale with a fixed seed.
"""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest

from cl_lightning.callbacks import EWC
from cl_lightning.datamodules import PermutedMNIST, SplitMNIST
from cl_lightning.methods import ContinualModule, JointTraining
from cl_lightning.nets import MLP
from tests.helpers.run import run_tasks


def split_mnist(root, scenario):
    return SplitMNIST(data_dir=str(root), scenario=scenario, train_samples_per_task=1000)


def permuted_mnist(root):
    return PermutedMNIST(num_tasks=3, data_dir=str(root), train_samples_per_task=2000)


def mlp_method(cls=ContinualModule, plugins=None, lr=1e-3):
    L.seed_everything(0, verbose=False)
    return cls(MLP(hidden_sizes=[100, 100]), lr=lr, plugins=plugins)


@pytest.mark.parametrize("scenario", ["task", "class"])
def test_finetune_forgets_split_mnist_and_joint_is_the_upper_bound(mnist_root, tmp_path, scenario):
    lr = 3e-3 if scenario == "task" else 1e-3  # task-IL forgetting is mild: a larger step makes it plain
    ft = run_tasks(mlp_method(lr=lr), split_mnist(mnist_root, scenario), tmp_path / "ft", max_epochs=2)
    joint = run_tasks(mlp_method(JointTraining, lr=lr), split_mnist(mnist_root, scenario), tmp_path / "joint",
                      max_epochs=2)
    R = np.asarray(ft["R"])
    assert np.mean(np.diag(R)) > 0.6, "tasks are learnt when they are trained"
    if scenario == "class":
        assert ft["BWT"] < -0.4 and np.mean(R[-1, :-1]) < 0.1  # old classes are overwritten
    else:
        assert ft["BWT"] < -0.03
    assert joint["ACC"] > ft["ACC"] + 0.05
    assert joint["BWT"] > ft["BWT"]


def test_ewc_forgets_less_than_finetune_on_permuted_mnist(mnist_root, tmp_path):
    ft = run_tasks(mlp_method(), permuted_mnist(mnist_root), tmp_path / "ft", max_epochs=3)
    ewc = run_tasks(mlp_method(plugins=[EWC(strength=300, fisher_samples=1000)]), permuted_mnist(mnist_root),
                    tmp_path / "ewc", max_epochs=3)
    joint = run_tasks(mlp_method(JointTraining), permuted_mnist(mnist_root), tmp_path / "joint", max_epochs=3)
    assert ft["BWT"] < -0.05, "fine-tuning forgets on Permuted-MNIST"
    assert ewc["BWT"] > ft["BWT"] + 0.03
    assert np.asarray(ewc["R"])[-1, 0] > np.asarray(ft["R"])[-1, 0] + 0.03
    assert joint["ACC"] >= max(ft["ACC"], ewc["ACC"])
    # the stored Fisher and anchor are counted: two values per trained parameter
    assert ewc["storage"]["plugin_EWC"] == 2 * ewc["storage"]["model_parameters"]


def test_online_ewc_keeps_one_decayed_precision(mnist_root, tmp_path):
    plugin = EWC(strength=300, online=True, gamma=0.5, fisher_samples=500)
    model = mlp_method(plugins=[plugin])
    run_tasks(model, permuted_mnist(mnist_root), tmp_path / "online", max_epochs=1)
    name = "backbone.layers.1.weight"
    # with gamma=0.5 the last task's Fisher dominates, and the anchor is the final parameters
    assert (plugin.precision[name] >= plugin.last_fisher[name] - 1e-12).all()
    np.testing.assert_allclose(plugin.anchor[name].numpy(), dict(model.named_parameters())[name].detach().numpy())
