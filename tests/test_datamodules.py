"""Benchmarks build the same tasks on every rank and run, shard global batches exactly, and label
each scenario as documented."""

from __future__ import annotations

import pytest
import torch

from cl_lightning.datamodule import ShardedBatchSampler
from cl_lightning.datamodules import PermutedMNIST, PolynomialRegression, RotatedMNIST, SplitMNIST


def test_sharded_batches_are_the_halves_of_the_single_process_batches():
    one = list(ShardedBatchSampler(1000, 64, shuffle=True, seed=5))
    halves = [list(ShardedBatchSampler(1000, 64, shuffle=True, seed=5, rank=r, world_size=2)) for r in (0, 1)]
    assert len(halves[0]) == len(halves[1]) == len(one)
    for whole, a, b in zip(one, *halves, strict=True):
        assert torch.equal(whole, torch.cat([a, b]))  # 1000 % 64 = 40: the last batch also splits evenly


def test_sampler_order_depends_only_on_seed_and_epoch():
    s = ShardedBatchSampler(100, 10, shuffle=True, seed=1)
    first = torch.cat(list(s))
    torch.manual_seed(123)  # the global RNG has no say
    assert torch.equal(first, torch.cat(list(ShardedBatchSampler(100, 10, shuffle=True, seed=1))))
    s.set_epoch(1)
    assert not torch.equal(first, torch.cat(list(s)))
    assert sorted(first.tolist()) == list(range(100))


def test_uneven_global_batch_is_trimmed_so_ranks_stay_in_step():
    shards = [list(ShardedBatchSampler(101, 50, shuffle=False, rank=r, world_size=2)) for r in (0, 1)]
    assert [len(b) for b in shards[0]] == [len(b) for b in shards[1]] == [25, 25]
    assert len(ShardedBatchSampler(101, 50, shuffle=False, rank=0, world_size=2)) == 2


def test_split_mnist_labels_per_scenario(mnist_root):
    task_il = SplitMNIST(data_dir=str(mnist_root), scenario="task", class_order=[9, 8, 7, 6, 5, 4, 3, 2, 1, 0])
    class_il = SplitMNIST(data_dir=str(mnist_root), scenario="class", class_order=[9, 8, 7, 6, 5, 4, 3, 2, 1, 0])
    assert task_il.tasks[0].classes == (9, 8)
    assert set(task_il.split(2, "test").y.tolist()) == {0, 1}
    assert set(class_il.split(2, "test").y.tolist()) == {4, 5}  # positions of digits 5 and 4 in the order
    assert task_il.info.head_width == 10 and task_il.info.multi_head
    assert SplitMNIST(data_dir=str(mnist_root), scenario="domain").info.head_width == 2
    x, y, t = next(iter(task_il.task_dataloader(2, "test")))
    assert x.shape[1:] == (1, 28, 28) and (t == 2).all()


def test_split_mnist_subsamples_and_holds_out_validation(mnist_root):
    dm = SplitMNIST(data_dir=str(mnist_root), train_samples_per_task=100, val_fraction=0.1)
    train, val = dm.split(0, "train"), dm.split(0, "val")
    assert len(train) == 100 and len(val) == pytest.approx(0.1 * 12665, abs=1)
    assert len(dm.val_dataloader()) == 1


def test_task_construction_uses_only_the_benchmark_seed(mnist_root):
    torch.manual_seed(0)
    a = PermutedMNIST(num_tasks=3, data_dir=str(mnist_root), seed=7)
    torch.manual_seed(999)
    b = PermutedMNIST(num_tasks=3, data_dir=str(mnist_root), seed=7)
    c = PermutedMNIST(num_tasks=3, data_dir=str(mnist_root), seed=8)
    assert all(torch.equal(p, q) for p, q in zip(a.permutations, b.permutations, strict=True))
    assert not torch.equal(a.permutations[1], c.permutations[1])
    shuffled = [SplitMNIST(shuffle_classes=True, seed=s, data_dir=str(mnist_root)).class_order for s in (3, 3, 4)]
    assert shuffled[0] == shuffled[1] != shuffled[2]


def test_permuted_and_rotated_tasks_transform_the_same_digits(mnist_root):
    pm = PermutedMNIST(num_tasks=2, data_dir=str(mnist_root), first_unpermuted=True)
    x0, y0, _ = pm.split(0, "test")[torch.arange(5)]
    x1, y1, _ = pm.split(1, "test")[torch.arange(5)]
    assert torch.equal(y0, y1)
    assert torch.equal(x0.flatten(1)[:, pm.permutations[1]].view_as(x1), x1)
    rm = RotatedMNIST(num_tasks=2, angles=[0, 90], data_dir=str(mnist_root), scenario="class")
    r0, _, _ = rm.split(0, "test")[torch.arange(5)]
    r1, l1, _ = rm.split(1, "test")[torch.arange(5)]
    torch.testing.assert_close(torch.rot90(r0, 1, dims=(2, 3)), r1, atol=1e-5, rtol=0)
    assert (l1 >= 10).all()  # class-IL: task 1 owns labels 10..19


def test_joint_training_serves_all_tasks_so_far(mnist_root):
    dm = SplitMNIST(data_dir=str(mnist_root), train_samples_per_task=64, batch_size=1000)
    dm.set_task(2, cumulative=True)
    _, _, t = next(iter(dm.train_dataloader()))
    assert sorted(t.unique().tolist()) == [0, 1, 2] and len(t) == 192


def test_poly_regression_tasks_live_on_disjoint_intervals():
    dm = PolynomialRegression(seed=3)
    xs = [dm.split(t, "train").x for t in range(3)]
    assert xs[0].max() <= -2 and xs[1].min() >= -1 and xs[1].max() <= 1 and xs[2].min() >= 2
    x, y, _ = dm.split(1, "test")[torch.arange(100)]
    torch.testing.assert_close(y, 2 * x**2 - 1)
    assert torch.equal(PolynomialRegression(seed=3).split(0, "train").y, dm.split(0, "train").y)


def test_a_truncated_idx_file_is_named_with_the_fix(tmp_path):
    from cl_lightning.datamodules import DataError
    from cl_lightning.datamodules.mnist import load_torchvision_split

    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    header = b"\0\0\x08\x03" + (60000).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2
    (raw / "train-images-idx3-ubyte").write_bytes(header + bytes(10))  # cut short by a failed copy
    with pytest.raises(DataError, match="train-images-idx3-ubyte is corrupt .*truncated.*Delete it"):
        load_torchvision_split("MNIST", str(tmp_path), True, False)
    (raw / "train-images-idx3-ubyte").write_bytes(b"")
    with pytest.raises(DataError, match="without an IDX header"):
        load_torchvision_split("MNIST", str(tmp_path), True, True)


def test_a_failed_download_leaves_no_folders_behind(tmp_path, monkeypatch):
    import torchvision

    from cl_lightning.datamodules import DataNotFoundError
    from cl_lightning.datamodules.mnist import load_torchvision_split

    def offline(self, *args, **kwargs):
        (tmp_path / "absent" / "MNIST" / "raw").mkdir(parents=True, exist_ok=True)  # as torchvision does
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz: " + "no network here " * 30)

    monkeypatch.setattr(torchvision.datasets.MNIST, "download", offline)
    with pytest.raises(DataNotFoundError) as info:
        load_torchvision_split("MNIST", str(tmp_path / "absent"), True, True)
    assert not (tmp_path / "absent").exists()
    assert str(info.value).count("no network here") < 30 and " ...)" in str(info.value)  # shortened at a word


def test_standard_pixels_are_standardised_and_rotations_pad_with_black(mnist_root):
    kw = {"num_tasks": 2, "data_dir": str(mnist_root), "train_samples_per_task": 5000}
    unit, std = PermutedMNIST(**kw), PermutedMNIST(pixels="standard", **kw)
    for dm in (unit, std):
        dm.setup()
    xu = unit.split(1, "train").transform(unit.split(1, "train").x)
    xs = std.split(1, "train").transform(std.split(1, "train").x)
    assert xu.min() >= 0.0 and xu.max() <= 1.0
    assert abs(xs.mean().item()) < 0.02 and abs(xs.std().item() - 1.0) < 0.02
    torch.testing.assert_close(xs, (xu - 0.1307) / 0.3081)
    rot = RotatedMNIST(angles=[0.0, 45.0], pixels="standard", **kw)
    rot.setup()
    x = rot.split(1, "test").transform(rot.split(1, "test").x[:8])
    # the corners a 45-degree rotation brings in are black, i.e. the standardised zero pixel
    torch.testing.assert_close(x[:, 0, 0, 0], torch.full((8,), -0.1307 / 0.3081))
    split = SplitMNIST(pixels="standard", data_dir=str(mnist_root))
    split.setup()
    assert split.split(0, "train").transform(split.split(0, "train").x[:4]).min() < -0.4
    with pytest.raises(ValueError, match="pixels='z-score' is not one of"):
        PermutedMNIST(pixels="z-score", **kw)
