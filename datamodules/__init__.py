"""Benchmarks: each a ContinualDataModule that serves one task at a time. Add one by dropping a file here."""

from datamodules.base import ContinualDataModule, DataError, TaskData
from datamodules.cifar import SplitCIFAR10, SplitCIFAR100
from datamodules.miniimagenet import SplitMiniImageNet
from datamodules.mnist import (
    DataNotFoundError,
    PermutedMNIST,
    RotatedMNIST,
    SplitFashionMNIST,
    SplitMNIST,
)
from datamodules.poly_regression import PolynomialRegression

__all__ = [
    "ContinualDataModule", "DataError", "DataNotFoundError", "PermutedMNIST", "PolynomialRegression", "RotatedMNIST",
    "SplitCIFAR10", "SplitCIFAR100", "SplitFashionMNIST", "SplitMiniImageNet", "SplitMNIST", "TaskData",
]
