"""Task data held as image files on disk (paths and labels), for data sets too large to decode into memory.

Indexed with a tensor of indices, :class:`ImageFiles` decodes those files, resizes each to one fixed size and
returns the whole batch, exactly as an in-memory :class:`~cl_lightning.datamodule.TaskData` does; the
benchmark's loader runs that in DataLoader worker processes. Decoding is deterministic (no random transform
here: training augmentation is applied by the method on the batch's device), so a batch is the same whatever
the number of workers or ranks. A missing or unreadable file is an error that names it.
"""

from __future__ import annotations

import os
import shutil
import tarfile
import textwrap
import urllib.request
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from cl_lightning.datamodule import BatchTransform, DataError, DataNotFoundError, TaskData

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp", ".tif", ".tiff")


def decode_image(path: str, size: tuple[int, int]) -> np.ndarray:
    """The image at ``path`` as uint8 ``[H, W, 3]`` of ``size`` ``(H, W)`` (RGB, bilinear resize; a JPEG is
    decoded at the smallest DCT scale not below ``size``, which is what makes large JPEGs cheap)."""
    h, w = size
    try:
        with Image.open(path) as img:
            img.draft("RGB", (w, h))
            rgb = img.convert("RGB")
        if rgb.size != (w, h):
            rgb = rgb.resize((w, h), Image.Resampling.BILINEAR)
        return np.asarray(rgb, dtype=np.uint8)
    except FileNotFoundError:
        raise DataNotFoundError(f"{path} is missing: the data set changed on disk after it was listed. Copy the "
                                "file back, or delete the data set's folder so that it is fetched again.") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        why = " ".join(str(err).split()) or type(err).__name__
        raise DataError(f"{path} is not a readable image ({why}): truncated or corrupt. Replace it with a "
                        "complete copy, or delete the data set's folder so that it is fetched again.") from None


class ImageFiles(TaskData):
    """One split of one task as image files: ``paths[i]`` has label ``y[i]``.

    A batch is ``(x, y, t)`` with ``x`` uint8 ``[B, 3, H, W]`` of ``size``, or what ``transform`` makes of it
    (a normalised float batch)."""

    reads_files = True

    def __init__(self, paths: Sequence[str] | np.ndarray, y: Tensor, task_id: int, size: tuple[int, int],
                 transform: BatchTransform | None = None):
        # a numpy array of strings, not a list: forked workers then share it without touching refcounts
        self.paths = np.asarray(paths, dtype=str)
        if len(self.paths) != len(y):
            raise ValueError(f"paths ({len(self.paths)}) and targets ({len(y)}) differ in length")
        self.y, self.task_id, self.size, self.transform = y, task_id, (int(size[0]), int(size[1])), transform

    @property
    def x(self) -> Tensor:
        """TaskData's tensor of inputs, which does not exist here."""
        raise TypeError("ImageFiles holds file paths, not an input tensor: index it (data[idx]) for a batch")

    @x.setter
    def x(self, value: Tensor) -> None:
        raise TypeError("ImageFiles holds file paths, not an input tensor")

    def __getitem__(self, idx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        rows = idx.numpy() if isinstance(idx, Tensor) else np.asarray(idx)
        images = np.stack([decode_image(str(p), self.size) for p in self.paths[rows]]) if len(rows) else \
            np.zeros((0, *self.size, 3), np.uint8)
        x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
        if self.transform is not None:
            x = self.transform(x)
        return x, self.y[idx], torch.full((len(rows),), self.task_id, dtype=torch.long)

    def subset(self, idx: Tensor) -> ImageFiles:
        return ImageFiles(self.paths[idx.numpy()], self.y[idx], self.task_id, self.size, self.transform)


def list_images(folder: Path, recursive: bool = False) -> list[str]:
    """The image files in ``folder`` (by extension; in its subfolders too if ``recursive``), sorted by path;
    reads no image."""
    found, todo = [], [str(folder)]
    while todo:
        with os.scandir(todo.pop()) as entries:
            for e in entries:
                if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS):
                    found.append(e.path)
                elif recursive and e.is_dir() and not e.name.startswith("."):
                    todo.append(e.path)
    return sorted(found)


def class_folders(root: Path) -> list[str]:
    """The names of the subfolders of ``root`` (one per class), sorted: a class's id is its position."""
    with os.scandir(root) as entries:
        return sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))


def parse_image_size(value: int | Sequence[int], key: str = "image_size") -> tuple[int, int]:
    """``(H, W)`` from an int (square) or a pair, or says why it cannot."""
    size = (value, value) if isinstance(value, int) else tuple(int(v) for v in value)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"{key}={value!r} must be a positive int or a pair [height, width]")
    return size[0], size[1]


def download_archive(url: str, root: Path) -> None:
    """Downloads the zip or tar archive at ``url`` into ``root`` and unpacks it there (the archive is deleted
    afterwards; a failed download leaves nothing behind). Raises whatever the network or archive raises."""
    root.mkdir(parents=True, exist_ok=True)
    archive = root / url.rstrip("/").rsplit("/", 1)[-1]
    partial = archive.with_name(archive.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(partial, "wb") as out:  # noqa: S310
            shutil.copyfileobj(response, out, 1 << 20)
        partial.replace(archive)
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as z:
                z.extractall(root)
        else:
            with tarfile.open(archive) as t:
                t.extractall(root, filter="data")
    finally:
        partial.unlink(missing_ok=True)
        archive.unlink(missing_ok=True)


def fetch_or_explain(name: str, url: str, root: Path, expected: Sequence[Path], download: bool, layout: str) -> None:
    """Makes sure every path of ``expected`` exists under ``root``: downloads ``url`` when one is missing and
    ``download`` is on; otherwise (or when that fails) a DataNotFoundError naming the missing files."""
    missing = [p for p in expected if not p.exists()]
    if not missing:
        return
    why = "download=false"
    if download:
        try:
            download_archive(url, root)
        except Exception as err:  # any network or archive error: say what to do instead
            why = "download failed: " + textwrap.shorten(" ".join(str(err).split()), 300, placeholder=" ...")
        else:
            missing = [p for p in expected if not p.exists()]
            if not missing:
                return
            why = f"{url} did not hold them"
    names = ", ".join(str(p.resolve()) for p in missing)
    raise DataNotFoundError(f"{name} was not found ({why}): missing {names}. Expected layout under "
                            f"{root.resolve()}: {layout}. Download {url} and unpack it there, or set CL_DATA_DIR / "
                            "data_dir to the folder that holds it.")
