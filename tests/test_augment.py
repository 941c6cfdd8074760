"""Batch-wise training augmentation: the crops and flips equal a per-sample reference, the parameters depend only on
(seed, task, step, use) and shard exactly, CIFAR's is on by default and off with ``augment=false``, the loss sees
augmented batches while the rehearsal memory keeps the loaded ones and augments when replaying, and two DDP
processes give the single-process R with augmentation on."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cl_lightning.augment import RandomCropFlip, RandomResizedCropFlip, draw_share, step_generator
from cl_lightning.callback import ContinualCallback
from cl_lightning.config import compose
from cl_lightning.datamodules.cifar import SplitCIFAR10, SplitCIFAR100
from cl_lightning.experiment import build
from tests.helpers.image_files import fake_cifar10
from tests.helpers.launch import train_process
from tests.helpers.run import run_tasks


def test_random_crop_flip_equals_pad_crop_flip_per_sample():
    x = torch.randn(6, 3, 8, 8)
    aug = RandomCropFlip(padding=2, fill=(1.0, 2.0, 3.0))
    params = aug.draw(6, torch.Generator().manual_seed(0))
    out = aug.apply(x, params)
    assert out.shape == x.shape
    for i, (r, c, f) in enumerate(params.tolist()):
        padded = torch.tensor([1.0, 2.0, 3.0]).view(3, 1, 1).repeat(1, 12, 12)
        padded[:, 2:10, 2:10] = x[i]
        want = padded[:, r:r + 8, c:c + 8]
        torch.testing.assert_close(out[i], want.flip(-1) if f else want, rtol=0, atol=0)
    assert {int(f) for f in params[:, 2]} == {0, 1} and params[:, :2].min() >= 0 and params[:, :2].max() <= 4
    still = RandomCropFlip(padding=0, flip=False)
    assert torch.equal(still(x, torch.Generator().manual_seed(1)), x)


def test_random_resized_crop_boxes_follow_scale_and_ratio_and_the_full_box_is_the_identity():
    aug = RandomResizedCropFlip(scale=(0.2, 0.6), ratio=(0.5, 2.0))
    p = aug.draw(4000, torch.Generator().manual_seed(0))
    x0, y0, w, h = p[:, 0], p[:, 1], p[:, 2], p[:, 3]
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x0 + w <= 1 + 1e-6).all() and (y0 + h <= 1 + 1e-6).all()
    area, ratio = w * h, w / h
    assert area.min() >= 0.2 - 1e-5 and area.max() <= 0.6 + 1e-5
    assert ratio.min() >= 0.5 - 1e-4 and ratio.max() <= 2.0 + 1e-4
    assert 0.45 < p[:, 4].mean() < 0.55  # half are flipped
    x = torch.randn(2, 3, 16, 16)
    full = torch.tensor([[0.0, 0.0, 1.0, 1.0, 0.0], [0.0, 0.0, 1.0, 1.0, 1.0]])
    out = aug.apply(x, full)
    torch.testing.assert_close(out[0], x[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(out[1], x[1].flip(-1), rtol=0, atol=1e-5)
    assert RandomResizedCropFlip(size=8).apply(x, full).shape == (2, 3, 8, 8)


def test_parameters_depend_on_seed_task_step_and_use_and_shard_like_the_batch():
    aug = RandomCropFlip(padding=4)
    torch.manual_seed(5)
    one = draw_share(aug, 10, step_generator(1, 7, 0))
    again = draw_share(aug, 10, step_generator(1, 7, 0))
    assert torch.equal(one, again)
    shares = [draw_share(aug, 10, step_generator(1, 7, 0), rank, 2) for rank in (0, 1)]
    assert torch.equal(torch.cat(shares), one) and [len(s) for s in shares] == [5, 5]
    for other in (step_generator(1, 8, 0), step_generator(2, 7, 0), step_generator(1, 7, 1)):
        assert not torch.equal(draw_share(aug, 10, other), one)
    torch.manual_seed(6)
    assert not torch.equal(draw_share(aug, 10, step_generator(1, 7, 0)), one)


def test_cifar_augments_training_batches_unless_switched_off(tmp_path):
    root = str(fake_cifar10(tmp_path))
    aug = SplitCIFAR10(data_dir=root).train_augmentation()
    assert isinstance(aug, RandomCropFlip) and aug.padding == 4 and aug.flip
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    assert aug.fill == pytest.approx(tuple(-m / s for m, s in zip(mean, std, strict=True)))  # a black pixel
    assert SplitCIFAR10(data_dir=root, augment=False).train_augmentation() is None
    assert SplitCIFAR10(data_dir=root).info.normalization == (mean, std)
    _, dm = build(compose(["benchmark=seq_cifar10", "method=er", f"data_dir={root}"]))
    assert dm.scenario.value == "class" and dm.num_tasks == 5 and dm.batch_size == 32 and dm.augment
    _, dm = build(compose(["benchmark=split_cifar100", "method=er", "benchmark.augment=false", f"data_dir={root}"]))
    assert dm.train_augmentation() is None


class Spy(ContinualCallback):
    """Records the batch the loss sees (``penalty``) beside the batch as loaded (``on_train_batch_end``)."""

    def __init__(self):
        super().__init__()
        self.seen: list[torch.Tensor] = []
        self.loaded: list[torch.Tensor] = []

    def penalty(self, module, batch, step=None):
        self.seen.append(batch[0].detach().clone())
        return None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.loaded.append(batch[0].detach().clone())


def er_on_cifar(tmp_path, *extra):
    root = fake_cifar10(tmp_path / "data", per_class=1, varied=True)  # 5 tasks of 10 training images
    cfg = compose(["method=er", "benchmark=seq_cifar10", f"data_dir={root}", "logger=none",
                   "benchmark.batch_size=4", "benchmark.eval_batch_size=50",
                   "method.plugins.ExperienceReplay.memory_size=30", "method.plugins.ExperienceReplay.batch_size=8",
                   *extra])
    return build(cfg)


def test_the_loss_sees_augmented_batches_and_the_memory_keeps_loaded_samples(tmp_path, monkeypatch):
    model, dm = er_on_cifar(tmp_path)
    spy = Spy()
    model.plugins.append(spy)
    salts: list[int] = []
    original = type(model).augment_inputs

    def recording(self, x, salt=0, global_n=None):
        salts.append(salt)
        return original(self, x, salt, global_n)

    monkeypatch.setattr(type(model), "augment_inputs", recording)
    run_tasks(model, dm, tmp_path / "run", max_epochs=1)
    assert len(spy.seen) == len(spy.loaded) > 0
    changed = [not torch.equal(s, raw) for s, raw in zip(spy.seen, spy.loaded, strict=True)]
    assert all(changed)  # every batch is cropped or flipped (4 images all left as they are: 1 in 80^4)
    assert all(s.shape == raw.shape for s, raw in zip(spy.seen, spy.loaded, strict=True))
    assert 1 in salts and 0 in salts  # replay batches were augmented as well as the stream's
    memory = model.plugins[0].memory.data["x"].cpu()
    loaded = torch.cat([dm.split(t, "train")[torch.arange(len(dm.split(t, "train")))][0] for t in range(5)])
    matches = (memory.flatten(1)[:, None] == loaded.flatten(1)[None]).all(-1).any(1)
    assert matches.all(), "the memory holds augmented samples"


def test_augment_false_trains_on_the_batches_as_loaded(tmp_path):
    model, dm = er_on_cifar(tmp_path, "benchmark.augment=false")
    spy = Spy()
    model.plugins.append(spy)
    run_tasks(model, dm, tmp_path / "run", max_epochs=1)
    assert spy.seen and all(torch.equal(s, raw) for s, raw in zip(spy.seen, spy.loaded, strict=True))


@pytest.mark.slow
def test_augmented_replay_under_two_processes_matches_one_process(tmp_path):
    """DER++ on Seq-CIFAR-10 with augmentation: the memories' logits (outputs of the network trained so far, so of
    every augmented batch it saw) and R of 2 processes equal the single-process run's."""
    root = fake_cifar10(tmp_path / "data", per_class=4, varied=True)

    def train(name, *extra):
        out, dump = tmp_path / name, tmp_path / f"dump_{name}"
        plugins = ("method.plugins=[{class_path: cl_lightning.callbacks.DarkExperienceReplay, init_args: "
                   "{memory_size: 20, batch_size: 6, alpha: 0.3, beta: 0.5}}, "
                   f"{{class_path: tests.helpers.dump_memory.DumpMemory, init_args: {{folder: '{dump}'}}}}]")
        cmd = ["method=derpp", "benchmark=seq_cifar10", f"data_dir={root}", f"output_dir={out}", "logger=none",
               plugins, "benchmark.num_tasks=2", "benchmark.batch_size=8", "benchmark.eval_batch_size=100",
               "trainer.max_epochs=2", "trainer.enable_progress_bar=false", "trainer.accelerator=cpu", *extra]
        proc = train_process(cmd)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads((out / "metrics.json").read_text()), torch.load(dump / "rank0_task1.pt")

    single, memory = train("single", "trainer.devices=1")
    ddp, ddp_memory = train("ddp", "trainer.devices=2", "trainer.strategy=ddp")
    np.testing.assert_allclose(ddp["R"], single["R"], atol=2e-3)
    assert ddp["optimizer_steps"] == single["optimizer_steps"]
    stored, ddp_stored = memory["0_DarkExperienceReplay"], ddp_memory["0_DarkExperienceReplay"]
    assert torch.equal(stored["x"], ddp_stored["x"])
    torch.testing.assert_close(ddp_stored["logits"], stored["logits"], rtol=1e-3, atol=1e-3)


def test_split_cifar100_keeps_its_defaults(tmp_path):
    dm = SplitCIFAR100(data_dir=str(tmp_path))
    assert dm.augment and isinstance(dm.train_augmentation(), RandomCropFlip)


def test_each_rank_augments_its_share_as_one_process_does(tmp_path):
    """``augment_inputs`` under a 2-process trainer (stubbed: rank and world size are all it reads) gives each rank
    the rows of the single-process batch, for the stream's batches and for replay batches of any size."""
    from types import SimpleNamespace

    model, dm = er_on_cifar(tmp_path)
    x = torch.randn(8, 3, 32, 32)
    torch.manual_seed(3)

    def on(world, rank, rows, **kw):
        model._trainer = SimpleNamespace(datamodule=dm, world_size=world, global_rank=rank, global_step=5)
        return model.augment_inputs(rows, **kw)

    alone = on(1, 0, x)
    assert not torch.equal(alone, x)
    torch.testing.assert_close(torch.cat([on(2, r, x[r * 4:(r + 1) * 4]) for r in (0, 1)]), alone, rtol=0, atol=0)
    replay = on(1, 0, x[:7], salt=1, global_n=7)
    shares = [on(2, r, part, salt=1, global_n=7) for r, part in enumerate(x[:7].tensor_split(2))]
    torch.testing.assert_close(torch.cat(shares), replay, rtol=0, atol=0)
    assert not torch.equal(replay, alone[:7])  # the replay batch's own parameters


def test_a_run_resumed_inside_a_task_augments_as_the_uninterrupted_run(tmp_path):
    """Crash in task 1's second epoch (7 steps per epoch), resume from its epoch-end checkpoint: the same R as
    without the crash (the augmentation's parameters come from the seed, the task and the step, not from state
    lost with the process); R differs from the run without augmentation, so augmentation is part of what is
    compared."""
    from tests.helpers.crash import CrashAt

    marker = tmp_path / "crashed"

    def make(*extra):
        model, dm = er_on_cifar(tmp_path / f"d{len(list(tmp_path.iterdir()))}", "benchmark.num_tasks=2",
                                "seed=0", *extra)
        model.plugins.append(CrashAt(1, 9, str(marker), hard=False))
        return model, dm

    marker.write_text("never crash")
    reference = run_tasks(*make(), tmp_path / "ref", max_epochs=2)
    plain = run_tasks(*make("benchmark.augment=false"), tmp_path / "plain", max_epochs=2)
    marker.unlink()
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_tasks(*make(), tmp_path / "run", max_epochs=2)
    assert (tmp_path / "run/checkpoints/task_1/last.ckpt").exists()
    resumed = run_tasks(*make(), tmp_path / "run", resume=True, max_epochs=2)
    np.testing.assert_allclose(resumed["R"], reference["R"], rtol=0, atol=1e-6)
    assert resumed["optimizer_steps"] == reference["optimizer_steps"]
    assert plain["R"] != reference["R"]
