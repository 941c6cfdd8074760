"""The ARI lifelong learner (Srivastava, Yaqub & Nandakumar, "Lifelong learning of task-parameter
relationships for knowledge transfer", CVPR-W 2023), Algorithm 1.

The learner keeps no per-task network. It keeps a *knowledge base* (KB): a chunked hypernetwork ``F``
with one learned embedding per stored parameter set (at most ``kb_capacity`` sets, not one per task),
an ARI estimator ``q`` (:mod:`cl_lightning.nets.ari_estimator`), a small exemplar memory per task and
each task's signature. For every task:

1. **Exploration** (this module, as the task's Lightning ``fit``): from the KB sets and the ``N``
   random initial sets ``Theta_0``, choose at most ``Q`` candidates by the estimator's predicted ARI on
   the task (random choice before ``q`` has data, or with ``selection="random"``, the paper's
   ablation) and train all of them on the task as one vectorised computation (one ``[Q, P]``
   parameter, ``torch.func.vmap`` over ``functional_call``; the summed per-candidate losses give each
   candidate exactly its own gradient, and Adam is element-wise, so this equals Q separate runs).
   The per-step error of every candidate is recorded: its ARI on the task.
2. **Consolidation** (the plugin :class:`cl_lightning.callbacks.ari_consolidation.ARIConsolidation`, at task
   end): add the observed (ARI, parameter signature, task signature) tuples to the buffer S and fit ``q``;
   then this module (:meth:`ARILearner.consolidate_knowledge_base`) keeps the ``kb_capacity`` sets with the
   highest predicted ARI summed over all observed tasks and trains ``F`` and the embeddings to reproduce them.
   The trained candidates themselves are then discarded.
3. **Inference** on task m (before every evaluation): generate the KB from ``F``, pick the set with the
   highest predicted ARI for task m, fine-tune it briefly on task m's exemplar memory (all tasks'
   fine-tunes vectorised together), and evaluate with it. A task not learned yet is evaluated with the
   first untrained initial set (chance level; there is nothing of it in memory).

Scenarios: inference always uses the task id to pick and fine-tune a set, as in the paper. Task-IL
and domain-IL: each set has one task's head. Class-IL benchmarks (global labels) give every set the
full single head, which is the paper's "single-headed" Split-MNIST protocol; it is **not** class-IL
in the strict sense (the id is used at test time), and results say so.

Under DDP every rank trains the same candidates on its share of each batch (gradients are averaged),
the errors are summed across ranks, and the consolidated state is broadcast from rank 0, so S, ``q``
and the KB are identical on every rank.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.strategies import Strategy
from torch import Tensor, nn

from cl_lightning.callback import ContinualCallback, TaskLoss
from cl_lightning.callbacks.ari_consolidation import ARIConsolidation
from cl_lightning.datamodule import benchmark_of
from cl_lightning.methods.base import ContinualModule, fit_body, per_task_outputs
from cl_lightning.nets.ari_estimator import ARIEstimator, RandomFeatures, pad_signature, task_signature
from cl_lightning.nets.functional import FunctionalTarget
from cl_lightning.nets.hypernetwork import ChunkedHyperNetwork, HyperNetwork
from cl_lightning.nets.mlp import MLP
from cl_lightning.tasks import BenchmarkInfo, Scenario

SELECTIONS = ("estimator", "random")


def _seeded(*parts: int) -> torch.Generator:
    seed = 0
    for p in parts:
        seed = (seed * 1_000_003 + int(p)) % (2**63 - 1)
    return torch.Generator().manual_seed(seed)


class ARILearner(ContinualModule):
    """Args:
        base: the base network's body (e.g. ``cl_lightning.nets.MLP``; the paper's 784-100-100); a linear
            head of one task's width is appended. Parameter sets are flat weight vectors of body + head.
        knowledge_base: the hypernetwork ``F`` (usually a ``ChunkedHyperNetwork``); its ``embedding_dim``
            sets the size of the per-set embeddings.
        estimator: the ARI estimator ``q``.
        feature_extractor: fixed extractor of the task signatures (default: ``RandomFeatures``).
        num_init_sets: ``N``, random initial parameter sets (paper: 3); regenerated from ``init_seed``.
        max_candidates: ``Q``, candidates trained per task (paper: 10).
        kb_capacity: ``B``, parameter sets kept in the knowledge base (paper: 20 for MNIST).
        selection: ``estimator`` or ``random`` (ablation: random choice at exploration, consolidation and
            inference).
        noise_inputs: Gaussian inputs of the parameter signature.
        samples_per_class: samples per class of the task signature.
        memory_per_task: exemplar memory per task (paper: 200 for MNIST), for inference-time fine-tuning.
        finetune_steps, finetune_batch_size, finetune_lr: the inference-time fine-tune on the memory
            (``finetune_lr=None``: ``lr``).
        embedding_init_std: standard deviation of a new KB embedding.
        init_seed: seed of the initial sets, the memories, the noise inputs and random choices.
        lr, optimizer, momentum, weight_decay: the candidates' optimizer (paper: Adam 1e-3, decay 1e-3).
        plugins: one ``ARIConsolidation`` (added with its defaults when absent) and any others.
    """

    supported_scenarios = frozenset(Scenario)
    required_plugins = (ARIConsolidation,)

    # set in __init__ (the body outside the module tree) and buffers registered in build
    _base_body: nn.Module
    feature_extractor: nn.Module
    init_sets: Tensor
    noise: Tensor
    kb_count: Tensor
    tasks_learned: Tensor
    estimator_fitted: Tensor
    candidate_sigs: Tensor
    task_sigs: Tensor
    memory_x: Tensor
    memory_y: Tensor
    memory_size: Tensor

    def __init__(self, base: nn.Module | None = None, knowledge_base: HyperNetwork | None = None,
                 estimator: ARIEstimator | None = None, feature_extractor: nn.Module | None = None,
                 num_init_sets: int = 3, max_candidates: int = 10, kb_capacity: int = 20,
                 selection: str = "estimator", noise_inputs: int = 32, samples_per_class: int = 5,
                 memory_per_task: int = 200, finetune_steps: int = 50, finetune_batch_size: int = 10,
                 finetune_lr: float | None = None, embedding_init_std: float = 1.0, init_seed: int = 0,
                 lr: float = 1e-3, optimizer: str = "adam", momentum: float = 0.0, weight_decay: float = 0.0,
                 plugins: Sequence[ContinualCallback] | None = None,
                 compile: bool | str = False):
        super().__init__(backbone=nn.Identity(), lr=lr, optimizer=optimizer, momentum=momentum,
                         weight_decay=weight_decay, plugins=plugins, compile=compile)
        for name, value in (("num_init_sets", num_init_sets), ("max_candidates", max_candidates),
                            ("kb_capacity", kb_capacity), ("noise_inputs", noise_inputs),
                            ("samples_per_class", samples_per_class), ("memory_per_task", memory_per_task),
                            ("finetune_batch_size", finetune_batch_size)):
            if value < 1:
                raise ValueError(f"{name}={value} must be at least 1")
        if finetune_steps < 0:
            raise ValueError(f"finetune_steps={finetune_steps} must not be negative")
        if selection not in SELECTIONS:
            raise ValueError(f"selection={selection!r} is not one of {list(SELECTIONS)}")
        if knowledge_base is not None and not isinstance(knowledge_base, HyperNetwork):
            raise ValueError(f"knowledge_base: {type(knowledge_base).__name__} is not a HyperNetwork")
        object.__setattr__(self, "_base_body", base if base is not None else MLP(hidden_sizes=(100, 100)))
        self.knowledge_base = knowledge_base if knowledge_base is not None else ChunkedHyperNetwork(
            hidden_sizes=(100, 100), embedding_dim=64, chunk_size=8000, chunk_embedding_dim=64)
        self.estimator = estimator if estimator is not None else ARIEstimator()
        object.__setattr__(self, "feature_extractor", feature_extractor or RandomFeatures())
        self.num_init_sets, self.max_candidates, self.kb_capacity = num_init_sets, max_candidates, kb_capacity
        self.selection, self.noise_inputs, self.samples_per_class = selection, noise_inputs, samples_per_class
        self.memory_per_task = memory_per_task
        self.finetune_steps, self.finetune_batch_size = finetune_steps, finetune_batch_size
        self.finetune_lr = finetune_lr if finetune_lr is not None else lr
        self.embedding_init_std, self.init_seed = embedding_init_std, init_seed
        self.target: FunctionalTarget | None = None
        #: Where each candidate of the current task came from: ("kb", j) or ("init", k).
        self.candidate_sources: list[tuple[str, int]] = []
        self.candidates_task = -1
        #: Per step of the current task: misclassified samples of every candidate (this rank) and samples.
        self.explore_wrong: list[Tensor] = []
        self.explore_count: list[int] = []
        self.eval_sets: Tensor | None = None

    # ------------------------------------------------------------------ set-up
    def build(self, info: BenchmarkInfo) -> None:
        body: nn.Module = self._base_body
        width = fit_body(body, info, role="base")
        if info.is_regression:
            raise ValueError("the ARI learner needs a classification benchmark (ARI is built on error rates)")
        head = info.head_width if info.scenario is Scenario.CLASS_IL else info.outputs_per_task
        template = nn.Sequential(body, nn.Linear(width, head))
        init_sets = []
        for k in range(self.num_init_sets):  # Theta_0: fresh default initialisations, seeded
            net = copy.deepcopy(template)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.init_seed * 1000 + k)
                for m in net.modules():
                    reset = getattr(m, "reset_parameters", None)
                    if reset is not None:
                        reset()
            init_sets.append(torch.cat([p.detach().flatten() for p in net.parameters()]))
        self.target = FunctionalTarget(template)
        if self.target.has_buffers:
            raise ValueError("the ARI learner's base network must have no buffers (use batch norm without "
                             "running statistics), as its parameter sets are vectorised")
        self.knowledge_base.set_target_shapes(self.target.param_shapes)
        n, e = self.target.num_params, self.knowledge_base.embedding_dim
        width = self.estimator.signature_width
        self.register_buffer("init_sets", torch.stack(init_sets), persistent=False)  # regenerated, not stored
        g = _seeded(self.init_seed, 7)
        self.register_buffer("noise", torch.randn(self.noise_inputs, *info.input_shape, generator=g),
                             persistent=False)
        self.kb_embeddings = nn.Parameter(torch.zeros(self.kb_capacity, e), requires_grad=False)
        self.register_buffer("kb_count", torch.zeros((), dtype=torch.long))
        self.register_buffer("tasks_learned", torch.zeros((), dtype=torch.long))
        self.register_buffer("estimator_fitted", torch.zeros((), dtype=torch.bool))
        self.candidates = nn.Parameter(torch.zeros(0, n), requires_grad=False)
        self.register_buffer("candidate_sigs", torch.zeros(0, width))
        T = info.num_tasks
        self.register_buffer("task_sigs", torch.zeros(T, width))
        self.register_buffer("memory_x", torch.zeros(T, self.memory_per_task, *info.input_shape))
        self.register_buffer("memory_y", torch.zeros(T, self.memory_per_task, dtype=torch.long))
        self.register_buffer("memory_size", torch.zeros(T, dtype=torch.long))
        for m in self.estimator.modules():  # from the run's seed, not from whenever q was constructed
            reset = getattr(m, "reset_parameters", None)
            if reset is not None:
                reset()
        for p in [*self.knowledge_base.parameters(), *self.estimator.parameters()]:
            p.requires_grad_(False)  # trained by the consolidation plugin, not by the task's optimizer

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        # the candidate matrix changes size from task to task: take the checkpoint's shape
        for name in ("candidates", "candidate_sigs"):
            saved = state_dict.get(prefix + name)
            if saved is not None and saved.shape != getattr(self, name).shape:
                getattr(self, name).data = torch.empty_like(saved, device=getattr(self, name).device)
        super()._load_from_state_dict(state_dict, prefix, *args)

    def setup(self, stage: str) -> None:
        """Before the optimizer and the DDP wrapper: remember the task, then choose the candidates."""
        if stage != "fit":
            return
        task = self.current_task
        if int(self.memory_size[task]) == 0:
            self.remember_task(task, benchmark_of(self.trainer).split(task, "train"))
        if len(self.candidates) == 0 or self.candidates_task != task:
            self.choose_candidates(task)
        self.candidates.requires_grad_(True)
        self.explore_wrong, self.explore_count = [], []

    # ------------------------------------------------------------------ signatures and memory
    @torch.no_grad()
    def remember_task(self, task: int, data: Any) -> None:
        """Stores the task's exemplar memory and signature (from its training data)."""
        g = _seeded(self.init_seed, 11, task)
        idx = torch.randperm(len(data), generator=g)[: self.memory_per_task]
        x, y, _ = data[idx.sort().values]
        dev = self.memory_x.device
        self.memory_x[task, : len(idx)] = x.to(dev)
        self.memory_y[task, : len(idx)] = y.to(dev)
        self.memory_size[task] = len(idx)
        labels = data.y
        few = torch.cat([(labels == c).nonzero().flatten()[: self.samples_per_class] for c in labels.unique()])
        few_x, few_y, _ = data[few.sort().values]
        sig = task_signature(self.feature_extractor.to(dev), few_x.to(dev), few_y.to(dev), self.samples_per_class)
        self.task_sigs[task] = pad_signature(sig.unsqueeze(0), self.estimator.signature_width)[0]

    @torch.no_grad()
    def memory_errors(self, sets: Tensor, tasks: Sequence[int]) -> Tensor:
        """``[len(tasks), len(sets)]`` error rate of every set, untrained, on every task's exemplar memory."""
        assert self.target is not None
        rows = []
        for t in tasks:
            n = int(self.memory_size[t])
            x, y = self.memory_x[t, :n].to(sets.device), self.memory_y[t, :n].to(sets.device)
            rows.append((self.target.batched(sets, x).argmax(-1) != y).float().mean(1))
        return torch.stack(rows)

    @torch.no_grad()
    def param_signatures(self, sets: Tensor) -> Tensor:
        """``[B, P]`` parameter sets -> padded signatures ``[B, width]`` (outputs on the noise inputs)."""
        assert self.target is not None
        outs = self.target.batched(sets, self.noise)  # [B, noise, k]
        return pad_signature(outs.flatten(1), self.estimator.signature_width)

    @torch.no_grad()
    def predicted_ari(self, sets: Tensor, tasks: Sequence[int]) -> Tensor:
        """``[len(tasks), B]``: the estimator's ARI of every set on every given (observed) task."""
        sigs = self.param_signatures(sets)
        task_sigs = self.task_sigs[list(tasks)]
        pred = self.estimator(sigs.repeat(len(task_sigs), 1), task_sigs.repeat_interleave(len(sigs), 0))
        return pred.view(len(task_sigs), len(sigs))

    # ------------------------------------------------------------------ the knowledge base
    def kb_sets(self) -> Tensor:
        """The parameter sets of the knowledge base, generated from ``F`` (``[kb_count, P]``)."""
        count = int(self.kb_count)
        if count == 0:
            return self.init_sets.new_zeros(0, self.init_sets.shape[1])
        return self.knowledge_base(self.kb_embeddings[:count])

    def new_embeddings(self, count: int, task: int) -> Tensor:
        g = _seeded(self.init_seed, 13, task)
        e = torch.randn(count, self.knowledge_base.embedding_dim, generator=g) * self.embedding_init_std
        return e.to(self.kb_embeddings.device)

    def fit_estimator(self, ari: Tensor, param_sigs: Tensor, task_sigs: Tensor, steps: int, lr: float,
                      weight_decay: float = 0.0) -> float:
        """Fits ``q`` to the observed ARIs (``ARIEstimator.fit``); from then on it ranks the sets. Returns the
        final training MSE."""
        mse = self.estimator.fit(ari, param_sigs, task_sigs, steps, lr, weight_decay)
        self.estimator_fitted.fill_(True)
        return mse

    def use_estimator(self) -> bool:
        return self.selection == "estimator" and bool(self.estimator_fitted)

    def rank_sets(self, sets: Tensor, tasks: Sequence[int], count: int, salt: int) -> Tensor:
        """Indices of the ``count`` sets with the highest predicted ARI summed over ``tasks`` (random
        without a fitted estimator or under ``selection=random``), in descending order."""
        count = min(count, len(sets))
        if self.use_estimator():
            return self.predicted_ari(sets, tasks).sum(0).topk(count).indices.cpu()
        g = _seeded(self.init_seed, salt, *tasks)
        return torch.randperm(len(sets), generator=g)[:count]

    def best_set_per_task(self, sets: Tensor, tasks: Sequence[int], salt: int) -> list[int]:
        """For each task, the index of the set with the highest predicted ARI (signatures computed once)."""
        if self.use_estimator():
            return self.predicted_ari(sets, tasks).argmax(1).tolist()
        return [int(self.rank_sets(sets, [m], 1, salt)[0]) for m in tasks]

    # ------------------------------------------------------------------ exploration
    @torch.no_grad()
    def choose_candidates(self, task: int) -> None:
        """Theta_Tr: at most Q sets of KB ∪ Theta_0 with the highest predicted ARI on ``task``."""
        kb = self.kb_sets()
        pool = torch.cat([kb, self.init_sets])
        sources = [("kb", j) for j in range(len(kb))] + [("init", k) for k in range(len(self.init_sets))]
        chosen = self.rank_sets(pool, [task], self.max_candidates, salt=17).tolist()
        self.candidates.data = pool[chosen].clone()
        self.candidate_sigs = self.param_signatures(self.candidates.data)
        self.candidate_sources = [sources[i] for i in chosen]
        self.candidates_task = task

    def task_loss(self, batch: tuple[Tensor, Tensor, Tensor]) -> TaskLoss:
        """Every candidate on the same batch; the sum of their mean losses (each gets its own gradient)."""
        assert self.target is not None
        x, y, _ = batch
        out = self.target.batched(self.candidates, x)  # [Q, n, k]
        q = len(out)
        losses = F.cross_entropy(out.flatten(0, 1), y.repeat(q), reduction="none").view(q, -1).mean(1)
        if self.training and torch.is_grad_enabled():
            self.explore_wrong.append((out.detach().argmax(-1) != y).sum(1))
            self.explore_count.append(len(y))
        return TaskLoss(losses.sum(), out.flatten(0, 1), y.repeat(q))

    def exploration_errors(self) -> Tensor:
        """``[steps, Q]`` error of every candidate at every step of this task, over all ranks."""
        if not self.explore_wrong:
            raise RuntimeError("no exploration step was recorded for this task")
        wrong = torch.stack(self.explore_wrong).float()
        count = torch.tensor(self.explore_count, dtype=torch.float, device=wrong.device)
        trainer = self.attached_trainer()
        if trainer is not None and trainer.world_size > 1:
            wrong = trainer.strategy.reduce(wrong, reduce_op="sum")
            count = trainer.strategy.reduce(count, reduce_op="sum")
        return wrong / count.unsqueeze(1)

    # ------------------------------------------------------------------ consolidation of the knowledge base
    @torch.no_grad()
    def consolidate_knowledge_base(self, task: int, steps: int, lr: float, tolerance: float,
                                   relative_tolerance: bool, cover_tasks: bool = False) -> dict[str, Any]:
        """From the KB sets and the trained candidates, keeps the ``kb_capacity`` sets with the highest
        predicted ARI summed over the tasks so far (their embeddings kept; new sets get fresh ones) and trains
        ``F`` to reproduce them (:meth:`reproduce`). Returns what was kept and how well it is reproduced.
        With ``cover_tasks`` (ours) each task's own best set is kept first (:meth:`covering_sets`)."""
        kb = self.kb_sets().detach()
        trained = self.candidates.detach().clone()
        pool = torch.cat([kb, trained])
        embeddings = torch.cat([self.kb_embeddings[: len(kb)], self.new_embeddings(len(trained), task)])
        tasks = list(range(task + 1))
        if cover_tasks and self.use_estimator():
            keep = self.covering_sets(pool, tasks).sort().values
        else:
            keep = self.rank_sets(pool, tasks, self.kb_capacity, salt=29).sort().values
        record: dict[str, Any] = {"kept": [("kb", i) if i < len(kb) else ("new", i - len(kb)) for i in keep.tolist()]}
        record.update(self.reproduce(pool[keep.to(pool.device)], embeddings[keep.to(embeddings.device)], steps, lr,
                                     tolerance, relative_tolerance))
        return record

    def covering_sets(self, sets: Tensor, tasks: Sequence[int]) -> Tensor:
        """``kb_capacity`` sets: first each task's highest-predicted set (distinct; the newest tasks first when
        there are more tasks than places), then the rest by predicted ARI summed over ``tasks``. The summed
        rule alone can drop every set of a task whose sets score low elsewhere, which leaves that task
        served by another task's set."""
        predicted = self.predicted_ari(sets, tasks)  # [T, S]
        chosen: list[int] = []
        for row in predicted.flip(0):
            best = next((i for i in row.argsort(descending=True).tolist() if i not in chosen), None)
            if best is not None and len(chosen) < self.kb_capacity:
                chosen.append(best)
        rest = [i for i in predicted.sum(0).argsort(descending=True).tolist() if i not in chosen]
        return torch.tensor(chosen + rest[: max(0, min(self.kb_capacity, len(sets)) - len(chosen))])

    def reproduce(self, sets: Tensor, embeddings: Tensor, steps: int, lr: float, tolerance: float,
                  relative_tolerance: bool) -> dict[str, Any]:
        """Trains ``F`` and the embeddings (Adam on the MSE, at most ``steps``) until every set's reproduction
        error is within ``tolerance`` (its MSE, relative to its own mean square when ``relative_tolerance``).
        Bounded per set, not on average: one new set among many reproduced ones would otherwise pass badly
        reproduced (measured on Permuted-MNIST: a kept set at 82 % error, its task at chance)."""
        hnet = self.knowledge_base
        emb = embeddings.clone().requires_grad_(True)
        params = list(hnet.parameters())
        taken, mse, worst = 0, float("inf"), float("inf")
        scale = sets.pow(2).mean(1).clamp_min(1e-12) if relative_tolerance else sets.new_ones(len(sets))
        with torch.enable_grad():
            for p in params:
                p.requires_grad_(True)
            opt = torch.optim.Adam([*params, emb], lr=lr)
            while True:
                per_set = (hnet(emb) - sets).pow(2).mean(1)
                loss = per_set.mean()
                mse, worst = float(loss.detach()), float((per_set.detach() / scale).max())
                if worst <= tolerance or taken >= steps:
                    break
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                taken += 1
            for p in params:
                p.requires_grad_(False)
        with torch.no_grad():
            self.kb_embeddings[: len(sets)] = emb.detach()
            self.kb_count.fill_(len(sets))
            relative = float(F.mse_loss(hnet(emb), sets) / sets.pow(2).mean().clamp_min(1e-12))
        return {"kb_mse": mse, "kb_relative_mse": relative, "kb_worst_set_error": worst, "kb_steps": taken,
                "kb_size": len(sets)}

    def broadcast_consolidation(self, strategy: Strategy) -> None:
        """Rank 0's KB and estimator on every rank (they are computed identically; this makes it exact)."""
        for t in [*self.knowledge_base.parameters(), *self.estimator.parameters(), self.kb_embeddings,
                  self.kb_count]:
            t.data.copy_(strategy.broadcast(t.data.detach().cpu(), src=0).to(t.device))

    def end_exploration(self, task: int) -> None:
        """After consolidation: the trained candidates are discarded; task ``task`` counts as learned."""
        self.candidates.requires_grad_(False)
        self.candidates.data = self.candidates.data.new_zeros(0, self.candidates.shape[1])
        self.candidate_sigs = self.candidate_sigs.new_zeros(0, self.candidate_sigs.shape[1])
        self.candidate_sources = []
        self.explore_wrong, self.explore_count = [], []
        self.tasks_learned.fill_(task + 1)
        self.eval_sets = None

    # ------------------------------------------------------------------ inference
    def on_validation_epoch_start(self) -> None:
        self.prepare_inference()

    def on_test_epoch_start(self) -> None:
        super().on_test_epoch_start()
        self.prepare_inference()

    def prepare_inference(self) -> None:
        """One parameter set per task: for each learned task, the KB set with the highest predicted ARI
        fine-tuned on its memory; the first initial set for the others."""
        assert self.info is not None
        learned = int(self.tasks_learned)
        sets = self.init_sets[:1].repeat(self.info.num_tasks, 1)
        if learned and int(self.kb_count):
            with torch.inference_mode(False), torch.no_grad():
                kb = self.kb_sets().clone()
                picks = self.best_set_per_task(kb, range(learned), salt=19)
                tuned = self.finetune(kb[picks].clone(), list(range(learned)))
            sets = torch.cat([tuned, sets[learned:]])
        self.eval_sets = sets.detach()

    def finetune(self, sets: Tensor, tasks: list[int]) -> Tensor:
        """``finetune_steps`` of Adam on each task's memory, all tasks in one vectorised computation."""
        assert self.target is not None
        if self.finetune_steps == 0:
            return sets
        with torch.enable_grad():
            params = sets.clone().requires_grad_(True)
            opt = torch.optim.Adam([params], lr=self.finetune_lr, weight_decay=self.weight_decay)
            sizes = self.memory_size[tasks].cpu()
            g = _seeded(self.init_seed, 23, int(self.tasks_learned))
            rows = torch.tensor(tasks)
            for _ in range(self.finetune_steps):
                idx = (torch.rand(len(tasks), self.finetune_batch_size, generator=g) * sizes.unsqueeze(1)).long()
                xs = self.memory_x[rows.unsqueeze(1), idx].to(params.device)
                ys = self.memory_y[rows.unsqueeze(1), idx].to(params.device)
                out = self.target.batched_inputs(params, xs)  # [M, b, k]
                loss = F.cross_entropy(out.flatten(0, 1), ys.flatten(), reduction="none").view(len(tasks), -1)
                opt.zero_grad(set_to_none=True)
                loss.mean(1).sum().backward()
                opt.step()
        return params.detach()

    def forward(self, x: Tensor, task_ids: Tensor) -> Tensor:
        assert self.target is not None
        if self.eval_sets is None:
            self.prepare_inference()
        target, sets = self.target, self.eval_sets
        assert sets is not None
        return per_task_outputs(x, task_ids, lambda t, rows: target(sets[t], rows))

    # ------------------------------------------------------------------ checkpoints and accounting
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["continual"]["ari"] = {
            "candidate_sources": list(self.candidate_sources),
            "candidates_task": self.candidates_task,
            "explore_wrong": [w.cpu() for w in self.explore_wrong],
            "explore_count": list(self.explore_count),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("continual", {}).get("ari")
        if state is not None:
            self.candidate_sources = [tuple(s) for s in state["candidate_sources"]]
            self.candidates_task = state["candidates_task"]
            self.explore_wrong = list(state["explore_wrong"])
            self.explore_count = list(state["explore_count"])
        self.eval_sets = None

    def stored_counts(self) -> dict[str, int]:
        """What is kept between tasks: F, the used embeddings, q, memories and task signatures (the
        initial sets are regenerated from the seed; trained candidates are discarded)."""
        assert self.target is not None
        learned = int(self.tasks_learned)
        return {
            "knowledge_base_hypernetwork": sum(p.numel() for p in self.knowledge_base.parameters()),
            "knowledge_base_embeddings": int(self.kb_count) * self.knowledge_base.embedding_dim,
            "estimator": sum(p.numel() for p in self.estimator.parameters()),
            "exemplar_memory": int(self.memory_size[:learned].sum()) * (self.memory_x[0, 0].numel() + 1),
            "task_signatures": learned * self.task_sigs.shape[1],
        }

    def storage_details(self) -> dict[str, int | float]:
        """The size of one parameter set, to compare the storage with."""
        assert self.target is not None
        return {"base_model_parameters": self.target.num_params}
