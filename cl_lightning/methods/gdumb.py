"""GDumb (Prabhu et al. 2020, "GDumb: a simple approach that questions our progress in continual learning").

GDumb does not learn from the stream: it only fills a class-balanced memory (its greedy sampler; here a plain
``RehearsalPlugin`` with ``insertion: task_end, balance: class`` that adds a seeded random sample of each new
class and shrinks the older classes to equal shares) and, whenever it is evaluated (after every task), trains
the network *from scratch* on the memory alone.

The retraining runs on a plain copy of the backbone and head (never the DDP-wrapped parameters, so no DDP
hook fires), from a seed and the memory only, identical on every rank; the result is copied back into the
module's parameters.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cl_lightning.callback import ContinualCallback
from cl_lightning.callbacks.rehearsal import RehearsalPlugin
from cl_lightning.methods.base import ContinualModule, RequiredPlugin, make_optimizer


class GDumb(ContinualModule):
    """Args (besides ``ContinualModule``'s; ``lr``/``optimizer``/``momentum``/``weight_decay`` are those of the
    retraining, rebuilt from scratch at every task's end):
        epochs: passes over the memory per retraining.
        train_batch_size: batch size of the retraining.
        seed: seeds the re-initialisation and the batch order of every retraining.
        plugins: must hold one ``RehearsalPlugin`` with ``insertion: task_end`` and ``balance: class`` (its
            ``memory_size`` is GDumb's budget: not added with a default).
    """

    required_plugins = (RequiredPlugin(RehearsalPlugin, add_default=False,
                                       settings={"insertion": "task_end", "balance": "class"}),)

    def __init__(self, backbone: nn.Module | None = None, lr: float = 0.05, optimizer: str = "sgd",
                 momentum: float = 0.9, weight_decay: float = 1e-6, epochs: int = 30, train_batch_size: int = 16,
                 seed: int = 0, plugins: Sequence[ContinualCallback] | None = None,
                 compile: bool | str = False):
        super().__init__(backbone, lr, optimizer, momentum, weight_decay, plugins, compile=compile)
        if epochs < 1 or train_batch_size < 1:
            raise ValueError(f"epochs={epochs} and train_batch_size={train_batch_size} must be at least 1")
        self.epochs, self.train_batch_size, self.seed = epochs, train_batch_size, seed

    @property
    def sampler(self) -> RehearsalPlugin:
        """The class-balanced memory the retraining reads (its ``memory``, never changed here)."""
        return self.plugin_of(RehearsalPlugin)

    def training_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> None:
        """The stream only passes by: the memory plugin keeps what it needs at the task's end."""
        return None

    def on_train_end(self) -> None:  # after the plugins' on_train_end, which filled the memory
        self.retrain()

    def retrain(self) -> None:
        """Trains a freshly initialised copy of the network on the memory, then loads it into the module."""
        assert self.head is not None
        net = nn.ModuleDict({"backbone": copy.deepcopy(self.backbone), "head": copy.deepcopy(self.head)})
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed + self.current_task)
            for m in net.modules():
                reset = getattr(m, "reset_parameters", None)
                if reset is not None:
                    reset()
        for p in net.parameters():
            p.requires_grad_(True)
        net.train()
        opt = self._retrain_optimizer(list(net.parameters()))
        mem = self.sampler.memory
        x, y, t = (mem.data[k].to(self.device) for k in ("x", "y", "t"))
        g = torch.Generator().manual_seed(self.seed + 1000 + self.current_task)
        steps = self.epochs * -(-len(y) // self.train_batch_size)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
        with torch.enable_grad():
            for _ in range(self.epochs):
                for idx in torch.randperm(len(y), generator=g).split(self.train_batch_size):
                    idx = idx.to(self.device)
                    out = self.select_head(net["head"](net["backbone"](x[idx])), t[idx])
                    loss = F.cross_entropy(out, y[idx])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
        with torch.no_grad():
            self.backbone.load_state_dict(net["backbone"].state_dict())
            self.head.load_state_dict(net["head"].state_dict())

    def _retrain_optimizer(self, params: list[Tensor]) -> torch.optim.Optimizer:
        kwargs = {"lr": self.lr, "weight_decay": self.weight_decay}
        if self.optimizer_name == "sgd":
            kwargs["momentum"] = self.momentum
        return make_optimizer(self.optimizer_name, params, **kwargs)
