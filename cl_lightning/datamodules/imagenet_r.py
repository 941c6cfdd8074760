"""ImageNet-R (200 ImageNet classes as renditions: art, cartoons, sketches, ...; 10 tasks of 20 in L2P, DualPrompt
and CODA-Prompt), read from disk one batch at a time.

Expected layout under ``data_dir``: ``imagenet-r/<wnid>/*.jpg``, the 200 class folders of the official tar (a
class's id is its folder's position in sorted order, as torchvision's ImageFolder that the L2P code uses). There is
no official test split: as the L2P / DualPrompt code, a random 80 / 20 split of the whole set, here drawn with the
benchmark ``seed``. Images are resized to ``image_size`` (224). ``download=true`` fetches and unpacks the tar.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cl_lightning.augment import BatchAugmentation, RandomResizedCropFlip
from cl_lightning.datamodule import FILE_OPTIONS, DataError, loader_options
from cl_lightning.datamodules.image_folder import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Files,
    ImageFileBenchmark,
    as_files,
    held_out,
)
from cl_lightning.image_files import class_folders, fetch_or_explain, list_images

URL = "https://people.eecs.berkeley.edu/~hendrycks/imagenet-r.tar"
FOLDER = "imagenet-r"
LAYOUT = "imagenet-r/<wnid>/*.jpg, 200 class folders"
NUM_CLASSES = 200


@functools.lru_cache(maxsize=2)
def list_imagenet_r(root: str) -> Files:
    """Every file of ImageNet-R with its class id, listed once per process."""
    base = Path(root) / FOLDER
    names = class_folders(base)
    if len(names) != NUM_CLASSES:
        raise DataError(f"{base.resolve()} has {len(names)} class folders where ImageNet-R has {NUM_CLASSES}: "
                        "an incomplete copy. Delete the folder so that it is fetched again.")
    paths: list[str] = []
    labels: list[int] = []
    for i, name in enumerate(names):
        found = list_images(base / name)
        if not found:
            raise DataError(f"{(base / name).resolve()} holds no image: an incomplete copy of ImageNet-R")
        paths += found
        labels += [i] * len(found)
    return as_files(paths, labels)


class ImageNetR(ImageFileBenchmark):
    """ImageNet-R cut into ``num_tasks`` groups of classes (default 10 tasks of 20, class-IL); labels as in
    Split-CIFAR.

    Args:
        test_fraction: the share of the whole set held out for testing (a random split drawn with ``seed``).
        image_size: every image is resized to this (an int: square, or ``[height, width]``).
        mean, std: the per-channel normalisation (pixels in [0, 1]); ImageNet's by default.
        download: fetch the official tar into ``data_dir`` when the folder is missing.
        num_workers, pin_memory, persistent_workers: the loader's worker processes that decode batches.
        augment: training batches get a random resized crop and a horizontal flip.
    """

    name = "imagenet_r"

    @loader_options(*FILE_OPTIONS, scenario="class", eval_batch_size=256, num_workers=8, pin_memory=True,
                    persistent_workers=True)
    def __init__(self, num_tasks: int = 10, class_order: list[int] | None = None, shuffle_classes: bool = False,
                 test_fraction: float = 0.2, image_size: int | list[int] = 224,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 data_dir: str | None = None, download: bool = True, **options: Any):
        super().__init__(num_tasks=num_tasks, num_classes=NUM_CLASSES, class_order=class_order,
                         shuffle_classes=shuffle_classes, image_size=image_size, mean=mean, std=std,
                         data_dir=data_dir, **options)
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"test_fraction={test_fraction} must be in (0, 1)")
        self.test_fraction, self.download = test_fraction, download

    def train_augmentation(self) -> BatchAugmentation | None:
        return RandomResizedCropFlip() if self.augment else None

    def _list_files(self) -> dict[str, Files]:
        root = Path(self.data_dir)
        fetch_or_explain("ImageNet-R", URL, root, [root / FOLDER], self.download, LAYOUT)
        paths, y = list_imagenet_r(str(root))
        test = held_out(y, self.test_fraction, self.seed, stratified=False)
        return {"train": (paths[~test.numpy()], y[~test]), "test": (paths[test.numpy()], y[test])}
