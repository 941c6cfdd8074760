"""HNET+TIR (von Oswald et al., ICLR 2020, Appendix B/C): task inference by a replay-protected classifier.

The method is our :class:`~cl_lightning.methods.hnet.HNET` classifier (task embeddings, a hypernetwork protected
by the output regularizer, each embedding generating its own task's network) plus a *replay model*,
:class:`TaskInferrer`: HNET+R's pair (:class:`~cl_lightning.methods.replay.HNETR`) of a classifier and a VAE whose
decoder's weights come from a task-conditioned hypernetwork protected by its own output regularizer, whose
classifier here predicts the *task*: one output per task, of which the seen ones are used (the paper's growing
softmax). In the authors' code the task inference network is trained by the same routine as HNET+R's classifier,
with the task ids as hard targets; so is ours.

Each task's fit trains the three together (one optimizer; no loss reaches another part's parameters):

- the HNET classifier on the current task's batch, plus the output regularizer (``OutputRegularizer``);
- the task classifier on the current batch labelled with the current task, plus replayed inputs of every past
  task labelled with their task (the :class:`cl_lightning.callbacks.task_inference.TaskInferenceReplay` plugin, which
  draws them from the VAE as it was at the task start);
- the VAE on the current batch, plus the output regularizer on its decoder's hypernetwork
  (:class:`cl_lightning.callbacks.task_inference.ReplayModelRegularizer`).

At test time (domain-IL CL2 and class-IL CL3) the task classifier picks each input's task among those seen, and
that task's embedding generates the network that classifies it (``task_inference: classifier``).
``task_inference: entropy`` uses HNET+ENT's rule on the same model instead (for comparison; ENT itself stays
:class:`HNET`'s). In the authors' code the task classifier, the replay model and the HNET classifier are trained
one after another; in one fit the VAE changes during the task, so replay samples come from its parameters at the
task start, which is what the sequential order sees.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cl_lightning.callback import ContinualCallback, TaskLoss
from cl_lightning.methods.base import per_task_outputs
from cl_lightning.methods.hnet import HNET
from cl_lightning.methods.replay import HNETR
from cl_lightning.nets.hypernetwork import ChunkedHyperNetwork, HyperNetwork
from cl_lightning.nets.mlp import MLP
from cl_lightning.tasks import BenchmarkInfo, Scenario

RULES = ("classifier", "entropy")
#: The replay model's attribute name; its parameters are ``replay_model.*`` in the method's state dict.
REPLAY = "replay_model"


class TaskInferrer(HNETR):
    """HNET+R's classifier and hypernetwork-protected VAE, the classifier predicting the task (not the class).

    Lives inside :class:`HNETTIR` (a child module: Lightning hands it the trainer; the parent keeps its task
    counters in step). Its head has one output per task; :meth:`task_logits` keeps the seen ones.
    """

    def build(self, info: BenchmarkInfo) -> None:
        super().build(info)
        assert self.head is not None
        self.head = nn.Linear(self.head.in_features, info.num_tasks)

    def forward(self, x: Tensor, task_ids: Tensor | None = None) -> Tensor:
        assert self.head is not None
        return self.head(self.backbone(x))

    def task_logits(self, x: Tensor) -> Tensor:
        """``[n, seen]``: logits over the tasks seen so far (the current one included)."""
        return self(x)[:, : self.current_task + 1]


class HNETTIR(HNET):
    """HNET+TIR: an HNET classifier whose task embedding is chosen by a replay-protected task classifier.

    Args:
        target, hypernetwork, embedding_init_std: the HNET classifier, as :class:`HNET` (default: the paper's
            Split-MNIST classifier, target 400-400, chunked hypernetwork 10-10 ReLU, chunks 42000, embeddings 96).
        task_inference: ``classifier`` (HNET+TIR) or ``entropy`` (HNET+ENT's rule on the same model).
        task_classifier: body of the task inference classifier (default MLP 400-400); a head with one output
            per task is appended.
        replay_hypernetwork: generates the VAE decoder's weights (default: the paper's, chunked, 10-10 ELU,
            chunks 50000, task and chunk embeddings 96, the authors' Xavier initialisation).
        replay_embedding_init_std: standard deviation of the decoder hypernetwork's initial task embeddings.
        encoder_hidden, decoder_hidden, latent_dim: the VAE (paper, Split-MNIST HNET+TIR: 400-400, 50-150, 100).
        lr, optimizer, momentum, weight_decay: one optimizer over all three parts (Adam is per parameter, so this
            is the authors' separate optimizers at equal learning rates).
        plugins: a ``TaskInferenceReplay``, an ``OutputRegularizer`` (the classifier's hypernetwork) and a
            ``ReplayModelRegularizer`` (the decoder's).
    """

    supported_scenarios = frozenset({Scenario.DOMAIN_IL, Scenario.CLASS_IL})

    def __init__(self, target: nn.Module | None = None, hypernetwork: HyperNetwork | None = None,
                 embedding_init_std: float = 1.0, task_inference: str = "classifier",
                 task_classifier: nn.Module | None = None, replay_hypernetwork: HyperNetwork | None = None,
                 replay_embedding_init_std: float = 1.0, encoder_hidden: Sequence[int] = (400, 400),
                 decoder_hidden: Sequence[int] = (50, 150), latent_dim: int = 100, lr: float = 1e-3,
                 optimizer: str = "adam", momentum: float = 0.0, weight_decay: float = 0.0,
                 plugins: Sequence[ContinualCallback] | None = None,
                 compile: bool | str = False):
        if task_inference not in RULES:
            raise ValueError(f"task_inference={task_inference!r} is not one of {list(RULES)}")
        if replay_hypernetwork is None:
            replay_hypernetwork = ChunkedHyperNetwork(hidden_sizes=(10, 10), activation="elu", embedding_dim=96,
                                                      chunk_size=50000, chunk_embedding_dim=96, init="xavier")
        super().__init__(target=target, hypernetwork=hypernetwork, embedding_init_std=embedding_init_std,
                         task_inference="auto", lr=lr, optimizer=optimizer, momentum=momentum,
                         weight_decay=weight_decay, plugins=plugins, compile=compile)
        self.rule = task_inference
        self.replay_model = TaskInferrer(
            backbone=task_classifier if task_classifier is not None else MLP(hidden_sizes=(400, 400)),
            hypernetwork=replay_hypernetwork, embedding_init_std=replay_embedding_init_std,
            encoder_hidden=encoder_hidden, decoder_hidden=decoder_hidden, latent_dim=latent_dim, lr=lr,
            optimizer=optimizer, momentum=momentum, weight_decay=weight_decay)
        self._sync_counters()

    # ------------------------------------------------------------------ the task counters, shared with the child
    # The runner sets ``current_task`` and ``steps_before_task`` on the method; the replay model reads its own
    # (its VAE noise seeds, its embeddings' freezing, its growing softmax, the regularizer's random subsets).
    @property
    def current_task(self) -> int:
        return self.__dict__.get("_current_task", 0)

    @current_task.setter
    def current_task(self, value: int) -> None:
        self.__dict__["_current_task"] = value
        self._sync_counters()

    @property
    def steps_before_task(self) -> int:
        return self.__dict__.get("_steps_before_task", 0)

    @steps_before_task.setter
    def steps_before_task(self, value: int) -> None:
        self.__dict__["_steps_before_task"] = value
        self._sync_counters()

    def _sync_counters(self) -> None:
        child = cast("TaskInferrer | None", self._modules.get(REPLAY) if "_modules" in self.__dict__ else None)
        if child is not None:
            child.current_task, child.steps_before_task = self.current_task, self.steps_before_task

    # ------------------------------------------------------------------ set-up
    def build(self, info: BenchmarkInfo) -> None:
        super().build(info)  # the HNET classifier; its inference resolves to "entropy" in CL2/CL3
        self.replay_model.setup_tasks(info)
        if self.rule == "classifier":
            self.inference = "classifier"

    def setup(self, stage: str) -> None:
        super().setup(stage)
        self._sync_counters()
        self.replay_model.setup(stage)

    # ------------------------------------------------------------------ training
    def task_loss(self, batch: tuple[Tensor, Tensor, Tensor]) -> TaskLoss:
        """The HNET classifier's loss, the task classifier's on the current inputs (labelled with their task)
        and the VAE's objective; each reaches only its own part's parameters (so each output regularizer's
        lookahead on the sum is the step on its own part's loss). Errors are the HNET classifier's."""
        x, _, t = batch
        classifier = super().task_loss(batch)
        rm = self.replay_model
        # on the first task this is a softmax over one task: zero, with zero gradients (still part of the
        # graph, so DDP sees every parameter used)
        task_inference = F.cross_entropy(rm.task_logits(x), t)
        generator = rm.vae_loss(x, t, salt=0)
        return classifier._replace(value=classifier.value + task_inference + generator)

    def replay_teacher(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """Of the method's parameters and buffers by name, those the replay sampler reads (the decoder's
        hypernetwork and embeddings), named as in the replay model."""
        keep = (f"{REPLAY}.hypernetwork.", f"{REPLAY}.task_embeddings.")
        return {n.removeprefix(f"{REPLAY}."): v for n, v in state.items() if n.startswith(keep)}

    @torch.no_grad()
    def sample_replay(self, tasks: Tensor, generator: torch.Generator,
                      teacher: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Inputs of past ``tasks`` from the decoder as it was at the task start (``teacher``: as
        :meth:`replay_teacher` keeps it), labelled with their task."""
        x, _ = self.replay_model.sample_replay(tasks, generator, teacher)
        return x, tasks.to(x.device)

    # ------------------------------------------------------------------ task inference
    @torch.no_grad()
    def predict_task(self, x: Tensor) -> Tensor:
        """Per input, the seen task the task classifier picks."""
        return self.replay_model.task_logits(x).argmax(1)

    @torch.no_grad()
    def infer_task(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.inference != "classifier":
            return super().infer_task(x)
        assert self.target is not None
        self.target.train(False)
        chosen = self.predict_task(x)
        return per_task_outputs(x, chosen, self.run_task), chosen

    # ------------------------------------------------------------------ accounting
    def storage_details(self) -> dict[str, int | float]:
        rm = self.replay_model
        assert rm.head is not None
        return {**super().storage_details(),
                "task_classifier_parameters": sum(p.numel() for p in [*rm.backbone.parameters(),
                                                                      *rm.head.parameters()]),
                "replay_model_parameters": sum(p.numel() for p in rm.generator_parameters()),
                "decoder_weights_generated": rm.hypernetwork.num_target_weights}
