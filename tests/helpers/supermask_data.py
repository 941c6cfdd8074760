"""A small generated benchmark for the supermask tests: Gaussian blobs, one random feature
permutation per task (so tasks are clearly separated), ``k`` classes per task."""

from __future__ import annotations

import torch

from cl_lightning.datamodule import ContinualDataModule, TaskData
from cl_lightning.datamodules import PermutedMNIST
from cl_lightning.tasks import Description, Scenario, Task


class PermutedBlobs(ContinualDataModule):
    def __init__(self, num_tasks: int = 3, classes: int = 4, dim: int = 32, samples: int = 256, test_samples: int = 256,
                 spread: float = 3.0, scenario: str = "domain", batch_size: int = 32, seed: int = 0,
                 eval_batch_size: int = 128):
        super().__init__(num_tasks=num_tasks, batch_size=batch_size, scenario=scenario, seed=seed,
                         eval_batch_size=eval_batch_size)
        self.classes, self.dim, self.spread = classes, dim, spread
        self.samples, self.test_samples = samples, test_samples

    def describe(self) -> Description:
        return Description("permuted_blobs", tuple(Task(i, f"blobs/{i}") for i in range(self.num_tasks)),
                           input_shape=(self.dim,), outputs_per_task=self.classes)

    def _load(self) -> None:
        g = torch.Generator().manual_seed(self.seed)
        self.centers = torch.randn(self.classes, self.dim, generator=g) * self.spread
        self.perms = [torch.randperm(self.dim, generator=g) for _ in range(self.num_tasks)]

    def _task_split(self, task_id: int, split: str) -> TaskData:
        n = self.samples if split == "train" else self.test_samples
        g = torch.Generator().manual_seed(self.seed * 1000 + task_id * 2 + (split == "test"))
        y = torch.randint(self.classes, (n,), generator=g)
        x = (self.centers[y] + torch.randn(n, self.dim, generator=g))[:, self.perms[task_id]]
        if self.scenario is Scenario.CLASS_IL:
            y = y + task_id * self.classes
        return TaskData(x, y, task_id)


class SmallPermutedMNIST(PermutedMNIST):
    """Permuted-MNIST with the test split cut to its first 1000 images (keeps the test fast)."""

    def _task_split(self, task_id, split):
        data = super()._task_split(task_id, split)
        if split == "test":
            data.x, data.y = data.x[:1000], data.y[:1000]
        return data
