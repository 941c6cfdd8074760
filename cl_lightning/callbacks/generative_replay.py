"""Replay: old tasks' inputs, drawn from a source, mixed into every training step through the method's loss.

From the second task on, every step draws a global replay batch of ``batch_size`` inputs spread evenly over
the past tasks from a :class:`ReplaySource`, and adds ``weight * L_replay`` to the loss (``penalty``). The
targets of replayed inputs come from the model as it was before the task (the *teacher*, a copy of every
parameter and buffer taken at the task's start and kept in the plugin's checkpointed state):

- ``soft`` (distillation, Hinton et al. 2015): ``T^2 * CE(softmax(teacher/T), softmax(student/T))``;
  in class-IL the teacher's outputs are its old tasks' classes and the student's all classes seen so far; the
  current task's classes get zero probability (``class_il_padding: probability``, van de Ven & Tolias'
  DGR+distill) or the teacher's logits are padded with zeros before the softmax (``logit``, the HNET authors'
  code, ``hypercl``'s ``get_fake_data_loss``), which gives each of them the probability of a logit of 0;
- ``hard``: cross-entropy on the teacher's argmax;
- labels given by the source (a stored memory): cross-entropy on them, whatever ``targets`` says.

A method that also trains its generator on replayed inputs (DGR's VAE relearning its own past samples)
exposes ``generator_replay_loss(x, task_ids)``; it is added to the same term.

The source is an explicit small interface (:class:`ReplaySource`): by default (``source: method``) the method
itself, a generative replay method such as ``cl_lightning.methods.replay.DGR``; with ``source: memory`` the
rehearsal plugin beside this one (any ``cl_lightning.callbacks.rehearsal.RehearsalPlugin``, e.g. with
``insertion: task_end, balance: task``), whose stored samples come with their labels. So generated and stored
replay share this one plugin: its batch spread over the past tasks, its seeded draws, its loss.

Distributed: the replay batch is drawn from a generator seeded by (run seed, task, step), so every rank
draws the same global batch and keeps its own contiguous share of it, as the datamodule does with real data;
2 processes then see the halves of the 1-process replay batch. The teacher is a copy of parameters that are
identical on every rank.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, cast, runtime_checkable

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call

from cl_lightning.callback import ContinualCallback, TaskLoss
from cl_lightning.tasks import Scenario

if TYPE_CHECKING:
    from cl_lightning.methods.base import ContinualModule

TARGETS = ("soft", "hard")
PADDINGS = ("probability", "logit")


@runtime_checkable
class ReplaySource(Protocol):
    """Where replayed inputs come from."""

    def sample_replay(self, tasks: Tensor, generator: torch.Generator,
                      teacher: dict[str, Tensor]) -> tuple[Tensor, Tensor | None]:
        """Inputs of the given past tasks (one per entry of ``tasks``), and their labels if the source knows
        them (``None``: the teacher labels them). ``generator`` (on the CPU) is the only randomness to use;
        ``teacher`` holds the method's parameters at the start of the task (a generator samples with those)."""


def distillation_loss(student: Tensor, teacher_probs: Tensor, temperature: float) -> Tensor:
    """Hinton et al.'s knowledge distillation: ``T^2 * mean(-sum p_teacher log softmax(student / T))``."""
    return -(teacher_probs * F.log_softmax(student / temperature, dim=1)).sum(1).mean() * temperature**2


class Replay(ContinualCallback):
    """Args:
        batch_size: replayed inputs per step (the global batch, spread evenly over the past tasks).
        weight: weight of the replay loss against the current task's loss (1: equal, as the HNET paper's
            code with ``l_rew=0.5``, up to a factor Adam ignores).
        targets: ``soft`` (distillation from the teacher) or ``hard`` (its argmax).
        temperature: the distillation temperature.
        class_il_padding: in class-IL, how the teacher's old-class outputs are widened to the classes seen so
            far for ``soft`` targets: ``probability`` (zero probability for the current task's classes) or
            ``logit`` (zero logits, then the softmax).
        source: ``method`` (the method is the source: a generative replay method), ``memory`` (the one rehearsal
            plugin among the method's plugins), or a :class:`ReplaySource` object.
    """

    SOURCES = ("method", "memory")

    def __init__(self, batch_size: int = 128, weight: float = 1.0, targets: str = "soft", temperature: float = 2.0,
                 source: str | ReplaySource = "method", class_il_padding: str = "probability"):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be at least 1")
        if weight < 0:
            raise ValueError(f"weight={weight} must not be negative")
        if targets not in TARGETS:
            raise ValueError(f"targets={targets!r} is not one of {list(TARGETS)}")
        if not temperature > 0:
            raise ValueError(f"temperature={temperature} must be positive")
        if class_il_padding not in PADDINGS:
            raise ValueError(f"class_il_padding={class_il_padding!r} is not one of {list(PADDINGS)}")
        if isinstance(source, str):
            if source not in self.SOURCES:
                raise ValueError(f"source={source!r} is not one of {list(self.SOURCES)} (or a ReplaySource object)")
        elif not isinstance(source, ReplaySource):
            raise ValueError(f"source: {type(source).__name__} has no sample_replay(tasks, generator, teacher)")
        self.batch_size, self.weight, self.targets, self.temperature = batch_size, weight, targets, temperature
        self.source, self.class_il_padding = source, class_il_padding
        #: The method's parameters and buffers at the start of the current task (None on the first task).
        self.teacher: dict[str, Tensor] | None = None

    # ------------------------------------------------------------------ teacher
    def on_task_start(self, trainer: L.Trainer, module: ContinualModule, task_id: int) -> None:
        if self._source(module) is None:
            if self.source == "memory":
                found = [type(p).__name__ for p in self._memories(module)]
                raise ValueError(f"Replay(source: memory) needs exactly one rehearsal plugin (e.g. RehearsalPlugin) "
                                 f"among {type(module).__name__}'s plugins; found {found or 'none'}")
            raise ValueError(f"Replay needs a source: {type(module).__name__} has no sample_replay (a generative "
                             f"replay method), and source is not 'memory'")
        if self.batch_size % trainer.world_size:
            raise ValueError(f"batch_size={self.batch_size} is the global replay batch and must divide by the "
                             f"{trainer.world_size} processes")
        if task_id == 0:
            self.teacher = None
            return
        self.teacher = {n: t.detach().clone() for n, t in [*module.named_parameters(), *module.named_buffers()]}

    def _memories(self, module: ContinualModule) -> list[ReplaySource]:
        return [p for p in module.plugins if p is not self and isinstance(p, ReplaySource)]

    def _source(self, module: ContinualModule) -> ReplaySource | None:
        if self.source == "method":
            return module if isinstance(module, ReplaySource) else None
        if self.source == "memory":
            found = self._memories(module)
            return found[0] if len(found) == 1 else None
        return cast(ReplaySource, self.source)

    def _teacher_on(self, device: torch.device) -> dict[str, Tensor]:
        assert self.teacher is not None
        if any(v.device != device for v in self.teacher.values()):
            self.teacher = {n: v.to(device) for n, v in self.teacher.items()}
        return self.teacher

    # ------------------------------------------------------------------ the replay batch
    def replay_tasks(self, task_id: int) -> Tensor:
        """Task ids of the global replay batch: ``batch_size`` entries spread evenly over tasks ``0..task_id-1``."""
        counts = torch.full((task_id,), self.batch_size // task_id)
        counts[: self.batch_size % task_id] += 1
        return torch.arange(task_id).repeat_interleave(counts)

    @staticmethod
    def generator(module: ContinualModule, salt: int = 0) -> torch.Generator:
        """A CPU generator seeded by the run seed, the task, the step and ``salt``: the same on every rank and
        after a resume."""
        step = int(getattr(module, "steps_before_task", 0)) + int(module.global_step)
        seed = ((torch.initial_seed() * 1_000_003 + module.current_task) * 1_000_003 + step) * 31 + salt
        return torch.Generator().manual_seed(seed % (2**63 - 1))

    def draw(self, module: ContinualModule) -> tuple[Tensor, Tensor, Tensor | None]:
        """This rank's share of the step's replay batch: inputs, task ids and the source's labels (or None)."""
        tasks = self.replay_tasks(module.current_task)
        with torch.no_grad():
            source = self._source(module)
            assert source is not None, "on_task_start found a replay source"
            x, y = source.sample_replay(tasks, self.generator(module), self._teacher_on(module.device))
        trainer = module.attached_trainer()
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        share = torch.arange(len(tasks)).tensor_split(world)[rank]
        tasks = tasks.to(x.device)
        return x[share.to(x.device)], tasks[share.to(x.device)], None if y is None else y[share.to(y.device)]

    # ------------------------------------------------------------------ loss
    def penalty(self, module: ContinualModule, batch: Any, step: TaskLoss | None = None) -> Tensor | None:
        if self.teacher is None or self.weight == 0:
            return None
        x, t, y = self.draw(module)
        loss = self.classifier_loss(module, x, t, y)
        extra = getattr(module, "generator_replay_loss", None)
        if callable(extra):
            loss = loss + extra(x, t)
        return self.weight * loss

    def classifier_loss(self, module: ContinualModule, x: Tensor, t: Tensor, y: Tensor | None) -> Tensor:
        """The classifier's loss on replayed inputs, against the source's labels or the teacher's outputs."""
        info = module.info
        assert info is not None
        current = module.current_task
        student = module(x, t)
        class_il = info.scenario is Scenario.CLASS_IL
        seen = (current + 1) * info.outputs_per_task
        if class_il:
            student = student[:, :seen]
        if y is not None:
            return F.cross_entropy(student, y)
        with torch.no_grad():
            teacher = functional_call(module, self._teacher_on(module.device), (x, t))
            if class_il:
                teacher = teacher[:, : current * info.outputs_per_task]
            if self.targets == "hard":
                labels = teacher.argmax(1)
            elif class_il and self.class_il_padding == "logit":
                probs = F.softmax(F.pad(teacher, (0, seen - teacher.shape[1])) / self.temperature, dim=1)
            else:
                probs = F.softmax(teacher / self.temperature, dim=1)
                if class_il:  # the current task's classes get zero probability
                    probs = F.pad(probs, (0, seen - probs.shape[1]))
        if self.targets == "hard":
            return F.cross_entropy(student, labels)
        return distillation_loss(student, probs, self.temperature)

    # ------------------------------------------------------------------ state
    def plugin_state(self) -> dict[str, Any]:
        return {"teacher": None if self.teacher is None else {n: v.cpu() for n, v in self.teacher.items()}}

    def load_plugin_state(self, state: dict[str, Any]) -> None:
        self.teacher = state.get("teacher")

    def stored_numel(self) -> int:
        return 0 if self.teacher is None else sum(v.numel() for v in self.teacher.values())
