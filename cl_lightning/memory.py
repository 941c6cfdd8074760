"""A rehearsal memory: a fixed budget of ``size`` stored samples shared by all tasks.

One buffer serves every rehearsal method (ER, DER, GEM, A-GEM, iCaRL, the gradient-sign filter's memory
reference). It holds inputs (as the network sees them), labels, task ids and, for logit replay, the
network's outputs at insertion time. Two ways to fill it:

- **reservoir** (:meth:`RehearsalMemory.add_reservoir`): every sample of the stream has the same chance
  ``size / seen`` to be in the memory (Vitter's algorithm R), decided sample by sample;
- **balanced** (:meth:`RehearsalMemory.set_group`): at a task's end the budget is split equally between
  groups (classes, a class being a label of one task, or tasks); each group keeps the first samples of its
  priority order, so shrinking a group keeps its best (iCaRL's herding order) or a random subset (a random order).

Every decision comes from the memory's own seeded generator, never from the rank or the global RNG, so
DDP ranks that see the same stream hold bitwise the same memory. Draws of replay batches use a second
seeded generator (:meth:`RehearsalMemory.draw`). Both generators and the contents are in :meth:`state_dict`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

FIELDS = ("x", "y", "t", "logits")
#: Class groups are (task, label) pairs, ``t * CLASS_STRIDE + y``: in task- and domain-IL every task reuses the
#: labels 0..k-1, and each task's classes still get their own share of the budget.
CLASS_STRIDE = 1 << 20


def group_keys(by: str, y: Tensor, t: Tensor) -> Tensor:
    """The balancing group of each sample: its class (``class``: the pair task, label) or its task (``task``)."""
    if by == "class":
        return t.long() * CLASS_STRIDE + y.long()
    if by == "task":
        return t.long()
    raise ValueError(f"balance={by!r} is not 'class' or 'task'")


class RehearsalMemory:
    """Args:
        size: the budget in samples, across all tasks.
        seed: seeds the insertion and the sampling generators.
    """

    def __init__(self, size: int, seed: int = 0):
        if size < 1:
            raise ValueError(f"memory_size={size} must be at least 1")
        self.size = int(size)
        self.seed = int(seed)
        self.insert_gen = torch.Generator().manual_seed(self.seed)
        self.sample_gen = torch.Generator().manual_seed(self.seed + 1)
        self.seen = 0  # stream samples offered to the reservoir so far
        self.data: dict[str, Tensor] = {}  # filled rows only, in slot order

    def __len__(self) -> int:
        return len(self.data["y"]) if self.data else 0

    @property
    def is_empty(self) -> bool:
        return len(self) == 0

    # ------------------------------------------------------------------ reservoir
    def reservoir_slots(self, n: int) -> list[tuple[int, int]]:
        """Decides where the next ``n`` stream samples go: ``(position in the batch, memory slot)`` pairs
        in stream order (a later pair may overwrite an earlier one's slot). Depends on nothing but the
        count seen so far and the generator, so it can be decided before the data is gathered."""
        u = torch.rand(n, generator=self.insert_gen, dtype=torch.float64).tolist()
        pairs = []
        for i in range(n):
            seen = self.seen + i  # samples before this one
            if seen < self.size:
                pairs.append((i, seen))
            else:
                j = int(u[i] * (seen + 1))  # uniform over 0..seen
                if j < self.size:
                    pairs.append((i, j))
        self.seen += n
        return pairs

    def write(self, pairs: list[tuple[int, int]], batch: dict[str, Tensor]) -> None:
        """Writes ``batch`` rows into the slots decided by :meth:`reservoir_slots`."""
        if not pairs:
            return
        final: dict[int, int] = {}
        for i, slot in pairs:  # the last write to a slot wins, as in a sample-by-sample loop
            final[slot] = i
        slots = torch.tensor(sorted(final))
        rows = torch.tensor([final[s] for s in sorted(final)])
        before = len(self)
        grow = int(slots.max()) + 1 - before
        missing = set(self.data) - set(batch)
        if before and missing:
            raise ValueError(f"memory fields {sorted(missing)} are missing from the rows to write")
        for key, value in batch.items():
            value = value.detach()
            if key not in self.data:
                if before:
                    raise ValueError(f"memory field {key!r} was not stored for the samples already in memory")
                self.data[key] = value.new_empty((0, *value.shape[1:]))
            if grow > 0:
                pad = self.data[key].new_zeros((grow, *self.data[key].shape[1:]))
                self.data[key] = torch.cat([self.data[key], pad])
            store = self.data[key]
            store[slots.to(store.device)] = value[rows.to(value.device)].to(store.device, store.dtype)

    def add_reservoir(self, batch: dict[str, Tensor]) -> None:
        """Offers a batch of stream samples (``x``, ``y``, ``t`` and optionally ``logits``) to the reservoir."""
        self.write(self.reservoir_slots(len(batch["y"])), batch)

    # ------------------------------------------------------------------ balanced
    def groups(self, by: str) -> Tensor:
        """The group of every stored sample (:func:`group_keys`)."""
        return group_keys(by, self.data["y"], self.data["t"])

    def set_group(self, by: str, new: dict[str, Tensor]) -> None:
        """Adds samples of new groups (each in its priority order, best first) and splits the budget equally
        between all groups: ``size // groups`` each, the remainder one extra to the earliest groups."""
        parts: dict[int, dict[str, Tensor]] = {}
        if self.data:
            old = self.groups(by)
            for g in old.unique().tolist():
                parts[g] = {k: v[old == g] for k, v in self.data.items()}
        keys = group_keys(by, new["y"], new["t"])
        for g in keys.unique().tolist():
            if g in parts:
                raise ValueError(f"group {g} is already in the memory")
            parts[g] = {k: v[keys == g] for k, v in new.items()}
        quotas = self.quotas(list(parts))
        kept = [{k: v[: quotas[g]] for k, v in parts[g].items()} for g in sorted(parts)]
        self.data = {k: torch.cat([p[k] for p in kept]) for k in kept[0]}

    def quotas(self, groups: list[int]) -> dict[int, int]:
        """Samples per group: equal shares of the budget, the remainder to the first groups in order."""
        base, extra = divmod(self.size, len(groups))
        return {g: base + (1 if i < extra else 0) for i, g in enumerate(sorted(groups))}

    # ------------------------------------------------------------------ drawing
    def draw(self, n: int) -> Tensor:
        """Indices of ``min(n, len)`` distinct stored samples, from the sampling generator."""
        return torch.randperm(len(self), generator=self.sample_gen)[: min(n, len(self))]

    def get(self, idx: Tensor, device: torch.device | None = None) -> dict[str, Tensor]:
        """The stored fields of rows ``idx`` (on ``device``)."""
        out = {}
        for k, v in self.data.items():
            rows = v[idx.to(v.device)]
            out[k] = rows.to(device) if device is not None else rows
        return out

    def to(self, device: torch.device) -> RehearsalMemory:
        self.data = {k: v.to(device) for k, v in self.data.items()}
        return self

    # ------------------------------------------------------------------ state
    def numel(self) -> int:
        """Values stored (inputs, labels, task ids, logits), for the storage accounting."""
        return sum(v.numel() for v in self.data.values())

    def state_dict(self) -> dict[str, Any]:
        return {"size": self.size, "seed": self.seed, "seen": self.seen,
                "insert_gen": self.insert_gen.get_state(), "sample_gen": self.sample_gen.get_state(),
                "data": {k: v.cpu() for k, v in self.data.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["size"]) != self.size:
            raise ValueError(f"memory_size={self.size} differs from the checkpoint's {state['size']}")
        self.seen = int(state["seen"])
        self.insert_gen.set_state(state["insert_gen"])
        self.sample_gen.set_state(state["sample_gen"])
        self.data = dict(state["data"])
