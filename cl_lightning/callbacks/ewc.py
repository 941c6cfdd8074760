"""Elastic weight consolidation (Kirkpatrick et al. 2017) and online EWC (Schwarz et al. 2018).

At the end of each task the diagonal Fisher information of the trained parameters is estimated; every
later step adds ``strength/2 * sum_i F_i (theta_i - theta*_i)^2`` to the loss. Two estimators
(``fisher_estimator``):

- ``per_sample`` (default, the paper's): the mean over samples of the squared per-sample gradient of the
  log-likelihood. For ``nn.Linear`` layers that see ``[B, in]`` inputs the per-sample gradient is the outer
  product ``g_i a_i^T`` of the layer's output gradient and input, so its square summed over the batch is
  ``(g^2)^T (a^2)``: one forward and backward of the batch plus one product per layer, the cost of a
  training step, with no per-sample gradient materialised. Any other trained parameter (convolutions,
  normalisation gains, a Linear used twice or on sequences) gets its per-sample gradients from
  ``torch.func`` (``vmap(grad)``, one vectorised pass per batch), for those parameters only.
- ``minibatch`` (cheaper still, what several libraries do): the mean over batches of the squared gradient
  of the batch's mean loss. Its scale differs: for a batch of ``B`` nearly independent gradients it is
  about ``1/B`` of the per-sample Fisher (plus the squared mean gradient), so ``strength`` must be
  retuned (larger) when switching; ``fisher_batch_size`` sets ``B``.

Both variants keep two tensors per parameter, whatever the number of tasks:
- EWC's sum over tasks ``sum_t F_t (theta - theta_t)^2`` equals ``P (theta - mu)^2 + const`` with the
  precision ``P = sum_t F_t`` and the precision-weighted anchor ``mu = sum_t F_t theta_t / P``; the
  constant does not change the gradient, so the penalty costs the same after 2 or 100 tasks.
- online EWC decays the old precision, ``P <- gamma P + F_t``, and anchors at the latest ``theta_t``.
Under DDP, per-rank Fisher sums are all-reduced, so every rank holds the same precision.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import lightning as L
import torch
from torch import Tensor
from torch.func import functional_call, grad, vmap

from cl_lightning.callback import ContinualCallback, TaskLoss
from cl_lightning.datamodule import benchmark_of

if TYPE_CHECKING:
    from cl_lightning.methods.base import ContinualModule


class EWC(ContinualCallback):
    """Args:
        strength: lambda, the weight of the quadratic penalty. Its scale depends on ``fisher_estimator``:
            the ``minibatch`` Fisher is about ``1/fisher_batch_size`` of the ``per_sample`` one, so the
            same regularisation needs a ``strength`` about ``fisher_batch_size`` times larger.
        online: online EWC (one running Fisher, anchored at the latest parameters).
        gamma: online EWC's decay of the previous precision (1 = no decay).
        fisher_samples: training samples of the task used for the Fisher (None: all).
        empirical_fisher: use the true labels (empirical Fisher); False samples labels from the model.
        fisher_estimator: ``per_sample`` (mean squared per-sample gradient, the paper's) or ``minibatch``
            (mean squared gradient of each batch's mean loss; another scale, see ``strength``).
        fisher_batch_size: samples per batch of the Fisher pass (the minibatch estimator's ``B``; for the
            per-sample estimator only a memory/speed trade-off).
    """

    ESTIMATORS = ("per_sample", "minibatch")

    def __init__(self, strength: float = 1000.0, online: bool = False, gamma: float = 1.0,
                 fisher_samples: int | None = None, empirical_fisher: bool = True,
                 fisher_estimator: str = "per_sample", fisher_batch_size: int = 256):
        super().__init__()
        if strength < 0:
            raise ValueError(f"strength={strength} must not be negative")
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"gamma={gamma} must be in [0, 1]")
        if fisher_samples is not None and fisher_samples < 1:
            raise ValueError(f"fisher_samples={fisher_samples} must be positive (or null for all)")
        if fisher_estimator not in self.ESTIMATORS:
            raise ValueError(f"fisher_estimator={fisher_estimator!r} is not one of {list(self.ESTIMATORS)}")
        if fisher_batch_size < 1:
            raise ValueError(f"fisher_batch_size={fisher_batch_size} must be positive")
        self.strength, self.online, self.gamma = strength, online, gamma
        self.fisher_samples, self.empirical_fisher = fisher_samples, empirical_fisher
        self.fisher_estimator, self.fisher_batch_size = fisher_estimator, fisher_batch_size
        self.precision: dict[str, Tensor] = {}
        self.anchor: dict[str, Tensor] = {}
        self.last_fisher: dict[str, Tensor] = {}

    # ------------------------------------------------------------------ penalty
    def penalty(self, module: ContinualModule, batch: Any, step: TaskLoss | None = None) -> Tensor | None:
        if not self.precision or self.strength == 0:
            return None
        terms = []
        for name, p in module.named_parameters():
            if name in self.precision:
                prec, anchor = self._on(name, p.device)
                terms.append((prec * (p - anchor).pow(2)).sum())
        return 0.5 * self.strength * torch.stack(terms).sum()

    def _on(self, name: str, device: torch.device) -> tuple[Tensor, Tensor]:
        if self.precision[name].device != device:
            self.precision[name] = self.precision[name].to(device)
            self.anchor[name] = self.anchor[name].to(device)
        return self.precision[name], self.anchor[name]

    # ------------------------------------------------------------------ consolidation
    def on_task_end(self, trainer: L.Trainer, module: ContinualModule, task_id: int) -> None:
        fisher = self.fisher(trainer, module, task_id)
        params = {n: p.detach().clone() for n, p in module.named_parameters() if n in fisher}
        for name, f in fisher.items():
            if name not in self.precision:
                self.precision[name], self.anchor[name] = f, params[name]
            elif self.online:
                self.precision[name] = self.gamma * self.precision[name].to(f.device) + f
                self.anchor[name] = params[name]
            else:
                old_p, old_a = self.precision[name].to(f.device), self.anchor[name].to(f.device)
                total = old_p + f
                self.anchor[name] = torch.where(total > 0, (old_p * old_a + f * params[name]) / total.clamp_min(1e-30),
                                                params[name])
                self.precision[name] = total
        self.last_fisher = fisher

    @torch.enable_grad()
    def fisher(self, trainer: L.Trainer, module: ContinualModule, task_id: int,
               use_vmap_only: bool = False) -> dict[str, Tensor]:
        """The diagonal Fisher over this task's training data (``fisher_estimator``), the same on every rank.
        ``use_vmap_only``: per-sample gradients of every parameter from ``torch.func`` (the reference the
        Linear-layer shortcut is tested against)."""
        was_training = module.training
        module.eval()
        names = [n for n, p in module.named_parameters() if p.requires_grad]
        sums = {n: torch.zeros_like(p) for n, p in module.named_parameters() if p.requires_grad}
        count = torch.zeros((), device=module.device, dtype=torch.float64)
        batches = 0
        loader = benchmark_of(trainer).task_dataloader(task_id, "train", batch_size=self.fisher_batch_size,
                                                    limit=self.fisher_samples)
        per_sample = None if self.fisher_estimator == "minibatch" else _PerSampleSquares(module, names, use_vmap_only)
        assert module.info is not None  # set when the method binds, before any plugin runs
        try:
            for x, y, t in loader:
                x, y, t = x.to(module.device), y.to(module.device), t.to(module.device)
                if not module.info.is_regression and not self.empirical_fisher:
                    with torch.no_grad():
                        y = torch.distributions.Categorical(logits=module(x, t)).sample()
                if per_sample is not None:
                    per_sample.add(x, y, t, sums)
                    count += len(y)
                    continue
                grads = self._batch_grad(trainer, module, names, (x, y, t))
                for n in names:
                    sums[n] += grads[n].pow(2)
                batches += 1
            if per_sample is None and trainer.world_size > 1:  # a rank whose share of the last batch was empty
                most = trainer.strategy.reduce(torch.tensor(float(batches), device=module.device), reduce_op="max")
                for _ in range(int(most) - batches):  # joins the other ranks' reductions (adds nothing itself)
                    grads = self._batch_grad(trainer, module, names, None)
                    for n in names:
                        sums[n] += grads[n].pow(2)
                batches = int(most)
        finally:
            if per_sample is not None:
                per_sample.close()
            module.train(was_training)
        if per_sample is None:  # every rank ran the same number of (shared) batches
            return {n: s / max(batches, 1) for n, s in sums.items()}
        count = trainer.strategy.reduce(count, reduce_op="sum")
        return {n: trainer.strategy.reduce(s, reduce_op="sum") / count.clamp_min(1).to(s.dtype)
                for n, s in sums.items()}

    @staticmethod
    def _batch_grad(trainer: L.Trainer, module: ContinualModule, names: list[str],
                    batch: tuple[Tensor, Tensor, Tensor] | None) -> dict[str, Tensor]:
        """Gradient of the global batch's mean loss (ranks hold parts of each batch: sums are all-reduced;
        ``batch`` None: this rank holds no part of it)."""
        params = dict(module.named_parameters())
        if batch is None:
            grads: Sequence[Tensor | None] = [None] * len(names)
            size = 0
        else:
            x, y, t = batch
            loss = _nll(module, module(x, t), y).sum()
            grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
            size = len(y)
        flat = torch.cat([(torch.zeros_like(params[n]) if g is None else g).flatten()
                          for n, g in zip(names, grads, strict=True)])
        n = torch.tensor(float(size), device=flat.device, dtype=flat.dtype)
        flat = trainer.strategy.reduce(flat, reduce_op="sum") / trainer.strategy.reduce(n, reduce_op="sum")
        return {name: f.view_as(params[name])
                for name, f in zip(names, flat.split([params[n].numel() for n in names]), strict=True)}

    # ------------------------------------------------------------------ state
    def plugin_state(self) -> dict[str, Any]:
        return {"precision": {n: v.cpu() for n, v in self.precision.items()},
                "anchor": {n: v.cpu() for n, v in self.anchor.items()}}

    def load_plugin_state(self, state: dict[str, Any]) -> None:
        self.precision = dict(state.get("precision", {}))
        self.anchor = dict(state.get("anchor", {}))

    def stored_numel(self) -> int:
        return sum(v.numel() for v in self.precision.values()) + sum(v.numel() for v in self.anchor.values())


def _nll(module: ContinualModule, out: Tensor, y: Tensor) -> Tensor:
    """Per-sample negative log-likelihood ``[B]`` (Gaussian with unit variance for regression)."""
    assert module.info is not None  # set when the method binds, before any plugin runs
    if module.info.is_regression:
        return 0.5 * (out - y).pow(2).flatten(1).sum(1)
    return torch.nn.functional.cross_entropy(out, y, reduction="none")


class _PerSampleSquares:
    """Adds ``sum_i (d nll_i / d theta)^2`` of a batch to running sums, per trained parameter.

    ``nn.Linear`` parameters: hooks keep each layer's input ``a`` and output gradient ``g`` of one backward
    of ``sum_i nll_i`` (the module is in eval mode, so sample ``i``'s loss depends on its own row only):
    ``sum_i (g_i a_i^T)^2 = (g^2)^T (a^2)``, and ``sum_i g_i^2`` for the bias. A layer whose input is not
    ``[B, in]`` or that runs more than once per forward is handed, with every other parameter, to
    ``vmap(grad)``, which then differentiates only those.
    """

    def __init__(self, module: ContinualModule, names: list[str], use_vmap_only: bool):
        self.module, self.names = module, names
        self.buffers = dict(module.named_buffers())
        trained = set(names)
        self.linears: dict[str, torch.nn.Linear] = {}
        if not use_vmap_only:
            for prefix, m in module.named_modules():
                if type(m) is torch.nn.Linear and f"{prefix}.weight" in trained and \
                        (m.bias is None or f"{prefix}.bias" in trained):
                    self.linears[prefix] = m
        self.unsupported: set[str] = set()  # Linear layers found unfit for the shortcut (then vmap'ed)
        self.seen: dict[str, list[Tensor]] = {}
        self.handles = [m.register_forward_hook(self._keep_input(p)) for p, m in self.linears.items()]

    def _keep_input(self, prefix: str):
        def hook(mod, inputs, output):
            if not torch.is_grad_enabled():
                return
            a = inputs[0]
            self.seen.setdefault(prefix, []).append(a.detach())
            if a.dim() == 2 and output.requires_grad:
                output.register_hook(lambda g: self.seen[prefix].append(g.detach()))
        return hook

    def _vmap_names(self) -> list[str]:
        fast = {f"{p}.{k}" for p in self.linears if p not in self.unsupported for k in ("weight", "bias")}
        return [n for n in self.names if n not in fast]

    def add(self, x: Tensor, y: Tensor, t: Tensor, sums: dict[str, Tensor]) -> None:
        module = self.module
        params = dict(module.named_parameters())
        if self.linears:
            self.seen = {}
            loss = _nll(module, module(x, t), y).sum()
            linear_params = [p for prefix in self.linears for p in self.linears[prefix].parameters()]
            torch.autograd.grad(loss, linear_params, allow_unused=True)
            for prefix, m in self.linears.items():
                got = self.seen.get(prefix, [])
                if len(got) != 2 or got[0].dim() != 2:
                    self.unsupported.add(prefix)  # run twice, on sequences, or unused: per-sample by vmap
                if prefix in self.unsupported:
                    continue
                a2, g2 = got[0].pow(2), got[1].pow(2)
                sums[f"{prefix}.weight"].addmm_(g2.T, a2)
                if m.bias is not None:
                    sums[f"{prefix}.bias"] += g2.sum(0)
            self.seen = {}
        rest = self._vmap_names()
        if not rest:
            return
        fixed = {n: p.detach() for n, p in params.items() if n not in rest}
        wrt = {n: params[n].detach() for n in rest}

        def nll(p: dict[str, Tensor], xi: Tensor, yi: Tensor, ti: Tensor) -> Tensor:
            out = functional_call(module, ({**fixed, **p}, self.buffers), (xi.unsqueeze(0), ti.unsqueeze(0)))
            return _nll(module, out, yi.unsqueeze(0)).sum()

        self.close()  # no hooks inside vmap
        try:
            grads = vmap(grad(nll), in_dims=(None, 0, 0, 0))(wrt, x, y, t)
        finally:
            self.handles = [m.register_forward_hook(self._keep_input(p)) for p, m in self.linears.items()]
        for n in rest:
            sums[n] += grads[n].pow(2).sum(0)

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
