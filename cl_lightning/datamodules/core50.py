"""CORe50 (Lomonaco & Maltoni 2017): 50 household objects filmed in 11 sessions (backgrounds, lighting), 128x128
crops read from disk one batch at a time, under its two standard protocols.

- ``protocol: nc`` (new classes): the 50 objects cut into ``num_tasks`` tasks of classes (class-IL by default),
  trained on the training sessions, tested on the test sessions.
- ``protocol: ni`` (new instances): one task per training session, every task with all 50 objects (domain-IL by
  default), each tested on the same test sessions.

The standard sessions: training s1, s2, s4, s5, s6, s8, s9, s11; test s3, s7, s10. Expected layout under
``data_dir``: ``core50_128x128/s<1..11>/o<1..50>/*.png`` (object ``o<k>`` is class ``k - 1``).
``download=true`` fetches and unpacks the official zip.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from cl_lightning.augment import BatchAugmentation, RandomResizedCropFlip
from cl_lightning.datamodule import DataNotFoundError, TaskData
from cl_lightning.datamodules.image_folder import IMAGENET_MEAN, IMAGENET_STD, Files, ImageFileBenchmark, as_files
from cl_lightning.image_files import ImageFiles, fetch_or_explain, list_images
from cl_lightning.tasks import Scenario

URL = "http://bias.csr.unibo.it/maltoni/download/core50/core50_128x128.zip"
FOLDER = "core50_128x128"
LAYOUT = "core50_128x128/s<1..11>/o<1..50>/*.png"
NUM_OBJECTS = 50
TRAIN_SESSIONS = (1, 2, 4, 5, 6, 8, 9, 11)
TEST_SESSIONS = (3, 7, 10)
PROTOCOLS = ("nc", "ni")


@functools.lru_cache(maxsize=4)
def list_session(root: str, session: int) -> Files:
    """One session's files with their object's class id, listed once per process."""
    paths: list[str] = []
    labels: list[int] = []
    for obj in range(1, NUM_OBJECTS + 1):
        folder = Path(root) / FOLDER / f"s{session}" / f"o{obj}"
        if not folder.is_dir():
            raise DataNotFoundError(f"CORe50: missing {folder.resolve()}. Expected layout: {LAYOUT}.")
        found = list_images(folder)
        paths += found
        labels += [obj - 1] * len(found)
    return as_files(paths, labels)


def _sessions(value: Sequence[int], key: str) -> tuple[int, ...]:
    sessions = tuple(int(s) for s in value)
    if not sessions or len(set(sessions)) != len(sessions) or not all(1 <= s <= 11 for s in sessions):
        raise ValueError(f"{key}={list(value)} must be distinct sessions among 1..11")
    return sessions


class CORe50(ImageFileBenchmark):
    """CORe50 under the NC or NI protocol.

    Args:
        protocol: ``nc`` (tasks of objects) or ``ni`` (a task per training session).
        num_tasks: NC: how many tasks the 50 objects are cut into (default 10 of 5); NI: the number of training
            sessions (null: all of them).
        train_sessions, test_sessions: the sessions trained on and tested on (the standard ones by default).
        scenario: null: class-IL for NC, domain-IL for NI.
        image_size: the images' side (128: their own; an int or ``[height, width]``).
        mean, std: the per-channel normalisation (pixels in [0, 1]); ImageNet's by default.
        download: fetch the official zip into ``data_dir`` when files are missing.
        num_workers, pin_memory, persistent_workers: the loader's worker processes that decode batches.
        augment: training batches get a random resized crop and a horizontal flip.
    """

    name = "core50"

    def __init__(self, protocol: str = "nc", num_tasks: int | None = None, class_order: list[int] | None = None,
                 shuffle_classes: bool = False, train_sessions: Sequence[int] = TRAIN_SESSIONS,
                 test_sessions: Sequence[int] = TEST_SESSIONS, image_size: int | list[int] = 128,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 data_dir: str | None = None, download: bool = True, batch_size: int = 128,
                 scenario: str | None = None, seed: int = 0, train_samples_per_task: int | None = None,
                 val_fraction: float = 0.0, eval_batch_size: int = 256, augment: bool = True, num_workers: int = 4,
                 pin_memory: bool = True, persistent_workers: bool = True):
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol={protocol!r} is not one of {PROTOCOLS}")
        self.protocol = protocol
        self.name = "core50" if protocol == "nc" else "core50_ni"  # as the config files
        self.train_sessions = _sessions(train_sessions, "train_sessions")
        self.test_sessions = _sessions(test_sessions, "test_sessions")
        if set(self.train_sessions) & set(self.test_sessions):
            raise ValueError(f"train_sessions={list(self.train_sessions)} and test_sessions="
                             f"{list(self.test_sessions)} overlap")
        if protocol == "ni":
            if num_tasks is not None and num_tasks != len(self.train_sessions):
                raise ValueError(f"num_tasks={num_tasks}: the NI protocol has one task per training session "
                                 f"({len(self.train_sessions)}); set it to null or change train_sessions")
            num_tasks = len(self.train_sessions)
        super().__init__(num_tasks=num_tasks or 10, num_classes=NUM_OBJECTS, class_order=class_order,
                         shuffle_classes=shuffle_classes, image_size=image_size, mean=mean, std=std,
                         data_dir=data_dir, batch_size=batch_size,
                         scenario=scenario or ("class" if protocol == "nc" else "domain"), seed=seed,
                         train_samples_per_task=train_samples_per_task, val_fraction=val_fraction,
                         eval_batch_size=eval_batch_size, augment=augment, num_workers=num_workers,
                         pin_memory=pin_memory, persistent_workers=persistent_workers,
                         class_tasks=protocol == "nc")
        self.download = download
        self._session: dict[str, np.ndarray] = {}

    def _task_name(self, task_id: int) -> str:
        if self.protocol == "ni":
            return f"{self.name}/s{self.train_sessions[task_id]}"
        return super()._task_name(task_id)

    def train_augmentation(self) -> BatchAugmentation | None:
        return RandomResizedCropFlip() if self.augment else None

    def _list_files(self) -> dict[str, Files]:
        root = Path(self.data_dir)
        sessions = sorted(self.train_sessions + self.test_sessions)
        fetch_or_explain("CORe50", URL, root, [root / FOLDER / f"s{s}" for s in sessions], self.download, LAYOUT)
        files: dict[str, Files] = {}
        for split, chosen in (("train", self.train_sessions), ("test", self.test_sessions)):
            parts = [list_session(str(root), s) for s in chosen]
            files[split] = (np.concatenate([p for p, _ in parts]), torch.cat([y for _, y in parts]))
            self._session[split] = np.concatenate([np.full(len(y), s) for s, (_, y) in zip(chosen, parts,
                                                                                           strict=True)])
        return files

    def _task_split(self, task_id: int, split: str) -> TaskData:
        if self.protocol == "nc":
            return super()._task_split(task_id, split)
        paths, y = self._files[split]
        if split == "train":
            rows = self._session["train"] == self.train_sessions[task_id]
            paths, y = paths[rows], y[torch.from_numpy(rows)]
        if self.scenario is Scenario.CLASS_IL:  # as Permuted-MNIST: each task its own block of outputs
            y = y + NUM_OBJECTS * task_id
        return ImageFiles(paths, y, task_id, self.size, self.normalize)
