"""The per-task optimizer: torch's fused kernel where it has one, with the plain optimizer's update rule."""

from __future__ import annotations

import pytest
import torch

from cl_lightning.methods.base import make_optimizer


@pytest.mark.parametrize("name,kwargs", [("adam", {}), ("adamw", {"weight_decay": 0.01}),
                                         ("sgd", {"momentum": 0.9})])
def test_fused_optimizer_takes_the_plain_optimizers_steps(name, kwargs):
    torch.manual_seed(0)
    start = [torch.randn(40, 3).T, torch.randn(7)]  # a transposed (non-contiguous) one too
    fused = [torch.nn.Parameter(p.clone()) for p in start]
    plain = [torch.nn.Parameter(p.clone()) for p in start]
    opt = make_optimizer(name, fused, lr=0.01, **kwargs)
    ref = type(opt)(plain, lr=0.01, **kwargs)
    assert opt.param_groups[0]["fused"] is True and not ref.param_groups[0].get("fused")
    for _ in range(5):
        grads = [torch.randn_like(p) for p in start]
        for params, o in ((fused, opt), (plain, ref)):
            for p, g in zip(params, grads, strict=True):
                p.grad = g.clone()
            o.step()
    for a, b in zip(fused, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not torch.equal(fused[0], start[0])  # it did move


def test_parameters_without_a_fused_kernel_get_the_plain_optimizer():
    p = torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))
    opt = make_optimizer("adam", [p], lr=0.1)
    assert not opt.param_groups[0].get("fused")
    p.grad = torch.ones_like(p)
    opt.step()  # the fused one would refuse complex parameters here


def test_rmsprop_is_torchs_rmsprop_with_its_defaults():
    torch.manual_seed(0)
    start = torch.randn(5, 4)
    ours, ref_p = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    opt = make_optimizer("rmsprop", [ours], lr=1e-4, weight_decay=0.0)
    assert isinstance(opt, torch.optim.RMSprop)
    ref = torch.optim.RMSprop([ref_p], lr=1e-4)  # the SupSup authors' call: optim.RMSprop(params, lr=lr)
    for _ in range(3):
        g = torch.randn_like(start)
        for p, o in ((ours, opt), (ref_p, ref)):
            p.grad = g.clone()
            o.step()
    torch.testing.assert_close(ours, ref_p)
    assert not torch.equal(ours, start)
