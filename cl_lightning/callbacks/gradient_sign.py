"""Gradient-sign filtering with meta-learned gradient predictors ("Enabling continual learning in
neural networks with meta learning", an anonymous preliminary submission in the ICML 2019 format).

While a task trains, (parameter value, descent direction) pairs of randomly chosen coordinates are
collected; at the task's end a coordinate-wise predictor h_t (``cl_lightning.callbacks.gradient_predictor``) is
fitted to them, so h_t(theta_j) reconstructs task t's gradient at any later parameters without its
data. On every later step coordinate j of the update is kept only where its sign agrees with the
(mean) predicted direction of the past tasks (the paper's Eq. 5), and zeroed otherwise.

The mean of the past predictors is itself distilled online into one predictor g (Eqs. 6-7,
``distill=True``), so at any time only g and the current task's h exist. ``combine="each"`` keeps every
past predictor and asks for agreement with each of them (storage grows with the tasks).

The predicted quantity is the optimizer's step divided by ``-lr`` (``descent_direction``): the gradient
for plain SGD, the momentum / Adam update otherwise. It is computed from the raw gradient, before
filtering, so the filter of a later task does not leak into what its predictor learns.

``reference="memory"`` (our extension, not in the paper) replaces the predictors by a rehearsal memory: at a
task's end a seeded random subset of its data joins a memory of ``memory_size`` samples split equally between
tasks (A-GEM's memory, ``cl_lightning.callbacks.gem.AGEM``), and on every later step the old-task direction of Eq. 5 is
the gradient of the loss on ``memory_batch_size`` memory samples at the current parameters (all-reduced across
ranks, as A-GEM's reference gradient). No pairs are collected and no predictor is fitted. In ``update`` mode
(Adam, momentum) the optimizer's step is compared with that gradient's sign.

``reference="random"`` is a control, not a method: from the second task on each coordinate of the update is
kept with probability ``keep_rate``, independently at every step (a fresh mask from the seeded generator, the
same on every rank), whatever its sign. Run at the keep rate the sign rule produced, it tells whether the
filter's effect comes from *which* coordinates it drops or merely from dropping that many (a smaller step).

Distributed: gradients are already reduced in ``on_before_optimizer_step`` and the parameters are the
same on every rank, so with the rank-independent sampling generator every rank collects the same pairs
and fits the same predictor; rank 0's predictors are broadcast anyway at each task's end.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

import lightning as L
import torch
from torch import Tensor, nn

from cl_lightning.callback import ContinualCallback
from cl_lightning.callbacks.gem import AGEM
from cl_lightning.callbacks.gradient_predictor import (
    CoordinatePredictor,
    PredictorTable,
    descent_direction,
    distill_mean,
    fit_predictor,
)

if TYPE_CHECKING:
    from cl_lightning.methods.base import ContinualModule

COMBINES = ("mean", "each")
REFERENCES = ("predictor", "memory", "random")
FILTER_MODES = ("auto", "gradient", "update")


class GradientSignFilter(ContinualCallback):
    """Args:
        hidden_sizes: hidden widths of each predictor (paper: [256, 256, 256]).
        combine: ``mean``: agree with the mean predicted direction of past tasks (Eq. 5);
            ``each``: agree with every past task's predictor (keeps them all).
        distill: with ``combine=mean``, keep one distilled running-mean predictor g (Eqs. 6-7) instead of
            every past predictor.
        filter_mode: ``gradient`` zeroes disagreeing gradient coordinates before the step (exact Eq. 5
            for plain SGD); ``update`` lets the optimizer step and restores the coordinates whose step
            disagrees (exact for any optimizer, e.g. Adam); ``auto``: gradient for SGD without momentum,
            update otherwise.
        coords_per_step: coordinates sampled at each collecting step.
        collect_every: collect on every k-th optimizer step.
        max_pairs: size of the collection buffer (reservoir sampling over the whole task beyond it).
        predictor_steps / distill_steps: Adam steps to fit h / to distill g.
        predictor_batch_size, predictor_lr: of those fits.
        distill_points: parameter values (half from the network, half uniform over the seen range) that
            the distillation is trained on.
        layer_position: give the predictors the position of the coordinate's tensor as an input.
        previous_value: give the predictors the coordinate's value before the previous optimizer step as an
            input (the paper's other suggested input). The filter then keeps a copy of the parameters, and
            the predictor, a function of two values, is evaluated on every coordinate at every step: it
            needs ``table_size=0`` and a small predictor.
        table_size: grid points of the interpolation table (see ``PredictorTable``); 0 evaluates the
            predictor on every coordinate at every step instead.
        seed: seed of the coordinate sampling and of the predictor fits (the same on every rank).
        reference: ``predictor`` (the paper: meta-learned gradient predictors), ``memory`` (the gradient of a
            rehearsal memory batch at the current parameters) or ``random`` (a control: a random mask that keeps
            ``keep_rate`` of the coordinates); the predictor options are unused by the last two.
        memory_size: with ``memory``, samples kept across all tasks (split equally between them).
        memory_batch_size: with ``memory``, memory samples behind each step's old-task gradient.
        keep_rate: with ``random``, the probability that a coordinate is kept at a step (in (0, 1]).
    """

    def __init__(self, hidden_sizes: Sequence[int] = (256, 256, 256), combine: str = "mean", distill: bool = True,
                 filter_mode: str = "auto", coords_per_step: int = 512, collect_every: int = 1,
                 max_pairs: int = 200_000, predictor_steps: int = 1000, predictor_batch_size: int = 1024,
                 predictor_lr: float = 1e-3, distill_steps: int = 1000, distill_points: int = 100_000,
                 layer_position: bool = False, previous_value: bool = False, table_size: int = 4097,
                 seed: int = 0, reference: str = "predictor", memory_size: int = 1000, memory_batch_size: int = 64,
                 keep_rate: float = 0.5):
        super().__init__()
        if reference not in REFERENCES:
            raise ValueError(f"reference={reference!r} is not one of {list(REFERENCES)}")
        self.reference = reference
        if reference == "random" and not 0.0 < keep_rate <= 1.0:
            raise ValueError(f"keep_rate={keep_rate} must be in (0, 1] for reference='random'")
        self.keep_rate = float(keep_rate)
        #: The share of coordinates kept in each finished task (1.0 for the first, unfiltered one).
        self.kept_history: list[float] = []
        #: The memory and its reference gradient (``reference=memory``): A-GEM's, used as a helper.
        self.rehearsal = AGEM(memory_size, memory_batch_size, seed) if reference == "memory" else None
        self.last_reference: list[Tensor] | None = None  # the last memory gradient, per parameter (diagnostic)
        if combine not in COMBINES:
            raise ValueError(f"combine={combine!r} is not one of {list(COMBINES)}")
        if filter_mode not in FILTER_MODES:
            raise ValueError(f"filter_mode={filter_mode!r} is not one of {list(FILTER_MODES)}")
        for key, value in (("coords_per_step", coords_per_step), ("collect_every", collect_every),
                           ("max_pairs", max_pairs), ("predictor_steps", predictor_steps),
                           ("predictor_batch_size", predictor_batch_size), ("distill_steps", distill_steps),
                           ("distill_points", distill_points)):
            if value < 1:
                raise ValueError(f"{key}={value} must be positive")
        if not predictor_lr > 0:
            raise ValueError(f"predictor_lr={predictor_lr} must be positive")
        if table_size == 1 or table_size < 0:
            raise ValueError(f"table_size={table_size} must be 0 (no table) or at least 2")
        if previous_value and table_size:
            raise ValueError(f"previous_value=True needs table_size=0 (got table_size={table_size}): a predictor "
                             "of the value and the previous value cannot be tabulated on one grid")
        if not hidden_sizes or any(h < 1 for h in hidden_sizes):
            raise ValueError(f"hidden_sizes={list(hidden_sizes)} must be a non-empty list of positive widths")
        self.hidden_sizes = [int(h) for h in hidden_sizes]
        self.combine, self.distill, self.filter_mode = combine, distill, filter_mode
        self.coords_per_step, self.collect_every, self.max_pairs = coords_per_step, collect_every, max_pairs
        self.predictor_steps, self.predictor_batch_size, self.predictor_lr = (predictor_steps, predictor_batch_size,
                                                                              predictor_lr)
        self.distill_steps, self.distill_points = distill_steps, distill_points
        self.layer_position, self.previous_value = layer_position, previous_value
        self.table_size, self.seed = table_size, seed
        #: The parameters before the last optimizer step (previous_value only; None at a task start).
        self.previous: list[Tensor] | None = None
        # state kept across tasks
        self.tasks_learned = 0
        self.running: CoordinatePredictor | None = None  # g: the distilled mean of past predictors
        self.past: list[CoordinatePredictor] = []  # every past h (combine=each, or mean without distill)
        self.range_seen: tuple[float, float] | None = None
        # state of the current task
        self._reset_buffer()
        self.step_count = 0
        self.kept = 0.0
        self.filtered_total = 0.0
        self.generator = torch.Generator().manual_seed(seed)
        self.fit_losses: list[dict[str, float]] = []
        self._tables: list[PredictorTable] | None = None
        self._pending: list[tuple[Tensor, Tensor, list[Tensor]]] | None = None

    # ------------------------------------------------------------------ task boundaries
    @property
    def active(self) -> bool:
        return self.tasks_learned > 0

    def _reset_buffer(self) -> None:
        width = 2 + int(self.layer_position) + int(self.previous_value)  # value, direction[, position][, previous]
        self.buffer = torch.zeros(self.max_pairs, width)
        self.filled = 0
        self.seen = 0

    def on_task_start(self, trainer: L.Trainer, module: ContinualModule, task_id: int) -> None:
        self._reset_buffer()
        self.step_count = 0
        self.kept = self.filtered_total = 0.0
        self.generator = torch.Generator().manual_seed(self.seed * 100_003 + task_id)
        self._tables = None
        self.previous = None
        if self.rehearsal is not None:
            self.rehearsal.on_task_start(trainer, module, task_id)

    def on_task_end(self, trainer: L.Trainer, module: ContinualModule, task_id: int) -> None:
        self.kept_history.append(self.kept_fraction)
        if self.reference == "random":  # the control has nothing to learn from a task
            self.tasks_learned += 1
            return
        if self.rehearsal is not None:  # the memory is the reference: no predictor to fit
            self.rehearsal.insert_task(trainer, module, task_id)
            self.tasks_learned += 1
            return
        if self.filled == 0:
            raise RuntimeError(f"task {task_id}: no (parameter, gradient) pairs were collected; did it train?")
        for h in ([self.running] if self.running is not None else []) + self.past:
            h.cpu()  # fits and distillation run on the CPU, where the pairs are
        data = self.buffer[: self.filled]
        x, y = data[:, 0], data[:, 1]
        pos = data[:, 2] if self.layer_position else None
        prev = data[:, -1] if self.previous_value else None
        seed = self.seed * 100_003 + 7919 * (task_id + 1)
        h, fit_loss = fit_predictor(x, y, pos, self.hidden_sizes, self.predictor_steps, self.predictor_batch_size,
                                    self.predictor_lr, seed, prev)
        losses = {"task": float(task_id), "fit_loss": fit_loss}
        params = self._params(module)
        flat = torch.cat([p.detach().reshape(-1).cpu() for _, p in params])
        lo = min(float(x.min()), float(flat.min()))
        hi = max(float(x.max()), float(flat.max()))
        if self.range_seen is not None:
            lo, hi = min(lo, self.range_seen[0]), max(hi, self.range_seen[1])
        self.range_seen = (lo, hi)
        if self.combine == "mean" and self.distill:
            if self.running is None:
                self.running = h
            else:
                dx, dpos, dprev = self.distillation_points(params, seed, data)
                self.running, losses["distill_loss"] = distill_mean(
                    self.running, h, self.tasks_learned + 1, dx, dpos, self.distill_steps,
                    self.predictor_batch_size, self.predictor_lr, seed + 1, dprev)
        else:
            self.past.append(h)
        self.tasks_learned += 1
        self.fit_losses.append(losses)
        if trainer.world_size > 1:  # same data and seeds give the same fits; make it certain
            self.load_predictor_state(trainer.strategy.broadcast(self.predictor_state(), src=0))
        self._reset_buffer()
        self._tables = None
        self.previous = None

    def distillation_points(self, params: list[tuple[str, Tensor]], seed: int, pairs: Tensor
                            ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """Inputs the running mean is distilled on: current parameter values and a uniform cover of the
        range seen so far (where future parameters are likely to be); with ``previous_value``, each point's
        previous value is the parameter's own (network points) or the point minus the change of a random
        collected pair (``pairs``: the task's buffer rows)."""
        g = torch.Generator().manual_seed(seed)
        values = [p.detach().reshape(-1).cpu() for _, p in params]
        flat = torch.cat(values)
        half = self.distill_points // 2
        idx = torch.randint(len(flat), (half,), generator=g)
        assert self.range_seen is not None
        lo, hi = self.range_seen
        uniform = lo + (hi - lo) * torch.rand(self.distill_points - half, generator=g)
        x = torch.cat([flat[idx], uniform])
        pos = prev = None
        if self.layer_position:
            positions = self._positions(params)
            flat_pos = torch.cat([torch.full_like(v, cast(float, at)) for v, at in zip(values, positions, strict=True)])
            choices = torch.tensor(sorted(set(positions)))
            upos = choices[torch.randint(len(choices), (len(uniform),), generator=g)]
            pos = torch.cat([flat_pos[idx], upos])
        if self.previous_value:
            before = flat  # (the network's own previous values when they cover the same parameters)
            if self.previous and sum(t.numel() for t in self.previous) == len(flat):
                before = torch.cat([t.reshape(-1).cpu() for t in self.previous])
            change = pairs[:, 0] - pairs[:, -1]
            pick = torch.randint(len(change), (len(uniform),), generator=g)
            prev = torch.cat([before[idx], uniform - change[pick]])
        return x, pos, prev

    # ------------------------------------------------------------------ per step
    @staticmethod
    def _params(module: nn.Module) -> list[tuple[str, Tensor]]:
        return [(n, p) for n, p in module.named_parameters() if p.requires_grad]

    def _positions(self, params: list[tuple[str, Tensor]]) -> list[float | None]:
        if not self.layer_position:
            return [None] * len(params)
        n = max(1, len(params) - 1)
        return [i / n for i in range(len(params))]

    def _mode(self, optimizer: torch.optim.Optimizer) -> str:
        if self.filter_mode != "auto":
            return self.filter_mode
        plain_sgd = isinstance(optimizer, torch.optim.SGD) and all(
            not g.get("momentum", 0.0) for g in optimizer.param_groups)
        return "gradient" if plain_sgd else "update"

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        optimizer = getattr(optimizer, "optimizer", optimizer)  # a LightningOptimizer wraps the torch one
        params = [(n, p) for n, p in self._params(pl_module) if p.grad is not None]
        if not params:
            return
        previous = self.previous_values(params)
        if self.previous_value:  # the values before this step are the next step's previous values
            self.previous = [p.detach().clone() for _, p in params]
        if self.reference == "predictor" and self.step_count % self.collect_every == 0:
            self.collect(optimizer, params, previous)
        self.step_count += 1
        if not self.active:
            return
        if self.reference == "random":
            preds = self.random_masks(params)
        elif self.rehearsal is not None:
            preds = self.memory_directions(trainer, cast("ContinualModule", pl_module), params)
        else:
            preds = self.predicted(params, previous)
        mode = self._mode(optimizer)
        kept = total = 0.0
        if mode == "gradient":
            for (_, p), pred in zip(params, preds, strict=True):
                assert p.grad is not None  # params are those with a gradient
                mask = self.mask_of(p.grad, pred)
                p.grad.mul_(mask)
                kept += float(mask.sum())
                total += mask.numel()
            self.kept += kept
            self.filtered_total += total
        else:
            self._pending = [(p, p.detach().clone(), pred) for (_, p), pred in zip(params, preds, strict=True)]

    @torch.no_grad()
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._pending is None:
            return
        kept = total = 0.0
        for p, before, pred in self._pending:
            direction = before - p  # -(step): the descent direction times lr
            mask = self.mask_of(direction, pred)
            p.copy_(torch.where(mask.bool(), p, before))
            kept += float(mask.sum())
            total += mask.numel()
        self.kept += kept
        self.filtered_total += total
        self._pending = None

    def memory_directions(self, trainer: L.Trainer, module: ContinualModule, params: list[tuple[str, Tensor]]
                          ) -> list[list[Tensor]]:
        """The old-task descent direction of every parameter: the loss gradient of a memory batch here."""
        assert self.rehearsal is not None  # reference="memory"
        flat = self.rehearsal.reference_gradient(trainer, module, [n for n, _ in params])
        parts = list(flat.split([p.numel() for _, p in params]))
        self.last_reference = [g.view_as(p) for g, (_, p) in zip(parts, params, strict=True)]
        return [[g] for g in self.last_reference]

    def random_masks(self, params: list[tuple[str, Tensor]]) -> list[list[Tensor]]:
        """``reference=random``: per parameter, a fresh 0/1 mask with ``keep_rate`` ones in expectation, drawn
        from the plugin's (rank-independent, checkpointed) generator."""
        return [[(torch.rand(p.shape, generator=self.generator) < self.keep_rate).to(p.device, p.dtype)]
                for _, p in params]

    def mask_of(self, direction: Tensor, preds: list[Tensor]) -> Tensor:
        """The 0/1 mask of one parameter: the random mask itself (``random``), else the sign rule."""
        if self.reference == "random":
            return preds[0].to(direction.dtype)
        return self.agreement(direction, preds)

    def agreement(self, direction: Tensor, preds: list[Tensor]) -> Tensor:
        """1 where ``direction`` agrees in sign with every predicted direction (zero predictions agree
        with anything), 0 where it disagrees: the mask of Eq. 5."""
        mask = torch.ones_like(direction)
        for pred in preds:
            mask = mask * (direction * pred >= 0).to(direction.dtype)
        return mask

    def previous_values(self, params: list[tuple[str, Tensor]]) -> list[Tensor] | None:
        """With ``previous_value``: each parameter before the previous optimizer step (itself at a task's
        first step)."""
        if not self.previous_value:
            return None
        if self.previous is None or len(self.previous) != len(params):
            return [p.detach() for _, p in params]
        return [t.to(p.device) for t, (_, p) in zip(self.previous, params, strict=True)]

    @torch.no_grad()
    def collect(self, optimizer: torch.optim.Optimizer, params: list[tuple[str, Tensor]],
                previous: list[Tensor] | None = None) -> None:
        """Samples ``coords_per_step`` coordinates (from the rank-independent generator) and stores their
        (value, descent direction[, layer position][, previous value]); reservoir sampling keeps the buffer
        bounded."""
        sizes = [p.numel() for _, p in params]
        idx = torch.randint(sum(sizes), (self.coords_per_step,), generator=self.generator)
        starts = torch.tensor([0, *sizes]).cumsum(0)
        which = torch.bucketize(idx, starts[1:], right=True)
        rows = torch.empty(self.coords_per_step, self.buffer.shape[1])
        positions = self._positions(params)
        for k, (_, p) in enumerate(params):
            sel = (which == k).nonzero().squeeze(1)
            if len(sel) == 0:
                continue
            local = (idx[sel] - starts[k]).to(p.device)
            assert p.grad is not None  # params are those with a gradient
            d = descent_direction(optimizer, p, p.grad).reshape(-1)[local]
            rows[sel, 0] = p.detach().reshape(-1)[local].float().cpu()
            rows[sel, 1] = d.float().cpu()
            position = positions[k]
            if self.layer_position:
                assert position is not None  # the layer position is known when it is an input
                rows[sel, 2] = position
            if previous is not None:
                rows[sel, -1] = previous[k].reshape(-1)[local].float().cpu()
        self._add(rows)

    def _add(self, rows: Tensor) -> None:
        free = min(self.max_pairs - self.filled, len(rows))
        if free:
            self.buffer[self.filled:self.filled + free] = rows[:free]
            self.filled += free
        rest = rows[free:]
        if len(rest):
            counts = self.seen + free + torch.arange(1, len(rest) + 1, dtype=torch.float64)
            slots = (torch.rand(len(rest), generator=self.generator, dtype=torch.float64) * counts).long()
            keep = slots < self.max_pairs
            self.buffer[slots[keep]] = rest[keep]
        self.seen += len(rows)

    # ------------------------------------------------------------------ predictions
    def references(self) -> list[CoordinatePredictor | list[CoordinatePredictor]]:
        """What the current direction must agree with: one entry (a predictor, or a list to average) for
        ``mean``, one per past task for ``each``."""
        if self.combine == "each":
            return list(self.past)
        if self.distill:
            return [self.running] if self.running is not None else []
        return [list(self.past)] if self.past else []

    @staticmethod
    def _evaluate(ref: CoordinatePredictor | list[CoordinatePredictor], theta: Tensor, pos: float | None,
                  previous: Tensor | None = None) -> Tensor:
        if isinstance(ref, CoordinatePredictor):
            return ref.predict(theta, pos, previous)
        return torch.stack([r.predict(theta, pos, previous) for r in ref]).mean(0)

    def predicted(self, params: list[tuple[str, Tensor]], previous: list[Tensor] | None = None
                  ) -> list[list[Tensor]]:
        """For every parameter tensor, the predicted directions of each reference."""
        device = params[0][1].device
        refs = self.references()
        for ref in refs:
            for r in ref if isinstance(ref, list) else [ref]:
                if next(r.parameters()).device != device:
                    r.to(device)
        positions = self._positions(params)
        if self.table_size == 0:
            befores = previous if previous is not None else [None] * len(params)
            return [[self._evaluate(ref, p.detach(), pos, before) for ref in refs] for (_, p), pos, before in
                    zip(params, positions, befores, strict=True)]
        if self._tables is None:
            flat = torch.cat([p.detach().reshape(-1) for _, p in params])
            lo, hi = float(flat.min()), float(flat.max())
            if self.range_seen is not None:
                lo, hi = min(lo, self.range_seen[0]), max(hi, self.range_seen[1])
            pad = 0.25 * (hi - lo)
            self._tables = [PredictorTable(functools.partial(self._evaluate, ref), lo - pad, hi + pad,
                                           self.table_size, device) for ref in refs]
        return [[table(p.detach(), pos) for table in self._tables] for (_, p), pos in
                zip(params, positions, strict=True)]

    @property
    def kept_fraction(self) -> float:
        """Share of coordinates the filter let through in the current task (1.0 before any filtering)."""
        return self.kept / self.filtered_total if self.filtered_total else 1.0

    # ------------------------------------------------------------------ state
    def predictor_state(self) -> dict[str, Any]:
        return {"tasks_learned": self.tasks_learned, "range_seen": self.range_seen,
                "running": None if self.running is None else {k: v.cpu() for k, v in
                                                              self.running.state_dict().items()},
                "past": [{k: v.cpu() for k, v in h.state_dict().items()} for h in self.past],
                "fit_losses": copy.deepcopy(self.fit_losses), "kept_history": list(self.kept_history)}

    def _predictor(self, state: dict[str, Tensor]) -> CoordinatePredictor:
        h = CoordinatePredictor(self.hidden_sizes, self.layer_position, self.previous_value)
        h.load_state_dict(state)
        return h.eval()

    def load_predictor_state(self, state: dict[str, Any]) -> None:
        self.tasks_learned = int(state["tasks_learned"])
        self.range_seen = None if state["range_seen"] is None else tuple(state["range_seen"])
        self.running = None if state["running"] is None else self._predictor(state["running"])
        self.past = [self._predictor(s) for s in state["past"]]
        self.fit_losses = list(state.get("fit_losses", []))
        self.kept_history = list(state.get("kept_history", []))
        self._tables = None

    def plugin_state(self) -> dict[str, Any]:
        memory = {} if self.rehearsal is None else {"rehearsal": self.rehearsal.plugin_state()}
        return {**memory, **self.predictor_state(), "buffer": self.buffer[: self.filled].clone(), "seen": self.seen,
                "step_count": self.step_count, "kept": self.kept, "filtered_total": self.filtered_total,
                "generator": self.generator.get_state(),
                "previous": None if self.previous is None else [t.cpu() for t in self.previous]}

    def load_plugin_state(self, state: dict[str, Any]) -> None:
        if "tasks_learned" not in state:
            return
        if self.rehearsal is not None and "rehearsal" in state:
            self.rehearsal.load_plugin_state(state["rehearsal"])
        self.load_predictor_state(state)
        self._reset_buffer()
        rows = state["buffer"]
        self.buffer[: len(rows)] = rows
        self.filled, self.seen = len(rows), int(state["seen"])
        self.step_count = int(state["step_count"])
        self.kept, self.filtered_total = float(state["kept"]), float(state["filtered_total"])
        self.generator.set_state(state["generator"])
        self.previous = state.get("previous")  # moved to the parameters' device when used

    def stored_numel(self) -> int:
        """Values kept between tasks: g (or the past predictors) and the two floats of the seen range."""
        kept = ([self.running] if self.running is not None else []) + self.past
        memory = 0 if self.rehearsal is None else self.rehearsal.stored_numel()
        return sum(h.numel() for h in kept) + (2 if self.range_seen is not None else 0) + memory

    def storage_breakdown(self) -> dict[str, int]:
        """Also the transient memory of a task: its predictor h (same size as g) and the pair buffer."""
        one = CoordinatePredictor(self.hidden_sizes, self.layer_position, self.previous_value).numel()
        breakdown = {"between_tasks": self.stored_numel(), "current_task_predictor": one,
                     "pair_buffer": self.buffer.numel()}
        if self.previous is not None:
            breakdown["previous_values"] = sum(t.numel() for t in self.previous)
        return breakdown
