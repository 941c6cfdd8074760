"""EWC's Fisher pass: the Linear-layer shortcut gives the per-sample estimator of ``torch.func``; the
minibatch estimator is the mean squared batch gradient."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from cl_lightning.callbacks import EWC
from cl_lightning.methods import ContinualModule
from cl_lightning.nets import MLP
from cl_lightning.tasks import BenchmarkInfo, Scenario, Task


class _Data:
    def __init__(self, n: int = 70, tasks: int = 3):
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(n, 1, 4, 4, generator=g), torch.randint(0, 2, (n,), generator=g)
        self.tasks = tasks

    def task_dataloader(self, task_id, split="train", batch_size=None, limit=None):
        n = limit or len(self.y)
        t = torch.full((n,), task_id)
        return DataLoader(TensorDataset(self.x[:n], self.y[:n], t), batch_size=batch_size)


class _Strategy:
    @staticmethod
    def reduce(x, reduce_op="sum"):
        return x


def _setup(batch_norm: bool, regression: bool = False):
    torch.manual_seed(0)
    problem = "regression" if regression else "classification"
    info = BenchmarkInfo("toy", tuple(Task(i, f"t{i}") for i in range(3)), Scenario.TASK_IL, (1, 4, 4), 2,
                         problem=problem)
    m = ContinualModule(MLP(hidden_sizes=(7, 5), batch_norm=batch_norm))
    m.setup_tasks(info)
    if batch_norm:  # non-trivial running statistics
        m.train()
        m(torch.randn(32, 1, 4, 4), torch.zeros(32, dtype=torch.long))
    data = _Data()
    if regression:
        data.y = torch.randn(len(data.y), 2)
    return m, SimpleNamespace(datamodule=data, strategy=_Strategy(), world_size=1)


@pytest.mark.parametrize("batch_norm", [False, True])
@pytest.mark.parametrize("empirical", [True, False])
def test_linear_shortcut_equals_vmap_per_sample_fisher(batch_norm, empirical):
    m, trainer = _setup(batch_norm)
    ewc = EWC(fisher_samples=50, fisher_batch_size=16, empirical_fisher=empirical)
    torch.manual_seed(1)
    fast = ewc.fisher(trainer, m, 1)
    torch.manual_seed(1)
    reference = ewc.fisher(trainer, m, 1, use_vmap_only=True)
    assert fast.keys() == reference.keys() and len(fast) == (10 if batch_norm else 6)
    for name, value in reference.items():
        assert value.abs().sum() > 0 or "head" in name
        torch.testing.assert_close(fast[name], value, rtol=1e-5, atol=1e-8, msg=name)
    assert m.training  # left as it was


def test_linear_shortcut_equals_vmap_for_regression():
    m, trainer = _setup(False, regression=True)
    ewc = EWC(fisher_batch_size=32)
    fast, reference = ewc.fisher(trainer, m, 0), ewc.fisher(trainer, m, 0, use_vmap_only=True)
    for name, value in reference.items():
        torch.testing.assert_close(fast[name], value, rtol=1e-5, atol=1e-8, msg=name)


def test_minibatch_estimator_is_mean_squared_batch_gradient():
    m, trainer = _setup(False)
    ewc = EWC(fisher_estimator="minibatch", fisher_batch_size=16, fisher_samples=64)
    got = ewc.fisher(trainer, m, 2)
    params = dict(m.named_parameters())
    expected = {n: torch.zeros_like(p) for n, p in params.items()}
    m.eval()
    for x, y, t in trainer.datamodule.task_dataloader(2, batch_size=16, limit=64):
        m.zero_grad()
        torch.nn.functional.cross_entropy(m(x, t), y).backward()
        for n, p in params.items():
            expected[n] += p.grad.pow(2) / 4
    for n in params:
        torch.testing.assert_close(got[n], expected[n], rtol=1e-5, atol=1e-10)
    per_sample = EWC(fisher_batch_size=16, fisher_samples=64).fisher(trainer, m, 2)
    name = "backbone.layers.1.weight"
    assert got[name].sum() < per_sample[name].sum() / 2  # another scale (about 1/B)
    with pytest.raises(ValueError, match="fisher_estimator="):
        EWC(fisher_estimator="batch")
    with pytest.raises(ValueError, match="fisher_batch_size="):
        EWC(fisher_batch_size=0)
