"""Split MiniImageNet (100 classes of 84x84 images, 20 tasks of 5 by default), read from the pickle files that
MARK's and ACL's code use (``dataloaders/miniimagenet.py`` of ``JuliousHurtado/meta-training-setup``).

Expected layout under ``data_dir``: ``miniimagenet/train.pkl`` and ``miniimagenet/test.pkl``, each a pickle of
a dict with ``"images"`` (uint8 ``[N, 84, 84, 3]``) and ``"labels"`` (N class ids in 0..99). There is no
download source: a missing file is an error that names it. Images stay uint8 ``[N, 3, 84, 84]`` in memory and
are normalised one batch at a time with ImageNet's mean and standard deviation, as the authors.
"""

from __future__ import annotations

import functools
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from cl_lightning.datamodule import LOADER_OPTIONS, ContinualDataModule, TaskData, loader_options
from cl_lightning.datamodules.cifar import _Normalize
from cl_lightning.datamodules.class_split import check_class_order, equal_class_split, split_by_classes
from cl_lightning.datamodules.mnist import DataNotFoundError, default_data_dir
from cl_lightning.tasks import Description, Task

FOLDER = "miniimagenet"
FILES = {"train": "train.pkl", "test": "test.pkl"}
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@functools.lru_cache(maxsize=2)
def load_miniimagenet_split(root: str, split: str) -> tuple[Tensor, Tensor]:
    """(images uint8 [N, 3, 84, 84], labels int64) of one split, read once per process."""
    path = Path(root) / FOLDER / FILES[split]
    if not path.exists():
        expected = ", ".join(str((Path(root) / FOLDER / f).resolve()) for f in FILES.values())
        raise DataNotFoundError(
            f"MiniImageNet was not found: missing {path.resolve()}. Expected {expected}, each a pickle of a dict "
            "with 'images' (uint8 [N, 84, 84, 3]) and 'labels' (class ids 0..99), the format of MARK's code; "
            "there is no download source. Set CL_DATA_DIR / data_dir to the folder that holds miniimagenet/.")
    with open(path, "rb") as fh:
        entry = pickle.load(fh)
    images = np.asarray(entry["images"], dtype=np.uint8)
    if images.ndim != 4 or images.shape[3] != 3:
        raise ValueError(f"{path}: 'images' must be uint8 [N, H, W, 3], got shape {list(images.shape)}")
    x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    y = torch.as_tensor(np.asarray(entry["labels"]), dtype=torch.long)
    if len(x) != len(y):
        raise ValueError(f"{path}: {len(x)} images but {len(y)} labels")
    return x, y


class SplitMiniImageNet(ContinualDataModule):
    """MiniImageNet cut into ``num_tasks`` groups of classes (default 20 tasks of 5); labels as in
    Split-CIFAR-100 (task-/domain-IL 0..k-1 per task, class-IL the class's position in ``class_order``)."""

    num_classes = 100

    @loader_options(*LOADER_OPTIONS, eval_batch_size=500)
    def __init__(self, num_tasks: int = 20, class_order: list[int] | None = None, shuffle_classes: bool = True,
                 data_dir: str | None = None, **options: Any):
        super().__init__(num_tasks=num_tasks, **options)
        self.data_dir = data_dir or default_data_dir()
        self.class_order = check_class_order(class_order, self.num_classes, self.seed if shuffle_classes else None)
        self.groups = equal_class_split(self.class_order, num_tasks)
        self.normalize = _Normalize(MEAN, STD)
        self._data: dict[str, tuple[Tensor, Tensor]] = {}

    def describe(self) -> Description:
        tasks = tuple(Task(i, "split_miniimagenet/" + "-".join(map(str, g)), g) for i, g in enumerate(self.groups))
        return Description("split_miniimagenet", tasks, input_shape=(3, 84, 84), outputs_per_task=len(self.groups[0]),
                           normalization=(MEAN, STD))

    def prepare_data(self) -> None:
        for split in FILES:
            load_miniimagenet_split(self.data_dir, split)

    def _load(self) -> None:
        for split in FILES:
            self._data[split] = load_miniimagenet_split(self.data_dir, split)

    def _task_split(self, task_id: int, split: str) -> TaskData:
        x, y = self._data[split]
        return split_by_classes(x, y, self.groups[task_id], self.class_order, task_id, self.scenario,
                                self.normalize)
