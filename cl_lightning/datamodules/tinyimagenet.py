"""Sequential Tiny ImageNet (200 classes of 64x64 images, 10 tasks of 20, as Mammoth's seq-tinyimg), read from
the official ``tiny-imagenet-200/`` folder one batch at a time.

Expected layout under ``data_dir``: ``tiny-imagenet-200/wnids.txt`` (the 200 class ids), ``train/<wnid>/images/
*.JPEG`` (500 per class) and ``val/images/*.JPEG`` with ``val/val_annotations.txt`` (file, wnid, box per line),
the test split (the labelled val set; the official test set has no labels). A class's id is its wnid's position
in the sorted ``wnids.txt``. ``download=true`` fetches and unpacks the official zip into ``data_dir``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cl_lightning.augment import BatchAugmentation, RandomCropFlip
from cl_lightning.datamodule import FILE_OPTIONS, DataError, DataNotFoundError, loader_options
from cl_lightning.datamodules.image_folder import Files, ImageFileBenchmark, as_files
from cl_lightning.image_files import fetch_or_explain, list_images

URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
FOLDER = "tiny-imagenet-200"
LAYOUT = ("tiny-imagenet-200/wnids.txt, tiny-imagenet-200/train/<wnid>/images/*.JPEG, "
          "tiny-imagenet-200/val/images/*.JPEG and tiny-imagenet-200/val/val_annotations.txt")
#: Mammoth's per-channel statistics of the training images
MEAN, STD = (0.4802, 0.4480, 0.3975), (0.2770, 0.2691, 0.2821)
NUM_CLASSES = 200


def expected_files(base: Path) -> list[Path]:
    return [base / "wnids.txt", base / "train", base / "val" / "images", base / "val" / "val_annotations.txt"]


@functools.lru_cache(maxsize=2)
def list_tiny_imagenet(root: str) -> dict[str, Files]:
    """Train and val files with their class ids, read once per process (folder listings and two text files)."""
    base = Path(root) / FOLDER
    wnids_file = base / "wnids.txt"
    wnids = sorted(line.strip() for line in wnids_file.read_text().splitlines() if line.strip())
    if len(wnids) != NUM_CLASSES or len(set(wnids)) != NUM_CLASSES:
        raise DataError(f"{wnids_file} lists {len(set(wnids))} distinct class ids where Tiny ImageNet has "
                        f"{NUM_CLASSES}: the file is truncated or not Tiny ImageNet's")
    ids = {w: i for i, w in enumerate(wnids)}
    paths: list[str] = []
    labels: list[int] = []
    for wnid in wnids:
        folder = base / "train" / wnid / "images"
        if not folder.is_dir():
            raise DataNotFoundError(f"Tiny ImageNet: missing {folder.resolve()} (class {wnid} of wnids.txt). "
                                    f"Expected layout: {LAYOUT}.")
        found = list_images(folder)
        paths += found
        labels += [ids[wnid]] * len(found)
    files = {"train": as_files(paths, labels)}
    annotations = base / "val" / "val_annotations.txt"
    val_paths: list[str] = []
    val_labels: list[int] = []
    for n, line in enumerate(annotations.read_text().splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2 or fields[1] not in ids:
            raise DataError(f"{annotations}, line {n}: {line[:80]!r} is not 'file<TAB>wnid<TAB>box' with a wnid of "
                            "wnids.txt: the file is corrupt")
        val_paths.append(str(base / "val" / "images" / fields[0]))
        val_labels.append(ids[fields[1]])
    files["test"] = as_files(val_paths, val_labels)
    return files


class SeqTinyImageNet(ImageFileBenchmark):
    """Tiny ImageNet cut into ``num_tasks`` groups of classes (default 10 tasks of 20); labels as in Split-CIFAR.

    Args:
        image_size: the images' side (64: their own; an int or ``[height, width]``).
        mean, std: the per-channel normalisation (pixels in [0, 1]; default: Mammoth's training-set statistics).
        download: fetch the official zip into ``data_dir`` when files are missing.
        num_workers, pin_memory, persistent_workers: the loader's worker processes that decode batches.
        augment: training batches get a random crop of the image's size from the image padded by 8 black pixels,
            and a horizontal flip (Mammoth's seq-tinyimg pads by 4).
    """

    name = "seq_tinyimagenet"

    @loader_options(*FILE_OPTIONS, batch_size=32, scenario="class", eval_batch_size=256, num_workers=4, pin_memory=True,
                    persistent_workers=True)
    def __init__(self, num_tasks: int = 10, class_order: list[int] | None = None, shuffle_classes: bool = False,
                 image_size: int | list[int] = 64, mean: Sequence[float] = MEAN, std: Sequence[float] = STD,
                 data_dir: str | None = None, download: bool = True, **options: Any):
        super().__init__(num_tasks=num_tasks, num_classes=NUM_CLASSES, class_order=class_order,
                         shuffle_classes=shuffle_classes, image_size=image_size, mean=mean, std=std,
                         data_dir=data_dir, **options)
        self.download = download

    def train_augmentation(self) -> BatchAugmentation | None:
        if not self.augment:
            return None
        black = tuple(-m / s for m, s in zip(self.mean, self.std, strict=True))  # a 0 pixel, normalised
        return RandomCropFlip(padding=8, fill=black)

    def _list_files(self) -> dict[str, Files]:
        root = Path(self.data_dir)
        fetch_or_explain("Tiny ImageNet", URL, root, expected_files(root / FOLDER), self.download, LAYOUT)
        return list_tiny_imagenet(str(root))
