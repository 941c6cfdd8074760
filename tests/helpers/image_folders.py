"""Tiny fake copies of the image-file data sets in their real layouts (Tiny ImageNet, ImageNet-R, CORe50, a plain
folder of class folders): a few small JPEG / PNG files per class, each noise around a colour of its class's own,
so a small network can learn them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

#: Overrides that build a benchmark which otherwise learns its size from its data folder, with no data there.
WITHOUT_DATA = {"image_folder": ["benchmark.num_classes=10"]}


def save_image(path: Path, label: int, rng: np.random.Generator, size: tuple[int, int] = (12, 10)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    colour = np.array([(label * 37) % 256, (label * 91) % 256, (label * 53) % 256])
    pixels = (colour + rng.integers(-20, 21, (*size, 3))).clip(0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, quality=95) if path.suffix.lower() in (".jpg", ".jpeg") else \
        Image.fromarray(pixels).save(path)


def fake_image_folder(root: Path, classes: int = 4, per_class: int = 5, ext: str = ".jpg") -> Path:
    rng = np.random.default_rng(0)
    for c in range(classes):
        for i in range(per_class):
            # sizes vary (every image is resized to one) and a subfolder is read too
            where = root / f"class_{c:02d}" / ("sub" if i == 0 else "")
            save_image(where / f"img_{i}{ext}", c, rng, (9 + i, 12))
    return root


def fake_tiny_imagenet(data_dir: Path, per_class: int = 2, val_per_class: int = 1) -> Path:
    base = data_dir / "tiny-imagenet-200"
    rng = np.random.default_rng(0)
    wnids = [f"n{1000 + 7 * i:08d}" for i in range(200)]
    base.mkdir(parents=True)
    (base / "wnids.txt").write_text("\n".join(reversed(wnids)) + "\n")  # not sorted in the file
    lines = []
    for c, wnid in enumerate(wnids):
        for i in range(per_class):
            save_image(base / "train" / wnid / "images" / f"{wnid}_{i}.JPEG", c, rng, (16, 16))
        (base / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
        for i in range(val_per_class):
            name = f"val_{c * val_per_class + i}.JPEG"
            save_image(base / "val" / "images" / name, c, rng, (16, 16))
            lines.append(f"{name}\t{wnid}\t0\t0\t15\t15")
    (base / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return data_dir


def fake_imagenet_r(data_dir: Path, per_class: int = 5) -> Path:
    base = data_dir / "imagenet-r"
    rng = np.random.default_rng(1)
    for c in range(200):
        for i in range(per_class):
            save_image(base / f"n{2000 + 3 * c:08d}" / f"art_{i}.jpg", c, rng, (10 + i % 3, 14))
    (base / "README.txt").write_text("ImageNet-R\n")
    return data_dir


def fake_core50(data_dir: Path, per_object: int = 1, sessions: range = range(1, 12)) -> Path:
    base = data_dir / "core50_128x128"
    rng = np.random.default_rng(2)
    for s in sessions:
        for o in range(1, 51):
            for i in range(per_object):
                save_image(base / f"s{s}" / f"o{o}" / f"C_{s:02d}_{o:02d}_{i:03d}.png", o - 1, rng, (8, 8))
    return data_dir
