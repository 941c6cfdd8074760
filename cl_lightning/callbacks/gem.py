"""Gradient projection against a rehearsal memory: GEM (Lopez-Paz & Ranzato 2017) and A-GEM
(Chaudhry et al. 2019).

At a task's end a seeded random subset of its data joins the memory, whose budget is split equally
between the tasks seen. On every later step, after the (DDP-reduced) gradient ``g`` of the current
batch is known and before the optimizer uses it:

- GEM computes the gradient ``G_k`` of the loss on each past task's memory and, if ``<g, G_k> < 0`` for
  some ``k``, replaces ``g`` by the closest vector with non-negative inner products, through the dual of
  that quadratic program: ``min_{v >= margin} 1/2 v^T G G^T v + (G g)^T v``, ``g~ = G^T v + g`` (the GEM
  code's form, with its ``margin`` and ``eps``). The k x k dual is solved in torch (:func:`solve_nonneg_qp`).
- A-GEM computes one reference gradient ``g_ref`` on a random memory batch and, if ``<g, g_ref> < 0``,
  projects: ``g~ = g - <g, g_ref> / <g_ref, g_ref> g_ref``.

Memory gradients are taken through ``torch.func`` on detached copies of the parameters: the graph never
touches the DDP-wrapped parameters, so no DDP hook fires and no second backward goes through the
wrapper. Each rank differentiates the loss summed over its share of the memory; the sums are all-reduced
and divided by the global counts, so every rank projects with the same memory gradients, equal to the
single-process ones, and edits its already-reduced ``.grad`` identically.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, cast

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from cl_lightning.callbacks.rehearsal import RehearsalPlugin, world_and_rank

if TYPE_CHECKING:
    from cl_lightning.methods.base import ContinualModule


def solve_nonneg_qp(Q: Tensor, b: Tensor, iters: int = 2000, tol: float = 1e-9) -> Tensor:
    """``argmin_{u >= 0} 1/2 u^T Q u + b^T u`` for a batch of positive definite ``Q`` ``[..., k, k]``.

    Accelerated projected gradient (FISTA, step ``1/lambda_max``) finds the active set; every 20 steps
    the equality-constrained problem on the current support is solved exactly and accepted where it meets
    the KKT conditions (``u >= 0``, gradient ``>= -tol`` off the support, ``= 0`` on it), which makes the
    answer exact up to rounding instead of up to the iteration count."""
    Q, b = Q.double(), b.double()
    step = 1.0 / torch.linalg.eigvalsh(Q)[..., -1:].clamp_min(1e-30)
    u = torch.zeros_like(b)
    y, momentum = u.clone(), 1.0
    scale = tol * (1.0 + b.abs().amax(-1, keepdim=True))
    best, done = u.clone(), torch.zeros(b.shape[:-1], dtype=torch.bool, device=b.device)
    eye = torch.eye(b.shape[-1], dtype=b.dtype, device=b.device)
    for i in range(iters):
        grad = (Q @ y.unsqueeze(-1)).squeeze(-1) + b
        nxt = (y - step * grad).clamp_min(0)
        m_next = (1 + (1 + 4 * momentum**2) ** 0.5) / 2
        y = nxt + (momentum - 1) / m_next * (nxt - u)
        u, momentum = nxt, m_next
        if i % 20 == 19 or i == iters - 1:
            support = u > 0
            both = support.unsqueeze(-1) & support.unsqueeze(-2)
            Qs = torch.where(both, Q, eye.expand_as(Q))
            exact = torch.linalg.solve(Qs, torch.where(support, -b, torch.zeros_like(b)))
            exact = torch.where(support, exact, torch.zeros_like(exact))
            g = (Q @ exact.unsqueeze(-1)).squeeze(-1) + b
            ok = (exact >= 0).all(-1) & (g >= -scale).all(-1) & (g.abs() <= scale).logical_or(~support).all(-1)
            newly = ok & ~done
            best = torch.where(newly.unsqueeze(-1), exact, best)
            done = done | ok
            if bool(done.all()):
                return best
    return torch.where(done.unsqueeze(-1), best, u)


def gem_project(g: Tensor, G: Tensor, margin: float = 0.5, eps: float = 1e-3) -> Tensor:
    """GEM's projection of ``g`` ``[p]`` against memory gradients ``G`` ``[k, p]`` (the GEM code's dual,
    its ``margin`` as the lower bound of the dual variables and ``eps * I`` added to ``G G^T``)."""
    Gd, gd = G.double(), g.double()
    Q = Gd @ Gd.T
    Q = 0.5 * (Q + Q.T) + eps * torch.eye(len(Q), dtype=Q.dtype, device=Q.device)
    b = Gd @ gd
    floor = torch.full_like(b, margin)
    u = solve_nonneg_qp(Q, b + Q @ floor)  # v = u + margin, u >= 0
    v = u + floor
    return (Gd.T @ v + gd).to(g.dtype)


def agem_project(g: Tensor, g_ref: Tensor) -> Tensor:
    """A-GEM: remove from ``g`` its component against ``g_ref`` when they disagree."""
    dot = g @ g_ref
    if dot >= 0:
        return g
    return g - dot / (g_ref @ g_ref).clamp_min(1e-30) * g_ref


class _Projection(RehearsalPlugin, ABC):
    """Shared by GEM and A-GEM: task-end insertion balanced by task, memory gradients in torch.func."""

    def __init__(self, memory_size: int, batch_size: int, seed: int):
        super().__init__(memory_size, batch_size, "task_end", "task", seed)
        self.projections = 0  # steps whose gradient was changed (a diagnostic, not state)
        self.steps = 0

    @staticmethod
    def trainable(module: nn.Module) -> list[tuple[str, Tensor]]:
        return [(n, p) for n, p in module.named_parameters() if p.requires_grad and p.grad is not None]

    @staticmethod
    def memory_loss_grad(module: ContinualModule, rows: dict[str, Tensor], names: list[str]) -> Tensor:
        """``[p]``: the gradient of the summed loss of this rank's ``rows``, by one plain forward and backward
        (``torch.autograd.grad``: the parameters' ``.grad``, which holds the step's gradient, is not touched)."""
        params = dict(module.named_parameters())
        with torch.enable_grad():
            out = module(rows["x"], rows["t"])
            loss = F.cross_entropy(out, rows["y"], reduction="sum")
            grads = torch.autograd.grad(loss, [params[n] for n in names])
        return torch.cat([g.reshape(-1) for g in grads])

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        if self.memory.is_empty:
            return
        module = cast("ContinualModule", pl_module)
        params = self.trainable(module)
        grads = [cast(Tensor, p.grad) for _, p in params]  # trainable keeps the parameters with a gradient
        g = torch.cat([d.reshape(-1) for d in grads])
        new = self.project(trainer, module, g, [n for n, _ in params])
        self.steps += 1
        if new is not g:
            self.projections += 1
            offset = 0
            for d in grads:
                d.copy_(new[offset: offset + d.numel()].view_as(d))
                offset += d.numel()

    @abstractmethod
    def project(self, trainer: L.Trainer, module: ContinualModule, g: Tensor, names: list[str]) -> Tensor:
        """The update to apply instead of ``g`` (``g`` itself when no constraint is violated)."""

    @staticmethod
    def reduce_sum(trainer: L.Trainer, value: Tensor) -> Tensor:
        return trainer.strategy.reduce(value, reduce_op="sum") if trainer.world_size > 1 else value


class GEM(_Projection):
    """Args:
        memory_size: the budget in samples across all tasks (GEM paper: 256 per task).
        margin: the GEM code's ``memory_strength`` (lower bound of the dual variables; 0: the plain projection).
        eps: added to the diagonal of ``G G^T``.
        seed: seeds which samples enter the memory.
    """

    def __init__(self, memory_size: int = 2560, margin: float = 0.5, eps: float = 1e-3, seed: int = 0):
        super().__init__(memory_size, 1, seed)
        if margin < 0 or eps < 0:
            raise ValueError(f"margin={margin} and eps={eps} must not be negative")
        self.margin, self.eps = margin, eps
        self.min_dot_after: float | None = None  # smallest <g~, G_k> of the last projection (diagnostic)

    def task_gradients(self, trainer: L.Trainer, module: ContinualModule, names: list[str]) -> Tensor:
        """``[k, p]``: the mean loss gradient of each past task's memory, the same on every rank. Each rank
        takes its share of every task's rows; the tasks are stacked (padded with zero-weight rows) and
        differentiated in one vmapped pass, so the cost is one forward and backward over the memory."""
        world, rank = world_and_rank(module)
        tasks = self.memory.data["t"]
        ids = tasks.unique().tolist()
        shares = [(tasks == k).nonzero().squeeze(1).tensor_split(world)[rank] for k in ids]
        m = max(1, max(len(s) for s in shares))
        idx = torch.stack([torch.cat([s, s.new_zeros(m - len(s))]) for s in shares])
        weight = torch.stack([(torch.arange(m) < len(s)).float() for s in shares]).to(module.device)
        rows = self.memory.get(idx.reshape(-1), module.device)
        rows = {k: v.reshape(len(ids), m, *v.shape[1:]) for k, v in rows.items()}
        leaves = {n: p.detach() for n, p in module.named_parameters()}
        fixed = {**{n: v for n, v in leaves.items() if n not in names}, **dict(module.named_buffers())}

        def loss(trained: dict[str, Tensor], x: Tensor, y: Tensor, t: Tensor, w: Tensor) -> Tensor:
            out = functional_call(module, {**fixed, **trained}, (x, t))
            return (F.cross_entropy(out, y, reduction="none") * w).sum()

        grads = vmap(grad(loss), in_dims=(None, 0, 0, 0, 0))({n: leaves[n] for n in names}, rows["x"], rows["y"],
                                                             rows["t"], weight)
        G = torch.cat([grads[n].reshape(len(ids), -1) for n in names], 1)
        counts = torch.tensor([int((tasks == k).sum()) for k in ids], device=G.device, dtype=G.dtype)
        return self.reduce_sum(trainer, G) / counts.unsqueeze(1)

    def project(self, trainer: L.Trainer, module: ContinualModule, g: Tensor, names: list[str]) -> Tensor:
        G = self.task_gradients(trainer, module, names)
        if bool((G @ g >= 0).all()):
            return g
        new = gem_project(g, G, self.margin, self.eps)
        self.min_dot_after = float((G @ new).min())
        return new


class AGEM(_Projection):
    """Args:
        memory_size: the budget in samples across all tasks.
        batch_size: samples of the memory behind each reference gradient (A-GEM paper: 256).
        seed: seeds which samples enter the memory and which are drawn.
    """

    def __init__(self, memory_size: int = 2560, batch_size: int = 256, seed: int = 0):
        super().__init__(memory_size, batch_size, seed)
        self.last_reference: Tensor | None = None  # the last reference gradient (diagnostic)

    def reference_gradient(self, trainer: L.Trainer, module: ContinualModule, names: list[str]) -> Tensor:
        drawn = self.replay_batch(module)
        assert drawn is not None, "a reference gradient needs a non-empty memory"
        rows, scale = drawn
        grad = self.memory_loss_grad(module, rows, names)
        return self.reduce_sum(trainer, grad) * (scale / world_and_rank(module)[0])

    def project(self, trainer: L.Trainer, module: ContinualModule, g: Tensor, names: list[str]) -> Tensor:
        self.last_reference = g_ref = self.reference_gradient(trainer, module, names)
        return agem_project(g, g_ref)
