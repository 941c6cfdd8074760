"""The base of every plugin that keeps a rehearsal memory (``cl_lightning.memory.RehearsalMemory``).

It fills the memory in one of two ways and hands replay batches to its subclass:

- ``insertion: reservoir``: after every training step the *global* batch is offered to the reservoir.
  Under DDP each rank holds a contiguous share of that batch, so the chosen rows are gathered from all
  ranks (``all_gather``; only when the seeded reservoir actually takes a sample) and every rank writes
  the same rows in the same slots. Subclasses may store extra fields (DER's logits) with
  :meth:`extra_fields`.
- ``insertion: task_end``: at a task's end a seeded random subset of the task's training data (every rank
  holds the whole data set, so no communication is needed) is added, and the budget is split equally
  between classes (``balance: class``) or tasks (``balance: task``).

A replay batch (:meth:`replay_batch`) is drawn from the memory's own generator, the same on every rank, and gets
the benchmark's training augmentation (memories hold samples as loaded, un-augmented, as Mammoth's buffer does);
each rank takes its share of it, so a loss written as ``sum over the share * world / n`` has the
single-process gradient once DDP averages the ranks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

import lightning as L
import torch
from torch import Tensor

from cl_lightning.callback import ContinualCallback
from cl_lightning.datamodule import benchmark_of
from cl_lightning.memory import RehearsalMemory, group_keys

if TYPE_CHECKING:
    from cl_lightning.methods.base import ContinualModule

INSERTIONS = ("reservoir", "task_end")
BALANCES = ("class", "task")


def world_and_rank(module: ContinualModule) -> tuple[int, int]:
    trainer = module.attached_trainer()
    if trainer is None:
        return 1, 0
    return trainer.world_size, trainer.global_rank


def gather_global(trainer: L.Trainer, value: Tensor) -> Tensor:
    """The global batch of a per-rank share (ranks hold equal contiguous shares, in rank order)."""
    if trainer.world_size == 1:
        return value
    return trainer.strategy.all_gather(value.contiguous()).flatten(0, 1)


class RehearsalPlugin(ContinualCallback):
    """Args:
        memory_size: the budget in samples, across all tasks.
        batch_size: samples drawn from the memory per step (the global replay batch).
        insertion: ``reservoir`` (every training step) or ``task_end``.
        balance: with ``task_end``, split the budget equally between ``class``-es or ``task``-s.
        seed: seeds the memory's insertion and sampling generators.
    """

    def __init__(self, memory_size: int = 500, batch_size: int = 128, insertion: str = "reservoir",
                 balance: str = "class", seed: int = 0):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be at least 1")
        if insertion not in INSERTIONS:
            raise ValueError(f"insertion={insertion!r} is not one of {list(INSERTIONS)}")
        if balance not in BALANCES:
            raise ValueError(f"balance={balance!r} is not one of {list(BALANCES)}")
        self.memory = RehearsalMemory(memory_size, seed)
        self.batch_size, self.insertion, self.balance = batch_size, insertion, balance

    # ------------------------------------------------------------------ for subclasses
    def extra_fields(self, module: ContinualModule, x: Tensor, t: Tensor) -> dict[str, Tensor]:
        """Fields stored beside ``x, y, t`` for the rows being inserted (DER: the network's outputs)."""
        return {}

    # ------------------------------------------------------------------ filling
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.insertion != "reservoir":
            return
        x, y, t = batch
        pairs = self.memory.reservoir_slots(len(y) * trainer.world_size)
        if not pairs:
            return  # the same decision on every rank: no collective is skipped by one rank only
        rows = sorted({i for i, _ in pairs})
        where = {r: k for k, r in enumerate(rows)}
        pick = torch.tensor(rows, device=y.device)
        fields = {"x": gather_global(trainer, x)[pick], "y": gather_global(trainer, y)[pick],
                  "t": gather_global(trainer, t)[pick]}
        fields.update(self.extra_fields(cast("ContinualModule", pl_module), fields["x"], fields["t"]))
        self.memory.write([(where[i], slot) for i, slot in pairs], fields)

    def on_task_end(self, trainer: L.Trainer, module: ContinualModule, task_id: int) -> None:
        if self.insertion == "task_end":
            self.insert_task(trainer, module, task_id)

    def insert_task(self, trainer: L.Trainer, module: ContinualModule, task_id: int,
                    order: Tensor | None = None) -> None:
        """Adds this task's share of the budget, each new group's samples in ``order`` (default: a seeded
        random order), and shrinks the older groups to their new share."""
        data = benchmark_of(trainer).split(task_id, "train")
        if order is None:
            order = torch.randperm(len(data), generator=self.memory.insert_gen)
        keys = group_keys(self.balance, data.y[order], torch.full((len(order),), task_id))
        old = self.memory.groups(self.balance).unique().tolist() if not self.memory.is_empty else []
        quotas = self.memory.quotas(sorted(set(old) | set(keys.unique().tolist())))
        chosen = torch.cat([order[keys == g][: quotas[g]] for g in keys.unique().tolist()])
        x, y, t = data[chosen]
        self.memory.set_group(self.balance, {"x": x.to(module.device), "y": y.to(module.device),
                                             "t": t.to(module.device)})

    # ------------------------------------------------------------------ drawing
    def replay_batch(self, module: ContinualModule, n: int | None = None,
                     draw: int = 0) -> tuple[dict[str, Tensor], float] | None:
        """This rank's share of a replay batch of ``n`` samples, augmented, and the factor ``world / n`` that turns
        a sum over the share into the global mean; ``None`` while the memory is empty. ``draw`` numbers the
        replay batches of one step (DER++ draws two), so each gets its own augmentation."""
        if self.memory.is_empty:
            return None
        idx = self.memory.draw(n or self.batch_size)
        world, rank = world_and_rank(module)
        share = idx.tensor_split(world)[rank]
        rows = self.memory.get(share, module.device)
        rows["x"] = module.augment_inputs(rows["x"], salt=1 + draw, global_n=len(idx))  # stored un-augmented
        return rows, world / len(idx)

    def sample_replay(self, tasks: Tensor, generator: torch.Generator,
                      teacher: dict[str, Tensor]) -> tuple[Tensor, Tensor | None]:
        """Stored samples of the given past tasks (one per entry of ``tasks``, drawn with ``generator``) and
        their stored labels: the memory as a ``ReplaySource``, so the ``Replay`` plugin (``source: memory``)
        replays it exactly as it replays a generator. A task with no stored sample (possible with a small
        reservoir) is replaced by samples of the whole memory."""
        if self.memory.is_empty:
            raise ValueError(f"{type(self).__name__}: the memory is empty, there is nothing to replay")
        stored = self.memory.data["t"].cpu()
        tasks = tasks.cpu()
        # one batched draw: a uniform position inside each entry's task block of the task-sorted memory
        order = torch.argsort(stored, stable=True)
        counts = torch.bincount(stored, minlength=int(tasks.max()) + 1)
        starts = counts.cumsum(0) - counts
        n, u = counts[tasks], torch.rand(len(tasks), generator=generator)
        offset = (u * n).long().clamp_max((n - 1).clamp_min(0))
        in_task = order[(starts[tasks] + offset).clamp_max(len(stored) - 1)]  # clamped: empty tasks, unused
        anywhere = (u * len(stored)).long().clamp_max(len(stored) - 1)
        idx = torch.where(n > 0, in_task, anywhere)
        rows = self.memory.get(idx)
        return rows["x"], rows["y"]

    # ------------------------------------------------------------------ state
    def on_task_start(self, trainer: L.Trainer, module: ContinualModule, task_id: int) -> None:
        assert module.info is not None  # set when the method binds, before any plugin runs
        if module.info.is_regression:
            raise ValueError(f"{type(self).__name__} replays labels with a cross-entropy: it needs a classification "
                             f"benchmark, not {module.info.name}")
        self.memory.to(module.device)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.memory.to(pl_module.device)  # also after a resume, which loads the memory on the CPU
        super().on_fit_start(trainer, pl_module)

    def plugin_state(self) -> dict[str, Any]:
        return {"memory": self.memory.state_dict()}

    def load_plugin_state(self, state: dict[str, Any]) -> None:
        if "memory" in state:
            self.memory.load_state_dict(state["memory"])

    def stored_numel(self) -> int:
        return self.memory.numel()
