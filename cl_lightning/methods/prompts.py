"""Prompt-based class-IL on a frozen pretrained ViT, and the prototype baseline they are measured against.

- **L2P** (Wang et al. 2022, "Learning to Prompt for Continual Learning"): a pool of M prompts of length Lp, each
  with a key; the N keys closest (cosine) to the query pick the prompts, which are prepended to the tokens (prompt
  tuning); the classifier reads the mean of the outputs at the prompt positions; a surrogate loss
  ``lambda * sum(1 - cos(q, k_selected))`` pulls the selected keys to the queries. Optional train-time prompt
  frequency balancing (the paper's diversity option: the distance of prompt i multiplied by its normalised
  selection frequency over the earlier tasks), off by default.
- **DualPrompt** (Wang et al. 2022, "DualPrompt: Complementary Prompting for Rehearsal-free Continual Learning"):
  a G(eneral)-prompt shared by all tasks as prefixes of layers 0-1, an E(xpert)-prompt per task as prefixes of
  layers 2-4; in training task t uses its own E-prompt and its key is pulled to the queries; at test the key
  closest to the query picks the E-prompt. The classifier reads the [CLS] output.
- **CODA-Prompt** (Smith et al. 2023): at every prefixed layer (0-4) a pool of M prompt components P_m with keys
  K_m and attention vectors A_m, M/T of each per task; the prompt is ``sum_m alpha_m P_m`` with
  ``alpha_m = cos(q * A_m, K_m)`` over the components of the tasks so far, those of earlier tasks frozen
  (detached); new components, keys and attention vectors start orthogonal to the old ones (Gram-Schmidt), with
  an optional orthogonality penalty ``||B B^T - I||^2`` (weight 0 in the authors' updated scripts).
- **SimpleCIL** (Zhou et al. 2023, "Revisiting Class-Incremental Learning with Pre-Trained Models"): no
  training; each class's prototype is the mean of the frozen model's features of its training images; the
  classifier is the cosine similarity to the prototypes.

All are class-IL. The prompt methods mask, in training, the logits of the classes outside the current task (the
originals' classifier masking); at test every method scores over the classes seen so far.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from cl_lightning.callback import ContinualCallback, TaskLoss
from cl_lightning.methods.base import ContinualModule, fit_body
from cl_lightning.nets.prompted_vit import PromptedViT
from cl_lightning.tasks import BenchmarkInfo, Scenario


def all_reduce_sum(x: Tensor) -> Tensor:
    """``x`` summed over the DDP ranks (unchanged in one process)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        x = x.clone()
        dist.all_reduce(x)
    return x


def _check_layers(name: str, layers: Sequence[int]) -> list[int]:
    layers = [int(i) for i in layers]
    if len(set(layers)) != len(layers) or any(i < 0 for i in layers):
        raise ValueError(f"{name}={layers}: layer indices must be distinct and non-negative")
    return layers


class FrozenViTModule(ContinualModule):
    """Common part: a frozen ``PromptedViT``, class-IL only, scores over the classes seen so far; pretrained
    weights loaded when a fit or test starts (never when the config is built)."""

    supported_scenarios = frozenset({Scenario.CLASS_IL})

    def __init__(self, backbone: PromptedViT | None = None, lr: float = 1e-3, optimizer: str = "adam",
                 momentum: float = 0.0, weight_decay: float = 0.0,
                 plugins: Sequence[ContinualCallback] | None = None,
                 compile: bool | str = False):
        if backbone is None:
            backbone = PromptedViT()
        if not isinstance(backbone, PromptedViT):
            raise ValueError(f"backbone: {type(self).__name__} needs a cl_lightning.nets.prompted_vit.PromptedViT, "
                             f"got {type(backbone).__name__}")
        super().__init__(backbone, lr, optimizer, momentum, weight_decay, plugins, compile=compile)
        self.vit: PromptedViT = backbone

    def setup(self, stage: str) -> None:
        self.vit.load_pretrained()

    def seen_classes(self) -> int:
        assert self.info is not None
        return (self.current_task + 1) * self.info.outputs_per_task

    def mask_unseen(self, logits: Tensor) -> Tensor:
        """Logits of the classes of later tasks at ``-inf`` (they cannot be predicted yet)."""
        cols = torch.arange(logits.shape[1], device=logits.device)
        return logits.masked_fill(cols >= self.seen_classes(), float("-inf"))

    def mask_other_tasks(self, logits: Tensor) -> Tensor:
        """Training: only the current task's classes compete (the originals' classifier masking)."""
        assert self.info is not None
        k = self.info.outputs_per_task
        cols = torch.arange(logits.shape[1], device=logits.device)
        inside = (cols >= self.current_task * k) & (cols < (self.current_task + 1) * k)
        return logits.masked_fill(~inside, float("-inf"))

    def stored_counts(self) -> dict[str, int]:
        frozen = sum(p.numel() for p in self.vit.parameters())
        learned = sum(p.numel() for n, p in self.named_parameters() if not n.startswith("backbone."))
        return {"frozen_backbone": frozen, "learned_parameters": learned,
                "buffers": sum(b.numel() for n, b in self.named_buffers() if not n.startswith("backbone."))}


class PromptModule(FrozenViTModule):
    """A prompt method: features with prompts, a linear head over all classes, masked logits in training, the
    method's matching loss added (``prompt_features`` returns both)."""

    def __init__(self, backbone: PromptedViT | None = None, lr: float = 1e-3, optimizer: str = "adam",
                 momentum: float = 0.0, weight_decay: float = 0.0, train_mask: bool = True,
                 plugins: Sequence[ContinualCallback] | None = None,
                 compile: bool | str = False):
        super().__init__(backbone, lr, optimizer, momentum, weight_decay, plugins, compile=compile)
        self.train_mask = train_mask

    def build(self, info: BenchmarkInfo) -> None:
        self.head = nn.Linear(fit_body(self.vit, info), info.head_width)  # fit_body: the input adapter's side
        self.build_prompts(info)

    def build_prompts(self, info: BenchmarkInfo) -> None:
        raise NotImplementedError

    def prompt_features(self, x: Tensor, task: int | None) -> tuple[Tensor, Tensor | None]:
        """Features (B, D) for the head and the method's auxiliary loss; ``task`` is the training task (None at
        test: the prompts are chosen by the query alone)."""
        raise NotImplementedError

    def forward(self, x: Tensor, task_ids: Tensor) -> Tensor:
        assert self.head is not None
        feats, _ = self.prompt_features(x, None)
        return self.mask_unseen(self.head(feats))

    def task_loss(self, batch: tuple[Tensor, Tensor, Tensor]) -> TaskLoss:
        assert self.head is not None
        x, y, _ = batch
        feats, aux = self.prompt_features(x, self.current_task)
        logits = self.head(feats)
        logits = self.mask_other_tasks(logits) if self.train_mask else self.mask_unseen(logits)
        loss = F.cross_entropy(logits, y)
        if aux is not None:
            loss = loss + aux
        return TaskLoss(loss, logits, y)


class L2P(PromptModule):
    """Args (besides ``ContinualModule``'s):
        pool_size: M, prompts in the pool.
        prompt_length: Lp, tokens per prompt.
        top_k: N, prompts chosen per image.
        pull_weight: lambda of the surrogate loss pulling the chosen keys to the queries.
        balance_prompts: train-time prompt-frequency balancing (off in the paper's main runs).
        train_mask: mask the logits of the classes outside the current task in training.
    """

    counts_task: Tensor
    counts_before: Tensor

    def __init__(self, backbone: PromptedViT | None = None, lr: float = 0.03, optimizer: str = "adam",
                 momentum: float = 0.0, weight_decay: float = 0.0, pool_size: int = 10, prompt_length: int = 5,
                 top_k: int = 5, pull_weight: float = 0.1, balance_prompts: bool = False, train_mask: bool = True,
                 plugins: Sequence[ContinualCallback] | None = None,
                 compile: bool | str = False):
        super().__init__(backbone, lr, optimizer, momentum, weight_decay, train_mask, plugins, compile=compile)
        if pool_size < 1 or prompt_length < 1 or not 1 <= top_k <= pool_size:
            raise ValueError(f"pool_size={pool_size}, prompt_length={prompt_length}, top_k={top_k}: need "
                             f"pool_size >= 1, prompt_length >= 1 and 1 <= top_k <= pool_size")
        if pull_weight < 0:
            raise ValueError(f"pull_weight={pull_weight} must not be negative")
        self.pool_size, self.prompt_length, self.top_k = pool_size, prompt_length, top_k
        self.pull_weight, self.balance_prompts = pull_weight, balance_prompts

    def build_prompts(self, info: BenchmarkInfo) -> None:
        D = self.vit.embed_dim
        self.prompts = nn.Parameter(torch.empty(self.pool_size, self.prompt_length, D).uniform_(-1, 1))
        self.keys = nn.Parameter(torch.empty(self.pool_size, D).uniform_(-1, 1))
        # selections counted in the current task's training, and over all earlier tasks (for balancing)
        self.register_buffer("counts_task", torch.zeros(self.pool_size))
        self.register_buffer("counts_before", torch.zeros(self.pool_size))

    def select(self, query: Tensor, balance: bool = False) -> tuple[Tensor, Tensor]:
        """Indices (B, N) of the N prompts whose keys are closest to the query (cosine distance, times the earlier
        tasks' normalised selection frequency when balancing), and the cosine similarities (B, M)."""
        sim = F.normalize(query, dim=-1) @ F.normalize(self.keys, dim=-1).t()
        distance = 1 - sim
        if balance and self.counts_before.sum() > 0:
            distance = distance * (self.counts_before / self.counts_before.sum())
        return distance.topk(self.top_k, dim=1, largest=False).indices, sim

    def prompt_features(self, x: Tensor, task: int | None) -> tuple[Tensor, Tensor | None]:
        query = self.vit.query(x)
        idx, sim = self.select(query, balance=self.balance_prompts and task is not None)
        tokens = self.prompts[idx].flatten(1, 2)  # (B, N * Lp, D)
        out = self.vit.forward_prompted(x, prompt_tokens=tokens)
        feats = out[:, 1:1 + tokens.shape[1]].mean(1)
        if task is None:
            return feats, None
        if torch.is_grad_enabled():
            self.counts_task += torch.bincount(idx.flatten(), minlength=self.pool_size).to(self.counts_task)
        pull = (1 - sim.gather(1, idx)).sum(1).mean()
        return feats, self.pull_weight * pull

    def on_train_end(self) -> None:
        self.counts_before += all_reduce_sum(self.counts_task)
        self.counts_task.zero_()


class DualPrompt(PromptModule):
    """Args (besides ``ContinualModule``'s):
        g_layers / e_layers: blocks that get the G-prompt / the E-prompt as prefixes.
        g_length / e_length: prefix tokens per layer, for the keys and (as many) for the values.
        pool_size: E-prompts (null: one per task, the paper's setting).
        pull_weight: weight of the matching loss ``1 - cos(q, k_t)``.
        train_mask: mask the logits of the classes outside the current task in training.
    """

    def __init__(self, backbone: PromptedViT | None = None, lr: float = 0.005, optimizer: str = "adam",
                 momentum: float = 0.0, weight_decay: float = 0.0, g_layers: Sequence[int] = (0, 1),
                 e_layers: Sequence[int] = (2, 3, 4), g_length: int = 5, e_length: int = 5,
                 pool_size: int | None = None, pull_weight: float = 1.0, train_mask: bool = True,
                 plugins: Sequence[ContinualCallback] | None = None,
                 compile: bool | str = False):
        super().__init__(backbone, lr, optimizer, momentum, weight_decay, train_mask, plugins, compile=compile)
        self.g_layers, self.e_layers = _check_layers("g_layers", g_layers), _check_layers("e_layers", e_layers)
        if set(self.g_layers) & set(self.e_layers):
            raise ValueError(f"g_layers={self.g_layers} and e_layers={self.e_layers} overlap")
        if max([*self.g_layers, *self.e_layers], default=-1) >= self.vit.depth:
            raise ValueError(f"g_layers={self.g_layers}, e_layers={self.e_layers}: the backbone has "
                             f"{self.vit.depth} blocks")
        if g_length < 1 or e_length < 1 or pull_weight < 0:
            raise ValueError(f"g_length={g_length}, e_length={e_length} must be >= 1, pull_weight={pull_weight} >= 0")
        if pool_size is not None and pool_size < 1:
            raise ValueError(f"pool_size={pool_size} must be at least 1 (or null: one E-prompt per task)")
        self.g_length, self.e_length, self.pool_size, self.pull_weight = g_length, e_length, pool_size, pull_weight

    def build_prompts(self, info: BenchmarkInfo) -> None:
        D = self.vit.embed_dim
        pool = self.pool_size if self.pool_size is not None else info.num_tasks
        if pool < info.num_tasks:
            raise ValueError(f"pool_size={pool}: DualPrompt trains E-prompt t on task t and needs at least "
                             f"num_tasks={info.num_tasks}")
        self.pool_size = pool
        # (layers, k/v, length, D), uniform(-1, 1) as the authors' prompt initialisation
        self.g_prompt = nn.Parameter(torch.empty(len(self.g_layers), 2, self.g_length, D).uniform_(-1, 1))
        self.e_prompts = nn.Parameter(torch.empty(pool, len(self.e_layers), 2, self.e_length, D).uniform_(-1, 1))
        self.e_keys = nn.Parameter(torch.empty(pool, D).uniform_(-1, 1))

    def select(self, query: Tensor) -> tuple[Tensor, Tensor]:
        """The E-prompt of each image at test: the key with the highest cosine similarity; and the similarities."""
        sim = F.normalize(query, dim=-1) @ F.normalize(self.e_keys, dim=-1).t()
        return sim.argmax(1), sim

    def prompt_features(self, x: Tensor, task: int | None) -> tuple[Tensor, Tensor | None]:
        query = self.vit.query(x)
        B = len(x)
        idx, sim = self.select(query)
        if task is not None:
            idx = torch.full_like(idx, task)
        prefixes: dict[int, tuple[Tensor, Tensor]] = {}
        for j, layer in enumerate(self.g_layers):
            g = self.g_prompt[j].unsqueeze(0).expand(B, -1, -1, -1)
            prefixes[layer] = (g[:, 0], g[:, 1])
        e = self.e_prompts[idx]  # (B, layers, 2, Le, D)
        for j, layer in enumerate(self.e_layers):
            prefixes[layer] = (e[:, j, 0], e[:, j, 1])
        feats = self.vit.forward_prompted(x, prefixes=prefixes)[:, 0]
        if task is None:
            return feats, None
        return feats, self.pull_weight * (1 - sim[:, task]).mean()


def gram_schmidt_rows(old: Tensor, new: Tensor) -> Tensor:
    """``new``'s rows made orthonormal (Gram-Schmidt, in order) and orthogonal to the span of ``old``'s rows."""
    basis = torch.linalg.qr(old.t()).Q.t() if len(old) else old  # orthonormal rows spanning old's rows
    out: list[Tensor] = []
    for r in new:
        v = r - basis.t() @ (basis @ r) if len(basis) else r.clone()
        for b in out:
            v = v - (v @ b) * b
        out.append(v / v.norm().clamp_min(1e-12))
    return torch.stack(out)


class CODAPrompt(PromptModule):
    """Args (besides ``ContinualModule``'s):
        pool_size: M prompt components per layer (M / num_tasks new per task).
        prompt_length: Lp; a component's first Lp/2 tokens are the key prefix, the other Lp/2 the value prefix.
        layers: prefixed blocks.
        ortho_weight: weight of the orthogonality penalty on the components, keys and attention vectors
            (0 in the authors' updated scripts, which rely on the orthogonal initialisation).
        train_mask: mask the logits of the classes outside the current task in training.
    """

    def __init__(self, backbone: PromptedViT | None = None, lr: float = 0.001, optimizer: str = "adam",
                 momentum: float = 0.0, weight_decay: float = 0.0, pool_size: int = 100, prompt_length: int = 8,
                 layers: Sequence[int] = (0, 1, 2, 3, 4), ortho_weight: float = 0.0, train_mask: bool = True,
                 plugins: Sequence[ContinualCallback] | None = None,
                 compile: bool | str = False):
        if weight_decay != 0:
            raise ValueError(f"weight_decay={weight_decay}: CODA-Prompt freezes earlier tasks' components, which "
                             "weight decay would move")
        super().__init__(backbone, lr, optimizer, momentum, weight_decay, train_mask, plugins, compile=compile)
        self.layers = _check_layers("layers", layers)
        if max(self.layers, default=-1) >= self.vit.depth or not self.layers:
            raise ValueError(f"layers={self.layers}: need at least one of the backbone's {self.vit.depth} blocks")
        if prompt_length < 2 or prompt_length % 2:
            raise ValueError(f"prompt_length={prompt_length} must be even (half key prefix, half value prefix)")
        if ortho_weight < 0:
            raise ValueError(f"ortho_weight={ortho_weight} must not be negative")
        self.pool_size, self.prompt_length, self.ortho_weight = pool_size, prompt_length, ortho_weight

    def build_prompts(self, info: BenchmarkInfo) -> None:
        T, M, D = info.num_tasks, self.pool_size, self.vit.embed_dim
        if M < T or M % T:
            raise ValueError(f"pool_size={M} must be a multiple of num_tasks={T} (M/T components per task)")
        self.per_task = M // T
        n = len(self.layers)
        self.components = nn.Parameter(torch.zeros(n, M, self.prompt_length, D))
        self.keys = nn.Parameter(torch.zeros(n, M, D))
        self.attention = nn.Parameter(torch.zeros(n, M, D))
        self.init_task_components(0)

    def task_slice(self, task: int) -> slice:
        return slice(task * self.per_task, (task + 1) * self.per_task)

    @torch.no_grad()
    def init_task_components(self, task: int) -> None:
        """Task ``task``'s components, keys and attention vectors: random, then orthogonal to the earlier tasks'
        (Gram-Schmidt over the flattened vectors, per layer). Seeded by the task, so a resume redoes it exactly."""
        g = torch.Generator().manual_seed(1234 + task)
        old, new = slice(0, task * self.per_task), self.task_slice(task)
        for param in (self.components, self.keys, self.attention):
            for j in range(param.shape[0]):
                flat = param[j].flatten(1)
                fresh = torch.randn(self.per_task, flat.shape[1], generator=g).to(flat)
                if fresh.shape[0] + task * self.per_task <= flat.shape[1]:
                    fresh = gram_schmidt_rows(flat[old], fresh)
                param[j, new] = fresh.view_as(param[j, new])

    def on_train_start(self) -> None:
        # a new task's components are set up once, before its first step (not again when resumed inside it)
        if self.current_task > 0 and self.trainer.global_step == 0:
            self.init_task_components(self.current_task)

    def compose(self, query: Tensor, j: int, task: int | None) -> Tensor:
        """Layer j's prompt (B, Lp, D): ``sum_m alpha_m P_m`` with ``alpha_m = cos(q * A_m, K_m)`` over the
        components of the tasks so far; those of earlier tasks detached (frozen) in training."""
        upto = ((task if task is not None else self.current_task) + 1) * self.per_task
        start = task * self.per_task if task is not None else upto
        P, K, A = (p[j, :upto] for p in (self.components, self.keys, self.attention))
        if task is not None and start > 0:
            P, K, A = (torch.cat([p[:start].detach(), p[start:]]) for p in (P, K, A))
        alpha = self._alpha(query, K, A)
        return torch.einsum("bm,mld->bld", alpha, P)

    @staticmethod
    def _alpha(query: Tensor, K: Tensor, A: Tensor) -> Tensor:
        """alpha (B, M): the cosine between the attended query ``q * A_m`` and the key ``K_m``."""
        attended = F.normalize(query.unsqueeze(1) * A.unsqueeze(0), dim=-1)  # (B, M, D)
        return torch.einsum("bmd,md->bm", attended, F.normalize(K, dim=-1))

    def ortho_penalty(self, task: int) -> Tensor:
        total = self.components.new_zeros(())
        upto = (task + 1) * self.per_task
        for param in (self.components, self.keys, self.attention):
            for j in range(param.shape[0]):
                B = param[j, :upto].flatten(1)
                B = torch.cat([B[:task * self.per_task].detach(), B[task * self.per_task:]])
                gram = B @ B.t()
                total = total + (gram - torch.eye(len(B), device=B.device, dtype=B.dtype)).pow(2).sum()
        return total

    def prompt_features(self, x: Tensor, task: int | None) -> tuple[Tensor, Tensor | None]:
        query = self.vit.query(x)
        half = self.prompt_length // 2
        prefixes = {}
        for j, layer in enumerate(self.layers):
            p = self.compose(query, j, task)
            prefixes[layer] = (p[:, :half], p[:, half:])
        feats = self.vit.forward_prompted(x, prefixes=prefixes)[:, 0]
        if task is None or self.ortho_weight == 0:
            return feats, None
        return feats, self.ortho_weight * self.ortho_penalty(task)

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        # earlier tasks' components never change: no gradient reaches them (detached), and weight decay or
        # momentum must not move them either
        start = self.current_task * self.per_task
        if start == 0:
            return
        for param in (self.components, self.keys, self.attention):
            if param.grad is not None:
                param.grad[:, :start] = 0


class SimpleCIL(FrozenViTModule):
    """Prototype classifier on the frozen backbone: no training. Over the first epoch of each task the features of
    the training images are summed per class (buffers, so a resume inside the task is exact; summed over the DDP
    ranks at the task's end); a class's prototype is the mean; prediction: the highest cosine similarity to the
    prototypes of the classes seen so far.

    ``training_step`` returns a zero loss attached to the graph through ``scale`` (the cosine classifier's
    scale, which Adam without weight decay leaves unchanged), so that DDP, which refuses a module without a
    trainable parameter, can wrap it and every rank steps in lockstep.
    """

    prototype_sums: Tensor
    prototype_counts: Tensor
    pending_sums: Tensor
    pending_counts: Tensor

    def __init__(self, backbone: PromptedViT | None = None, lr: float = 1e-3, optimizer: str = "adam",
                 momentum: float = 0.0, weight_decay: float = 0.0,
                 plugins: Sequence[ContinualCallback] | None = None,
                 compile: bool | str = False):
        if weight_decay != 0:
            raise ValueError(f"weight_decay={weight_decay}: SimpleCIL does not train, weight decay would move its "
                             "classifier scale")
        super().__init__(backbone, lr, optimizer, momentum, weight_decay, plugins, compile=compile)

    def build(self, info: BenchmarkInfo) -> None:
        D = fit_body(self.vit, info)
        self.scale = nn.Parameter(torch.ones(()))
        self.register_buffer("prototype_sums", torch.zeros(info.head_width, D, dtype=torch.float64))
        self.register_buffer("prototype_counts", torch.zeros(info.head_width, dtype=torch.float64))
        self.register_buffer("pending_sums", torch.zeros(info.head_width, D, dtype=torch.float64))
        self.register_buffer("pending_counts", torch.zeros(info.head_width, dtype=torch.float64))

    @property
    def prototypes(self) -> Tensor:
        """Class means of the frozen features (zeros for classes not seen yet)."""
        return (self.prototype_sums / self.prototype_counts.clamp_min(1).unsqueeze(1)).float()

    def forward(self, x: Tensor, task_ids: Tensor) -> Tensor:
        feats = self.vit.query(x)
        logits = self.scale * F.normalize(feats, dim=-1) @ F.normalize(self.prototypes, dim=-1).t()
        return self.mask_unseen(logits)

    def training_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y, _ = batch
        if self.current_epoch == 0:
            feats = self.vit.query(x).to(torch.float64)
            self.pending_sums.index_add_(0, y, feats)
            self.pending_counts += torch.bincount(y, minlength=len(self.pending_counts)).to(self.pending_counts)
        return self.scale * 0.0

    def on_train_end(self) -> None:
        self.prototype_sums += all_reduce_sum(self.pending_sums)
        self.prototype_counts += all_reduce_sum(self.pending_counts)
        self.pending_sums.zero_()
        self.pending_counts.zero_()
