"""The random-mask control of the gradient-sign filter (``reference: random``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cl_lightning.callbacks.gradient_sign import GradientSignFilter


class Params(nn.Module):
    def __init__(self, *shapes: int):
        super().__init__()
        self.ws = nn.ParameterList([nn.Parameter(torch.zeros(n)) for n in shapes])


def step(plugin: GradientSignFilter, module: Params, opt: torch.optim.Optimizer, grads: list[torch.Tensor]) -> None:
    for w, g in zip(module.ws, grads, strict=True):
        w.grad = g.clone()
    plugin.on_before_optimizer_step(None, module, opt)
    opt.step()
    plugin.on_train_batch_end(None, module, None, None, 0)


@pytest.mark.parametrize("keep_rate", [0.2, 0.65])
@pytest.mark.parametrize("mode", ["gradient", "update"])
def test_random_mask_keeps_that_fraction_and_only_from_the_second_task(keep_rate, mode):
    plugin = GradientSignFilter(reference="random", keep_rate=keep_rate, filter_mode=mode, seed=3)
    module = Params(20_000, 5_000)
    opt = torch.optim.SGD(module.parameters(), lr=1.0)
    plugin.on_task_start(None, module, 0)
    grads = [torch.ones(20_000), -torch.ones(5_000)]
    step(plugin, module, opt, grads)  # the first task is never filtered
    assert torch.equal(module.ws[0].detach(), -torch.ones(20_000))
    plugin.on_task_end(None, module, 0)
    plugin.on_task_start(None, module, 1)
    moved = []
    for _ in range(4):
        before = [w.detach().clone() for w in module.ws]
        step(plugin, module, opt, grads)
        changed = torch.cat([(w.detach() != b).reshape(-1) for w, b in zip(module.ws, before, strict=True)])
        moved.append(changed)
        # a kept coordinate moves by the full, unscaled step; a dropped one not at all
        delta = torch.cat([(w.detach() - b).abs().reshape(-1) for w, b in zip(module.ws, before, strict=True)])
        assert set(delta.unique().tolist()) <= {0.0, 1.0}
    share = torch.stack(moved).float().mean()
    assert share == pytest.approx(keep_rate, abs=0.01)  # 100k Bernoulli draws: std < 0.002
    assert plugin.kept_fraction == pytest.approx(float(share))
    assert not torch.equal(moved[0], moved[1])  # a fresh mask at every step, not a fixed subnetwork
    plugin.on_task_end(None, module, 1)
    assert plugin.kept_history[0] == 1.0 and plugin.kept_history[1] == pytest.approx(float(share))


def test_random_mask_is_seeded_and_resumes_from_the_checkpoint_state():
    def run(plugin: GradientSignFilter, module: Params, steps: int) -> None:
        opt = torch.optim.SGD(module.parameters(), lr=1.0)
        for k in range(steps):
            step(plugin, module, opt, [torch.full((1000,), float(k + 1))])

    a = GradientSignFilter(reference="random", keep_rate=0.5, seed=1)
    a.tasks_learned = 1
    ma = Params(1000)
    run(a, ma, 2)
    b = GradientSignFilter(reference="random", keep_rate=0.5, seed=1)
    b.load_state_dict(a.state_dict())
    mb = Params(1000)
    mb.load_state_dict(ma.state_dict())
    run(a, ma, 3)
    run(b, mb, 3)
    assert torch.equal(ma.ws[0], mb.ws[0])


def test_random_keep_rate_is_checked():
    with pytest.raises(ValueError, match="keep_rate=0.0"):
        GradientSignFilter(reference="random", keep_rate=0.0)
    with pytest.raises(ValueError, match="keep_rate=1.5"):
        GradientSignFilter(reference="random", keep_rate=1.5)
    with pytest.raises(ValueError, match="reference='mask'"):
        GradientSignFilter(reference="mask")
