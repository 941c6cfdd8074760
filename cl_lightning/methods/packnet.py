"""PackNet (Mallya & Lazebnik, CVPR 2018): several tasks packed into one network by iterative pruning.

Every weight of the backbone's matrices and kernels has an owner, the task it belongs to (``owners``, an int32
buffer per weight tensor, in the checkpoints). Task t trains the weights no earlier task kept (all of them for
task 0); the plugin ``PackNetPruning`` (``cl_lightning/callbacks/packnet.py``) then frees a fraction of them by
magnitude, retrains the rest with the freed ones held at zero, and from then on task t's weights never change.
Task t is evaluated with the weights of owners ``<= t`` only, so later tasks cannot touch its function.

Biases and batch-norm layers are trained in task 0 and frozen after it (shared by all tasks), as in the paper;
heads are per task (task-IL). Implemented from our knowledge of the paper (its text is not in
``/work/shared/papers``). Weight decay is refused: it would move frozen weights.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call

from cl_lightning.callback import ContinualCallback
from cl_lightning.callbacks.packnet import PackNetPruning
from cl_lightning.methods.base import ContinualModule, per_task_outputs
from cl_lightning.nets import MLP
from cl_lightning.tasks import BenchmarkInfo, Scenario


def owner_key(name: str) -> str:
    return "owners__" + name.replace(".", "__")


class PackNet(ContinualModule):
    """Per-weight task ownership over a plain backbone; the pruning and freezing run in ``PackNetPruning``
    (added with its defaults when the config has none).

    Args:
        backbone: any network of ``Linear`` / ``Conv`` layers (default: an MLP of 400-400).
        lr, optimizer, momentum: the per-task optimizer.
        weight_decay: must be 0 (decay would move frozen weights).
        plugins: continual-learning callbacks; ``PackNetPruning`` holds the mechanism.
    """

    supported_scenarios = frozenset({Scenario.TASK_IL})
    required_plugins = (PackNetPruning,)

    def __init__(self, backbone: nn.Module | None = None, lr: float = 1e-3, optimizer: str = "adam",
                 momentum: float = 0.0, plugins: Sequence[ContinualCallback] | None = None,
                 weight_decay: float = 0.0):
        super().__init__(backbone=backbone if backbone is not None else MLP(hidden_sizes=[400, 400]), lr=lr,
                         optimizer=optimizer, momentum=momentum, weight_decay=weight_decay, plugins=plugins)
        if weight_decay != 0:
            raise ValueError(f"weight_decay={weight_decay}: PackNet needs 0 (decay would move frozen weights)")
        self.owner_names: list[str] = []

    def build(self, info: BenchmarkInfo) -> None:
        super().build(info)
        free = PackNetPruning.FREE
        if info.num_tasks >= free:
            raise ValueError(f"PackNet keeps owners below {free}: at most {free - 1} tasks, not {info.num_tasks}")
        self.owner_names = [n for n, p in self.backbone.named_parameters() if p.dim() > 1]
        if not self.owner_names:
            raise ValueError(f"backbone {type(self.backbone).__name__} has no weight matrices to prune")
        params = dict(self.backbone.named_parameters())
        for name in self.owner_names:  # task 0 owns everything until it is pruned
            self.register_buffer(owner_key(name), torch.zeros_like(params[name], dtype=torch.int32))

    # ------------------------------------------------------------------ what the plugin uses
    def prunable(self) -> Iterator[tuple[str, nn.Parameter, Tensor]]:
        """Each prunable weight tensor of the backbone: its name, the parameter and its owners."""
        params = dict(self.backbone.named_parameters())
        for name in self.owner_names:
            yield name, params[name], getattr(self, owner_key(name))

    def shared_parameters(self) -> list[nn.Parameter]:
        """The backbone's other parameters (biases, batch norm): trained in task 0 only."""
        owned = set(self.owner_names)
        return [p for n, p in self.backbone.named_parameters() if n not in owned]

    def setup(self, stage: str) -> None:
        # before configure_optimizers and the DDP wrapper, which both read requires_grad
        if stage == "fit":
            for p in self.shared_parameters():
                p.requires_grad_(self.current_task == 0)

    def train(self, mode: bool = True) -> PackNet:
        super().train(mode)
        if mode and self.current_task > 0:  # batch-norm statistics are shared and frozen after task 0
            for m in self.backbone.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    # ------------------------------------------------------------------ forward
    def task_features(self, x: Tensor, task: int) -> Tensor:
        """The backbone with only the weights of owners ``<= task``."""
        weights = {name: p * (owners <= task).to(p.dtype) for name, p, owners in self.prunable()}
        return functional_call(self.backbone, weights, (x,), strict=False)

    def forward(self, x: Tensor, task_ids: Tensor) -> Tensor:
        assert self.head is not None, "setup_tasks builds the head"
        feats = per_task_outputs(x, task_ids, lambda t, rows: self.task_features(rows, t))
        return self.select_head(self.head(feats), task_ids)

    # ------------------------------------------------------------------ accounting
    def stored_counts(self) -> dict[str, int]:
        counts = super().stored_counts()
        counts["owners"] = sum(o.numel() for _, _, o in self.prunable())
        return counts

    def storage_details(self) -> dict[str, int | float]:
        """Weights owned by each task and still free."""
        assert self.info is not None
        owners = torch.cat([o.flatten() for _, _, o in self.prunable()])
        details: dict[str, int | float] = {f"weights_task_{t}": int((owners == t).sum())
                                           for t in range(self.info.num_tasks)}
        details["weights_free"] = int((owners == PackNetPruning.FREE).sum())
        return details
