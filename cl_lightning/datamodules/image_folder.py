"""Benchmarks read from image files on disk, and ``image_folder``: any folder of class subfolders.

The files are listed once per process (no image is read before a batch needs it) and served as
:class:`~cl_lightning.image_files.ImageFiles`: each batch decoded, resized to ``image_size`` and normalised with
``mean`` / ``std`` in the loader's ``num_workers`` worker processes. Classes are cut into tasks as in
Split-CIFAR (``class_order``, ``shuffle_classes`` from ``seed``; labels task-/domain-IL 0..k-1 per task,
class-IL the class's position in the order).
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from cl_lightning.augment import BatchAugmentation, RandomResizedCropFlip
from cl_lightning.datamodule import FILE_OPTIONS, ContinualDataModule, DataNotFoundError, TaskData, loader_options
from cl_lightning.datamodules.cifar import _Normalize
from cl_lightning.datamodules.class_split import check_class_order, equal_class_split, split_by_classes
from cl_lightning.datamodules.mnist import default_data_dir
from cl_lightning.image_files import ImageFiles, class_folders, list_images, parse_image_size
from cl_lightning.tasks import Description, Task

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

#: One split's files: paths and their class ids.
Files = tuple[np.ndarray, Tensor]


def held_out(y: Tensor, fraction: float, seed: int, stratified: bool) -> Tensor:
    """A boolean mask of the samples held out for testing: ``fraction`` of them drawn with ``seed``, of every
    class (``stratified``) or of the whole set (a random split, as the L2P code cuts ImageNet-R)."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"test_fraction={fraction} must be in (0, 1)")
    g = torch.Generator().manual_seed(seed)
    test = torch.zeros(len(y), dtype=torch.bool)
    groups = [torch.nonzero(y == c).squeeze(1) for c in y.unique().tolist()] if stratified else [torch.arange(len(y))]
    for rows in groups:
        n_test = len(rows) - int((1.0 - fraction) * len(rows))  # L2P's split: int(0.8 * n) for training
        test[rows[torch.randperm(len(rows), generator=g)[:n_test]]] = True
    return test


def as_files(paths: Sequence[str], labels: Sequence[int]) -> Files:
    return np.asarray(paths, dtype=str), torch.as_tensor(list(labels), dtype=torch.long)


class ImageFileBenchmark(ContinualDataModule):
    """Base of the benchmarks whose images are files: ``num_classes`` (known without reading the data) cut into
    ``num_tasks`` tasks. Subclasses list their files (:meth:`_list_files`)."""

    #: the benchmark's name, spelled as its config file
    name: str

    def __init__(self, num_tasks: int, num_classes: int, class_order: list[int] | None, shuffle_classes: bool,
                 image_size: int | Sequence[int], mean: Sequence[float], std: Sequence[float],
                 data_dir: str | None, *, class_tasks: bool = True, **kwargs: Any):
        """``kwargs``: ``FILE_OPTIONS``, passed on to :class:`ContinualDataModule` (each benchmark's
        ``@loader_options`` gives them all)."""
        super().__init__(num_tasks=num_tasks, **kwargs)
        self.data_dir = data_dir or default_data_dir()
        self.num_classes = num_classes
        self.size = parse_image_size(image_size)
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"mean={list(mean)} and std={list(std)} must have 3 entries each (RGB), std positive")
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self.normalize = _Normalize(self.mean, self.std)
        self.class_order = check_class_order(class_order, num_classes, self.seed if shuffle_classes else None)
        #: the classes of each task: a cut of the class order, or (``class_tasks=False``: tasks that differ by
        #: their inputs, as CORe50's sessions) all of them
        self.groups = equal_class_split(self.class_order, num_tasks) if class_tasks else \
            [tuple(self.class_order)] * num_tasks
        self._files: dict[str, Files] = {}

    def _task_name(self, task_id: int) -> str:
        """Its classes, as Split-CIFAR's tasks, up to 5 (more would fill the terminal's tables); else its number
        (the classes are in :attr:`Task.classes`)."""
        group = self.groups[task_id]
        return f"{self.name}/" + ("-".join(map(str, group)) if len(group) <= 5 else f"task{task_id}")

    def describe(self) -> Description:
        tasks = tuple(Task(i, self._task_name(i), g) for i, g in enumerate(self.groups))
        return Description(self.name, tasks, input_shape=(3, *self.size), outputs_per_task=len(self.groups[0]),
                           normalization=(self.mean, self.std))

    @abstractmethod
    def _list_files(self) -> dict[str, Files]:
        """``{"train": (paths, class ids), "test": ...}``, listing folders only (no image is read)."""

    def prepare_data(self) -> None:
        """Lists (and, where the benchmark can, downloads) the files once, on one process per machine."""
        self._list_files()

    def _load(self) -> None:
        self._files = self._list_files()
        for split, (_, y) in self._files.items():
            if len(y) and not 0 <= int(y.min()) <= int(y.max()) < self.num_classes:
                raise ValueError(f"{self.name}: {split} class ids {int(y.min())}..{int(y.max())} are not in "
                                 f"0..{self.num_classes - 1}")

    def _task_split(self, task_id: int, split: str) -> TaskData:
        paths, y = self._files[split]
        kept = split_by_classes(torch.arange(len(y)), y, self.groups[task_id], self.class_order, task_id,
                                self.scenario, None)
        return ImageFiles(paths[kept.x.numpy()], kept.y, task_id, self.size, self.normalize)


class ImageFolder(ImageFileBenchmark):
    """Any folder of class subfolders (``root/<class>/**/*.jpg``; class ids: the sorted folder names), its
    classes cut into ``num_tasks`` tasks.

    Args:
        root: the folder of class subfolders (default ``<data_dir>/image_folder``).
        test_root: a held-out folder with the same class subfolders; null: ``test_fraction`` of each class of
            ``root`` is held out, drawn with ``seed``.
        num_classes: the number of class subfolders; null counts them (then ``root`` must exist to build).
        image_size: every image is resized to this (an int: square, or ``[height, width]``).
        mean, std: the per-channel normalisation (pixels in [0, 1]); ImageNet's by default.
        num_workers, pin_memory, persistent_workers: the loader's worker processes that decode batches.
    """

    name = "image_folder"

    @loader_options(*FILE_OPTIONS, batch_size=64, scenario="class", eval_batch_size=256, num_workers=4, pin_memory=True,
                    persistent_workers=True)
    def __init__(self, root: str | None = None, test_root: str | None = None, test_fraction: float = 0.2,
                 num_classes: int | None = None, num_tasks: int = 5, class_order: list[int] | None = None,
                 shuffle_classes: bool = False, image_size: int | list[int] = 224,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 data_dir: str | None = None, **options: Any):
        self.root = Path(root) if root else Path(data_dir or default_data_dir()) / "image_folder"
        self.test_root = Path(test_root) if test_root else None
        self.test_fraction = test_fraction
        if num_classes is None:
            num_classes = len(self._classes(self.root))
        super().__init__(num_tasks=num_tasks, num_classes=num_classes, class_order=class_order,
                         shuffle_classes=shuffle_classes, image_size=image_size, mean=mean, std=std,
                         data_dir=data_dir, **options)
        if self.test_root is None and not 0.0 < test_fraction < 1.0:
            raise ValueError(f"test_fraction={test_fraction} must be in (0, 1) (or give test_root)")

    @staticmethod
    def _classes(root: Path) -> list[str]:
        if not root.is_dir():
            raise DataNotFoundError(f"image_folder: {root.resolve()} is not a folder. Set benchmark.root to a folder "
                                    "of class subfolders (root/<class>/*.jpg), or benchmark.num_classes to build "
                                    "the benchmark before the data is there.")
        names = class_folders(root)
        if not names:
            raise DataNotFoundError(f"image_folder: {root.resolve()} has no class subfolders (root/<class>/*.jpg)")
        return names

    def _list_files(self) -> dict[str, Files]:
        names = self._classes(self.root)
        if len(names) != self.num_classes:
            raise ValueError(f"image_folder: {self.root} has {len(names)} class folders but num_classes="
                             f"{self.num_classes}; set benchmark.num_classes={len(names)} (or null)")
        files = {"train": self._folder_files(self.root, names)}
        if self.test_root is not None:
            test_names = self._classes(self.test_root)
            unknown = sorted(set(test_names) - set(names))
            if unknown:
                raise ValueError(f"image_folder: test_root {self.test_root} has classes that root {self.root} has "
                                 f"not: {', '.join(unknown[:5])}")
            files["test"] = self._folder_files(self.test_root, names, test_names)
        else:
            paths, y = files["train"]
            test = held_out(y, self.test_fraction, self.seed, stratified=True)
            files = {"train": (paths[~test.numpy()], y[~test]), "test": (paths[test.numpy()], y[test])}
        return files

    @staticmethod
    def _folder_files(root: Path, classes: list[str], present: list[str] | None = None) -> Files:
        ids = {name: i for i, name in enumerate(classes)}
        paths: list[str] = []
        labels: list[int] = []
        for name in present or classes:
            found = list_images(root / name, recursive=True)
            if not found:
                raise DataNotFoundError(f"image_folder: {(root / name).resolve()} holds no image file")
            paths += found
            labels += [ids[name]] * len(found)
        return as_files(paths, labels)

    def train_augmentation(self) -> BatchAugmentation | None:
        """Random resized crop and flip, as ImageNet-R's and CORe50's references train (a user's photos are
        most often that kind of data); ``augment=false`` for data where it does not fit."""
        return RandomResizedCropFlip() if self.augment else None
