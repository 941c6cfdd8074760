"""Shared fixtures (the real MNIST root) and the test process's thread count; the helpers tests import are in
``tests/helpers/``."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers.run import find_mnist_root

# two threads in one process; under pytest-xdist the cores are shared among its workers
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _WORKERS)))


@pytest.fixture(scope="session")
def mnist_root() -> Path:
    """The real MNIST root. CI must have it: there a missing folder fails instead of skipping."""
    root = find_mnist_root()
    if root is None:
        if os.environ.get("CI"):
            pytest.fail("real MNIST not found: CI must set CL_DATA_DIR to a folder with MNIST/raw")
        pytest.skip("real MNIST not available (set CL_DATA_DIR)")
    return root


@pytest.fixture(autouse=True)
def _own_wandb_service_per_test():
    """No W&B run or service outlives its test: a run left open would be reused by the next test's logger,
    and a process started later would inherit ``WANDB_SERVICE`` and share this worker's wandb-core (a
    ``train.py`` subprocess so attached once hung a CI run for 900 s)."""
    os.environ.pop("WANDB_SERVICE", None)
    yield
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()
    os.environ.pop("WANDB_SERVICE", None)


@pytest.fixture
def one_thread():
    """Torch on one thread for the test: runs of many small matrix products or convolutions are faster so on a
    shared CPU. A module uses it for all its tests with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
