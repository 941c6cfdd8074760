"""Coordinate-wise gradient predictors: a small MLP from one parameter value to that coordinate's
descent direction, shared by all coordinates of a network (the meta-learned part of gradient-sign
filtering, see ``cl_lightning.callbacks.gradient_sign``).

Why these pieces:
- ``CoordinatePredictor`` normalises its input and output with stored scales, so one architecture fits
  parameters of any magnitude and gradients of any size.
- ``fit_predictor`` / ``distill_mean`` train it deterministically (own seed, own generator), so every
  DDP rank trained on the same pairs ends with the same weights.
- ``PredictorTable``: with the parameter value as the only input (or value plus a per-tensor layer
  position) the predictor is a function of one real number, so it is tabulated once per task on a fine
  grid and linearly interpolated (not with the previous value as an input: then it is a function of two).
  This replaces a 3x256 MLP per coordinate per step (tens of GFLOPs for a 300k-parameter network) by O(n)
  work; values outside the grid are evaluated exactly.
- ``descent_direction``: the per-coordinate step an optimizer would take for a raw gradient, divided by
  ``-lr`` (the gradient itself for plain SGD; momentum / Adam / AdamW updates otherwise).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn


class CoordinatePredictor(nn.Module):
    """h(theta_j[, layer position][, previous value]) -> predicted descent direction of coordinate j.

    Args:
        hidden_sizes: widths of the hidden layers (the paper: three of 256).
        layer_position: take the position of the coordinate's tensor in the network (in [0, 1]) as an input.
        previous_value: take the coordinate's value before the previous optimizer step as an input (as the
            change ``theta - previous``, scaled by its typical size).
    """

    in_shift: Tensor  # buffers: the input's and output's normalisation, fitted with the predictor
    in_scale: Tensor
    out_scale: Tensor
    delta_scale: Tensor

    def __init__(self, hidden_sizes: Sequence[int] = (256, 256, 256), layer_position: bool = False,
                 previous_value: bool = False):
        super().__init__()
        if not hidden_sizes or any(h < 1 for h in hidden_sizes):
            raise ValueError(f"hidden_sizes={list(hidden_sizes)} must be a non-empty list of positive widths")
        self.layer_position, self.previous_value = layer_position, previous_value
        layers: list[nn.Module] = []
        width = 1 + int(layer_position) + int(previous_value)
        for h in hidden_sizes:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)
        self.register_buffer("in_shift", torch.zeros(()))
        self.register_buffer("in_scale", torch.ones(()))
        self.register_buffer("out_scale", torch.ones(()))
        self.register_buffer("delta_scale", torch.ones(()))

    def forward(self, theta: Tensor, position: Tensor | None = None, previous: Tensor | None = None) -> Tensor:
        x = ((theta - self.in_shift) / self.in_scale).unsqueeze(-1)
        if self.layer_position:
            if position is None:
                raise ValueError("this predictor takes the layer position as an input")
            x = torch.cat([x, position.to(x).expand(x.shape[:-1]).unsqueeze(-1)], -1)
        if self.previous_value:
            if previous is None:
                raise ValueError("this predictor takes the previous value as an input")
            x = torch.cat([x, ((theta - previous.to(x)) / self.delta_scale).unsqueeze(-1)], -1)
        return self.net(x).squeeze(-1) * self.out_scale

    @torch.no_grad()
    def predict(self, theta: Tensor, position: Tensor | float | None = None, previous: Tensor | None = None,
                chunk: int = 65536) -> Tensor:
        """Evaluates many coordinates in chunks (bounded memory), without building a graph."""
        param = next(self.parameters())
        flat = theta.reshape(-1).to(param)
        pos = prev = None
        if position is not None:
            pos = torch.as_tensor(position, dtype=param.dtype, device=param.device)
            pos = pos.reshape(-1) if pos.dim() else pos.expand(flat.shape)
        if previous is not None:
            prev = previous.reshape(-1).to(param)
        out = torch.empty_like(flat)
        for s in range(0, len(flat), chunk):
            out[s:s + chunk] = self(flat[s:s + chunk], None if pos is None else pos[s:s + chunk],
                                    None if prev is None else prev[s:s + chunk])
        return out.view(theta.shape).to(theta.dtype)

    def numel(self) -> int:
        return sum(t.numel() for t in self.state_dict().values())


def _train(predictor: CoordinatePredictor, x: Tensor, y: Tensor, pos: Tensor | None, prev: Tensor | None,
           steps: int, batch_size: int, lr: float, seed: int) -> float:
    """Adam on the normalised squared error; the batch order comes from ``seed`` only."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(predictor.parameters(), lr=lr)
    scale = predictor.out_scale
    n = len(x)
    losses: list[float] = []
    predictor.train()
    for _ in range(steps):
        idx = torch.randint(n, (min(batch_size, n),), generator=g).to(x.device)
        out = predictor(x[idx], None if pos is None else pos[idx], None if prev is None else prev[idx])
        loss = ((out - y[idx]) / scale).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    predictor.eval()
    tail = losses[-max(1, steps // 10):]
    return sum(tail) / len(tail)


def _set_scales(predictor: CoordinatePredictor, x: Tensor, y: Tensor, prev: Tensor | None = None) -> None:
    predictor.in_shift.fill_(float(x.mean()))
    predictor.in_scale.fill_(max(float(x.std()) if len(x) > 1 else 0.0, 1e-8))
    predictor.out_scale.fill_(max(float(y.pow(2).mean().sqrt()), 1e-12))
    if prev is not None:
        predictor.delta_scale.fill_(max(float((x - prev).pow(2).mean().sqrt()), 1e-12))


def fit_predictor(x: Tensor, y: Tensor, pos: Tensor | None = None, hidden_sizes: Sequence[int] = (256, 256, 256),
                  steps: int = 1000, batch_size: int = 1024, lr: float = 1e-3, seed: int = 0,
                  prev: Tensor | None = None) -> tuple[CoordinatePredictor, float]:
    """A fresh predictor fitted to pairs (x: parameter values[, pos: layer positions][, prev: values before
    the previous step]; y: descent directions); returns it and its final normalised training loss (1.0 is
    what predicting zero scores)."""
    if len(x) == 0 or len(x) != len(y):
        raise ValueError(f"need as many targets as inputs, and some (got {len(x)} inputs, {len(y)} targets)")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        predictor = CoordinatePredictor(hidden_sizes, layer_position=pos is not None,
                                        previous_value=prev is not None).to(x.device)
    _set_scales(predictor, x, y, prev)
    loss = _train(predictor, x, y, pos, prev, steps, batch_size, lr, seed + 1)
    return predictor, loss


def distill_mean(running: CoordinatePredictor, new: CoordinatePredictor, count: int, x: Tensor,
                 pos: Tensor | None = None, steps: int = 1000, batch_size: int = 1024, lr: float = 1e-3,
                 seed: int = 0, prev: Tensor | None = None) -> tuple[CoordinatePredictor, float]:
    """Online distillation (the paper's Eqs. 6-7): a predictor of the running mean
    ``g_t = ((t-1) g_{t-1} + h_t) / t`` after ``count = t`` tasks, trained on inputs ``x`` (``pos``,
    ``prev``), warm-started from ``g_{t-1}``. Neither input predictor is changed."""
    if count < 2:
        raise ValueError(f"count={count}: the running mean of one predictor is that predictor")
    with torch.no_grad():
        target = ((count - 1) * running.predict(x, pos, prev) + new.predict(x, pos, prev)) / count
    student = copy.deepcopy(running)
    _set_scales(student, x, target, prev)
    loss = _train(student, x, target, pos, prev, steps, batch_size, lr, seed)
    return student, loss


class PredictorTable:
    """A scalar function of the parameter value, tabulated per layer position on ``[lo, hi]``.

    ``fn(theta, position)`` is evaluated once at ``size`` grid points; inside the grid calls are answered
    by linear interpolation, outside by ``fn`` itself (exact, and rare when the grid is padded).
    """

    def __init__(self, fn: Callable[[Tensor, float | None], Tensor], lo: float, hi: float, size: int,
                 device: torch.device | str = "cpu"):
        if size < 2:
            raise ValueError(f"table_size={size} must be at least 2")
        if not hi > lo:
            hi = lo + 1e-6
        self.fn, self.lo, self.hi, self.size = fn, float(lo), float(hi), size
        self.grid = torch.linspace(self.lo, self.hi, size, device=device)
        self.values: dict[float | None, Tensor] = {}

    def __call__(self, theta: Tensor, position: float | None = None) -> Tensor:
        if position not in self.values:
            self.values[position] = self.fn(self.grid, position).to(self.grid)
        values = self.values[position].to(theta.device)
        flat = theta.detach().reshape(-1).to(values.dtype)
        if not bool(torch.isfinite(flat).all()):
            raise FloatingPointError("gradient-sign filter: parameters are no longer finite (training diverged); "
                                     "lower the learning rate")
        u = (flat - self.lo) / (self.hi - self.lo) * (self.size - 1)
        i0 = u.floor().clamp(0, self.size - 2).long()
        w = (u - i0).clamp(0, 1)
        out = values[i0] * (1 - w) + values[i0 + 1] * w
        outside = (flat < self.lo) | (flat > self.hi)
        if bool(outside.any()):
            out[outside] = self.fn(flat[outside], position).to(out)
        return out.view(theta.shape).to(theta.dtype)


def descent_direction(optimizer: torch.optim.Optimizer, param: Tensor, grad: Tensor) -> Tensor:
    """The step ``optimizer`` would take on ``param`` for ``grad``, divided by ``-lr`` (reads, never
    changes, the optimizer state). Plain SGD: the gradient (plus weight decay)."""
    group = next((g for g in optimizer.param_groups if any(p is param for p in g["params"])), None)
    if group is None:
        return grad.clone()
    state = optimizer.state.get(param, {})
    p = param.detach()
    wd = group.get("weight_decay", 0.0)
    if isinstance(optimizer, torch.optim.SGD):
        d = grad + wd * p if wd else grad.clone()
        mu = group.get("momentum", 0.0)
        if mu:
            buf = state.get("momentum_buffer")
            buf = d.clone() if buf is None else mu * buf + (1 - group.get("dampening", 0.0)) * d
            d = d + mu * buf if group.get("nesterov", False) else buf
        return d
    if isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW):
        decoupled = isinstance(optimizer, torch.optim.AdamW) or group.get("decoupled_weight_decay", False)
        g = grad if decoupled or not wd else grad + wd * p
        beta1, beta2 = group["betas"]
        step = float(state.get("step", 0)) + 1
        m = state.get("exp_avg")
        v = state.get("exp_avg_sq")
        m = (1 - beta1) * g if m is None else beta1 * m + (1 - beta1) * g
        v = (1 - beta2) * g * g if v is None else beta2 * v + (1 - beta2) * g * g
        if group.get("amsgrad", False) and state.get("max_exp_avg_sq") is not None:
            v = torch.maximum(state["max_exp_avg_sq"], v)
        d = (m / (1 - beta1 ** step)) / ((v / (1 - beta2 ** step)).sqrt() + group["eps"])
        return d + wd * p if decoupled and wd else d
    return grad.clone()
