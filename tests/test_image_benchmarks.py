"""The benchmarks read from image files (image_folder, seq_tinyimagenet, imagenet_r, core50), on tiny generated
copies in each real layout: class splits, held-out splits, batches decoded in worker processes equal to those
decoded in the training process (and DDP shards to the one-process batch), errors that name the bad file, and
each benchmark run end to end."""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from cl_lightning.augment import RandomCropFlip, RandomResizedCropFlip
from cl_lightning.config import compose
from cl_lightning.datamodule import DataError, DataNotFoundError
from cl_lightning.datamodules import tinyimagenet
from cl_lightning.datamodules.core50 import CORe50
from cl_lightning.datamodules.image_folder import ImageFolder
from cl_lightning.datamodules.imagenet_r import ImageNetR
from cl_lightning.datamodules.tinyimagenet import SeqTinyImageNet
from cl_lightning.experiment import build
from cl_lightning.image_files import ImageFiles
from tests.helpers.image_folders import fake_core50, fake_image_folder, fake_imagenet_r, fake_tiny_imagenet
from tests.helpers.run import run_tasks


def batches(loader) -> list[tuple[torch.Tensor, ...]]:
    return [tuple(part.clone() for part in batch) for batch in loader]


def same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for p, q in zip(a, b, strict=True)
                                    for x, y in zip(p, q, strict=True))


def test_image_folder_splits_classes_and_holds_out_a_seeded_share_of_each(tmp_path, monkeypatch):
    root = fake_image_folder(tmp_path / "folder", classes=4, per_class=5)
    # neither describing nor listing opens an image
    opened = []
    monkeypatch.setattr("cl_lightning.image_files.Image.open", lambda *a, **k: opened.append(a) or 1 / 0)
    dm = ImageFolder(root=str(root), num_tasks=2, image_size=8, num_workers=0)
    assert dm.info.num_tasks == 2 and dm.info.outputs_per_task == 2 and dm.info.input_shape == (3, 8, 8)
    assert dm.info.normalization == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    dm.setup()
    train, test = dm.split(1, "train"), dm.split(1, "test")
    assert opened == [] and isinstance(train, ImageFiles)
    monkeypatch.undo()
    assert len(train) == 8 and len(test) == 2  # 1 of each class's 5 images held out
    assert sorted(train.y.tolist()) == [2] * 4 + [3] * 4  # class-IL: the class's position in the order
    assert not set(train.paths) & set(test.paths)
    assert all(Path(p).parent.name in ("class_02", "class_03", "sub") for p in train.paths)
    x, y, t = train[torch.tensor([0, 5])]
    assert x.shape == (2, 3, 8, 8) and x.dtype == torch.float32 and t.tolist() == [1, 1]
    assert ImageFiles(train.paths, train.y, 1, (8, 8))[torch.tensor([0])][0].dtype == torch.uint8
    with pytest.raises(TypeError, match="file paths"):
        train.x  # noqa: B018
    # a seeded class order; another seed holds out other images
    shuffled = ImageFolder(root=str(root), num_tasks=2, image_size=8, shuffle_classes=True, seed=3)
    assert sorted(shuffled.class_order) == [0, 1, 2, 3] and shuffled.groups == [tuple(shuffled.class_order[:2]),
                                                                                 tuple(shuffled.class_order[2:])]
    other = ImageFolder(root=str(root), num_tasks=2, image_size=8, seed=5, scenario="task")
    other.setup()
    assert set(other.split(1, "test").paths) != set(test.paths) and other.split(1, "test").y.tolist() == [0, 1]
    # a held-out folder of its own
    held = fake_image_folder(tmp_path / "held", classes=4, per_class=2)
    dm = ImageFolder(root=str(root), test_root=str(held), num_tasks=4, image_size=[8, 6])
    dm.setup()
    assert len(dm.split(3, "train")) == 5 and len(dm.split(3, "test")) == 2 and dm.info.input_shape == (3, 8, 6)
    with pytest.raises(ValueError, match="num_classes=3"):
        ImageFolder(root=str(root), num_classes=3, num_tasks=3).setup()
    with pytest.raises(DataNotFoundError, match="nowhere"):
        ImageFolder(root=str(tmp_path / "nowhere"))
    assert ImageFolder(root=str(tmp_path / "nowhere"), num_classes=10).info.num_tasks == 5  # builds without data
    # a user's photos train with random resized crops and flips, unless augment=false
    assert isinstance(ImageFolder(root=str(root), num_tasks=2).train_augmentation(), RandomResizedCropFlip)
    assert ImageFolder(root=str(root), num_tasks=2, augment=False).train_augmentation() is None


def test_worker_processes_give_the_same_batches_and_ddp_shards(tmp_path, monkeypatch):
    root = fake_image_folder(tmp_path / "folder", classes=4, per_class=5)
    results = []
    for workers in (0, 2):
        dm = ImageFolder(root=str(root), num_tasks=2, image_size=8, batch_size=4, eval_batch_size=3,
                         num_workers=workers, persistent_workers=True, val_fraction=0.25)
        dm.setup()
        train = dm.train_dataloader()
        assert train.num_workers == workers and train.persistent_workers == (workers > 0)
        dm.set_task(1, cumulative=True)  # joint training: batches mixing the files of two tasks
        joint = batches(dm.train_dataloader())
        dm.set_task(0)
        results.append((batches(train), batches(dm.val_dataloader()[0]), [batches(d) for d in dm.test_dataloader()],
                        joint))
    assert same(results[0][0], results[1][0]) and same(results[0][1], results[1][1])
    assert all(same(a, b) for a, b in zip(results[0][2], results[1][2], strict=True))
    assert same(results[0][3], results[1][3]) and set(torch.cat([b[2] for b in results[0][3]]).tolist()) == {0, 1}
    assert [len(b[1]) for b in results[0][0]] == [4, 2] and len(results[0][1][0][1]) == 2  # 8 images, val 1/4
    # two ranks: each batch's shards, side by side, are the one-process batch
    shards = []
    for rank in (0, 1):
        dm = ImageFolder(root=str(root), num_tasks=2, image_size=8, batch_size=4, num_workers=2)
        monkeypatch.setattr(dm, "_rank_and_world", lambda rank=rank: (rank, 2))
        dm.setup()
        shards.append(batches(dm.train_dataloader()))
    one = ImageFolder(root=str(root), num_tasks=2, image_size=8, batch_size=4, num_workers=0)
    one.setup()
    joined = [tuple(torch.cat(parts) for parts in zip(a, b, strict=True)) for a, b in zip(*shards, strict=True)]
    assert same(joined, batches(one.train_dataloader()))


def worker_error(loader) -> str:
    """The DataError a worker process raised, re-raised here. The workers are shut down at once: torch's re-raise
    leaves a reference cycle that keeps the iterator alive, and a shutdown at the next garbage collection waits
    5 s (harmless in a run, which ends with the error; slow in a test)."""
    it = iter(loader)
    try:
        for _ in it:
            pass
    except DataError as err:
        return str(err)
    finally:
        it._shutdown_workers()
    raise AssertionError("no DataError")


def test_a_corrupt_or_missing_image_is_an_error_naming_the_file(tmp_path):
    root = fake_image_folder(tmp_path / "folder", classes=2, per_class=5)
    victim = root / "class_01" / "img_3.jpg"
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])  # truncated
    dm = ImageFolder(root=str(root), num_tasks=1, image_size=8, batch_size=8, scenario="task")
    dm.setup()
    test_data = dm.split(0, "train")
    with pytest.raises(DataError, match="img_3.jpg.*truncated or corrupt"):
        test_data[torch.arange(len(test_data))]
    dm.num_workers, dm.persistent_workers = 2, False
    assert "img_3.jpg is not a readable image" in worker_error(dm.train_dataloader())
    victim.write_bytes(b"not an image at all")
    with pytest.raises(DataError, match="img_3.jpg"):
        test_data[torch.arange(len(test_data))]
    victim.unlink()
    with pytest.raises(DataNotFoundError, match="img_3.jpg is missing"):
        test_data[torch.arange(len(test_data))]


def test_tiny_imagenet_layout_download_and_missing_files(tmp_path, monkeypatch):
    data_dir = fake_tiny_imagenet(tmp_path / "data")
    dm = SeqTinyImageNet(data_dir=str(data_dir), image_size=8, num_workers=0, download=False)
    assert dm.info.num_tasks == 10 and dm.info.outputs_per_task == 20 and dm.info.input_shape == (3, 8, 8)
    aug = dm.train_augmentation()
    assert isinstance(aug, RandomCropFlip) and aug.padding == 8
    assert dm.tasks[1].name == "seq_tinyimagenet/task1" and dm.tasks[1].classes == tuple(range(20, 40))
    assert SeqTinyImageNet(data_dir=str(data_dir), augment=False).train_augmentation() is None
    dm.setup()
    train, test = dm.split(3, "train"), dm.split(3, "test")
    assert len(train) == 40 and len(test) == 20 and sorted(set(test.y.tolist())) == list(range(60, 80))
    # a class is its wnid's position in the sorted wnids.txt; each val file has its annotated class
    wnids = sorted((data_dir / "tiny-imagenet-200" / "wnids.txt").read_text().split())
    assert all(Path(p).parts[-3] == wnids[c] for p, c in zip(train.paths, train.y.tolist(), strict=True))
    assert all(int(Path(p).stem.split("_")[1]) == c for p, c in zip(test.paths, test.y.tolist(), strict=True))
    assert test[torch.arange(4)][0].shape == (4, 3, 8, 8)
    # missing: the error names the expected files; a failed download says so
    with pytest.raises(DataNotFoundError, match="download=false.*wnids.txt"):
        SeqTinyImageNet(data_dir=str(tmp_path / "empty"), download=False).prepare_data()
    monkeypatch.setattr(tinyimagenet, "URL", (tmp_path / "no.zip").as_uri())
    with pytest.raises(DataNotFoundError, match="download failed.*val_annotations.txt"):
        SeqTinyImageNet(data_dir=str(tmp_path / "empty"), download=True).prepare_data()
    assert list((tmp_path / "empty").iterdir()) == []  # nothing left behind
    # a download (here from a local copy of the zip) is unpacked into the data root
    archive = tmp_path / "tiny-imagenet-200.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for f in sorted((data_dir / "tiny-imagenet-200").rglob("*")):
            z.write(f, f.relative_to(data_dir))
    monkeypatch.setattr(tinyimagenet, "URL", archive.as_uri())
    fetched = SeqTinyImageNet(data_dir=str(tmp_path / "fetched"), image_size=8, num_workers=0)
    fetched.prepare_data()
    fetched.setup()
    assert torch.equal(fetched.split(3, "train")[torch.arange(40)][0], train[torch.arange(40)][0])
    assert not (tmp_path / "fetched" / "tiny-imagenet-200.zip").exists()
    shutil.rmtree(data_dir / "tiny-imagenet-200" / "train" / wnids[7])
    tinyimagenet.list_tiny_imagenet.cache_clear()
    with pytest.raises(DataNotFoundError, match=f"{wnids[7]}/images"):
        SeqTinyImageNet(data_dir=str(data_dir), download=False).setup()


def test_imagenet_r_seeded_80_20_split(tmp_path):
    data_dir = fake_imagenet_r(tmp_path / "data", per_class=5)
    dm = ImageNetR(data_dir=str(data_dir), image_size=8, num_workers=0, download=False)
    assert dm.info.num_tasks == 10 and dm.info.outputs_per_task == 20 and dm.info.input_shape == (3, 8, 8)
    assert isinstance(dm.train_augmentation(), RandomResizedCropFlip)
    dm.setup()
    train = np.concatenate([dm.split(t, "train").paths for t in range(10)])
    test = np.concatenate([dm.split(t, "test").paths for t in range(10)])
    assert len(train) == 800 and len(test) == 200 and not set(train) & set(test)
    again = ImageNetR(data_dir=str(data_dir), download=False)
    again.setup()
    assert list(again.split(2, "test").paths) == list(dm.split(2, "test").paths)
    other = ImageNetR(data_dir=str(data_dir), download=False, seed=1)
    other.setup()
    assert set(np.concatenate([other.split(t, "test").paths for t in range(10)])) != set(test)
    names = sorted(p.name for p in (data_dir / "imagenet-r").iterdir() if p.is_dir())
    task = dm.split(4, "train")
    assert all(Path(p).parent.name == names[c] for p, c in zip(task.paths, task.y.tolist(), strict=True))
    assert dm.split(4, "train")[torch.arange(3)][0].shape == (3, 3, 8, 8)


def test_core50_nc_and_ni_protocols(tmp_path):
    data_dir = fake_core50(tmp_path / "data")
    nc = CORe50(data_dir=str(data_dir), image_size=8, num_workers=0, download=False)
    assert nc.info.num_tasks == 10 and nc.info.outputs_per_task == 5 and nc.scenario.value == "class"
    assert nc.tasks[1].name == "core50/5-6-7-8-9"
    nc.setup()
    train, test = nc.split(2, "train"), nc.split(2, "test")
    assert len(train) == 5 * 8 and len(test) == 5 * 3 and sorted(set(train.y.tolist())) == list(range(10, 15))
    assert {Path(p).parts[-3] for p in train.paths} == {f"s{s}" for s in (1, 2, 4, 5, 6, 8, 9, 11)}
    assert {Path(p).parts[-3] for p in test.paths} == {"s3", "s7", "s10"}
    assert all(Path(p).parts[-2] == f"o{c + 1}" for p, c in zip(train.paths, train.y.tolist(), strict=True))
    ni = CORe50(protocol="ni", data_dir=str(data_dir), image_size=8, download=False)
    assert ni.info.num_tasks == 8 and ni.info.outputs_per_task == 50 and ni.scenario.value == "domain"
    assert [t.name for t in ni.tasks][:3] == ["core50_ni/s1", "core50_ni/s2", "core50_ni/s4"]
    ni.setup()
    t5 = ni.split(5, "train")  # session 8
    assert len(t5) == 50 and {Path(p).parts[-3] for p in t5.paths} == {"s8"}
    assert sorted(t5.y.tolist()) == list(range(50))
    assert list(ni.split(0, "test").paths) == list(ni.split(7, "test").paths) and len(ni.split(0, "test")) == 150
    ni_class = CORe50(protocol="ni", data_dir=str(data_dir), scenario="class", download=False)
    ni_class.setup()
    assert sorted(set(ni_class.split(2, "train").y.tolist())) == list(range(100, 150))
    with pytest.raises(ValueError, match="one task per training session"):
        CORe50(protocol="ni", num_tasks=4)
    with pytest.raises(DataNotFoundError, match="s3"):
        shutil.rmtree(data_dir / "core50_128x128" / "s3")
        CORe50(data_dir=str(data_dir), download=False).prepare_data()


END_TO_END = {
    "image_folder": (lambda d: fake_image_folder(d / "folder", classes=4, per_class=5), ["benchmark.num_tasks=2"]),
    "seq_tinyimagenet": (fake_tiny_imagenet, ["benchmark.num_tasks=2", "benchmark.download=false"]),
    "imagenet_r": (lambda d: fake_imagenet_r(d, per_class=2), ["benchmark.num_tasks=2", "benchmark.download=false"]),
    "core50": (fake_core50, ["benchmark.num_tasks=2", "benchmark.download=false"]),
    "core50_ni": (lambda d: fake_core50(d, sessions=range(1, 12)),
                  ["benchmark.train_sessions=[1,2]", "benchmark.download=false"]),
}


def run_benchmark(name: str, data: Path, run_dir: Path, workers: int) -> tuple[dict, object]:
    made, extra = END_TO_END[name]
    where = made(data)
    place = [f"benchmark.root={where}"] if name == "image_folder" else [f"data_dir={where}"]
    cfg = compose([f"benchmark={name}", "method=finetune", "method.backbone.hidden_sizes=[16]", "logger=none",
                   "benchmark.image_size=8", "benchmark.batch_size=16", "benchmark.eval_batch_size=64",
                   f"benchmark.num_workers={workers}", *place, *extra])
    model, dm = build(cfg)
    return run_tasks(model, dm, run_dir, max_epochs=1), dm


@pytest.mark.parametrize("name", list(END_TO_END))
def test_each_benchmark_runs_end_to_end(tmp_path, name):
    m, _ = run_benchmark(name, tmp_path / "data", tmp_path / "run", workers=0)
    R = np.asarray(m["R"])
    assert R.shape == (2, 2) and np.isfinite(R).all() and (R >= 0).all()


def test_a_run_with_worker_processes_equals_one_without(tmp_path):
    a, _ = run_benchmark("image_folder", tmp_path / "a", tmp_path / "run_a", workers=0)
    b, dm = run_benchmark("image_folder", tmp_path / "b", tmp_path / "run_b", workers=2)
    assert dm.train_dataloader().num_workers == 2 and dm.test_dataloader()[0].num_workers == 2
    assert a["R"] == b["R"] and len(set(np.asarray(a["R"]).ravel().tolist())) > 1
