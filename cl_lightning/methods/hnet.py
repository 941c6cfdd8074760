"""Task-conditioned hypernetworks (von Oswald, Henning, Sacramento & Grewe, ICLR 2020).

A hypernetwork ``h`` maps a learned task embedding ``e_t`` to every weight of a target network, which
holds no weights of its own (see :mod:`cl_lightning.nets.functional`). Each task trains the
hypernetwork and its own embedding; earlier embeddings are frozen, and forgetting is prevented by the
output regularizer (:class:`cl_lightning.callbacks.hnet_regularizer.OutputRegularizer`, a plugin) that keeps
``h(e_t)`` of past tasks where it was.

Scenarios:

- task-IL (CL1): the given task id picks the embedding; each embedding generates its own head, so the
  target's output is one task wide.
- domain-IL (CL2) and class-IL (CL3), "HNET+ENT": the task is inferred per input as the embedding whose
  output has the lowest predictive entropy (all seen embeddings in one vectorised pass). Class-IL puts
  the chosen task's logits into its slice of the packed output (the other slices get -inf).

Batch norm in the target keeps running statistics per task (buffers ``[num_tasks, ...]``, checkpointed);
under DDP it normalises with the global batch's statistics (:mod:`cl_lightning.nets.batchnorm`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from cl_lightning.callback import ContinualCallback
from cl_lightning.methods.base import ContinualModule, fit_body, per_task_outputs, place_task_logits
from cl_lightning.nets.batchnorm import convert_to_global_batchnorm
from cl_lightning.nets.functional import FunctionalTarget, buffer_key, stack_buffers
from cl_lightning.nets.hypernetwork import ChunkedHyperNetwork, HyperNetwork
from cl_lightning.nets.mlp import MLP
from cl_lightning.tasks import BenchmarkInfo, Scenario

INFERENCE = ("auto", "given", "entropy")
HEADS = ("own", "all")


class HNET(ContinualModule):
    """A hypernetwork generating a target network's weights from task embeddings.

    Args:
        target: the target network's body (e.g. ``cl_lightning.nets.MLP``); a linear head of one task's
            width is appended. Its own weights are never used (it is moved to the meta device).
        hypernetwork: a :class:`~cl_lightning.nets.hypernetwork.HyperNetwork` (full) or
            :class:`~cl_lightning.nets.hypernetwork.ChunkedHyperNetwork`; its ``embedding_dim`` sets the
            size of the task embeddings.
        embedding_init_std: standard deviation of the initial task embeddings.
        heads: ``own``: every embedding generates one task-wide head; ``all``: every embedding generates the heads
            of all tasks (``num_tasks x outputs_per_task`` outputs) and a task reads its own slice, as the authors'
            Split-MNIST code builds its main network for CL1/CL3 (the output regularizer then also holds the
            other tasks' heads of past embeddings in place).
        task_inference: ``given`` (use the task id), ``entropy`` (HNET+ENT) or ``auto`` (given for
            task-IL and regression, entropy otherwise).
        lr, optimizer, momentum, weight_decay: the per-task optimizer (over the hypernetwork and the
            current embedding).
        plugins: usually one ``cl_lightning.callbacks.hnet_regularizer.OutputRegularizer``.
    """

    supported_scenarios = frozenset(Scenario)
    #: ``compile``: the hypernetwork (the target runs functionally on its generated weights)
    compiled_modules = ("hypernetwork",)

    _target_body: nn.Module  # set in __init__, outside the module tree (the hypernetwork generates its weights)

    def __init__(self, target: nn.Module | None = None, hypernetwork: HyperNetwork | None = None,
                 embedding_init_std: float = 1.0, task_inference: str = "auto", heads: str = "own", lr: float = 1e-3,
                 optimizer: str = "adam", momentum: float = 0.0, weight_decay: float = 0.0,
                 plugins: Sequence[ContinualCallback] | None = None,
                 compile: bool | str = False):
        super().__init__(backbone=nn.Identity(), lr=lr, optimizer=optimizer, momentum=momentum,
                         weight_decay=weight_decay, plugins=plugins, compile=compile)
        if task_inference not in INFERENCE:
            raise ValueError(f"task_inference={task_inference!r} is not one of {list(INFERENCE)}")
        if heads not in HEADS:
            raise ValueError(f"heads={heads!r} is not one of {list(HEADS)}")
        if not embedding_init_std > 0:
            raise ValueError(f"embedding_init_std={embedding_init_std} must be positive")
        if hypernetwork is not None and not isinstance(hypernetwork, HyperNetwork):
            raise ValueError(f"hypernetwork: {type(hypernetwork).__name__} is not a HyperNetwork")
        # the target body is held outside the module tree: it never owns trainable weights
        object.__setattr__(self, "_target_body", target if target is not None else MLP(hidden_sizes=(400, 400)))
        self.hypernetwork = hypernetwork if hypernetwork is not None else ChunkedHyperNetwork()
        self.embedding_init_std = embedding_init_std
        self.heads = heads
        self.task_inference = task_inference
        self.inference = task_inference
        self.target: FunctionalTarget | None = None
        self.task_embeddings = nn.ParameterList()
        self.buffer_names: list[str] = []

    # ------------------------------------------------------------------ set-up
    def build(self, info: BenchmarkInfo) -> None:
        body = self._target_body
        inference = self.task_inference
        if inference == "auto":
            inference = "given" if info.scenario is Scenario.TASK_IL or info.is_regression else "entropy"
        if inference == "entropy" and info.is_regression:
            raise ValueError("task_inference='entropy' needs a classification benchmark")
        if inference == "given" and info.scenario is Scenario.CLASS_IL:
            raise ValueError("task_inference='given' would read the task id, which class-IL does not give; "
                             "use 'entropy' (HNET+ENT)")
        self.inference = inference
        width = fit_body(body, info, role="target")
        outputs = info.outputs_per_task * (info.num_tasks if self.heads == "all" else 1)
        # global-batch statistics under DDP, so that DDP matches one process
        self.target = FunctionalTarget(nn.Sequential(convert_to_global_batchnorm(body), nn.Linear(width, outputs)))
        self.hypernetwork.set_target_shapes(self.target.param_shapes)
        dim = self.hypernetwork.embedding_dim
        self.task_embeddings = nn.ParameterList(
            nn.Parameter(torch.randn(dim) * self.embedding_init_std, requires_grad=False)
            for _ in range(info.num_tasks))
        for name, stacked in stack_buffers(self.target.initial_buffers, info.num_tasks).items():
            self.register_buffer("task_stats__" + buffer_key(name), stacked)
            self.buffer_names.append(name)

    def setup(self, stage: str) -> None:
        if stage == "fit":  # before the optimizer and the DDP wrapper are made
            for i, e in enumerate(self.task_embeddings):
                e.requires_grad_(i == self.current_task)

    # ------------------------------------------------------------------ generation
    def embeddings(self, tasks: Sequence[int] | Tensor) -> Tensor:
        """Stacked embeddings ``[B, E]`` of the given tasks."""
        idx = tasks.tolist() if isinstance(tasks, Tensor) else list(tasks)
        return torch.stack([self.task_embeddings[i] for i in idx])

    def generate(self, tasks: Sequence[int] | Tensor) -> Tensor:
        """Flat target weights ``[B, N]`` for the given tasks, in one hypernetwork pass."""
        return self.hypernetwork(self.embeddings(tasks))

    def task_buffers(self, task: int | slice) -> dict[str, Tensor]:
        """The target's buffers (batch-norm statistics) of one task, or stacked for a slice of tasks."""
        return {n: getattr(self, "task_stats__" + buffer_key(n))[task] for n in self.buffer_names}

    # ------------------------------------------------------------------ forward
    def run_task(self, task: int, x: Tensor) -> Tensor:
        """The target's output on ``x`` with task ``task``'s generated weights (one task wide)."""
        assert self.target is not None
        self.target.train(self.training)
        out = self.target(self.generate([task])[0], x, self.task_buffers(task))
        if self.heads == "all":
            assert self.info is not None
            k = self.info.outputs_per_task
            out = out[:, task * k: (task + 1) * k]
        return out

    def forward(self, x: Tensor, task_ids: Tensor) -> Tensor:
        assert self.info is not None
        return place_task_logits(per_task_outputs(x, task_ids, self.run_task), task_ids, self.info)

    # ------------------------------------------------------------------ task inference (HNET+ENT)
    def seen_tasks(self) -> int:
        return self.current_task + 1

    @torch.no_grad()
    def infer_task(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Per input, the seen task whose output has the lowest entropy: (its logits ``[n, k]``, task ids)."""
        assert self.target is not None
        self.target.train(False)
        seen = self.seen_tasks()
        weights = self.generate(range(seen))
        outs = self.target.batched(weights, x, self.task_buffers(slice(0, seen)))  # [S, n, k] (heads: [S, n, T*k])
        if self.heads == "all":  # task s reads its own head of its own generated weights
            assert self.info is not None
            own = torch.arange(seen, device=x.device)
            outs = outs.unflatten(-1, (self.info.num_tasks, self.info.outputs_per_task))[own, :, own]
        logp = outs.log_softmax(-1)
        entropy = -(logp.exp() * logp).sum(-1)  # [S, n]
        chosen = entropy.argmin(0)
        return outs[chosen, torch.arange(len(x), device=x.device)], chosen

    def predict_for_eval(self, x: Tensor, task_ids: Tensor) -> Tensor:
        if self.inference == "given":
            return self(x, task_ids)
        logits, chosen = self.infer_task(x)
        assert self.info is not None
        return place_task_logits(logits, chosen, self.info)

    # ------------------------------------------------------------------ accounting
    def compression_ratio(self) -> float:
        """Trainable hypernetwork weights (without embeddings) / target weights."""
        return sum(p.numel() for p in self.hypernetwork.parameters()) / self.hypernetwork.num_target_weights

    def storage_details(self) -> dict[str, int | float]:
        return {"hypernetwork_parameters": sum(p.numel() for p in self.hypernetwork.parameters()),
                "task_embeddings": sum(e.numel() for e in self.task_embeddings),
                "target_weights_generated": self.hypernetwork.num_target_weights}
