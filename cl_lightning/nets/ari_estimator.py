"""The ARI estimator of the ARI lifelong learner: signatures of parameter sets and tasks, and the network
``q`` that predicts the adaptation rate integral of a (parameter set, task) pair from them.

- Parameter signature: the base network's outputs on fixed Gaussian noise inputs (so two parameter sets
  that compute the same function look the same, whatever their weights' permutation).
- Task signature: the mean feature of a few samples of each class (in label order) through a fixed
  feature extractor. The paper uses an ImageNet ResNet-18; the default here is
  :class:`RandomFeatures`, a fixed, seeded random ReLU projection that needs no download. Any module
  mapping a batch of inputs to ``[n, features]`` can be configured instead (e.g. a torchvision model).
- Both are L2-normalised and zero-padded to ``signature_width`` (2048), then projected to 128 each by
  :class:`ARIEstimator`, whose ``[100, 100]`` ReLU regressor is trained with MSE on the buffer of
  observed ``(ARI, parameter signature, task signature)`` tuples.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def pad_signature(values: Tensor, width: int) -> Tensor:
    """``[B, d]`` -> L2-normalised rows zero-padded to ``[B, width]`` (``d`` must not exceed ``width``)."""
    if values.shape[-1] > width:
        raise ValueError(f"a signature of {values.shape[-1]} values does not fit signature_width={width}; "
                         "use fewer noise inputs, samples or features, or a wider signature")
    return F.pad(F.normalize(values.flatten(1), dim=-1), (0, width - values.shape[-1]))


class RandomFeatures(nn.Module):
    """A fixed random feature extractor (flatten, seeded Gaussian projection, ReLU): needs no download.

    Its weights are buffers, drawn from ``seed`` when the input size is first seen, so every process
    and every resumed run computes the same task signatures.
    """

    projection: Tensor  # a buffer: the random projection, drawn for the input width on first use

    def __init__(self, features: int = 128, seed: int = 0):
        super().__init__()
        if features < 1:
            raise ValueError(f"features={features} must be positive")
        self.features, self.seed = features, seed
        self.register_buffer("projection", torch.zeros(0), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        flat = x.flatten(1)
        if self.projection.shape != (flat.shape[1], self.features):
            g = torch.Generator().manual_seed(self.seed)
            w = torch.randn(flat.shape[1], self.features, generator=g) / math.sqrt(flat.shape[1])
            self.projection = w.to(flat.device)
        return torch.relu(flat @ self.projection)


@torch.no_grad()
def task_signature(extractor: nn.Module, x: Tensor, y: Tensor, samples_per_class: int) -> Tensor:
    """``[classes * features]``: mean extractor feature of the first ``samples_per_class`` samples of each
    class present in ``y``, classes in label order."""
    parts = []
    for c in y.unique().sort().values.tolist():
        idx = (y == c).nonzero().flatten()[:samples_per_class]
        parts.append(extractor(x[idx]).float().mean(0))
    return torch.cat(parts)


class ARIEstimator(nn.Module):
    """``q(parameter signature, task signature) -> predicted ARI``.

    Args:
        signature_width: width both signatures are padded to (paper: 2048).
        projection: width of each signature's learned projection (paper: 128).
        hidden_sizes: the regressor's ReLU layers (paper: [100, 100]).
    """

    def __init__(self, signature_width: int = 2048, projection: int = 128, hidden_sizes: Sequence[int] = (100, 100)):
        super().__init__()
        if signature_width < 1 or projection < 1 or any(h < 1 for h in hidden_sizes):
            raise ValueError(f"signature_width={signature_width}, projection={projection} and "
                             f"hidden_sizes={list(hidden_sizes)} must be positive")
        self.signature_width = signature_width
        self.param_encoder = nn.Linear(signature_width, projection)
        self.task_encoder = nn.Linear(signature_width, projection)
        layers: list[nn.Module] = []
        width = 2 * projection
        for h in hidden_sizes:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, 1))
        self.regressor = nn.Sequential(*layers)

    def forward(self, param_sigs: Tensor, task_sigs: Tensor) -> Tensor:
        """Padded signatures ``[B, width]`` each (or one task signature ``[width]`` for all) -> ``[B]``."""
        if task_sigs.dim() == 1:
            task_sigs = task_sigs.expand(len(param_sigs), -1)
        z = torch.cat([self.param_encoder(param_sigs), self.task_encoder(task_sigs)], -1)
        return self.regressor(torch.relu(z)).squeeze(-1)

    def fit(self, ari: Tensor, param_sigs: Tensor, task_sigs: Tensor, steps: int, lr: float,
            weight_decay: float = 0.0) -> float:
        """Full-batch Adam on the MSE to the observed ARIs (``steps`` steps, warm-started from the current
        weights; deterministic); returns the final training MSE."""
        params = list(self.parameters())
        was = [p.requires_grad for p in params]
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        loss = torch.zeros(())
        with torch.enable_grad():
            for p in params:
                p.requires_grad_(True)
            for _ in range(steps):
                opt.zero_grad(set_to_none=True)
                loss = F.mse_loss(self(param_sigs, task_sigs), ari)
                loss.backward()
                opt.step()
            for p, w in zip(params, was, strict=True):
                p.requires_grad_(w)
        return float(loss.detach())
