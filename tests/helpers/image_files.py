"""Small CIFAR and MiniImageNet files in their real pickle formats (neither can be downloaded here)."""

from __future__ import annotations

import pickle

import numpy as np


def class_coloured_images(labels: np.ndarray, pixel_shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """uint8 images of ``pixel_shape``, noise around a mean colour of their class's own, so the toy is learnable."""
    base = (labels * 2).reshape(-1, *[1] * len(pixel_shape))
    return (base + rng.integers(0, 40, (len(labels), *pixel_shape))).clip(0, 255).astype(np.uint8)


def fake_cifar100(root, per_class_train: int = 4, per_class_test: int = 2):
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, per in (("train", per_class_train), ("test", per_class_test)):
        labels = np.repeat(np.arange(100), per)
        data = class_coloured_images(labels, (3072,), rng)
        with open(folder / name, "wb") as fh:
            pickle.dump({b"data": data, b"fine_labels": labels.tolist(), b"coarse_labels": (labels // 5).tolist(),
                         b"filenames": [b"x.png"] * len(labels)}, fh)
    with open(folder / "meta", "wb") as fh:
        pickle.dump({b"fine_label_names": [f"c{i}".encode() for i in range(100)]}, fh)
    return root


def fake_cifar10(root, per_class: int = 2, varied: bool = False):
    """CIFAR-10's batch files with ``per_class`` images of each class in each; constant images (7) unless
    ``varied`` (noise around a brightness of the class's own, which crops and flips change)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = np.arange(10).repeat(per_class)
        data = (class_coloured_images(labels * 12, (3072,), rng) if varied  # brightness 24 apart: learnable
                else np.full((len(labels), 3072), 7, np.uint8))
        with open(folder / name, "wb") as fh:
            pickle.dump({b"data": data, b"labels": labels.tolist()}, fh)
    return root


def fake_miniimagenet(root, per_class_train: int = 2, per_class_test: int = 1):
    folder = root / "miniimagenet"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, per in (("train", per_class_train), ("test", per_class_test)):
        labels = np.repeat(np.arange(100), per)
        images = class_coloured_images(labels, (84, 84, 3), rng)
        with open(folder / f"{name}.pkl", "wb") as fh:
            pickle.dump({"images": images, "labels": labels.tolist()}, fh)
    return root
