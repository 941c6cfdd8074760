"""Running an ordinary ``nn.Module`` on weights it does not own (``torch.func.functional_call``).

A hypernetwork method builds its target network from the usual classes (``cl_lightning.nets.MLP`` plus
a head), reads off the parameter layout, then moves the module to the ``meta`` device: it keeps the
structure and no weights. :class:`FunctionalTarget` cuts a flat generated weight vector into that
layout and calls the module with it, for one weight vector or, vectorised with ``torch.func.vmap``,
for many at once (task inference over all embeddings in one pass).

Buffers (batch-norm running statistics) are not generated: the caller keeps one set per task and
passes it in; in training mode batch norm updates the passed tensors in place.
"""

from __future__ import annotations

import math

from torch import Tensor, nn
from torch.func import functional_call, vmap


class FunctionalTarget:
    """A weightless target network driven by flat weight vectors.

    It is deliberately not an ``nn.Module``: the method that owns it must not see its (meta) tensors as
    parameters, and device moves do not concern it.
    """

    def __init__(self, module: nn.Module):
        self.param_shapes = [(n, tuple(p.shape)) for n, p in module.named_parameters()]
        self.param_numels = [math.prod(s) for _, s in self.param_shapes]
        self.num_params = sum(self.param_numels)
        #: Initial buffer values (e.g. batch-norm running statistics), to start each task's own copy.
        self.initial_buffers = {n: b.detach().clone() for n, b in module.named_buffers()}
        self.module = module.to("meta")

    @property
    def has_buffers(self) -> bool:
        return bool(self.initial_buffers)

    def split(self, flat: Tensor) -> dict[str, Tensor]:
        """``[..., N]`` -> {parameter name: ``[..., *shape]``}."""
        lead = flat.shape[:-1]
        if flat.shape[-1] != self.num_params:
            raise ValueError(f"got {flat.shape[-1]} weights, the target has {self.num_params}")
        pieces = flat.split(self.param_numels, dim=-1)
        return {n: piece.reshape(*lead, *s) for (n, s), piece in zip(self.param_shapes, pieces, strict=True)}

    def __call__(self, flat: Tensor, x: Tensor, buffers: dict[str, Tensor] | None = None) -> Tensor:
        """The target's output on ``x`` with the weights ``flat`` (``[N]``)."""
        return functional_call(self.module, (self.split(flat), buffers or {}), (x,))

    def batched(self, flat: Tensor, x: Tensor, buffers: dict[str, Tensor] | None = None) -> Tensor:
        """Outputs for ``B`` weight vectors on the same inputs: ``flat [B, N]``, buffers ``[B, ...]`` ->
        ``[B, n, out]``. Batch norm must be in eval mode here (running statistics are not updated)."""
        params = self.split(flat)

        def one(p: dict[str, Tensor], b: dict[str, Tensor]) -> Tensor:
            return functional_call(self.module, (p, b), (x,))

        return vmap(one, in_dims=(0, 0))(params, buffers or {})

    def batched_inputs(self, flat: Tensor, xs: Tensor) -> Tensor:
        """Outputs for ``B`` weight vectors, each on its own inputs: ``flat [B, N]``, ``xs [B, n, ...]`` ->
        ``[B, n, out]`` (e.g. fine-tuning several parameter sets on several tasks' data at once)."""
        def one(p: dict[str, Tensor], x: Tensor) -> Tensor:
            return functional_call(self.module, p, (x,))

        return vmap(one, in_dims=(0, 0))(self.split(flat), xs)

    def train(self, mode: bool = True) -> None:
        self.module.train(mode)


def stack_buffers(initial: dict[str, Tensor], copies: int) -> dict[str, Tensor]:
    """``copies`` independent copies of each initial buffer, stacked on a new first dimension."""
    return {n: b.unsqueeze(0).repeat(copies, *([1] * b.dim())).clone() for n, b in initial.items()}


def buffer_key(name: str) -> str:
    """A buffer name usable as an attribute (``layers.1.running_mean`` -> ``layers__1__running_mean``)."""
    return name.replace(".", "__")

