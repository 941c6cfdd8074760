"""The pieces of a task-conditioned variational autoencoder used as a replay model (Kingma & Welling 2014;
von Oswald et al. 2020, Appendix B).

The encoder maps an input to the mean and log-variance of a diagonal Gaussian over the latent; the decoder
maps a latent sample concatenated with the task's one-hot vector to pixel logits (Bernoulli means after a
sigmoid). The objective is the per-pixel binary cross-entropy plus the Gaussian prior-matching term divided
by the number of pixels, as in the HNET authors' code (which follows van de Ven & Tolias' DGR).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cl_lightning.nets.mlp import MLP


class VAEEncoder(nn.Module):
    """``x -> hidden_sizes -> (mu, logvar)`` of a ``latent_dim``-dimensional diagonal Gaussian."""

    def __init__(self, in_features: int, hidden_sizes: Sequence[int] = (400, 400), latent_dim: int = 100):
        super().__init__()
        if latent_dim < 1:
            raise ValueError(f"latent_dim={latent_dim} must be positive")
        self.latent_dim = latent_dim
        self.body = MLP(in_features=in_features, hidden_sizes=hidden_sizes)
        assert self.body.out_features is not None  # known: in_features is given
        self.out = nn.Linear(self.body.out_features, 2 * latent_dim)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mu, logvar = self.out(self.body(x)).chunk(2, dim=-1)
        return mu, logvar


def decoder_body(latent_dim: int, num_tasks: int, hidden_sizes: Sequence[int], out_features: int) -> nn.Sequential:
    """The decoder as a module: ``[z, one_hot(task)] -> hidden_sizes -> out_features`` pixel logits."""
    body = MLP(in_features=latent_dim + num_tasks, hidden_sizes=hidden_sizes)
    assert body.out_features is not None  # known: in_features is given
    return nn.Sequential(body, nn.Linear(body.out_features, out_features))


def decoder_input(z: Tensor, tasks: Tensor, num_tasks: int) -> Tensor:
    """The decoder's input: the latent sample with the task's one-hot vector appended."""
    return torch.cat([z, F.one_hot(tasks, num_tasks).to(z.dtype)], dim=-1)


def vae_loss(x: Tensor, logits: Tensor, mu: Tensor, logvar: Tensor) -> Tensor:
    """Mean over the batch of: mean per-pixel binary cross-entropy + KL(q(z|x) || N(0, I)) / pixels."""
    x = x.flatten(1)
    rec = F.binary_cross_entropy_with_logits(logits, x, reduction="none").mean(1)
    kld = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(1) / x.shape[1]
    return (rec + kld).mean()
