"""Split-CIFAR-10 and Split-CIFAR-100, read from torchvision's CIFAR python-pickle files.

Expected layout under ``data_dir``: ``cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}`` or
``cifar-100-python/{train, test, meta}`` (each a pickle of a dict with ``b"data"`` ``[N, 3072]`` uint8 and
``b"labels"`` / ``b"fine_labels"``). Images stay uint8 ``[N, 3, 32, 32]`` in memory and are normalised
one batch at a time. Training batches get the references' augmentation (random crop 32 of the image padded by 4
black pixels, horizontal flip: Mammoth's and DER's ``RandomCrop(32, 4)`` + ``RandomHorizontalFlip``), applied by
the method on the batch's device; ``augment=false`` turns it off.
"""

from __future__ import annotations

import functools
import pickle
import textwrap
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from cl_lightning.augment import BatchAugmentation, RandomCropFlip
from cl_lightning.datamodule import LOADER_OPTIONS, ContinualDataModule, DataError, TaskData, loader_options
from cl_lightning.datamodules.class_split import check_class_order, equal_class_split, split_by_classes
from cl_lightning.datamodules.mnist import DataNotFoundError, default_data_dir
from cl_lightning.tasks import Description, Task

#: folder, train files, test files, label key, mean, std
LAYOUTS = {
    "CIFAR10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels",
                (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "CIFAR100": ("cifar-100-python", ["train"], ["test"], b"fine_labels",
                 (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


@functools.lru_cache(maxsize=4)
def load_cifar_split(dataset: str, root: str, train: bool, download: bool = False) -> tuple[Tensor, Tensor]:
    """(images uint8 [N, 3, 32, 32], labels int64) of CIFAR-10 or CIFAR-100, read once per process."""
    folder, train_files, test_files, key, _, _ = LAYOUTS[dataset]
    base = Path(root) / folder
    files = [base / f for f in (train_files if train else test_files)]
    if not all(f.exists() for f in files) and download:
        import torchvision

        try:
            getattr(torchvision.datasets, dataset)(root=root, train=train, download=True)
        except Exception as err:  # any network or file error: say what to do instead
            reason = textwrap.shorten(" ".join(str(err).split()), 400, placeholder=" ...")
            raise _missing(dataset, base, f"download failed: {reason}") from None
    missing = [f.name for f in files if not f.exists()]
    if missing:
        raise _missing(dataset, base, f"missing {', '.join(missing)}")
    xs, ys = [], []
    for f in files:
        try:
            with open(f, "rb") as fh:
                entry = pickle.load(fh, encoding="bytes")
        except (pickle.UnpicklingError, EOFError, ValueError) as err:
            raise DataError(f"{f} is corrupt ({' '.join(str(err).split()) or type(err).__name__}). Delete it so "
                            "that it is downloaded again, or copy a complete file there.") from None
        xs.append(torch.as_tensor(entry[b"data"], dtype=torch.uint8).view(-1, 3, 32, 32))
        ys.append(torch.as_tensor(entry[key], dtype=torch.long))
    return torch.cat(xs), torch.cat(ys)


def _missing(dataset: str, folder: Path, why: str) -> DataNotFoundError:
    return DataNotFoundError(f"{dataset} was not found in {folder.resolve()} ({why}). Put torchvision's python "
                             f"version of {dataset} there, or set CL_DATA_DIR / data_dir to its parent folder.")


class _Normalize:
    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)

    def __call__(self, x: Tensor) -> Tensor:
        return (x.float().div_(255.0) - self.mean) / self.std


class SplitCIFAR100(ContinualDataModule):
    """CIFAR-100 cut into ``num_tasks`` groups of classes (default 20 tasks of 5, SupSup's SplitCIFAR100).

    Labels as in Split-MNIST: task-/domain-IL 0..k-1 per task, class-IL the class's position in ``class_order``.
    """

    dataset = "CIFAR100"
    num_classes = 100
    #: The name runs and reports use (default ``split_<dataset>``); a variant's config file name.
    benchmark_name: str | None = None

    @loader_options(*LOADER_OPTIONS, "augment")
    def __init__(self, num_tasks: int = 20, class_order: list[int] | None = None, shuffle_classes: bool = False,
                 data_dir: str | None = None, download: bool = True, **options: Any):
        super().__init__(num_tasks=num_tasks, **options)
        self.data_dir = data_dir or default_data_dir()
        self.download = download
        self.class_order = check_class_order(class_order, self.num_classes, self.seed if shuffle_classes else None)
        self.groups = equal_class_split(self.class_order, num_tasks)
        _, _, _, _, mean, std = LAYOUTS[self.dataset]
        self.mean, self.std = mean, std
        self.normalize = _Normalize(mean, std)
        self._data: dict[str, tuple[Tensor, Tensor]] = {}

    def describe(self) -> Description:
        name = self.benchmark_name or f"split_{self.dataset.lower()}"
        tasks = tuple(Task(i, f"{name}/" + "-".join(map(str, g)), g) for i, g in enumerate(self.groups))
        return Description(name, tasks, input_shape=(3, 32, 32), outputs_per_task=len(self.groups[0]),
                           normalization=(self.mean, self.std))

    def train_augmentation(self) -> BatchAugmentation | None:
        if not self.augment:
            return None
        black = tuple(-m / s for m, s in zip(self.mean, self.std, strict=True))  # a 0 pixel, normalised
        return RandomCropFlip(padding=4, flip=True, fill=black)

    def prepare_data(self) -> None:
        for train in (True, False):
            load_cifar_split(self.dataset, self.data_dir, train, self.download)

    def _load(self) -> None:
        for split in ("train", "test"):
            self._data[split] = load_cifar_split(self.dataset, self.data_dir, split == "train", self.download)

    def _task_split(self, task_id: int, split: str) -> TaskData:
        x, y = self._data[split]
        return split_by_classes(x, y, self.groups[task_id], self.class_order, task_id, self.scenario,
                                self.normalize)


class SplitCIFAR10(SplitCIFAR100):
    """CIFAR-10 in ``num_tasks`` groups (default 5 tasks of 2)."""

    dataset = "CIFAR10"
    num_classes = 10

    @loader_options(*LOADER_OPTIONS, "augment")
    def __init__(self, num_tasks: int = 5, class_order: list[int] | None = None, shuffle_classes: bool = False,
                 data_dir: str | None = None, download: bool = True, **options: Any):
        super().__init__(num_tasks=num_tasks, class_order=class_order, shuffle_classes=shuffle_classes,
                         data_dir=data_dir, download=download, **options)


class SeqCIFAR10(SplitCIFAR10):
    """Mammoth's Seq-CIFAR-10: Split-CIFAR-10 named as its own benchmark (its runs and reports apart from
    ``split_cifar10``'s); its config sets class-IL and Mammoth's batch of 32."""

    benchmark_name = "seq_cifar10"
