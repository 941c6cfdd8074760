"""Every MARK experiment config composes and builds; the Split CIFAR-100 and MiniImageNet ones run end to end on
small generated files in the real formats; the MiniImageNet datamodule reads the authors' pickle format and
names the expected files when they are absent."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cl_lightning.config import CONFIG_DIR, compose
from cl_lightning.datamodules.miniimagenet import SplitMiniImageNet, load_miniimagenet_split
from cl_lightning.datamodules.mnist import DataNotFoundError
from cl_lightning.experiment import build
from tests.helpers.image_files import fake_cifar100, fake_miniimagenet
from tests.helpers.run import run_tasks

EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("mark_*.yaml"))
TINY = ["method.kb_channels=[4,8,8]", "method.latent_dim=16", "method.feature_channels=[4,4]",
        "method.feature_epochs=1", "method.pretrain_epochs=1", "method.mask_epochs=1", "method.kb_epochs=1",
        "method.final_epochs=1", "method.meta_steps=1"]


pytestmark = pytest.mark.usefixtures("one_thread")


def test_every_mark_experiment_composes_and_builds(tmp_path):
    expected = {"mark_split_cifar100", "mark_miniimagenet", "mark_split_mnist", "mark_split_fashion_mnist",
                "mark_permuted_mnist", "mark_split_cifar100_reptile", "mark_split_cifar100_no_meta",
                "mark_split_cifar100_kb_frozen", "mark_split_cifar100_masks_off", "mark_split_cifar100_random_f",
                "mark_split_cifar100_random_kb", "mark_split_cifar100_baseline1", "mark_split_cifar100_baseline3"}
    assert expected <= set(EXPERIMENTS)
    for name in EXPERIMENTS:
        model, dm = build(compose([f"experiment={name}", f"data_dir={tmp_path}", "logger=none"]))
        assert type(model).__name__ == "MARK", name
        assert dm.scenario.value == "task", name
        meta = [p for p in model.plugins if type(p).__name__ == "MARKMetaUpdate"]
        assert len(meta) == (model.kb_update == "meta"), name
    b1, _ = build(compose(["experiment=mark_split_cifar100_baseline1", f"data_dir={tmp_path}", "logger=none"]))
    assert not b1.use_masks and b1.kb_update == "normal"
    rep, _ = build(compose(["experiment=mark_split_cifar100_reptile", f"data_dir={tmp_path}", "logger=none"]))
    assert rep.plugins[0].sign == "reptile"
    mini, dm = build(compose(["experiment=mark_miniimagenet", f"data_dir={tmp_path}", "logger=none"]))
    assert mini.latent_dim == 256 and mini.plugins[0].inner.lr == 0.001 and dm.info.input_shape == (3, 84, 84)
    cifar, dm = build(compose(["experiment=mark_split_cifar100", f"data_dir={tmp_path}", "logger=none"]))
    assert dm.num_tasks == 20 and dm.info.outputs_per_task == 5 and cifar.plugins[0].mini_tasks == 10
    assert cifar.plugins[0].inner.steps == 40 and cifar.meta_steps == 10 and cifar.kb.channels == (64, 128, 256)
    assert [c.kernel_size[0] for c in cifar.kb.convs] == [4, 3, 2]  # the authors' [size//8, size//10, 2]


@pytest.mark.parametrize("experiment", ["mark_split_cifar100", "mark_miniimagenet"])
def test_mark_paper_configs_run_on_generated_data(tmp_path, experiment):
    if "cifar" in experiment:
        root = fake_cifar100(tmp_path / "data", per_class_train=4, per_class_test=2)
    else:
        root = fake_miniimagenet(tmp_path / "data")
    common = [f"experiment={experiment}", f"data_dir={root}", "logger=none", *TINY, "benchmark.num_tasks=4",
              "benchmark.batch_size=20", "benchmark.eval_batch_size=100",
              "method.plugins.MARKMetaUpdate.mini_tasks=2", "method.plugins.MARKMetaUpdate.inner_steps=2"]
    model, dm = build(compose(common))
    m = run_tasks(model, dm, tmp_path / "run")
    R = np.asarray(m["R"])
    assert R.shape == (4, 4) and np.isfinite(R).all()
    assert len(model.plugins[0].history) == 4  # one outer step per task
    assert m["storage"]["tasks"] == 4


def test_miniimagenet_reads_the_pickle_format_and_names_missing_files(tmp_path):
    root = fake_miniimagenet(tmp_path)
    x, y = load_miniimagenet_split(str(root), "train")
    assert x.shape == (200, 3, 84, 84) and x.dtype == torch.uint8 and y.tolist()[:3] == [0, 0, 1]
    dm = SplitMiniImageNet(data_dir=str(root))
    assert dm.num_tasks == 20 and dm.info.outputs_per_task == 5
    dm.setup()
    t2 = dm.split(2, "train")
    assert len(t2) == 10 and sorted(set(t2.y.tolist())) == [0, 1, 2, 3, 4]
    assert sorted(set(int(c) for c in dm.groups[2])) == sorted(dm.class_order[10:15])
    xb, _, tb = t2[torch.arange(3)]
    assert xb.shape == (3, 3, 84, 84) and xb.dtype == torch.float32 and tb.tolist() == [2, 2, 2]
    with pytest.raises(DataNotFoundError, match=r"miniimagenet.*train\.pkl.*test\.pkl"):
        load_miniimagenet_split(str(tmp_path / "nowhere"), "train")
    with pytest.raises(ValueError, match="num_tasks"):
        SplitMiniImageNet(num_tasks=7, data_dir=str(root))
