"""MNIST-family benchmarks: Split-MNIST, Split-Fashion-MNIST, Permuted-MNIST and Rotated-MNIST.

Images stay uint8 in memory and are scaled (and permuted or rotated) one batch at a time, so ten
permuted tasks cost no more memory than one.
"""

from __future__ import annotations

import functools
import math
import os
import shutil
import textwrap
from abc import abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torchvision
from torch import Tensor
from torchvision.transforms.functional import InterpolationMode, rotate

from cl_lightning.datamodule import (
    LOADER_OPTIONS,
    BatchTransform,
    ContinualDataModule,
    DataError,
    TaskData,
    loader_options,
)
from cl_lightning.datamodule import DataNotFoundError as DataNotFoundError  # its home before datamodule.py
from cl_lightning.datamodules.class_split import check_class_order, equal_class_split, split_by_classes
from cl_lightning.tasks import Description, Scenario, Task


def default_data_dir() -> str:
    return os.environ.get("CL_DATA_DIR", "./data")


#: torchvision's raw files of each split (the unpacked IDX files it reads).
IDX_FILES = {True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def check_idx_file(path: Path) -> None:
    """Raises a DataError naming ``path`` if it is shorter or longer than its IDX header says."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        header = f.read(4)
        if len(header) == 4 and header[:2] == b"\0\0" and header[2] == 0x08:
            dims = [int.from_bytes(f.read(4), "big") for _ in range(header[3])]
            expected = 4 + 4 * len(dims) + math.prod(dims)
            if size == expected:
                return
            why = f"{size} bytes where its header promises {expected}: truncated or padded"
        else:
            why = f"{size} bytes without an IDX header"
    raise DataError(f"{path} is corrupt ({why}). Delete it so that it is downloaded again, "
                    "or copy a complete file there.")


@functools.lru_cache(maxsize=8)
def load_torchvision_split(dataset: str, root: str, train: bool, download: bool = True) -> tuple[Tensor, Tensor]:
    """(images uint8 [N, 28, 28], labels int64) of MNIST or FashionMNIST, read once per process."""
    cls = {"MNIST": torchvision.datasets.MNIST, "FashionMNIST": torchvision.datasets.FashionMNIST}[dataset]
    raw = Path(root) / dataset / "raw"
    for name in IDX_FILES[train]:
        if (raw / name).exists():
            check_idx_file(raw / name)
    try:
        ds = cls(root=root, train=train, download=False)
    except RuntimeError:
        if not download:
            raise _missing(dataset, root, "download=false") from None
        created = next((p for p in reversed([raw, *raw.parents]) if not p.exists()), None)
        try:
            ds = cls(root=root, train=train, download=True)
        except Exception as err:  # any network or file error: say what to do instead
            if created is not None:  # leave no empty folders behind a failed download
                shutil.rmtree(created, ignore_errors=True)
            reason = textwrap.shorten(" ".join(str(err).split()), 400, placeholder=" ...")
            raise _missing(dataset, root, f"download failed: {reason}") from None
    return ds.data.clone(), ds.targets.clone().long()


def _missing(dataset: str, root: str, why: str) -> DataNotFoundError:
    folder = Path(root).resolve() / dataset / "raw"
    return DataNotFoundError(
        f"{dataset} was not found in {folder} ({why}). Put the four IDX files there, or point the data "
        f"root at a folder that holds {dataset}/raw: set the environment variable CL_DATA_DIR or the "
        f"config key data_dir (e.g. `python train.py data_dir=/path/to/data`)."
    )


def to_unit_range(x: Tensor) -> Tensor:
    """uint8 [B, 28, 28] -> float [B, 1, 28, 28] in [0, 1]."""
    return x.unsqueeze(1).float().div_(255.0)


PIXELS = ("unit", "standard")


class PixelScale:
    """Pixels in [0, 1] (``unit``), or standardised with the data set's mean and std (``standard``, as
    torchvision's examples, Avalanche and the SupSup code feed MNIST; it changes how much an MLP forgets)."""

    def __init__(self, kind: str, mean: float, std: float):
        if kind not in PIXELS:
            raise ValueError(f"pixels={kind!r} is not one of {PIXELS}")
        self.kind, self.mean, self.std = kind, mean, std

    @property
    def normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """``(mean, std)`` of the scale, as ``Description.normalization`` states it."""
        return ((self.mean,), (self.std,)) if self.kind == "standard" else ((0.0,), (1.0,))

    def finish(self, x: Tensor) -> Tensor:
        """A [0, 1] float batch to this scale (after any geometric transform, so rotations pad with black)."""
        return x.sub_(self.mean).div_(self.std) if self.kind == "standard" else x

    def __call__(self, x: Tensor) -> Tensor:
        return self.finish(to_unit_range(x))


class _MNISTFamily(ContinualDataModule):
    dataset = "MNIST"
    #: the training split's pixel mean and std in [0, 1] (``pixels: standard``)
    mean_std = (0.1307, 0.3081)

    def __init__(self, num_tasks: int, data_dir: str | None = None, download: bool = True, pixels: str = "unit",
                 **kwargs):
        super().__init__(num_tasks=num_tasks, **kwargs)
        self.data_dir = data_dir or default_data_dir()
        self.download = download
        self.pixel_scale = PixelScale(pixels, *self.mean_std)
        self._train: tuple[Tensor, Tensor] | None = None
        self._test: tuple[Tensor, Tensor] | None = None

    def prepare_data(self) -> None:
        """Downloads and checks the files; what it reads is kept, so that every later call (Lightning makes one
        per fit and per test) and :meth:`_load` read nothing again."""
        self._load()

    def _load(self) -> None:
        if self._train is None:
            self._train = load_torchvision_split(self.dataset, self.data_dir, True, self.download)
        if self._test is None:
            self._test = load_torchvision_split(self.dataset, self.data_dir, False, self.download)

    def _raw(self, split: str) -> tuple[Tensor, Tensor]:
        data = self._train if split == "train" else self._test
        assert data is not None, "setup() was not called"
        return data


class SplitMNIST(_MNISTFamily):
    """MNIST cut into ``num_tasks`` groups of classes (default 5 tasks of 2: 0/1, 2/3, ...).

    Task-IL and domain-IL label each task's classes 0..k-1; class-IL labels a class by its position in
    ``class_order``, so task t owns outputs ``[t*k, (t+1)*k)`` of one shared head.
    """

    name = "split_mnist"  # spelled as its config file (benchmark=split_mnist)

    @loader_options(*LOADER_OPTIONS)
    def __init__(self, num_tasks: int = 5, class_order: list[int] | None = None, shuffle_classes: bool = False,
                 data_dir: str | None = None, download: bool = True, *, pixels: str = "unit", **options: Any):
        super().__init__(num_tasks=num_tasks, data_dir=data_dir, download=download, pixels=pixels, **options)
        self.class_order = check_class_order(class_order, 10, self.seed if shuffle_classes else None)
        self.groups = equal_class_split(self.class_order, num_tasks)

    def describe(self) -> Description:
        tasks = tuple(Task(i, f"{self.name}/" + "-".join(map(str, g)), g) for i, g in enumerate(self.groups))
        return Description(self.name, tasks, input_shape=(1, 28, 28), outputs_per_task=len(self.groups[0]),
                           normalization=self.pixel_scale.normalization)

    def _task_split(self, task_id: int, split: str) -> TaskData:
        x, y = self._raw(split)
        return split_by_classes(x, y, self.groups[task_id], self.class_order, task_id, self.scenario,
                                self.pixel_scale)


class SplitFashionMNIST(SplitMNIST):
    """Split-MNIST's protocol on Fashion-MNIST."""

    dataset = "FashionMNIST"
    mean_std = (0.2860, 0.3530)
    name = "split_fashion_mnist"


class _PixelPermutation:
    def __init__(self, perm: Tensor | None, scale: PixelScale):
        self.perm, self.scale = perm, scale

    def __call__(self, x: Tensor) -> Tensor:
        x = self.scale(x)
        if self.perm is None:
            return x
        return x.flatten(1)[:, self.perm].view_as(x)


class _Rotation:
    def __init__(self, angle: float, scale: PixelScale):
        self.angle, self.scale = angle, scale

    def __call__(self, x: Tensor) -> Tensor:
        return self.scale.finish(rotate(to_unit_range(x), self.angle, interpolation=InterpolationMode.BILINEAR))


class _TransformedMNIST(_MNISTFamily):
    """All ten digits in every task; tasks differ by an input transform. Labels 0..9 (class-IL: +10t)."""

    name: str  # each benchmark's

    def describe(self) -> Description:
        return Description(self.name, tuple(Task(i, f"{self.name}/{i}") for i in range(self.num_tasks)),
                           input_shape=(1, 28, 28), outputs_per_task=10, normalization=self.pixel_scale.normalization)

    @abstractmethod
    def _transform(self, task_id: int) -> BatchTransform:
        """The input transform that defines task ``task_id``."""

    def _task_split(self, task_id: int, split: str) -> TaskData:
        x, y = self._raw(split)
        if self.scenario is Scenario.CLASS_IL:
            y = y + 10 * task_id
        return TaskData(x, y, task_id, self._transform(task_id))


class PermutedMNIST(_TransformedMNIST):
    """Each task applies its own fixed pixel permutation (from the benchmark seed)."""

    name = "permuted_mnist"

    @loader_options(*LOADER_OPTIONS, scenario="domain")
    def __init__(self, num_tasks: int = 10, first_unpermuted: bool = False, data_dir: str | None = None,
                 download: bool = True, *, pixels: str = "unit", **options: Any):
        super().__init__(num_tasks=num_tasks, data_dir=data_dir, download=download, pixels=pixels, **options)
        self.first_unpermuted = first_unpermuted
        g = torch.Generator().manual_seed(self.seed)
        self.permutations = [torch.randperm(784, generator=g) for _ in range(num_tasks)]

    def _transform(self, task_id: int) -> BatchTransform:
        if task_id == 0 and self.first_unpermuted:
            return _PixelPermutation(None, self.pixel_scale)
        return _PixelPermutation(self.permutations[task_id], self.pixel_scale)


class RotatedMNIST(_TransformedMNIST):
    """Each task rotates every image by its own angle (degrees): ``angles``, evenly spaced in ``[0, max_angle)``
    (``None``), or drawn uniformly in ``[0, max_angle)`` from the benchmark seed (``random``, as Mammoth's
    ``rot-mnist`` in the DER paper's protocol)."""

    name = "rotated_mnist"

    @loader_options(*LOADER_OPTIONS, scenario="domain")
    def __init__(self, num_tasks: int = 10, angles: Sequence[float] | Literal["random"] | None = None,
                 max_angle: float = 180.0, data_dir: str | None = None, download: bool = True, *,
                 pixels: str = "unit", **options: Any):
        super().__init__(num_tasks=num_tasks, data_dir=data_dir, download=download, pixels=pixels, **options)
        if angles is None:
            angles = [max_angle * i / num_tasks for i in range(num_tasks)]
        elif isinstance(angles, str):
            if angles != "random":
                raise ValueError(f"angles={angles!r} must be a list of degrees, null or 'random'")
            angles = np.random.default_rng(self.seed).uniform(0.0, max_angle, num_tasks).tolist()
        if len(angles) != num_tasks:
            raise ValueError(f"angles={list(angles)} must have num_tasks={num_tasks} entries")
        self.angles = [float(a) for a in angles]

    def _transform(self, task_id: int) -> BatchTransform:
        return _Rotation(self.angles[task_id], self.pixel_scale)
