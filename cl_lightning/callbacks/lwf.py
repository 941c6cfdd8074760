"""Learning without Forgetting (Li & Hoiem 2016): distil the previous model's outputs on the new data.

At the start of every task after the first, the backbone and head are snapshotted. Each step adds
``strength * KD(new, old)`` on the current batch, with ``KD`` the cross-entropy between the
temperature-``T`` softmaxes of the snapshot and of the network, over the outputs of earlier tasks:
task-IL: each earlier task's head slice (one softmax per slice); domain-IL: the shared head;
class-IL: the columns of the classes seen in earlier tasks (read from their training labels at each
task's end, the same on every rank). No memory of samples is kept: only the snapshot.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from cl_lightning.callback import ContinualCallback, TaskLoss
from cl_lightning.datamodule import benchmark_of
from cl_lightning.tasks import Scenario

if TYPE_CHECKING:
    from cl_lightning.methods.base import ContinualModule


def soft_cross_entropy(new: Tensor, old: Tensor, temperature: float) -> Tensor:
    """Per-row cross-entropy of ``softmax(new/T)`` against the targets ``softmax(old/T)``."""
    return -(F.softmax(old / temperature, -1) * F.log_softmax(new / temperature, -1)).sum(-1)


def raw_outputs(module: ContinualModule, x: Tensor, state: dict[str, Tensor] | None = None) -> Tensor:
    """The packed head output of ``backbone`` + ``head`` (all tasks' slices in task-IL), with ``state``
    (names ``backbone.*`` / ``head.*``) in place of the module's own parameters when given."""
    assert module.head is not None
    if state is None:
        return module.head(module.backbone(x))
    parts = {name: {k.removeprefix(name + "."): v for k, v in state.items() if k.startswith(name + ".")}
             for name in ("backbone", "head")}
    return functional_call(module.head, parts["head"], (functional_call(module.backbone, parts["backbone"], (x,)),))


class LwF(ContinualCallback):
    """Args:
        strength: weight of the distillation term (lambda_o; the paper uses 1).
        temperature: softmax temperature T (the paper uses 2).
    """

    def __init__(self, strength: float = 1.0, temperature: float = 2.0):
        super().__init__()
        if strength < 0:
            raise ValueError(f"strength={strength} must not be negative")
        if not temperature > 0:
            raise ValueError(f"temperature={temperature} must be positive")
        self.strength, self.temperature = strength, temperature
        self.old: dict[str, Tensor] = {}
        self.old_classes: list[int] = []

    def check_host(self, module: ContinualModule) -> None:
        """LwF distils the outputs of ``head(backbone(x))``: a method with both, on a classification benchmark."""
        if not (isinstance(getattr(module, "backbone", None), nn.Module) and
                isinstance(getattr(module, "head", None), nn.Module)):
            raise ValueError(f"plugins: LwF needs a method with a backbone and a head, not {type(module).__name__}")
        assert module.info is not None  # set when the method binds, before any plugin runs
        if module.info.is_regression:
            raise ValueError(f"plugins: LwF distils softmax outputs: it needs a classification benchmark, not "
                             f"{module.info.name}")

    def on_task_start(self, trainer: L.Trainer, module: ContinualModule, task_id: int) -> None:
        if task_id > 0:
            self.old = {f"{part}.{k}": v.detach().clone() for part in ("backbone", "head")
                        for k, v in getattr(module, part).state_dict().items()}

    def on_task_end(self, trainer: L.Trainer, module: ContinualModule, task_id: int) -> None:
        labels = benchmark_of(trainer).split(task_id, "train").y.unique().tolist()
        self.old_classes = sorted(set(self.old_classes) | set(labels))

    def penalty(self, module: ContinualModule, batch: Any, step: TaskLoss | None = None) -> Tensor | None:
        if not self.old or self.strength == 0:
            return None
        x, _, _ = batch
        was_training = module.training
        module.eval()
        with torch.no_grad():
            old = raw_outputs(module, x, {k: v.to(x.device) for k, v in self.old.items()})
        module.train(was_training)
        new = raw_outputs(module, x)
        info = module.info
        assert info is not None
        if info.scenario is Scenario.TASK_IL:
            k, done = info.outputs_per_task, module.current_task
            new, old = new[:, : done * k].reshape(len(x), done, k), old[:, : done * k].reshape(len(x), done, k)
            loss = soft_cross_entropy(new, old, self.temperature).sum(-1)
        elif info.scenario is Scenario.CLASS_IL:
            cols = torch.tensor(self.old_classes, device=x.device)
            loss = soft_cross_entropy(new[:, cols], old[:, cols], self.temperature)
        else:
            loss = soft_cross_entropy(new, old, self.temperature)
        return self.strength * loss.mean()

    def plugin_state(self) -> dict[str, Any]:
        return {"old": {k: v.cpu() for k, v in self.old.items()}, "old_classes": list(self.old_classes)}

    def load_plugin_state(self, state: dict[str, Any]) -> None:
        self.old = dict(state.get("old", {}))
        self.old_classes = list(state.get("old_classes", []))

    def stored_numel(self) -> int:
        return sum(v.numel() for v in self.old.values())
