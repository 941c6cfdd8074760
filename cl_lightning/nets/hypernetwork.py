"""Hypernetworks: maps from a task embedding to every weight of a target network.

Both kinds take a batch of embeddings ``[B, E]`` and return one flat weight vector per embedding,
``[B, N]`` with ``N`` the target's parameter count, in one pass: the output regularizer of
:mod:`cl_lightning.callbacks.hnet_regularizer` generates the weights of all past tasks together, so its cost is
one (wider) forward instead of a Python loop over tasks.

- :class:`HyperNetwork` ("full"): an MLP whose last layer has ``N`` outputs.
- :class:`ChunkedHyperNetwork`: the MLP produces ``chunk_size`` outputs from ``[e, c_j]`` for learned
  chunk embeddings ``c_1..c_C``; the weights are the concatenated chunks. With a small hidden layer and
  a large chunk the hypernetwork has fewer trainable weights than its target (the compressive regime).

The target is known only once the benchmark is: :meth:`HyperNetwork.set_target_shapes` builds the
layers (like ``MLP.set_input_size``). By default (``init="scaled"``) generated weights are
``offset + scale * raw`` with fixed, per-tensor ``scale`` = 1/sqrt(fan-in) (and ``offset`` 1 for batch-norm
gains), so that an embedding and a hypernetwork at their standard initialisation produce a target at its usual
initialisation scale (the spirit of Chang et al. 2020's principled hypernetwork initialisation).

The last layer is linear, which the output regularizer exploits: :meth:`HyperNetwork.output_penalty`
computes ``sum_t ||h(e_t) - target_t||^2`` exactly from Gram matrices of the last layer and small sums
over the past tasks' last hidden activations, without generating their weights (its cost barely grows
with the number of tasks), given a snapshot from when the targets were taken
(:meth:`HyperNetwork.output_reference`).

The last layer is a :class:`TransposedLinear`: its weight ``[K, H]`` is held as the contiguous parameter
``weight_t`` ``[H, K]`` (``weight`` is the usual view; checkpoints in ``nn.Linear``'s layout load). The products
over its long dimension ``K`` (generating, the weight gradient ``z^T dY``, the output penalty and its gradient)
then run over contiguous rows of ``W^T``, and the fused optimizer updates one contiguous tensor; on a CPU both
cost several times more the other way round. ``init="pytorch"`` drops the fixed output scale and offset and
keeps PyTorch's default initialisation; ``init="xavier"`` drops them too and initialises every weight matrix
Xavier-uniform and every bias to zero, which is what the authors' MNIST scripts do after building their networks
(``hypercl``: ``mnist/train_utils.py``, ``mnist/replay/train_utils_replay.py``; chunk and task embeddings N(0, 1)).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cl_lightning.nets.mlp import ACTIVATIONS

TargetShapes = Sequence[tuple[str, Sequence[int]]]


def output_affine(shapes: TargetShapes) -> tuple[Tensor, Tensor]:
    """Per-value (offset, scale) for a flat weight vector laid out as ``shapes`` (name, shape), in order.

    Matrices and kernels: scale 1/sqrt(fan-in), and their bias the same scale. 1-D ``weight`` tensors
    (batch-norm gains): offset 1, scale 0.1, and their bias 0.1.
    """
    offsets, scales = [], []
    bias_scale = 0.1
    for name, shape in shapes:
        n = math.prod(shape)
        offset = 0.0
        if len(shape) >= 2:
            scale = bias_scale = 1.0 / math.sqrt(math.prod(shape[1:]))
        elif name.endswith("weight"):  # a normalisation gain
            offset, scale = 1.0, 0.1
            bias_scale = 0.1
        else:
            scale = bias_scale
        offsets.append(torch.full((n,), offset))
        scales.append(torch.full((n,), scale))
    return torch.cat(offsets), torch.cat(scales)


class TransposedLinear(nn.Module):
    """A linear layer that holds its weight transposed, as a contiguous ``weight_t`` ``[in, out]``.

    Why: the hypernetwork's last layer is very wide (``out`` = the chunk size) and narrow (``in`` = the last
    hidden width). Its products over ``out`` (generating, the weight gradient ``z^T dY``, the output penalty
    and its gradient) run over contiguous rows of ``W^T``, and a fused optimizer updates one contiguous
    parameter (on a CPU both cost several times more the other way round). ``weight`` is the usual
    ``[out, in]`` view; a state dict with a plain ``weight`` (``nn.Linear``'s layout) loads too.
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        plain = nn.Linear(in_features, out_features)  # its default initialisation (and random draws)
        self.weight_t = nn.Parameter(plain.weight.detach().T.contiguous())
        self.bias = nn.Parameter(plain.bias.detach())

    @property
    def weight(self) -> Tensor:
        """``[out, in]``: a view of ``weight_t``."""
        return self.weight_t.T

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        plain = prefix + "weight"
        if plain in state_dict and prefix + "weight_t" not in state_dict:
            state_dict[prefix + "weight_t"] = state_dict.pop(plain).T.contiguous()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class HyperNetwork(nn.Module):
    """Full hypernetwork: ``embedding -> hidden_sizes -> N`` target weights in one MLP.

    Args:
        hidden_sizes: widths of the hidden layers (empty: one linear map).
        activation: hidden activation (``relu``, ``elu``, ``tanh``, ...).
        embedding_dim: size of the task embeddings it reads (the method creates them).
        init: ``scaled`` (ours): generated weights are ``offset + scale * raw`` with the fixed per-tensor scale
            of the module docstring and raw outputs of unit variance, so the target starts at its usual
            initialisation scale; ``pytorch``: the layers at PyTorch's default initialisation and the raw
            outputs used as weights; ``xavier``: Xavier-uniform weight matrices, zero biases and the raw outputs
            used as weights, as the paper's MNIST code initialises its hypernetworks (von Oswald et al. 2020).
    """

    INITS = ("scaled", "pytorch", "xavier")
    out_offset: Tensor  # buffers, made with the target: the generated weights are offset + scale * raw
    out_scale: Tensor

    def __init__(self, hidden_sizes: Sequence[int] = (100, 100), activation: str = "relu",
                 embedding_dim: int = 32, init: str = "scaled"):
        super().__init__()
        if init not in self.INITS:
            raise ValueError(f"init={init!r} is not one of {list(self.INITS)}")
        self.init = init
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation={activation!r} is not one of {sorted(ACTIVATIONS)}")
        if any(h < 1 for h in hidden_sizes):
            raise ValueError(f"hidden_sizes={list(hidden_sizes)} must be positive")
        if embedding_dim < 1:
            raise ValueError(f"embedding_dim={embedding_dim} must be positive")
        self.hidden_sizes, self.activation, self.embedding_dim = list(hidden_sizes), activation, embedding_dim
        self.target_shapes: TargetShapes | None = None
        self.num_outputs = 0
        self.has_offset = False

    # ------------------------------------------------------------------ building
    def set_target_shapes(self, shapes: TargetShapes) -> None:
        """Builds the layers for a target whose parameters are ``shapes`` (name, shape), in order (once)."""
        shapes = [(str(n), tuple(int(d) for d in s)) for n, s in shapes]
        if self.target_shapes is not None:
            if self.target_shapes != shapes:
                raise ValueError("set_target_shapes was already called with another target")
            return
        if not shapes:
            raise ValueError("the target network has no parameters to generate")
        self.target_shapes = shapes
        self.num_outputs = sum(math.prod(s) for _, s in shapes)
        offset, scale = output_affine(shapes)
        if self.init in ("pytorch", "xavier"):
            offset, scale = torch.zeros_like(offset), torch.ones_like(scale)
        self.register_buffer("out_offset", offset, persistent=False)
        self.register_buffer("out_scale", scale, persistent=False)
        self.has_offset = bool(offset.any())
        self._build()

    def _mlp(self, in_features: int, out_features: int) -> tuple[nn.ModuleList, TransposedLinear]:
        hidden = nn.ModuleList()
        width = in_features
        for h in self.hidden_sizes:
            layer = nn.Linear(width, h)
            if self.init == "scaled":
                nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
                nn.init.zeros_(layer.bias)
            elif self.init == "xavier":
                nn.init.xavier_uniform_(layer.weight)
                nn.init.zeros_(layer.bias)
            hidden.append(layer)
            width = h
        out = TransposedLinear(width, out_features)
        if self.init == "pytorch":
            return hidden, out
        if self.init == "xavier":
            with torch.no_grad():  # weight_t [H, K]: Xavier's bound is symmetric in fan-in and fan-out
                nn.init.xavier_uniform_(out.weight_t)
                out.bias.zero_()
            return hidden, out
        # raw outputs of about unit variance: the fixed output scale then sets the target's init scale
        with torch.no_grad():
            out.weight.copy_(torch.empty(out_features, width).normal_(std=1.0 / math.sqrt(width)))
            out.bias.zero_()
        return hidden, out

    def _build(self) -> None:
        self.hidden, self.out = self._mlp(self.embedding_dim, self.num_outputs)

    def _act(self, x: Tensor) -> Tensor:
        return _ACT_FN[self.activation](x)

    # ------------------------------------------------------------------ forward
    def forward(self, embeddings: Tensor) -> Tensor:
        """``[B, E]`` embeddings -> ``[B, N]`` flat target weights (a single ``[E]`` gives ``[N]``)."""
        if self.target_shapes is None:
            raise RuntimeError("call set_target_shapes before generating weights")
        single = embeddings.dim() == 1
        e = embeddings.unsqueeze(0) if single else embeddings
        w = self._to_weights(self._raw(e))
        return w[0] if single else w

    def _raw(self, e: Tensor) -> Tensor:
        """``[B, E]`` -> ``[B, N]`` raw outputs (before the fixed output scale and offset)."""
        return self._flat(F.linear(self.last_hidden(e), self.out.weight, self.out.bias))

    def _flat(self, raw: Tensor) -> Tensor:
        """``[B, C, K]`` last-layer outputs -> ``[B, N]`` (the chunks in order, truncated to ``N``)."""
        return raw.flatten(1)[:, : self.num_outputs]

    def _to_weights(self, raw: Tensor) -> Tensor:
        w = raw * self.out_scale
        if self.has_offset:
            w = w + self.out_offset
        return w

    def _param(self, params: Mapping[str, Tensor] | None, name: str) -> Tensor:
        """Parameter ``name`` from ``params`` if it is there, else the module's own (or the one that
        ``torch.func.functional_call`` put in its place)."""
        if params is not None and name in params:
            return params[name]
        obj: object = self
        for part in name.split("."):
            obj = getattr(obj, part)
        assert isinstance(obj, Tensor)
        return obj

    def last_hidden(self, embeddings: Tensor, params: Mapping[str, Tensor] | None = None) -> Tensor:
        """``[B, E]`` -> ``[B, C, H]``: the input of the last (linear) layer per embedding and chunk
        (``C = 1`` for the full hypernetwork; ``H`` = the last hidden width, or ``E`` without hidden layers).
        ``params`` (name -> tensor) replaces some parameters, e.g. by ``theta + dtheta`` (lookahead)."""
        h = embeddings
        for i in range(len(self.hidden)):
            h = self._act(F.linear(h, self._param(params, f"hidden.{i}.weight"),
                                   self._param(params, f"hidden.{i}.bias")))
        return h.unsqueeze(1)

    # ------------------------------------------------------------------ output regularizer, algebraic form
    def output_reference(self, embeddings: Tensor, targets: Tensor | None = None,
                         params: Mapping[str, Tensor] | None = None) -> tuple[OutputReference, Tensor]:
        """Snapshot for :meth:`output_penalty`: the last layer and the last hidden activations of
        ``embeddings`` ``[P, E]`` now (or under ``params``, name -> tensor, e.g. a copy of the parameters
        taken at a task start); also returns the weights they generate, ``[P, N]`` (the same values as
        ``self(embeddings)``, from the same pass).

        Without ``targets`` the targets are those generated weights (the output regularizer at a task
        start): the reference then describes them exactly and holds ``O(K H + P C H)`` values. With
        ``targets`` ``[P, N]`` (restored from a checkpoint, or set by hand), every value that differs from
        what the hypernetwork generates now keeps its difference, in raw units, in the reference: the
        penalty stays exact, but that part costs ``O(P N)`` per step.
        """
        if self.target_shapes is None:
            raise RuntimeError("call set_target_shapes before generating weights")
        with torch.no_grad():
            z0 = self.last_hidden(embeddings, params).detach()           # [P, C, H]
            w0 = self._param(params, "out.weight_t").detach().T
            b0 = self._param(params, "out.bias").detach()
            raw0 = F.linear(z0, w0, b0)                                   # [P, C, K]
            weights = self._to_weights(self._flat(raw0))
            bounds, seg_weight, s = self._penalty_layout()
            K, H = w0.shape
            yt = w0.new_empty(2 * H + 1, K)                               # [W0^T; workspace for X^T]
            yt[:H] = w0.T                                                 # a copy: w0.T is the parameter
            w0t = yt[:H]
            gram0 = torch.stack([w0t[:, a:e] @ w0t[:, a:e].T for a, e in bounds]).double()
            ref = OutputReference(z0=z0, yt=yt, b0=b0.clone(), gram0=gram0, bounds=bounds,
                                  seg_weight=seg_weight.to(z0.device))
            if targets is not None:
                if targets.shape != weights.shape:
                    raise ValueError(f"targets {tuple(targets.shape)} do not match the generated weights "
                                     f"{tuple(weights.shape)}")
                targets = targets.to(weights.device, weights.dtype)
                differs = weights != targets
                if differs.any():  # e = (y - offset) / scale - raw0 where the targets differ
                    y = targets.double() - self.out_offset.double() if self.has_offset else targets.double()
                    e = torch.where(differs, y / self.out_scale.double() - self._flat(raw0).double(), 0.0)
                    e_full = e.new_zeros(len(e), s.numel())
                    e_full[:, : self.num_outputs] = e
                    e_full = e_full.view(len(e), *s.shape)                # [P, C, K]
                    ve = e_full * s                                       # S e, zero on the padding
                    ref.ve = ve.to(w0.dtype)
                    ref.ve_w0 = ve @ w0.double()                          # [P, C, H]
                    ref.e_const = (ve * e_full).sum((1, 2))               # [P]
        return ref, weights

    def _penalty_layout(self) -> tuple[list[tuple[int, int]], Tensor, Tensor]:
        """Where the penalty's per-value weights ``scale^2`` are constant along a chunk.

        Returns the segments ``[a, b)`` of the last layer's ``K`` outputs on which every chunk's weights
        are constant (segments where all are 0 left out), those weights ``[C, J]``, and the weights of
        every output ``[C, K]`` (0 on the padding of the last chunk), both float64 on the buffers' device.
        """
        K = self.out.out_features
        C = math.ceil(self.num_outputs / K)
        s = torch.zeros(C * K, dtype=torch.float64)
        s[: self.num_outputs] = self.out_scale.detach().double().cpu() ** 2
        s = s.view(C, K)
        change = (s[:, 1:] != s[:, :-1]).any(0).nonzero().flatten().add(1).tolist()
        starts = [0, *change]
        bounds = list(zip(starts, [*change, K], strict=True))
        weight = s[:, starts]                                             # [C, J]
        keep = weight.ne(0).any(0)
        bounds = [seg for seg, k in zip(bounds, keep.tolist(), strict=True) if k]
        device = self.out_scale.device
        return bounds, weight[:, keep].to(device), s.to(device)

    def output_penalty_is_cheaper(self, rows: int) -> bool:
        """Whether :meth:`output_penalty` over ``rows`` embeddings is expected to cost less than generating
        their weights and comparing them with the targets.

        A rough cost model, per output of the last layer (``K`` of them): the algebraic form's Gram
        products and their backward, ``2 (2H+1)(H+1)`` multiply-adds, whatever ``rows``; the direct form,
        for each of ``rows * C`` chunks, ``4H`` multiply-adds (the targets' forward from the task start's
        parameters, the forward and backward of the last layer) and
        its elementwise passes over the generated weights (memory-bound; ``_ELEMENTWISE_COST``
        multiply-adds per weight, as measured on a CPU). So a chunked hypernetwork with many chunks is cheaper
        algebraically from the first past task on, a full one (``C = 1``) with a wide last hidden layer
        only from many past tasks on.
        """
        H = self.out.in_features
        C = math.ceil(self.num_outputs / self.out.out_features)
        algebraic, direct = 2 * (2 * H + 1) * (H + 1), rows * C * (4 * H + _ELEMENTWISE_COST)
        return algebraic < direct

    def output_penalty(self, embeddings: Tensor, reference: OutputReference, rows: Tensor | None = None,
                       params: Mapping[str, Tensor] | None = None) -> Tensor:
        """``sum_t || h(e_t) - target_t ||^2`` over ``embeddings`` ``[n, E]`` of the past tasks ``rows`` of
        ``reference`` (all of them if None), exactly, without generating any weights.

        The last layer is linear. With ``z`` its input, ``W, b`` its weights, ``z0, W0, b0`` those of the
        reference and ``dz = z - z0``, ``X = [W - W0, b - b0]``, one chunk's residual in raw units is
        ``W z + b - (W0 z0 + b0) = W0 dz + X [z; 1]``; it is weighted by ``scale^2``, which is constant on
        each segment ``j`` of a chunk (:meth:`_penalty_layout`). Summed over tasks and chunks:

            sum_j <W0_j^T W0_j, Odd_j> + 2 <W0_j^T X_j, Odx_j> + <X_j^T X_j, Oxx_j>,

        ``O_j = sum_rows scale_j^2 [dz; z; 1] [dz; z; 1]^T`` (blocks ``dd``, ``dx``, ``xx``). The Gram
        matrices of the last layer cost ``O(K H^2)`` whatever the number of tasks; what grows with the
        tasks is ``O_j``, ``[2H+1, 2H+1]`` sums over ``n C`` rows.

        Numerics: every term is quadratic in the differences ``dz`` and ``X`` from the reference, so all
        are of the size of the drift squared. Expanding ``||W z + b - r||^2`` around zero instead would
        subtract terms ~``|r|^2`` to get a result ~``|residual|^2`` (useless in float32 right after a task
        start). The terms can still partly cancel when ``W0 dz ~ -X [z; 1]`` (the output held while the
        parameters move), costing a factor ``(|W0 dz| / |residual|)^2`` of float32 resolution; measured in
        training, that leaves the error at the direct form's own (the tests check both against float64).
        ``O`` and the final sums are float64; ``params`` replaces parameters (the lookahead's
        ``theta + dtheta``). Everything after the last hidden layer is one autograd function,
        :class:`_OutputPenalty`.
        """
        everything = rows is None or torch.equal(rows.cpu(), torch.arange(len(reference.z0)))
        ref = reference if everything or rows is None else reference.rows(rows)
        z = self.last_hidden(embeddings, params)                          # [n, C, H]
        return _OutputPenalty.apply(z, self._param(params, "out.weight_t").T, self._param(params, "out.bias"), ref)

    # ------------------------------------------------------------------ accounting
    @property
    def num_target_weights(self) -> int:
        return self.num_outputs

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def compression_ratio(self) -> float:
        """Trainable hypernetwork weights / target weights (< 1: compressive)."""
        if not self.num_outputs:
            raise RuntimeError("call set_target_shapes first")
        return self.num_trainable() / self.num_outputs


class ChunkedHyperNetwork(HyperNetwork):
    """Chunked hypernetwork: ``[e, c_j] -> hidden_sizes -> chunk_size`` for each learned chunk embedding.

    All (embedding, chunk) pairs go through the MLP together. The first layer is split,
    ``W [e; c] = W_e e + W_c c``, so the chunk part is computed once per step whatever the number of
    embeddings.

    Args:
        hidden_sizes: widths of the hidden layers (at least one).
        activation: hidden activation.
        embedding_dim: size of the task embeddings.
        chunk_size: outputs per chunk; ``ceil(N / chunk_size)`` chunks cover the target.
        chunk_embedding_dim: size of the learned chunk embeddings.
        init: as for :class:`HyperNetwork`.
    """

    def __init__(self, hidden_sizes: Sequence[int] = (100, 100), activation: str = "relu",
                 embedding_dim: int = 32, chunk_size: int = 4000, chunk_embedding_dim: int = 32,
                 init: str = "scaled"):
        super().__init__(hidden_sizes=hidden_sizes, activation=activation, embedding_dim=embedding_dim, init=init)
        if not hidden_sizes:
            raise ValueError("hidden_sizes=[] : a chunked hypernetwork needs at least one hidden layer")
        if chunk_size < 1 or chunk_embedding_dim < 1:
            raise ValueError(f"chunk_size={chunk_size} and chunk_embedding_dim={chunk_embedding_dim} must be positive")
        self.chunk_size, self.chunk_embedding_dim = chunk_size, chunk_embedding_dim
        self.num_chunks = 0

    def _build(self) -> None:
        self.num_chunks = math.ceil(self.num_outputs / self.chunk_size)
        self.chunk_embeddings = nn.Parameter(torch.randn(self.num_chunks, self.chunk_embedding_dim))
        self.hidden, self.out = self._mlp(self.embedding_dim + self.chunk_embedding_dim, self.chunk_size)

    def last_hidden(self, embeddings: Tensor, params: Mapping[str, Tensor] | None = None) -> Tensor:
        weight = self._param(params, "hidden.0.weight")
        w_e, w_c = weight[:, : self.embedding_dim], weight[:, self.embedding_dim:]
        from_e = embeddings @ w_e.T                          # [B, H]
        from_c = self._param(params, "chunk_embeddings") @ w_c.T + self._param(params, "hidden.0.bias")  # [C, H]
        h = self._act(from_e.unsqueeze(1) + from_c.unsqueeze(0))  # [B, C, H]
        for i in range(1, len(self.hidden)):
            h = self._act(F.linear(h, self._param(params, f"hidden.{i}.weight"),
                                   self._param(params, f"hidden.{i}.bias")))
        return h


#: Cost of the direct penalty's elementwise passes per generated weight, in multiply-adds of a matrix product
#: (all its passes together; CPU: memory-bound passes against the matrix products' throughput).
_ELEMENTWISE_COST = 70


@dataclass
class OutputReference:
    """What :meth:`HyperNetwork.output_penalty` needs to know about the targets of ``P`` past tasks.

    Made by :meth:`HyperNetwork.output_reference` from the hypernetwork at one moment; derived data, never
    checkpointed. Small unless targets differ from what the reference generates (then ``ve`` is
    ``[P, C, K]``).
    """

    z0: Tensor                       # [P, C, H] last hidden activations
    yt: Tensor                       # [2H+1, K] W0^T (last-layer weight, transposed), then the H+1 rows
    #                                  that each penalty overwrites with X^T (workspace; _OutputPenalty)
    b0: Tensor                       # [K] last-layer bias
    gram0: Tensor                    # [J, H, H] W0_j^T W0_j per segment (float64)
    bounds: list[tuple[int, int]]    # segments [a, b) of a chunk's K outputs
    seg_weight: Tensor               # [C, J] scale^2 per chunk and segment (float64)
    ve: Tensor | None = None         # [P, C, K] scale^2 * (raw target - raw reference)
    ve_w0: Tensor | None = None      # [P, C, H] ve @ W0 (float64)
    e_const: Tensor | None = None    # [P] sum of scale^2 * (raw target - raw reference)^2 (float64)

    _PER_TASK = ("z0", "ve", "ve_w0", "e_const")

    def rows(self, idx: Tensor) -> OutputReference:
        """The reference of the past tasks ``idx`` only."""
        idx = idx.to(self.z0.device)
        changes: dict[str, Any] = {n: getattr(self, n)[idx] for n in self._PER_TASK if getattr(self, n) is not None}
        return replace(self, **changes)

    def to(self, device: torch.device | str) -> OutputReference:
        changes: dict[str, Any] = {f.name: v.to(device) for f in fields(self)
                                   if isinstance(v := getattr(self, f.name), Tensor)}
        return replace(self, **changes)

    @property
    def device(self) -> torch.device:
        return self.z0.device

    @property
    def w0t(self) -> Tensor:
        """``[H, K]`` the last-layer weight, transposed."""
        return self.yt[: self.z0.shape[-1]]


class _OutputPenalty(torch.autograd.Function):
    """:meth:`HyperNetwork.output_penalty` from the last hidden activations ``z`` ``[n, C, H]`` and the last
    layer ``W, b``, with its gradient in closed form (one node instead of a graph of small operations).

    With ``v = [dz; z; 1]`` per row and ``O_j = sum_rows scale_j^2 v v^T``, the value is
    ``sum_j <B_j, O_j>`` [``- 2 sum_r (ve_r X) . [z_r; 1] - 2 <ve_w0, dz> + sum e_const``], where
    ``B_j = [[W0_j^T W0_j, 2 W0_j^T X_j], [0, X_j^T X_j]]``; so ``d/dv_r = sum_j scale_j^2 (B_j + B_j^T) v_r``
    and ``dX = 2 W0 Odx + X (Oxx + Oxx^T)``.

    ``X`` is formed transposed under ``W0^T`` in the reference's buffer ``yt = [W0^T; X^T]`` ``[2H+1, K]``,
    so that each segment takes one matrix product forward, ``yt_j X_j = [W0_j^T X_j; X_j^T X_j]``, and one
    backward, ``dX_j^T = [2 Odx_j; Oxx_j + Oxx_j^T]^T yt_j``, both over contiguous memory (skinny products
    over ``K`` cost much more on a CPU the other way round). The buffer is overwritten by the next
    penalty; a backward that finds it overwritten (its version changed) forms ``X`` again from ``W, b``.
    """

    @staticmethod
    def forward(ctx, z: Tensor, w: Tensor, b: Tensor, ref: OutputReference) -> Tensor:
        H, yt = z.shape[-1], ref.yt
        dz = z - ref.z0
        v = torch.cat([dz, z, z.new_ones(*z.shape[:-1], 1)], -1).double()  # [n, C, 2H+1]
        omega = torch.einsum("cj,nca,ncb->jab", ref.seg_weight, v, v)      # [J, 2H+1, 2H+1]
        xt = _form_xt(w, b, yt, ref.b0, yt[H:])
        prods = torch.stack([yt[:, a:e] @ xt[:, a:e].T for a, e in ref.bounds]).double()  # [J, 2H+1, H+1]
        big_b = torch.zeros_like(omega)                                   # B_j
        big_b[:, :H, :H] = ref.gram0
        big_b[:, :H, H:] = 2 * prods[:, :H]
        big_b[:, H:, H:] = prods[:, H:]
        value = (big_b * omega).sum()
        q = None
        if ref.ve is not None:  # targets that the reference does not generate
            assert ref.ve_w0 is not None and ref.e_const is not None  # set together with ve
            q = (ref.ve.flatten(0, 1) @ xt.T).double().view_as(v[..., H:])  # [n, C, H+1]
            value = value - 2 * (q * v[..., H:]).sum() - 2 * (ref.ve_w0 * v[..., :H]).sum() + ref.e_const.sum()
        ctx.save_for_backward(w, b, v, omega, big_b, q)
        ctx.ref, ctx.yt_version, ctx.z_dtype = ref, yt._version, z.dtype
        return value.to(w.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        w, b, v, omega, big_b, q = ctx.saved_tensors
        ref, H, g = ctx.ref, w.shape[1], grad.double()
        yt, ve = ref.yt, ref.ve
        grad_z = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            gv = torch.einsum("cj,jab,ncb->nca", ref.seg_weight, big_b + big_b.transpose(1, 2), v)
            if ve is not None:
                gv[..., H:] -= 2 * q
                gv[..., :H] -= 2 * ref.ve_w0
            grad_z = (g * (gv[..., :H] + gv[..., H:-1])).to(ctx.z_dtype)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            K = yt.shape[1]
            covered = sum(e - a for a, e in ref.bounds) == K
            grad_xt = yt.new_empty(H + 1, K) if covered else yt.new_zeros(H + 1, K)
            odx, oxx = omega[:, :H, H:], omega[:, H:, H:]
            m_t = torch.cat([(2 * g) * odx, g * (oxx + oxx.transpose(1, 2))], 1).transpose(1, 2).to(yt.dtype)
            if yt._version == ctx.yt_version:
                for j, (a, e) in enumerate(ref.bounds):
                    torch.mm(m_t[j], yt[:, a:e], out=grad_xt[:, a:e])
            else:  # another penalty has overwritten X^T since the forward
                xt = _form_xt(w, b, yt, ref.b0, yt.new_empty(H + 1, K))
                for j, (a, e) in enumerate(ref.bounds):
                    out = grad_xt[:, a:e]
                    torch.mm(m_t[j, :, H:], xt[:, a:e], out=out)
                    out.addmm_(m_t[j, :, :H], yt[:H, a:e])
            if ve is not None:
                grad_xt.addmm_((-2 * g * v[..., H:]).flatten(0, 1).T.to(yt.dtype), ve.flatten(0, 1))
            grad_w, grad_b = grad_xt[:-1].T, grad_xt[-1]
        return grad_z, grad_w, grad_b, None


def _form_xt(w: Tensor, b: Tensor, yt: Tensor, b0: Tensor, out: Tensor) -> Tensor:
    """``X^T = [W^T - W0^T; b - b0]`` into ``out`` ``[H+1, K]`` (``W0^T`` = the first ``H`` rows of ``yt``)."""
    H = w.shape[1]
    torch.sub(w.T, yt[:H], out=out[:H])
    torch.sub(b, b0, out=out[H])
    return out


_ACT_FN = {
    "relu": torch.relu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "elu": nn.functional.elu,
    "gelu": nn.functional.gelu,
}
