"""MARK's knowledge-base meta-update (Hurtado et al., NeurIPS 2021; ``approach.meta_training`` in the
authors' code), as a plugin.

One outer step: ``K`` mini-tasks, each a functional copy of the KB with a fresh linear head, trained for
``S`` SGD steps on one batch of the current task (momentum 0.9, weight decay 0.1, the task's masks M_t(F_t(x))
applied and fixed, the learning rate halved on a loss plateau as the authors' ``ReduceLROnPlateau``), then
each mini-task's accuracy on its batch after training. The KB's gradient is set to

    g = sum_k  w_k (theta_k - theta) / K,     w_k = acc_k / sum_j acc_j

and the method's outer SGD (``outer_lr``, weight decay 0.1) steps with it. The authors' sign (``official``)
gives ``theta <- theta - lr g``: the KB moves *away* from the adapted weights; ``reptile`` uses ``-g`` and
moves toward them (Nichol et al.'s Reptile).

The K mini-tasks run as one computation: KB parameters stacked ``[K, ...]`` and ``torch.func.vmap`` over
``functional_call`` (:func:`inner_loop_vectorised`); :func:`inner_loop_sequential` is the authors' way
(K deep copies, ``torch.optim.SGD`` and ``ReduceLROnPlateau`` in a Python loop), kept as the reference.
The live KB is never touched by the inner loop. Mini-task batches, fresh heads and dropout masks come from
a generator seeded by (run seed, task, outer step) over the task's whole training split, so the update is
the same on every DDP rank and after a resume; rank 0's gradient is broadcast all the same.

The plugin acts only on the method's meta steps: it is called from ``on_before_optimizer_step``, asks the
method which meta step is under way (``MARKHost.current_meta_step``) and writes the KB's ``.grad``.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Protocol, cast

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value, vmap

from cl_lightning.callback import ContinualCallback
from cl_lightning.datamodule import benchmark_of


class MARKHost(Protocol):
    """What the meta-update needs of its method (MARK): the knowledge base it updates, the task's masks, the
    meta step under way, and the run's seed."""

    kb: nn.Module
    current_task: int
    run_seed: int

    def current_meta_step(self) -> int | None:
        """The index of the meta step whose optimizer step is under way, or None (any other step)."""

    def task_masks(self, task: int, x: Tensor) -> list[Tensor] | None:
        """The task's per-sample KB masks of ``x`` (``None`` without masks)."""

SIGNS = ("official", "reptile")


@dataclass(frozen=True)
class InnerConfig:
    """The inner loop's SGD: steps S, lr, momentum, weight decay, and the plateau rule (authors' defaults)."""

    steps: int = 40
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.1
    plateau: bool = True
    plateau_factor: float = 0.5
    plateau_patience: int = 5
    plateau_threshold: float = 1e-3
    dropout: float = 0.0


@dataclass
class MiniTasks:
    """Inputs of one outer step: ``x [K, B, ...]``, ``y [K, B]``, masks (list of ``[K, B, C_i]``, or None),
    dropout keep-masks ``[S, K, B, latent]`` (or None), fresh heads ``head_w [K, n, latent]``, ``head_b [K, n]``."""

    x: Tensor
    y: Tensor
    masks: list[Tensor] | None
    keep: Tensor | None
    head_w: Tensor
    head_b: Tensor


def meta_gradient(base: dict[str, Tensor], adapted: dict[str, Tensor], accuracies: Tensor,
                  sign: str = "official") -> dict[str, Tensor]:
    """The KB gradient of one outer step: ``sum_k w_k (adapted_k - base) / K`` with ``w = acc / sum(acc)``
    (uniform when every accuracy is 0), negated for ``reptile``. ``adapted`` values are stacked ``[K, ...]``."""
    if sign not in SIGNS:
        raise ValueError(f"sign={sign!r} is not one of {list(SIGNS)}")
    acc = accuracies.double()
    k = len(acc)
    w = acc / acc.sum() if acc.sum() > 0 else torch.full_like(acc, 1.0 / k)
    out = {}
    for name, theta in base.items():
        diff = adapted[name].double() - theta.double().unsqueeze(0)
        g = (w.to(diff.device).view(-1, *[1] * theta.dim()) * diff).sum(0) / k
        out[name] = (g if sign == "official" else -g).to(theta.dtype)
    return out


def _plateau(lr: Tensor, best: Tensor, bad: Tensor, loss: Tensor, cfg: InnerConfig) -> tuple[Tensor, Tensor, Tensor]:
    """torch's ``ReduceLROnPlateau`` (mode min, relative threshold, no cooldown), for every mini-task at once."""
    better = loss < best * (1.0 - cfg.plateau_threshold)
    best = torch.where(better, loss, best)
    bad = torch.where(better, torch.zeros_like(bad), bad + 1)
    cut = bad > cfg.plateau_patience
    new_lr = lr * cfg.plateau_factor
    lr = torch.where(cut & (lr - new_lr > 1e-8), new_lr, lr)
    bad = torch.where(cut, torch.zeros_like(bad), bad)
    return lr, best, bad


def inner_loop_vectorised(kb: nn.Module, tasks: MiniTasks, cfg: InnerConfig) -> tuple[dict[str, Tensor], Tensor]:
    """All K mini-tasks as one batched computation. Returns the adapted KB parameters ``[K, ...]`` and the
    mini-tasks' accuracies ``[K]`` on their batches after training (no dropout)."""
    k = len(tasks.x)
    base = {n: p.detach() for n, p in kb.named_parameters()}
    params = {n: p.unsqueeze(0).repeat(k, *[1] * p.dim()).clone() for n, p in base.items()}
    params["head.w"], params["head.b"] = tasks.head_w.clone(), tasks.head_b.clone()
    has_masks, has_keep = tasks.masks is not None, tasks.keep is not None

    def outputs(p: dict[str, Tensor], x: Tensor, masks: list[Tensor] | None, keep: Tensor | None) -> Tensor:
        body = {n: v for n, v in p.items() if not n.startswith("head.")}
        h = functional_call(kb, body, (x, masks, keep))
        return h @ p["head.w"].T + p["head.b"]

    def loss_fn(p: dict[str, Tensor], x: Tensor, y: Tensor, masks: Any, keep: Any) -> Tensor:
        return F.cross_entropy(outputs(p, x, masks if has_masks else None, keep if has_keep else None), y)

    step = vmap(grad_and_value(loss_fn), in_dims=(0, 0, 0, 0 if has_masks else None, 0 if has_keep else None))
    masks = tasks.masks if has_masks else None
    buf: dict[str, Tensor] = {}
    lr = torch.full((k,), cfg.lr, dtype=torch.float64)
    best = torch.full((k,), math.inf, dtype=torch.float64)
    bad = torch.zeros(k, dtype=torch.long)
    with torch.enable_grad():
        for s in range(cfg.steps):
            keep = tasks.keep[s] if tasks.keep is not None else None
            grads, loss = step(params, tasks.x, tasks.y, masks, keep)
            for n, p in params.items():
                d = grads[n] + cfg.weight_decay * p if cfg.weight_decay else grads[n]
                if cfg.momentum:
                    buf[n] = d.clone() if n not in buf else buf[n].mul_(cfg.momentum).add_(d)
                    d = buf[n]
                step_lr = lr.to(p.dtype).to(p.device).view(-1, *[1] * (p.dim() - 1))
                params[n] = p - step_lr * d
            if cfg.plateau:
                lr, best, bad = _plateau(lr, best, bad, loss.detach().double().cpu(), cfg)
    with torch.no_grad():
        out = vmap(outputs, in_dims=(0, 0, 0 if has_masks else None, None))(params, tasks.x, masks, None)
        acc = (out.argmax(-1) == tasks.y).float().mean(1)
    return {n: v.detach() for n, v in params.items() if not n.startswith("head.")}, acc


def inner_loop_sequential(kb: nn.Module, tasks: MiniTasks, cfg: InnerConfig) -> tuple[dict[str, Tensor], Tensor]:
    """The reference: the authors' loop (a deep copy of the KB and a head per mini-task, ``torch.optim.SGD``,
    ``ReduceLROnPlateau`` stepped with each step's loss)."""
    adapted: dict[str, list[Tensor]] = {n: [] for n, _ in kb.named_parameters()}
    accs = []
    for i in range(len(tasks.x)):
        net = copy.deepcopy(kb)
        head = nn.Linear(tasks.head_w.shape[2], tasks.head_w.shape[1]).to(tasks.head_w.device)
        with torch.no_grad():
            head.weight.copy_(tasks.head_w[i])
            head.bias.copy_(tasks.head_b[i])
        opt = torch.optim.SGD([*net.parameters(), *head.parameters()], lr=cfg.lr, momentum=cfg.momentum,
                              weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
            opt, factor=cfg.plateau_factor, patience=cfg.plateau_patience, threshold=cfg.plateau_threshold)
        masks = [m[i] for m in tasks.masks] if tasks.masks is not None else None
        with torch.enable_grad():
            for s in range(cfg.steps):
                keep = tasks.keep[s, i] if tasks.keep is not None else None
                opt.zero_grad()
                loss = F.cross_entropy(head(net(tasks.x[i], masks, keep)), tasks.y[i])
                loss.backward()
                opt.step()
                if cfg.plateau:
                    sched.step(loss.item())
        with torch.no_grad():
            accs.append((head(net(tasks.x[i], masks, None)).argmax(-1) == tasks.y[i]).float().mean())
        for n, p in net.named_parameters():
            adapted[n].append(p.detach())
    return {n: torch.stack(v) for n, v in adapted.items()}, torch.stack(accs)


def check_finite(kb_gradient: Tensor, task: int, step: int) -> None:
    """Raises where an outer step's KB gradient is not finite: its mini-tasks' inner loops diverged, and the step
    would write inf/NaN into the KB, which every task shares, so every task after it would silently sit at chance."""
    if not torch.isfinite(kb_gradient).all():
        raise FloatingPointError(
            f"MARK's meta-update diverged at task {task}, outer step {step}: the inner loops of its mini-tasks gave a "
            "non-finite KB gradient (ReLU masks can grow large in the masks phase; lower "
            "method.plugins.MARKMetaUpdate.inner_lr or method.lr, or try method.mask_activation=sigmoid)")


def seeded_generator(*parts: int) -> torch.Generator:
    seed = 0
    for p in parts:
        seed = (seed * 1_000_003 + int(p)) % (2**63 - 1)
    return torch.Generator().manual_seed(seed)


class MARKMetaUpdate(ContinualCallback):
    """Args:
        sign: ``official`` (the authors' code: the KB moves away from the adapted weights) or ``reptile``.
        mini_tasks: K, mini-tasks per outer step (authors: 10).
        inner_steps: S, SGD steps of each mini-task on its one batch (authors: 40).
        inner_lr, inner_momentum, inner_weight_decay: the inner SGD (authors: lr_meta, 0.9, 0.1).
        inner_plateau: halve a mini-task's lr when its loss stops falling (the authors' ReduceLROnPlateau,
            patience 5, threshold 1e-3).
        batch_size: samples per mini-task (None: the benchmark's batch size, as the authors).
        vectorised: the K mini-tasks as one ``vmap`` computation (False: the sequential reference).
    """

    host = MARKHost

    def __init__(self, sign: str = "official", mini_tasks: int = 10, inner_steps: int = 40, inner_lr: float = 0.01,
                 inner_momentum: float = 0.9, inner_weight_decay: float = 0.1, inner_plateau: bool = True,
                 batch_size: int | None = None, vectorised: bool = True):
        super().__init__()
        if sign not in SIGNS:
            raise ValueError(f"sign={sign!r} is not one of {list(SIGNS)}")
        for name, value in (("mini_tasks", mini_tasks), ("inner_steps", inner_steps)):
            if value < 1:
                raise ValueError(f"{name}={value} must be at least 1")
        if not inner_lr > 0:
            raise ValueError(f"inner_lr={inner_lr} must be positive")
        if inner_momentum < 0 or inner_weight_decay < 0:
            raise ValueError(f"inner_momentum={inner_momentum} and inner_weight_decay={inner_weight_decay} "
                             "must not be negative")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be at least 1 (or null)")
        self.sign, self.mini_tasks, self.batch_size, self.vectorised = sign, mini_tasks, batch_size, vectorised
        self.inner = InnerConfig(steps=inner_steps, lr=inner_lr, momentum=inner_momentum,
                                 weight_decay=inner_weight_decay, plateau=inner_plateau)
        #: Mini-task accuracies of every outer step: (task, step, [K]).
        self.history: list[tuple[int, int, list[float]]] = []

    # ------------------------------------------------------------------ one outer step
    def sample(self, module: Any, data: Any, task: int, generator: torch.Generator, batch_size: int) -> MiniTasks:
        """K batches of ``batch_size`` from the task's whole training split (disjoint while the split allows),
        their masks, dropout keep-masks and fresh heads, all from ``generator``."""
        k, n = self.mini_tasks, len(data)
        need = k * batch_size
        order = torch.cat([torch.randperm(n, generator=generator) for _ in range(math.ceil(need / n))])[:need]
        x, y, _ = data[order]
        dev = module.device
        x, y = x.to(dev), y.to(dev)
        kb = module.kb
        keep = None
        if kb.dropout > 0:
            u = torch.rand(self.inner.steps, k, batch_size, kb.latent_dim, generator=generator)
            keep = (u >= kb.dropout).float().to(dev)
        classes = module.info.outputs_per_task
        bound = 1.0 / math.sqrt(kb.latent_dim)  # nn.Linear's default initialisation
        head_w = (torch.rand(k, classes, kb.latent_dim, generator=generator) * 2 - 1) * bound
        head_b = (torch.rand(k, classes, generator=generator) * 2 - 1) * bound
        masks = module.task_masks(task, x)
        if masks is not None:
            masks = [m.view(k, batch_size, -1) for m in masks]
        return MiniTasks(x=x.view(k, batch_size, *x.shape[1:]), y=y.view(k, batch_size), masks=masks, keep=keep,
                         head_w=head_w.to(dev), head_b=head_b.to(dev))

    def kb_gradient(self, kb: nn.Module, tasks: MiniTasks) -> tuple[dict[str, Tensor], Tensor]:
        run = inner_loop_vectorised if self.vectorised else inner_loop_sequential
        adapted, acc = run(kb, tasks, self.inner)
        base = {n: p.detach() for n, p in kb.named_parameters()}
        return meta_gradient(base, adapted, acc, self.sign), acc

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        host = cast(MARKHost, pl_module)
        step = host.current_meta_step()
        if step is None:
            return
        task = host.current_task
        data = benchmark_of(trainer).split(task, "train")
        batch = self.batch_size or benchmark_of(trainer).batch_size
        g = seeded_generator(host.run_seed, task, step)
        with torch.no_grad():
            tasks = self.sample(host, data, task, g, batch)
        grads, acc = self.kb_gradient(host.kb, tasks)
        names = [n for n, _ in host.kb.named_parameters()]
        flat = torch.cat([grads[n].flatten() for n in names])
        check_finite(flat, task, step)
        if trainer.world_size > 1:  # identical on every rank already; rank 0's copy makes it bitwise certain
            torch.distributed.broadcast(flat, src=0)
        offset = 0
        for p in host.kb.parameters():
            p.grad = flat[offset: offset + p.numel()].view_as(p).clone()
            offset += p.numel()
        self.history.append((task, step, acc.tolist()))

    # ------------------------------------------------------------------ state
    def plugin_state(self) -> dict[str, Any]:
        return {"history": list(self.history)}

    def load_plugin_state(self, state: dict[str, Any]) -> None:
        self.history = [tuple(h) for h in state.get("history", [])]
