"""Global-batch batch norm: under DDP (2 gloo processes on CPU) it equals plain batch norm on the whole batch."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from cl_lightning.nets.batchnorm import GlobalBatchNorm, convert_to_global_batchnorm


def _net(momentum: float | None) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3, momentum=momentum), nn.ReLU(), nn.Flatten(),
                         nn.Linear(3 * 4 * 4, 5), nn.BatchNorm1d(5, momentum=momentum), nn.Linear(5, 1))


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 2, 6, 6, generator=g) * 3 + 1, torch.randn(8, 1, generator=g)


def _step(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    for _ in range(2):  # two steps: the running statistics are updated twice
        net.zero_grad()
        ((net(x) - y) ** 2).mean().backward()


def _worker(rank: int, world: int, port: int, momentum: float | None, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        net = convert_to_global_batchnorm(_net(momentum))
        x, y = _data()
        _step(net, x.chunk(world)[rank], y.chunk(world)[rank])
        grads = [p.grad.clone() for p in net.parameters()]
        for g in grads:  # what DDP does: the mean of the per-process gradients
            dist.all_reduce(g)
            g /= world
        if rank == 0:
            # numpy arrays travel by value (shared tensors would vanish with this process)
            queue.put(([g.numpy() for g in grads], {k: v.numpy() for k, v in net.state_dict().items()}))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("momentum", [0.1, None])
def test_global_batchnorm_under_two_processes_equals_one_process_on_the_whole_batch(momentum):
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, momentum, queue)) for r in range(2)]
    for p in procs:
        p.start()
    grads, state = queue.get()
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    net = _net(momentum)
    x, y = _data()
    _step(net, x, y)
    for (name, p), g in zip(net.named_parameters(), grads, strict=True):
        torch.testing.assert_close(torch.from_numpy(g), p.grad, rtol=1e-5, atol=1e-6, msg=name)
    for name, value in net.state_dict().items():
        torch.testing.assert_close(torch.from_numpy(state[name]), value, rtol=1e-5, atol=1e-6, msg=name)


def test_conversion_keeps_state_and_is_plain_batchnorm_without_a_process_group():
    net = _net(0.1)
    net[1].running_mean.fill_(0.5)
    plain_state = {k: v.clone() for k, v in net.state_dict().items()}
    converted = convert_to_global_batchnorm(_net(0.1))
    converted.load_state_dict(plain_state)
    assert isinstance(converted[1], GlobalBatchNorm) and isinstance(converted[5], GlobalBatchNorm)
    assert converted.state_dict().keys() == plain_state.keys()
    net.load_state_dict(plain_state)
    x, y = _data()
    _step(net, x, y)
    _step(converted, x, y)
    for a, b in zip(net.state_dict().values(), converted.state_dict().values(), strict=True):
        assert torch.equal(a, b)
