"""Fully connected networks. They are backbones: they map inputs to features, and the method adds the
heads its scenario needs (``out_features`` tells it the feature width)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "elu": nn.ELU, "gelu": nn.GELU}


class MLP(nn.Module):
    """Flatten, then ``hidden_sizes`` linear layers with an activation (optionally batch norm and dropout).

    ``in_features=None`` links the input width to the benchmark: the method calls :meth:`set_input_size`.
    """

    def __init__(self, in_features: int | None = None, hidden_sizes: Sequence[int] = (100, 100),
                 activation: str = "relu", batch_norm: bool = False, dropout: float = 0.0):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation={activation!r} is not one of {sorted(ACTIVATIONS)}")
        if (in_features is not None and in_features < 1) or any(h < 1 for h in hidden_sizes):
            raise ValueError(f"in_features={in_features} and hidden_sizes={list(hidden_sizes)} must be positive")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout={dropout} must be in [0, 1)")
        self.activation, self.batch_norm, self.dropout = activation, batch_norm, dropout
        self.hidden_sizes = list(hidden_sizes)
        self.in_features: int | None = None
        self.layers = nn.Sequential()
        if in_features is not None:
            self.set_input_size(in_features)

    @property
    def out_features(self) -> int | None:
        return self.hidden_sizes[-1] if self.hidden_sizes else self.in_features

    def set_input_size(self, in_features: int) -> None:
        """Builds the layers for inputs of ``in_features`` values (once)."""
        if self.in_features is not None:
            if self.in_features != in_features:
                raise ValueError(f"in_features={self.in_features} but the benchmark's inputs have {in_features}")
            return
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in self.hidden_sizes:
            layers.append(nn.Linear(width, h))
            if self.batch_norm:
                layers.append(nn.BatchNorm1d(h))
            layers.append(ACTIVATIONS[self.activation]())
            if self.dropout:
                layers.append(nn.Dropout(self.dropout))
            width = h
        self.layers = nn.Sequential(*layers)
        self.in_features = in_features

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)
