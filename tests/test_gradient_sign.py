"""Gradient-sign filtering with meta-learned gradient predictors (cl_lightning/callbacks/gradient_sign.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from cl_lightning.callbacks.gradient_predictor import (
    CoordinatePredictor,
    PredictorTable,
    descent_direction,
    distill_mean,
    fit_predictor,
)
from cl_lightning.callbacks.gradient_sign import GradientSignFilter
from cl_lightning.datamodules.mnist import PermutedMNIST
from cl_lightning.methods.base import ContinualModule
from cl_lightning.nets import MLP
from tests.helpers.run import run_tasks, train_py


def identity_predictor(scale: float = 1.0, positive_part: bool = False) -> CoordinatePredictor:
    """h(theta) = scale * theta (or scale * relu(theta)), written into the weights of a 2-unit ReLU MLP."""
    h = CoordinatePredictor(hidden_sizes=[2])
    with torch.no_grad():
        h.net[0].weight.copy_(torch.tensor([[1.0], [-1.0]]))
        h.net[0].bias.zero_()
        h.net[2].weight.copy_(torch.tensor([[scale, 0.0 if positive_part else -scale]]))
        h.net[2].bias.zero_()
    return h.eval()


class Params(nn.Module):
    def __init__(self, theta: torch.Tensor):
        super().__init__()
        self.w = nn.Parameter(theta.clone())


THETA = torch.tensor([0.5, -0.5, 0.3, -0.2, 0.1, -0.4, 0.0, 0.25])
GRAD = torch.tensor([1.0, 1.0, -1.0, -1.0, 2.0, -3.0, 1.0, 0.0])


@pytest.mark.parametrize("table_size", [0, 257])
def test_filter_zeroes_exactly_the_disagreeing_coordinates(table_size):
    plugin = GradientSignFilter(hidden_sizes=[2], table_size=table_size, filter_mode="gradient")
    plugin.running, plugin.tasks_learned = identity_predictor(), 1  # predicted direction = theta
    module = Params(THETA)
    module.w.grad = GRAD.clone()
    plugin.on_before_optimizer_step(None, module, torch.optim.SGD(module.parameters(), lr=0.1))
    expected = torch.where(GRAD * THETA >= 0, GRAD, torch.zeros_like(GRAD))
    assert torch.equal(module.w.grad, expected)
    assert (expected == 0).sum() == 3  # the hand-made case has disagreements to remove


def test_each_mode_asks_every_past_task_and_update_mode_restores_disagreeing_steps():
    plugin = GradientSignFilter(hidden_sizes=[2], combine="each", table_size=0, filter_mode="update")
    plugin.past, plugin.tasks_learned = [identity_predictor(), identity_predictor(-1.0, positive_part=True)], 2
    module = Params(THETA)
    module.w.grad = GRAD.clone()
    opt = torch.optim.SGD(module.parameters(), lr=1.0)
    plugin.on_before_optimizer_step(None, module, opt)
    opt.step()
    plugin.on_train_batch_end(None, module, None, None, 0)
    agree = (GRAD * THETA >= 0) & (GRAD * -THETA.clamp_min(0) >= 0)
    assert torch.equal(module.w.detach(), torch.where(agree, THETA - GRAD, THETA))
    assert plugin.kept_fraction == pytest.approx(float(agree.float().mean()))


@pytest.mark.parametrize("make", [
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.01),
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True),
    lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=0.01),
    lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1),
])
def test_descent_direction_is_the_optimizers_step(make):
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(50))
    opt = make([w])
    for _ in range(3):
        w.grad = torch.randn(50)
        d = descent_direction(opt, w, w.grad)
        before = w.detach().clone()
        opt.step()
        lr = opt.param_groups[0]["lr"]
        torch.testing.assert_close(-(w.detach() - before) / lr, d, rtol=1e-4, atol=1e-5)


def test_trained_predictor_reconstructs_its_tasks_gradient_on_held_out_points():
    """Linear regression whose weights all share one optimum (0.5) on whitened inputs, with weight decay:
    the gradient of each coordinate depends on its value (plus minibatch noise), and the pairs the plugin
    collects teach h that dependence. Evaluated on held-out steps."""
    torch.manual_seed(0)
    model = nn.Linear(64, 8, bias=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, weight_decay=0.1)
    plugin = GradientSignFilter(hidden_sizes=[32, 32], coords_per_step=128, max_pairs=20_000)
    held_out = GradientSignFilter(hidden_sizes=[32, 32], coords_per_step=128, seed=1)
    x = torch.randn(512, 64)
    y = x @ torch.full((64, 8), 0.5)
    params = list(model.named_parameters())
    for step in range(120):
        idx = torch.randint(512, (128,))
        opt.zero_grad()
        nn.functional.mse_loss(model(x[idx]), y[idx]).backward()
        (held_out if step % 4 == 3 else plugin).collect(opt, params)
        opt.step()
    data, test = plugin.buffer[: plugin.filled], held_out.buffer[: held_out.filled]
    h, _ = fit_predictor(data[:, 0], data[:, 1], hidden_sizes=[32, 32], steps=400, batch_size=512, seed=0)
    mse = (h.predict(test[:, 0]) - test[:, 1]).pow(2).mean()
    zero = test[:, 1].pow(2).mean()
    assert mse < 0.5 * zero, (float(mse), float(zero))


def test_previous_value_input_is_collected_used_and_learned():
    """``previous_value``: (1) the pairs carry each coordinate's value before the previous step; (2) the
    filter feeds the predictor that value: with a hand-made h = theta - previous it keeps exactly the
    gradient coordinates whose sign agrees with the last change; (3) a fitted predictor uses the input: on
    directions that follow the last change it beats a value-only one; (4) two tasks end to end (fit, then
    distillation with previous values)."""
    torch.manual_seed(0)
    plugin = GradientSignFilter(hidden_sizes=[2], previous_value=True, table_size=0, filter_mode="gradient",
                                coords_per_step=64)
    h = CoordinatePredictor(hidden_sizes=[2], previous_value=True)  # h = delta_scale * (theta - previous)
    with torch.no_grad():
        h.net[0].weight.copy_(torch.tensor([[0.0, 1.0], [0.0, -1.0]]))
        h.net[0].bias.zero_()
        h.net[2].weight.copy_(torch.tensor([[1.0, -1.0]]))
        h.net[2].bias.zero_()
    plugin.running, plugin.tasks_learned, plugin.range_seen = h.eval(), 1, (-1.0, 1.0)
    module = Params(torch.randn(16))
    opt = torch.optim.SGD(module.parameters(), lr=0.1)
    theta0 = module.w.detach().clone()
    module.w.grad = torch.randn(16)
    plugin.on_before_optimizer_step(None, module, opt)  # first step: previous = theta, h = 0, all kept
    assert plugin.kept_fraction == 1.0
    rows = plugin.buffer[: plugin.filled]
    assert torch.equal(rows[:, 0], rows[:, -1])
    opt.step()
    theta1 = module.w.detach().clone()
    grad = torch.randn(16)
    module.w.grad = grad.clone()
    plugin.on_before_optimizer_step(None, module, opt)
    expected = torch.where(grad * (theta1 - theta0) >= 0, grad, torch.zeros_like(grad))
    assert torch.equal(module.w.grad, expected) and (expected == 0).any()
    rows = plugin.buffer[64: plugin.filled]  # the second step's pairs: (theta1[j], ..., theta0[j])
    j = (rows[:, :1] == theta1).float().argmax(1)
    assert torch.equal(rows[:, 0], theta1[j]) and torch.equal(rows[:, -1], theta0[j])
    assert plugin.storage_breakdown()["previous_values"] == 16
    copy = GradientSignFilter(hidden_sizes=[2], previous_value=True, table_size=0)
    copy.load_state_dict(plugin.state_dict())
    assert torch.equal(copy.previous[0], theta1)

    theta = torch.rand(20_000) * 2 - 1
    change = 0.01 * torch.randn(20_000)
    direction = -change / 0.01 + 0.1 * torch.randn(20_000)  # the descent direction continues the last step
    with_prev, loss_prev = fit_predictor(theta, direction, hidden_sizes=[16, 16], steps=300, seed=0,
                                         prev=theta - change)
    _, loss_value = fit_predictor(theta, direction, hidden_sizes=[16, 16], steps=300, seed=0)
    assert loss_prev < 0.1 < 0.9 < loss_value, (loss_prev, loss_value)
    assert with_prev.predict(theta[:5], previous=theta[:5] - change[:5]).shape == (5,)

    plugin = GradientSignFilter(hidden_sizes=[8], previous_value=True, table_size=0, predictor_steps=50,
                                distill_steps=50, distill_points=2000, coords_per_step=32)
    model = nn.Linear(8, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = SimpleNamespace(world_size=1)
    for task in range(2):
        plugin.on_task_start(trainer, model, task)
        for _ in range(10):
            opt.zero_grad()
            model(torch.randn(16, 8)).pow(2).mean().backward()
            plugin.on_before_optimizer_step(trainer, model, opt)
            opt.step()
        plugin.on_task_end(trainer, model, task)
    assert plugin.tasks_learned == 2 and plugin.running.previous_value
    assert "distill_loss" in plugin.fit_losses[1] and plugin.kept_fraction < 1.0


def test_table_matches_the_predictor():
    h, _ = fit_predictor(torch.linspace(-1, 1, 2000), torch.sin(4 * torch.linspace(-1, 1, 2000)),
                         hidden_sizes=[16, 16], steps=50, seed=0)
    table = PredictorTable(lambda t, pos: h.predict(t, pos), -1.0, 1.0, 4097)
    theta = torch.linspace(-1.5, 1.5, 999)  # also outside the grid
    torch.testing.assert_close(table(theta), h.predict(theta), rtol=1e-3, atol=1e-4)


def test_distilled_running_mean_matches_the_mean_of_the_predictors():
    x = torch.linspace(-1, 1, 4000)
    hs = [fit_predictor(x, torch.sin(k * x) + 0.5 * k * x, hidden_sizes=[32, 32], steps=600, batch_size=512,
                        seed=k)[0] for k in (1, 3, 5)]
    running = hs[0]
    for t, h in enumerate(hs[1:], start=2):
        running, _ = distill_mean(running, h, t, x, steps=600, batch_size=512, seed=10 + t)
    test = torch.rand(1000, generator=torch.Generator().manual_seed(5)) * 2 - 1
    mean = torch.stack([h.predict(test) for h in hs]).mean(0)
    err = (running.predict(test) - mean).pow(2).mean().sqrt() / mean.pow(2).mean().sqrt()
    assert err < 0.1
    # the distilled predictor is closer to the mean than any single one of the predictors
    singles = [(h.predict(test) - mean).pow(2).mean().sqrt() / mean.pow(2).mean().sqrt() for h in hs]
    assert err < min(singles) / 3


def permuted(mnist_root, tasks: int = 2) -> PermutedMNIST:
    return PermutedMNIST(num_tasks=tasks, data_dir=str(mnist_root), batch_size=64, train_samples_per_task=2000,
                         eval_batch_size=2000)


def model(plugins=None) -> ContinualModule:
    return ContinualModule(backbone=MLP(hidden_sizes=[100, 100]), optimizer="adam", lr=1e-3, plugins=plugins)


@pytest.mark.slow
def test_filter_changes_training_against_fine_tuning_and_state_survives_the_checkpoint(mnist_root, tmp_path):
    """Same data, seed and optimizer (Adam, so the ``update`` filter) as fine-tuning."""
    base = run_tasks(model(), permuted(mnist_root), tmp_path / "ft", max_epochs=-1, max_steps=200)
    plugin = GradientSignFilter(hidden_sizes=[32, 32], predictor_steps=200, distill_steps=200,
                                distill_points=20_000, coords_per_step=256)
    ours = run_tasks(model([plugin]), permuted(mnist_root), tmp_path / "gs", max_epochs=-1, max_steps=200)
    R0, R1 = torch.tensor(base["R"]), torch.tensor(ours["R"])
    print("fine-tuning", base["R"], "BWT", base["BWT"], "| gradsign", ours["R"], "BWT", ours["BWT"])
    assert torch.equal(R0[0], R1[0])  # the filter starts at the second task
    assert (R0[1] - R1[1]).abs().max() > 0.01  # and then changes the result measurably
    assert 0.0 < plugin.kept_fraction < 1.0
    assert plugin.running is not None and plugin.past == [] and plugin.tasks_learned == 2
    assert ours["storage"]["plugin_GradientSignFilter"] == plugin.stored_numel() > 0

    # (5) the plugin's state round-trips through the boundary checkpoint of the last task
    ckpt = torch.load(tmp_path / "gs" / "checkpoints" / "after_task_1.ckpt", map_location="cpu", weights_only=False)
    state = next(v for k, v in ckpt["callbacks"].items() if "GradientSignFilter" in k)
    restored = GradientSignFilter(hidden_sizes=[32, 32])
    restored.load_state_dict(state)
    assert restored.tasks_learned == 2 and restored.task_finished == 1
    assert restored.range_seen == plugin.range_seen
    theta = torch.linspace(-0.3, 0.3, 101)
    assert torch.equal(restored.running.predict(theta), plugin.running.predict(theta))
    assert restored.stored_numel() == plugin.stored_numel()


def test_mid_task_state_round_trip():
    plugin = GradientSignFilter(hidden_sizes=[2], coords_per_step=16, max_pairs=40)
    plugin.running, plugin.tasks_learned, plugin.range_seen = identity_predictor(), 1, (-1.0, 1.0)
    module = Params(torch.randn(100))
    opt = torch.optim.SGD(module.parameters(), lr=0.1)
    for _ in range(5):  # more pairs than the buffer holds: reservoir sampling
        module.w.grad = torch.randn(100)
        plugin.on_before_optimizer_step(None, module, opt)
    copy = GradientSignFilter(hidden_sizes=[2], coords_per_step=16, max_pairs=40)
    copy.load_state_dict(plugin.state_dict())
    assert torch.equal(copy.buffer, plugin.buffer) and copy.seen == 80 and copy.step_count == 5
    # the sampling generator continues where it was
    assert torch.equal(torch.randint(100, (5,), generator=copy.generator),
                       torch.randint(100, (5,), generator=plugin.generator))


def test_invalid_arguments_name_the_key():
    with pytest.raises(ValueError, match="combine='sum'"):
        GradientSignFilter(combine="sum")
    with pytest.raises(ValueError, match="table_size=1"):
        GradientSignFilter(table_size=1)
    with pytest.raises(ValueError, match="coords_per_step=0"):
        GradientSignFilter(coords_per_step=0)
    with pytest.raises(ValueError, match="previous_value=True needs table_size=0"):
        GradientSignFilter(previous_value=True)


@pytest.mark.slow
def test_ddp_two_processes_match_one(mnist_root, tmp_path):
    """Through ``train.py`` with SGD (the filter zeroes gradient coordinates after DDP has averaged them): the
    same pairs are collected and the same predictor is fitted on both ranks, and R equals one process's."""
    args = ["method=gradsign", "benchmark=permuted_mnist", "method.backbone.hidden_sizes=[64,64]", "method.lr=0.05",
            "method.plugins.GradientSignFilter.hidden_sizes=[16,16]",
            "method.plugins.GradientSignFilter.predictor_steps=100",
            "method.plugins.GradientSignFilter.distill_steps=100",
            "method.plugins.GradientSignFilter.distill_points=5000",
            "method.plugins.GradientSignFilter.coords_per_step=128"]
    one = train_py([*args, "trainer.devices=1"], tmp_path / "one", mnist_root)
    two = train_py([*args, "trainer.strategy=ddp", "trainer.devices=2"], tmp_path / "two", mnist_root)
    assert torch.allclose(torch.tensor(one["R"]), torch.tensor(two["R"]), atol=0.01), (one["R"], two["R"])
    states = []
    for run in ("one", "two"):
        ckpt = torch.load(tmp_path / run / "checkpoints" / "after_task_1.ckpt", map_location="cpu",
                          weights_only=False)
        states.append(next(v for k, v in ckpt["callbacks"].items() if "GradientSignFilter" in k))
    assert states[0]["tasks_learned"] == states[1]["tasks_learned"] == 2
    for name, value in states[0]["running"].items():  # g after distilling two tasks' predictors
        torch.testing.assert_close(states[1]["running"][name], value, rtol=1e-3, atol=1e-4, msg=name)
    assert states[0]["range_seen"] == pytest.approx(states[1]["range_seen"], rel=1e-4)
