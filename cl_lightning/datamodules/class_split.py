"""Class-split benchmarks (Split-MNIST, Split-CIFAR, Split-MiniImageNet): cutting a class order into tasks and
labelling each task's samples for its scenario."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from cl_lightning.datamodule import BatchTransform, TaskData
from cl_lightning.tasks import Scenario


def split_by_classes(x: Tensor, y: Tensor, classes: Sequence[int], class_order: Sequence[int], task_id: int,
                     scenario: Scenario, transform: BatchTransform | None) -> TaskData:
    """Task ``task_id``'s samples (those of ``classes``), labelled by the class's position in ``class_order``
    for class-IL (one shared head) or by its position inside the task for task- and domain-IL."""
    wanted = torch.tensor(list(classes))
    keep = torch.isin(y, wanted)
    position = torch.empty(len(class_order), dtype=torch.long)
    position[torch.tensor(list(class_order))] = torch.arange(len(class_order))
    labels = position[y[keep]]
    if scenario is not Scenario.CLASS_IL:
        labels = labels - task_id * len(wanted)
    return TaskData(x[keep], labels, task_id, transform)


def equal_class_split(class_order: Sequence[int], num_tasks: int, key: str = "num_tasks") -> list[tuple[int, ...]]:
    """Cuts a class order into ``num_tasks`` groups of equal size, or says why it cannot."""
    n = len(class_order)
    if num_tasks > n or n % num_tasks:
        raise ValueError(f"{key}={num_tasks} must divide the {n} classes into equal tasks")
    size = n // num_tasks
    return [tuple(class_order[i * size:(i + 1) * size]) for i in range(num_tasks)]


def check_class_order(class_order: Sequence[int] | None, num_classes: int, seed: int | None) -> list[int]:
    """The class order to use: given, or a permutation from the benchmark seed (None: natural order)."""
    if class_order is None:
        if seed is None:
            return list(range(num_classes))
        g = torch.Generator().manual_seed(seed)
        return torch.randperm(num_classes, generator=g).tolist()
    order = [int(c) for c in class_order]
    if sorted(order) != list(range(num_classes)):
        raise ValueError(f"class_order={list(class_order)} must be a permutation of 0..{num_classes - 1}")
    return order
