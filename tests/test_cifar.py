"""Split-CIFAR data modules on small generated files in CIFAR's real python-pickle format, and the
Split-CIFAR-100 supermask configs (masked ResNet-18) run end to end on them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cl_lightning.config import compose
from cl_lightning.datamodules.cifar import SplitCIFAR10, SplitCIFAR100, load_cifar_split
from cl_lightning.datamodules.mnist import DataNotFoundError
from cl_lightning.experiment import build
from tests.helpers.image_files import fake_cifar10, fake_cifar100
from tests.helpers.run import run_tasks


def test_split_cifar100_reads_the_pickle_format(tmp_path):
    root = fake_cifar100(tmp_path)
    x, y = load_cifar_split("CIFAR100", str(root), True)
    assert x.shape == (400, 3, 32, 32) and x.dtype == torch.uint8 and y.tolist()[:5] == [0, 0, 0, 0, 1]
    dm = SplitCIFAR100(data_dir=str(root))
    assert dm.num_tasks == 20 and dm.info.outputs_per_task == 5 and dm.info.input_shape == (3, 32, 32)
    dm.setup()
    t3 = dm.split(3, "train")
    assert len(t3) == 20 and sorted(set(t3.y.tolist())) == [0, 1, 2, 3, 4]
    batch = t3[torch.arange(4)]
    assert batch[0].shape == (4, 3, 32, 32) and batch[0].dtype == torch.float32 and batch[2].tolist() == [3] * 4
    dm = SplitCIFAR100(data_dir=str(root), scenario="class", num_tasks=10)
    dm.setup()
    assert sorted(set(dm.split(2, "test").y.tolist())) == list(range(20, 30))
    dm10 = SplitCIFAR10(data_dir=str(fake_cifar10(tmp_path / "c10")))
    dm10.setup()
    assert dm10.num_tasks == 5 and len(dm10.split(0, "train")) == 20
    with pytest.raises(DataNotFoundError, match="cifar-100-python"):
        load_cifar_split("CIFAR100", str(tmp_path / "nowhere"), True)
    with pytest.raises(ValueError, match="num_tasks"):
        SplitCIFAR100(num_tasks=7, data_dir=str(root))


@pytest.mark.parametrize("experiment", ["supsup_split_cifar100_gg", "impresslearn_split_cifar100_heterogeneous"])
def test_split_cifar100_supermask_configs_run_on_generated_data(tmp_path, experiment):
    root = fake_cifar100(tmp_path / "data", per_class_train=2, per_class_test=1)
    common = [f"experiment={experiment}", f"data_dir={root}", "logger=none", "method.backbone.width=4",
              "benchmark.batch_size=20", "benchmark.eval_batch_size=50"]
    model, dm = build(compose(common))
    assert type(model.backbone).__name__ == "MaskedResNet18" and model.backbone.num_layers == 21
    assert dm.num_tasks == 20 and dm.info.outputs_per_task == 5
    # the run itself: 4 tasks of 25 classes (basis of 2 for ImpressLearn) keep it short on a CPU
    extra = ["benchmark.num_tasks=4", "benchmark.train_samples_per_task=20"]
    if "impresslearn" in experiment:
        extra.append("method.basis_size=2")
    model, dm = build(compose(common + extra))
    m = run_tasks(model, dm, tmp_path / "run", max_epochs=1)
    R = np.asarray(m["R"])
    assert R.shape == (4, 4) and np.isfinite(R).all()
    assert (R[-1] == R.diagonal()).all()  # masks (and frozen alphas) of earlier tasks never change


@pytest.mark.parametrize("experiment", ["ari_split_cifar10", "ari_split_cifar100"])
def test_ari_cifar_configs_run_on_generated_data(tmp_path, experiment):
    """The ARI learner's reduced ResNet-18 configs, end to end on generated CIFAR files (small budgets)."""
    root = (fake_cifar10 if experiment.endswith("10") else fake_cifar100)(tmp_path / "data")
    common = [f"experiment={experiment}", f"data_dir={root}", "logger=none", "benchmark.eval_batch_size=50"]
    model, dm = build(compose(common))
    assert type(model._base_body).__name__ == "ReducedResNet18" and model._base_body.out_features == 160
    assert dm.num_tasks == (5 if experiment.endswith("10") else 20)
    small = ["method.base.width=4", "method.kb_capacity=3", "method.max_candidates=2", "method.memory_per_task=8",
             "method.finetune_steps=2", "method.plugins.ARIConsolidation.kb_steps=5",
             "method.plugins.ARIConsolidation.estimator_steps=5", "method.feature_extractor.features=16"]
    if experiment.endswith("100"):
        small += ["benchmark.num_tasks=4", "benchmark.train_samples_per_task=20"]
    model, dm = build(compose(common + small))
    m = run_tasks(model, dm, tmp_path / "run", max_epochs=1)
    R = np.asarray(m["R"])
    assert R.shape == (dm.num_tasks, dm.num_tasks) and np.isfinite(R).all()
    history = model.plugins[0].history
    assert len(history) == dm.num_tasks and history[-1]["kb_size"] <= 3
