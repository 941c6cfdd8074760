"""Benchmarks: each a ContinualDataModule that serves one task at a time. Add one by dropping a file here."""

from cl_lightning.datamodule import ContinualDataModule, DataError, TaskData
from cl_lightning.datamodules.cifar import SeqCIFAR10, SplitCIFAR10, SplitCIFAR100
from cl_lightning.datamodules.core50 import CORe50
from cl_lightning.datamodules.image_folder import ImageFolder
from cl_lightning.datamodules.imagenet_r import ImageNetR
from cl_lightning.datamodules.miniimagenet import SplitMiniImageNet
from cl_lightning.datamodules.mnist import (
    DataNotFoundError,
    PermutedMNIST,
    RotatedMNIST,
    SplitFashionMNIST,
    SplitMNIST,
)
from cl_lightning.datamodules.poly_regression import PolynomialRegression
from cl_lightning.datamodules.tinyimagenet import SeqTinyImageNet

__all__ = [
    "CORe50", "ContinualDataModule", "DataError", "DataNotFoundError", "ImageFolder", "ImageNetR", "PermutedMNIST",
    "PolynomialRegression", "RotatedMNIST", "SeqCIFAR10", "SeqTinyImageNet", "SplitCIFAR10", "SplitCIFAR100",
    "SplitFashionMNIST", "SplitMiniImageNet", "SplitMNIST", "TaskData",
]
