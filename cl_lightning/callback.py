"""The plugin seam of a continual method: a Lightning ``Callback`` that also knows task boundaries.

A ``ContinualCallback`` is handed to a method as one of its ``plugins``; the method returns its plugins
from ``configure_callbacks``, so every per-task Trainer runs them, and their ``state_dict`` lands in
Lightning's checkpoints. Plugins change training in one of two distributed-safe ways: a ``penalty``
added to the loss (one backward pass, reduced by DDP as usual), or a change of ``.grad`` in
``on_before_optimizer_step`` (gradients are already reduced there).

A plugin that needs more of its method than every ``ContinualModule`` has (a hypernetwork, a knowledge
base, a mask basis) says what in ``host``: a ``typing.Protocol`` listing those attributes and methods. It
is checked once, when the method binds to the benchmark, and a method that lacks a member is named with
it; the plugin then uses those members and nothing else of the method.

The hooks' ``module`` is the method, a ``cl_lightning.methods.base.ContinualModule``; plugins annotate it so
(importing it for type checking only). This module does not: the method's module imports the plugin contract, and
the contract does not import it back.
"""

from __future__ import annotations

import inspect
from typing import Any, ClassVar, NamedTuple, Protocol

import lightning as L
from torch import Tensor


def missing_members(obj: Any, protocol: type) -> list[str]:
    """The members of ``protocol`` that ``obj`` lacks."""
    return [name for name in protocol_members(protocol) if not hasattr(obj, name)]


class TaskLoss(NamedTuple):
    """A method's loss on one training batch before the plugins' penalties, with the logits and targets the
    error count (the ARI of every run) is taken from; ``logits=None`` when the step has none to count."""

    value: Tensor
    logits: Tensor | None = None
    targets: Tensor | None = None


def protocol_members(protocol: type) -> list[str]:
    """The attribute and method names a ``Protocol`` class (and its protocol bases) declares."""
    names: list[str] = []
    for cls in reversed(protocol.__mro__):
        if cls in (object, Protocol, Any) or not getattr(cls, "_is_protocol", False):
            continue
        members = [*getattr(cls, "__annotations__", {}),
                   *(n for n, v in vars(cls).items() if inspect.isfunction(v) or isinstance(v, property))]
        names += [n for n in members if not n.startswith("_") and n not in names]
    return names


class ContinualCallback(L.Callback):
    """Base of between-task and per-step continual-learning plugins.

    Override :meth:`on_task_start` / :meth:`on_task_end` (run once per task, also across a resume:
    the last task seen is part of the state) and :meth:`penalty`. Keep state that must survive a
    resume in :meth:`plugin_state` / :meth:`load_plugin_state`.
    """

    #: What the plugin needs of its method beyond ``ContinualModule`` (a ``Protocol``), or None.
    host: ClassVar[type | None] = None

    def __init__(self) -> None:
        self.task_started = -1
        self.task_finished = -1

    def check_host(self, module: Any) -> None:
        """Raises a ``ValueError`` naming the members of :attr:`host` that ``module`` lacks."""
        if self.host is None:
            return
        missing = missing_members(module, self.host)
        if missing:
            raise ValueError(f"plugins: {type(self).__name__} needs a method that provides {self.host.__name__} "
                             f"({', '.join(missing)}); {type(module).__name__} does not")

    # ---------------------------------------------------------------- for subclasses
    def on_task_start(self, trainer: L.Trainer, module: Any, task_id: int) -> None:
        """Before the first step of a task (e.g. snapshot targets for a regularizer)."""

    def on_task_end(self, trainer: L.Trainer, module: Any, task_id: int) -> None:
        """After the last step of a task, before it is evaluated (e.g. Fisher, consolidation)."""

    def penalty(self, module: Any, batch: Any, step: TaskLoss | None = None) -> Tensor | None:
        """A term added to the training loss at every step; ``None`` when there is nothing to add. ``step`` is the
        method's loss on this batch (with its logits), for a penalty that depends on it."""
        return None

    def plugin_state(self) -> dict[str, Any]:
        return {}

    def load_plugin_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`plugin_state` returned."""

    def stored_numel(self) -> int:
        """Number of values this plugin keeps between tasks (for the storage accounting)."""
        return 0

    # ---------------------------------------------------------------- plumbing
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        module: Any = pl_module  # plugins run only under a ContinualModule
        task = module.current_task
        if self.task_started != task:  # not again when a task is resumed mid-way
            self.on_task_start(trainer, module, task)
            self.task_started = task

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        module: Any = pl_module
        task = module.current_task
        if self.task_finished != task:
            self.on_task_end(trainer, module, task)
            self.task_finished = task

    def state_dict(self) -> dict[str, Any]:
        return {"task_started": self.task_started, "task_finished": self.task_finished, **self.plugin_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict)
        self.task_started = state.pop("task_started", -1)
        self.task_finished = state.pop("task_finished", -1)
        self.load_plugin_state(state)
