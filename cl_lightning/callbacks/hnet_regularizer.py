"""The output regularizer of task-conditioned hypernetworks (von Oswald et al. 2020, Eq. 2).

At the start of task T the targets are fixed: for every earlier task t, the weights the hypernetwork
generates for it then, ``target_t = h(e_t)`` (with the hypernetwork as it was before task T). Every
training step then adds

    beta / (T-1) * sum_{t<T} || h(e_t; theta [+ dtheta]) - target_t ||^2

to the task loss (squared L2 norm over all generated weights, averaged over past tasks, as in the
paper). All past embeddings go through the hypernetwork in one batched pass. Options:

- ``max_past_tasks=K``: a random subset of at most K past tasks per step (the paper's stochastic
  regularizer), normalised by the subset size, so the cost stays flat as tasks accumulate. The subset
  comes from a generator seeded by (seed, task, step), so every DDP rank draws the same one.
- ``lookahead``: regularise at ``theta + dtheta``, with ``dtheta`` the step the optimizer would take
  on the task loss alone (treated as a constant, as in the authors' code). It is computed from the
  gradient of the task loss the method hands to :meth:`penalty` (one extra backward through it, averaged
  across DDP ranks) and the optimizer's state: the exact next Adam/AdamW step (without weight decay), SGD
  with its momentum buffer, and ``-lr * grad`` for other optimizers.

What is stored is not the ``[T-1, N]`` targets but what they are made of: a copy of the hypernetwork's
parameters taken at the task start (``snapshot``; the past embeddings are frozen model parameters, read
from the module). ``target_t = h(e_t; snapshot)`` is the same value, so the penalty is the same, while the
plugin's memory and its share of every checkpoint stay one hypernetwork's size whatever the number of
tasks. Every rank takes the snapshot from identical weights, and checkpoints (also those in the middle of
a task) hold it, so a resume rebuilds exactly what the uninterrupted run used. Targets set by hand, or
restored from a checkpoint of an earlier version that stored them, are still honoured (``targets``).

Two exact forms of the same penalty (``form``):

- ``direct``: generate the past tasks' weights (one batched pass) and compare them with the targets
  (generated from the snapshot without gradient, for the regularised tasks only); the cost grows with the
  number of past tasks (``[P, N]`` generated weights, forward and backward).
- ``algebraic`` (for :class:`~cl_lightning.nets.hypernetwork.HyperNetwork` and its subclasses): the
  hypernetwork's last layer is linear, so the penalty follows from Gram matrices of that layer and small
  sums over the past tasks' last hidden activations
  (:meth:`~cl_lightning.nets.hypernetwork.HyperNetwork.output_penalty`), without generating any past
  task's weights: the per-step cost barely depends on the number of past tasks. It needs a reference
  (the snapshot's last layer and the past tasks' last hidden activations under it): derived, never
  checkpointed, rebuilt from the snapshot after a load. (Explicit ``targets`` instead: the reference is
  built from the current hypernetwork and carries their remaining difference exactly; that part of the
  cost grows with the past tasks again.)
- ``auto`` (default): the algebraic form where the hypernetwork supports it and a cost model expects it
  to be cheaper (:meth:`~cl_lightning.nets.hypernetwork.HyperNetwork.output_penalty_is_cheaper`: e.g. a
  chunked hypernetwork with many chunks per task, from the first past task on; a full hypernetwork with
  a wide last hidden layer only from many past tasks on), else the direct one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, cast

import lightning as L
import torch
from torch import Tensor, nn
from torch.func import functional_call

from cl_lightning.callback import ContinualCallback, TaskLoss
from cl_lightning.nets.hypernetwork import HyperNetwork, OutputReference
from cl_lightning.precision import full_precision

if TYPE_CHECKING:
    from cl_lightning.methods.base import ContinualModule


class HypernetworkHost(Protocol):
    """What the output regularizer needs of its method (HNET, HNET+R): the hypernetwork it protects and the
    task embeddings it generates from."""

    hypernetwork: nn.Module
    current_task: int

    def embeddings(self, tasks: Sequence[int] | Tensor) -> Tensor:
        """Stacked embeddings ``[B, E]`` of the given tasks."""

    def generate(self, tasks: Sequence[int] | Tensor) -> Tensor:
        """The hypernetwork's output ``[B, N]`` for the given tasks."""


class OutputRegularizer(ContinualCallback):
    """Args:
        beta: weight of the output regularizer (paper: 0.01 Split-MNIST, 0.1 Permuted-MNIST-10).
        max_past_tasks: regularise a random subset of at most this many past tasks per step (None: all).
        lookahead: regularise at the optimizer's candidate step ``theta + dtheta`` (Eq. 2).
        seed: seed of the random subsets.
        form: ``direct`` (generate the past tasks' weights), ``algebraic`` (from the last layer's Gram
            matrices; cost nearly flat in the number of past tasks) or ``auto`` (the one expected to be
            cheaper); all give the same penalty.
    """

    FORMS = ("auto", "algebraic", "direct")
    host: ClassVar[type | None] = HypernetworkHost

    def __init__(self, beta: float = 0.01, max_past_tasks: int | None = None, lookahead: bool = False,
                 seed: int = 0, form: str = "auto"):
        super().__init__()
        if beta < 0:
            raise ValueError(f"beta={beta} must not be negative")
        if max_past_tasks is not None and max_past_tasks < 1:
            raise ValueError(f"max_past_tasks={max_past_tasks} must be positive (or null for all)")
        if form not in self.FORMS:
            raise ValueError(f"form={form!r} is not one of {list(self.FORMS)}")
        self.beta, self.max_past_tasks, self.lookahead, self.seed = beta, max_past_tasks, lookahead, seed
        self.form = form
        #: The hypernetwork's parameters at the start of the current task (name -> tensor; None on task 0).
        self.snapshot: dict[str, Tensor] | None = None
        #: Number of past tasks regularised (those before the current task).
        self.past_tasks = 0
        #: ``[P, N]`` explicit targets (set by hand, or from a checkpoint of an earlier version); when set
        #: they replace the snapshot's.
        self.targets: Tensor | None = None
        self._on_device: dict[str, Tensor] | None = None
        self._on_device_of: dict[str, Tensor] | None = None
        #: Derived, for the algebraic form: the reference and what it describes (see ``_source_key``).
        self._reference: OutputReference | None = None
        self._reference_of: tuple[Any, ...] | None = None

    # ------------------------------------------------------------------ targets
    def on_task_start(self, trainer: L.Trainer, module: ContinualModule, task_id: int) -> None:
        self._on_device = None
        self._reference = self._reference_of = None
        self.targets = None
        self.past_tasks = task_id
        if task_id == 0:
            self.snapshot = None
            return
        host = cast(HypernetworkHost, module)
        self.snapshot = {n: p.detach().clone() for n, p in host.hypernetwork.named_parameters()}
        rows = min(task_id, self.max_past_tasks or task_id)
        if self.uses_algebraic(module, rows):
            self.reference(module, module.device)

    @property
    def active(self) -> bool:
        """Whether there are past tasks to regularise."""
        return self.targets is not None or (self.snapshot is not None and self.past_tasks > 0)

    @property
    def num_past(self) -> int:
        return len(self.targets) if self.targets is not None else self.past_tasks

    def _snapshot(self, device: torch.device) -> dict[str, Tensor]:
        assert self.snapshot is not None
        if self._on_device is None or next(iter(self._on_device.values())).device != device or \
                self._on_device_of is not self.snapshot:
            self._on_device = {n: v.to(device) for n, v in self.snapshot.items()}
            self._on_device_of = self.snapshot
        return self._on_device

    @torch.no_grad()
    def past_targets(self, module: ContinualModule, idx: Tensor | None = None) -> Tensor:
        """``[len(idx), N]`` the targets of the past tasks ``idx`` (all if None): explicit targets, or
        generated from the snapshot (the past embeddings are frozen)."""
        rows = torch.arange(self.num_past) if idx is None else idx
        if self.targets is not None:
            return self.targets[rows.to(self.targets.device)]
        host = cast(HypernetworkHost, module)
        embeddings = host.embeddings(rows).detach()
        return functional_call(host.hypernetwork, self._snapshot(embeddings.device), (embeddings,))

    def uses_algebraic(self, module: ContinualModule, rows: int) -> bool:
        """Whether the penalty over ``rows`` past tasks is computed in the algebraic form."""
        hnet = cast(HypernetworkHost, module).hypernetwork
        if self.form == "direct" or not callable(getattr(hnet, "output_penalty", None)):
            return False
        return self.form == "algebraic" or cast(HyperNetwork, hnet).output_penalty_is_cheaper(rows)

    def _source_key(self) -> tuple[Any, ...]:
        """What the reference is made from: the explicit targets (object and version) or the snapshot."""
        if self.targets is not None:
            return ("targets", self.targets, self.targets._version)
        return ("snapshot", self.snapshot, self.past_tasks)

    def _reference_is_current(self) -> bool:
        if self._reference is None or self._reference_of is None:
            return False
        key = self._source_key()
        return self._reference_of[0] == key[0] and self._reference_of[1] is key[1] and \
            self._reference_of[2] == key[2]

    def reference(self, module: ContinualModule, device: torch.device) -> OutputReference:
        """The algebraic form's reference: built from the snapshot (exactly what the task start saw), or
        for explicit targets from the current hypernetwork, carrying the targets' difference."""
        assert self.active
        if self._reference is None or not self._reference_is_current():
            host = cast(HypernetworkHost, module)
            hnet = cast(HyperNetwork, host.hypernetwork)  # one with the algebraic form: uses_algebraic said so
            embeddings = host.embeddings(range(self.num_past)).detach()
            if self.targets is not None:
                self._reference, _ = hnet.output_reference(embeddings, targets=self.targets.to(embeddings.device))
            else:
                self._reference, _ = hnet.output_reference(embeddings, params=self._snapshot(embeddings.device))
            self._reference_of = self._source_key()
        if self._reference.device != device:
            self._reference = self._reference.to(device)
        return self._reference

    @torch.no_grad()
    def drift(self, module: ContinualModule) -> Tensor:
        """Per past task, the largest absolute change of a generated weight since its target was taken."""
        if not self.active:
            return torch.zeros(0)
        now = cast(HypernetworkHost, module).generate(range(self.num_past))
        return (now - self.past_targets(module).to(now.device)).abs().amax(1)

    # ------------------------------------------------------------------ penalty
    def subset(self, module: ContinualModule) -> Tensor:
        """Indices of the past tasks regularised at this step (all, or a random subset of K)."""
        past = self.num_past
        if self.max_past_tasks is None or past <= self.max_past_tasks:
            return torch.arange(past)
        step = int(getattr(module, "steps_before_task", 0)) + int(module.global_step)
        task = cast(HypernetworkHost, module).current_task
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + task) * 1_000_003 + step)
        return torch.randperm(past, generator=g)[: self.max_past_tasks].sort().values

    def penalty(self, module: ContinualModule, batch: Any, step: TaskLoss | None = None) -> Tensor | None:
        if not self.active or self.beta == 0:
            return None
        # in fp32 under mixed precision: generated weights in bf16 differ from their targets by rounding alone
        # (8 mantissa bits), a floor the penalty would push against; see cl_lightning/precision.py
        with full_precision(module.device):
            return self._penalty(module, step)

    def _penalty(self, module: ContinualModule, step: TaskLoss | None) -> Tensor:
        host = cast(HypernetworkHost, module)
        idx = self.subset(module)
        embeddings = host.embeddings(idx)
        shifted = None
        if self.lookahead and step is None:
            raise ValueError("OutputRegularizer(lookahead=True) regularises at the step on the task loss: pass the "
                             "method's TaskLoss as penalty(module, batch, step)")
        if self.lookahead:
            assert step is not None
            shifted = {n: p + d for (n, p), d in zip(self._trainable(module), self.candidate_step(module, step.value),
                                                     strict=True)}
        if self.uses_algebraic(module, len(idx)):
            reference = self.reference(module, embeddings.device)
            hnet = cast(HyperNetwork, host.hypernetwork)  # one with the algebraic form: uses_algebraic said so
            total = hnet.output_penalty(embeddings, reference, idx, params=shifted)
            return self.beta / len(idx) * total
        targets = self.past_targets(module, idx).to(embeddings.device)
        if shifted is not None:
            weights = functional_call(host.hypernetwork, shifted, (embeddings,))
        else:
            weights = host.hypernetwork(embeddings)
        return self.beta / len(idx) * (weights - targets).pow(2).sum()

    # ------------------------------------------------------------------ lookahead
    @staticmethod
    def _trainable(module: ContinualModule) -> list[tuple[str, Tensor]]:
        return [(n, p) for n, p in cast(HypernetworkHost, module).hypernetwork.named_parameters() if p.requires_grad]

    def candidate_step(self, module: ContinualModule, task_loss: Tensor) -> list[Tensor]:
        """The (detached) step the optimizer would take on ``task_loss`` alone, per trainable parameter.

        Written out for Adam/AdamW and SGD because torch has no public way to ask an optimizer for its step without
        taking it: ``Optimizer.step`` updates the parameters and the state in place, and the functional kernels
        (``torch.optim._functional``, ``torch.optim.adam.adam``) are not public API. Stepping a copy of the
        optimizer would cost a copy of every parameter and its state per step, and would add the weight decay
        the authors' lookahead leaves out."""
        params = [p for _, p in self._trainable(module)]
        raw = torch.autograd.grad(task_loss, params, retain_graph=True, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, raw, strict=True)]
        trainer = module.attached_trainer()
        if trainer is not None and trainer.world_size > 1:  # the same step on every rank
            flat = trainer.strategy.reduce(torch.cat([g.flatten() for g in grads]), reduce_op="mean")
            grads = [f.view_as(p) for f, p in zip(flat.split([p.numel() for p in params]), params, strict=True)]
        optimizer = self._optimizer(module)
        if optimizer is None:
            return [-float(module.lr) * g for g in grads]
        groups = {id(p): group for group in optimizer.param_groups for p in group["params"]}
        steps = []
        for p, g in zip(params, grads, strict=True):
            group, state = groups.get(id(p)), optimizer.state.get(p, {})
            if group is None:
                steps.append(torch.zeros_like(p))
                continue
            lr = group["lr"]
            if isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW):
                b1, b2 = group["betas"]
                s = float(state["step"]) + 1 if "step" in state else 1.0
                m = b1 * state["exp_avg"] + (1 - b1) * g if "exp_avg" in state else (1 - b1) * g
                v = b2 * state["exp_avg_sq"] + (1 - b2) * g * g if "exp_avg_sq" in state else (1 - b2) * g * g
                m_hat, v_hat = m / (1 - b1**s), v / (1 - b2**s)
                steps.append(-lr * m_hat / (v_hat.sqrt() + group["eps"]))
            elif isinstance(optimizer, torch.optim.SGD) and group.get("momentum", 0) and \
                    state.get("momentum_buffer") is not None:
                steps.append(-lr * (group["momentum"] * state["momentum_buffer"] + g))
            else:
                steps.append(-lr * g)
        return [s.detach() for s in steps]

    @staticmethod
    def _optimizer(module: ContinualModule) -> torch.optim.Optimizer | None:
        try:  # Lightning raises a RuntimeError outside a fit
            opt = module.optimizers()
        except (RuntimeError, AttributeError):
            return None
        first = (opt[0] if opt else None) if isinstance(opt, list) else opt
        return None if first is None else first.optimizer

    # ------------------------------------------------------------------ state
    def plugin_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "snapshot": None if self.snapshot is None else {n: v.cpu() for n, v in self.snapshot.items()},
            "past_tasks": self.past_tasks}
        if self.targets is not None:
            state["targets"] = self.targets.cpu()
        return state

    def load_plugin_state(self, state: dict[str, Any]) -> None:
        self.snapshot = state.get("snapshot")
        self.targets = state.get("targets")  # explicit, or a checkpoint from before snapshots
        self.past_tasks = state.get("past_tasks", 0 if self.targets is None else len(self.targets))
        self._on_device = None
        self._reference = self._reference_of = None  # derived: rebuilt on first use

    def stored_numel(self) -> int:
        """The snapshot (one hypernetwork, whatever the number of tasks), plus explicit targets if any."""
        return sum(v.numel() for v in (self.snapshot or {}).values()) + \
            (0 if self.targets is None else self.targets.numel())
