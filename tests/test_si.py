"""Synaptic intelligence: the path integral is nonzero, it reduces forgetting against fine-tuning on the same
data (ACC too), the check behind that fails for an SI that keeps views of the weights instead of copies
(the bug that makes a widely used SI equal fine-tuning on CPU), and a run killed mid-task resumes exactly."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch

from cl_lightning.callbacks import SI
from cl_lightning.datamodules import SplitMNIST
from cl_lightning.methods import ContinualModule
from cl_lightning.nets import MLP
from tests.helpers.crash import CrashAt
from tests.helpers.run import run_tasks


class ViewSI(SI):
    """The bug: parameter values 'saved' as views, which the optimizer's in-place update changes with them."""

    @staticmethod
    def snapshot(p: torch.Tensor) -> torch.Tensor:
        return p.detach()


def run(root, out, plugins):
    L.seed_everything(0, verbose=False)
    model = ContinualModule(MLP(hidden_sizes=[100, 100]), lr=3e-3, plugins=plugins)
    dm = SplitMNIST(data_dir=str(root), scenario="task", train_samples_per_task=500)
    return run_tasks(model, dm, out, max_epochs=1)


def check_si_protects(si: SI, si_run: dict, ft_run: dict) -> None:
    """What SI must show: importance after training, and less forgetting than fine-tuning with a better ACC."""
    total = sum(float(v.sum()) for v in si.importance.values())
    assert si.importance and total > 1.0, f"importance is {total}: the path integral did not accumulate"
    assert all(torch.isfinite(v).all() for v in si.importance.values())
    assert si_run["BWT"] > ft_run["BWT"] + 0.02, (si_run["BWT"], ft_run["BWT"])
    assert si_run["ACC"] > ft_run["ACC"] + 0.01, (si_run["ACC"], ft_run["ACC"])


def test_si_forgets_less_than_finetuning_and_catches_the_view_bug(mnist_root, tmp_path, one_thread):
    ft = run(mnist_root, tmp_path / "ft", None)
    assert ft["BWT"] < -0.03, "fine-tuning must forget for the comparison to mean anything"

    si = SI(strength=1000.0, damping=0.1)
    si_run = run(mnist_root, tmp_path / "si", [si])
    check_si_protects(si, si_run, ft)
    # the importance is a path integral: it is not the squared gradient, and its parts are mostly positive
    flat = torch.cat([v.flatten() for v in si.importance.values()])
    assert (flat > 0).float().mean() > 0.5

    view = ViewSI(strength=1000.0, damping=0.1)
    view_run = run(mnist_root, tmp_path / "view", [view])
    with pytest.raises(AssertionError, match="path integral did not accumulate"):
        check_si_protects(view, view_run, ft)
    # and with views SI is exactly fine-tuning
    np.testing.assert_allclose(view_run["R"], ft["R"], atol=1e-6)


def test_si_resumes_inside_a_task(mnist_root, tmp_path, one_thread):
    def make(marker):
        L.seed_everything(0, verbose=False)
        si = SI(strength=10.0)
        model = ContinualModule(MLP(hidden_sizes=[64]), lr=1e-3,
                                plugins=[si, CrashAt(1, 7, str(marker), hard=False)])
        dm = SplitMNIST(data_dir=str(mnist_root), num_tasks=2, train_samples_per_task=300, batch_size=64)
        return model, dm, si

    marker = tmp_path / "crashed"
    marker.write_text("never crash")
    model, dm, si_ref = make(marker)
    reference = run_tasks(model, dm, tmp_path / "ref", max_epochs=2)
    marker.unlink()  # crash in the second epoch of task 1 (5 steps per epoch)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_tasks(*make(marker)[:2], tmp_path / "run", max_epochs=2)
    model, dm, si = make(marker)
    resumed = run_tasks(model, dm, tmp_path / "run", resume=True, max_epochs=2)
    np.testing.assert_allclose(resumed["R"], reference["R"], rtol=0, atol=1e-6)
    for name, omega in si_ref.importance.items():
        torch.testing.assert_close(si.importance[name], omega)
