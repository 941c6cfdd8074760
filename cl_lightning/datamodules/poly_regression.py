"""The 1-D polynomial regression toy of von Oswald et al. (2020), Fig. 2.

Three tasks, each a polynomial observed with Gaussian noise on its own, disjoint input interval:
(x+3)^3 on [-4, -2], 2x^2 - 1 on [-1, 1] and (x-3)^3 on [2, 4]. The matrix entries are test MSE
(lower is better).
"""

from __future__ import annotations

from typing import Any

import torch

from cl_lightning.datamodule import LOADER_OPTIONS, ContinualDataModule, TaskData, loader_options
from cl_lightning.tasks import Description, Task

FUNCTIONS = (
    ("(x+3)^3", lambda x: (x + 3.0) ** 3, (-4.0, -2.0)),
    ("2x^2-1", lambda x: 2.0 * x**2 - 1.0, (-1.0, 1.0)),
    ("(x-3)^3", lambda x: (x - 3.0) ** 3, (2.0, 4.0)),
)


class PolynomialRegression(ContinualDataModule):
    """Noisy training samples drawn uniformly in each task's interval; noise-free, evenly spaced test points."""

    @loader_options(*LOADER_OPTIONS, batch_size=32)
    def __init__(self, num_tasks: int = 3, train_samples: int = 20, test_samples: int = 100,
                 noise_std: float = 0.05, **options: Any):
        if not 1 <= num_tasks <= len(FUNCTIONS):
            raise ValueError(f"num_tasks={num_tasks} must be between 1 and {len(FUNCTIONS)}")
        if options["scenario"] == "class":
            raise ValueError("scenario='class' has no meaning for regression; use 'task' or 'domain'")
        if noise_std < 0:
            raise ValueError(f"noise_std={noise_std} must not be negative")
        super().__init__(num_tasks=num_tasks, **options)
        self.train_samples, self.test_samples, self.noise_std = train_samples, test_samples, noise_std

    def describe(self) -> Description:
        tasks = tuple(Task(i, f"poly_regression/{FUNCTIONS[i][0]}") for i in range(self.num_tasks))
        return Description("poly_regression", tasks, input_shape=(1,), outputs_per_task=1, problem="regression")

    def _load(self) -> None:
        """Nothing to read: the data is generated per task from the benchmark seed."""

    def _task_split(self, task_id: int, split: str) -> TaskData:
        _, f, (lo, hi) = FUNCTIONS[task_id]
        if split == "test":
            x = torch.linspace(lo, hi, self.test_samples)
            y = f(x)
        else:
            g = torch.Generator().manual_seed(self.seed * 1009 + task_id)
            x = lo + (hi - lo) * torch.rand(self.train_samples, generator=g)
            y = f(x) + self.noise_std * torch.randn(self.train_samples, generator=g)
        return TaskData(x.unsqueeze(1), y.unsqueeze(1), task_id)

