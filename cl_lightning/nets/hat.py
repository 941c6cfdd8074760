"""The MLP of HAT (Serra et al. 2018): every hidden unit is multiplied by a per-task gate.

The gates of task t in layer l are ``sigmoid(s * e_t^l)``, from a learned task embedding ``e_t^l`` (one value
per unit) and a temperature ``s``; at ``s = s_max`` they are (almost) binary, so each task uses a hard subset of
the units. The network only computes with gates it is given; the temperature schedule, the cumulative masks and
the gradient rules live in the method and its plugin (``cl_lightning/methods/hat.py``,
``cl_lightning/callbacks/hat.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from cl_lightning.nets.mlp import ACTIVATIONS


def annealed_temperature(batch: int, batches: int, s_max: float) -> float:
    """HAT's ``s`` for 0-based ``batch`` of ``batches``: ``1/s_max`` at the first, ``s_max`` at the last (the paper's
    annealing, ``s = 1/s_max + (s_max - 1/s_max) b / (B - 1)``)."""
    if batches <= 1:
        return s_max
    return 1.0 / s_max + (s_max - 1.0 / s_max) * batch / (batches - 1)


class HATMLP(nn.Module):
    """Flatten, then ``hidden_sizes`` gated linear layers (``activation(W h + b) * gate``).

    Args:
        in_features: input width; null links it to the benchmark.
        hidden_sizes: widths of the gated hidden layers.
        activation: nonlinearity before the gate.
        dropout: dropout after every gated layer (training only).
        input_dropout: dropout on the flattened input.
    """

    def __init__(self, in_features: int | None = None, hidden_sizes: Sequence[int] = (400, 400),
                 activation: str = "relu", dropout: float = 0.0, input_dropout: float = 0.0):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation={activation!r} is not one of {sorted(ACTIVATIONS)}")
        if not hidden_sizes or any(h < 1 for h in hidden_sizes):
            raise ValueError(f"hidden_sizes={list(hidden_sizes)} must be one or more positive widths")
        for name, p in (("dropout", dropout), ("input_dropout", input_dropout)):
            if not 0.0 <= p < 1.0:
                raise ValueError(f"{name}={p} must be in [0, 1)")
        self.hidden_sizes = list(hidden_sizes)
        self.act = ACTIVATIONS[activation]()
        self.drop, self.input_drop = nn.Dropout(dropout), nn.Dropout(input_dropout)
        self.in_features: int | None = None
        self.layers = nn.ModuleList()
        self.embeddings = nn.ParameterList()
        if in_features is not None:
            self.set_input_size(in_features)

    @property
    def out_features(self) -> int:
        return self.hidden_sizes[-1]

    def set_input_size(self, in_features: int) -> None:
        """Builds the layers for inputs of ``in_features`` values (once)."""
        if self.in_features is not None:
            if self.in_features != in_features:
                raise ValueError(f"in_features={self.in_features} but the benchmark's inputs have {in_features}")
            return
        widths = [in_features, *self.hidden_sizes]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:], strict=True))
        self.in_features = in_features

    def set_tasks(self, num_tasks: int) -> None:
        """One embedding row per task and unit, N(0, 1) as the HAT code's ``nn.Embedding`` (once)."""
        if len(self.embeddings):
            if self.embeddings[0].shape[0] != num_tasks:
                raise ValueError(f"the embeddings hold {self.embeddings[0].shape[0]} tasks, not {num_tasks}")
            return
        self.embeddings = nn.ParameterList(nn.Parameter(torch.randn(num_tasks, h)) for h in self.hidden_sizes)

    def gates(self, task: int, s: float) -> list[Tensor]:
        """Task ``task``'s gates of every layer at temperature ``s``."""
        return [torch.sigmoid(s * e[task]) for e in self.embeddings]

    def forward(self, x: Tensor, gates: Sequence[Tensor]) -> Tensor:
        h = self.input_drop(x.flatten(1))
        for layer, g in zip(self.layers, gates, strict=True):
            h = self.drop(self.act(layer(h)) * g)
        return h
