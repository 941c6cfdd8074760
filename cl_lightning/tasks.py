"""What a continual benchmark is made of: tasks, and the scenario that says how they are told apart.

A benchmark describes itself with a :class:`BenchmarkInfo` before any data is loaded, so a method can
build its heads (and reject a scenario it cannot handle) before training starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Scenario(str, Enum):
    """How the task identity is available (van de Ven & Tolias' three scenarios).

    - ``task``: task-IL, the task id is given at test time; one head per task (hnet CL1, SupSup GG).
    - ``domain``: domain-IL, one shared head, the id is not needed (CL2).
    - ``class``: class-IL, one head over the classes of all tasks, the id must be inferred (CL3, GN).
    """

    TASK_IL = "task"
    DOMAIN_IL = "domain"
    CLASS_IL = "class"

    @classmethod
    def parse(cls, value: str | Scenario) -> Scenario:
        if isinstance(value, Scenario):
            return value
        aliases = {"task-il": "task", "domain-il": "domain", "class-il": "class", "cl1": "task",
                   "cl2": "domain", "cl3": "class"}
        key = aliases.get(str(value).lower(), str(value).lower())
        try:
            return cls(key)
        except ValueError:
            valid = ", ".join(s.value for s in cls)
            raise ValueError(f"scenario={value!r} is not one of: {valid}") from None


@dataclass(frozen=True)
class Task:
    """One task: its position, a readable name and the original labels (or transform) that define it."""

    id: int
    name: str
    classes: tuple[int, ...] = ()


@dataclass(frozen=True)
class Description:
    """What a benchmark says of itself before loading data, whatever the scenario (a benchmark's
    :meth:`~cl_lightning.datamodule.ContinualDataModule.describe`)."""

    name: str
    tasks: tuple[Task, ...]
    input_shape: tuple[int, ...]
    outputs_per_task: int
    problem: str = "classification"  # or "regression"
    #: Per-channel ``(mean, std)`` the benchmark's images were normalised with (``x = (pixel - mean) / std``,
    #: pixels in [0, 1]); ``None``: inputs are not images of that kind. A pretrained backbone reads it to put
    #: inputs into its own weights' normalisation.
    normalization: tuple[tuple[float, ...], tuple[float, ...]] | None = None


@dataclass(frozen=True)
class BenchmarkInfo:
    """Static description of a benchmark, available before its data is loaded.

    ``outputs_per_task`` is the width of one task's head; ``head_width`` is the width of the output
    the network must produce for the chosen scenario (task-IL packs one slice per task).
    """

    name: str
    tasks: tuple[Task, ...]
    scenario: Scenario
    input_shape: tuple[int, ...]
    outputs_per_task: int
    problem: str = "classification"  # or "regression"
    normalization: tuple[tuple[float, ...], tuple[float, ...]] | None = None

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    @property
    def multi_head(self) -> bool:
        return self.scenario is Scenario.TASK_IL

    @property
    def head_width(self) -> int:
        if self.scenario is Scenario.DOMAIN_IL:
            return self.outputs_per_task
        return self.outputs_per_task * self.num_tasks

    @property
    def is_regression(self) -> bool:
        return self.problem == "regression"
