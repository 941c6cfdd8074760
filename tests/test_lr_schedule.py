"""CosineLR: the rate every optimizer step used follows the formula and restarts with each task, for a method with
the base optimizer and one with its own; bad settings are refused by name; a run resumed inside a task steps with
the rates (and ends with the R) of the uninterrupted run; the CODA-Prompt config carries the authors' schedule."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cl_lightning.callback import ContinualCallback
from cl_lightning.callbacks import CosineLR
from cl_lightning.methods import ContinualModule
from cl_lightning.nets import MLP
from tests.helpers.crash import CrashAt
from tests.helpers.run import run_tasks
from tests.helpers.supermask_data import PermutedBlobs

pytestmark = pytest.mark.usefixtures("one_thread")


class RecordLR(ContinualCallback):
    """The rate of the first group at every optimizer step, per task (after every plugin's batch-start hook)."""

    def __init__(self):
        super().__init__()
        self.rates: dict[int, list[float]] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.rates.setdefault(pl_module.current_task, []).append(optimizer.param_groups[0]["lr"])


def run(tmp_path, schedule, crash=None, resume=False, max_epochs=3, name="run"):
    torch.manual_seed(0)
    record = RecordLR()
    plugins = [schedule, record] + ([crash] if crash else [])
    model = ContinualModule(MLP(hidden_sizes=(32,)), lr=0.1, optimizer="sgd", plugins=plugins)
    dm = PermutedBlobs(num_tasks=2, samples=128, batch_size=32)  # 4 steps per epoch
    result = run_tasks(model, dm, tmp_path / name, resume=resume, max_epochs=max_epochs)
    return result, record.rates


def test_factors_of_both_shapes():
    annealing, quarter = CosineLR("annealing"), CosineLR("quarter")
    assert [annealing.factor(i, 4) for i in (0, 2, 4, 9)] == pytest.approx([1.0, 0.5, 0.0, 0.0])
    assert quarter.factor(0, 5) == 1.0 and quarter.factor(4, 5) == pytest.approx(math.cos(0.495 * math.pi))
    assert quarter.factor(2, 5) == pytest.approx(math.cos(0.2475 * math.pi))
    assert quarter.factor(0, 1) == 1.0


def test_every_step_uses_the_scheduled_rate_and_each_task_restarts(tmp_path):
    _, per_step = run(tmp_path, CosineLR("annealing", "step"), name="step")
    expected = [0.1 * 0.5 * (1 + math.cos(math.pi * i / 12)) for i in range(12)]
    assert set(per_step) == {0, 1}
    for task in (0, 1):
        assert per_step[task] == pytest.approx(expected)
    _, per_epoch = run(tmp_path, CosineLR("quarter", "epoch"), name="epoch")
    expected = [0.1 * math.cos(0.495 * math.pi * e / 2) for e in (0, 1, 2) for _ in range(4)]
    for task in (0, 1):
        assert per_epoch[task] == pytest.approx(expected)


def test_the_schedule_changes_training(tmp_path):
    with_schedule, _ = run(tmp_path, CosineLR(), name="cos")
    without, rates = run(tmp_path, ContinualCallback(), name="const")
    assert rates[1] == pytest.approx([0.1] * 12)
    assert with_schedule["R"] != without["R"]
    assert min(np.diag(with_schedule["R"])) > 0.8  # both tasks learnt under the decayed rate


def test_bad_settings_are_named(tmp_path):
    with pytest.raises(ValueError, match="shape='linear'"):
        CosineLR("linear")
    with pytest.raises(ValueError, match="interval='batch'"):
        CosineLR(interval="batch")
    with pytest.raises(ValueError, match="interval='epoch' needs trainer.max_epochs"):
        run(tmp_path, CosineLR(interval="epoch"), max_epochs=-1, name="steps")


def test_resume_inside_a_task_steps_with_the_uninterrupted_rates(tmp_path):
    """Crash in task 1's third epoch (at its step 9), resume from the epoch-end checkpoint: the steps after the
    resume use the rates of the uninterrupted run (the configured rate came back from the optimizer's state, not
    from the decayed one it held), and R is the same."""
    marker = tmp_path / "crashed"
    marker.write_text("never crash")
    reference, ref_rates = run(tmp_path, CosineLR(), CrashAt(1, 9, str(marker), hard=False), name="ref")
    marker.unlink()
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(tmp_path, CosineLR(), CrashAt(1, 9, str(marker), hard=False))
    resumed, rates = run(tmp_path, CosineLR(), CrashAt(1, 9, str(marker), hard=False), resume=True)
    assert rates[1] == pytest.approx(ref_rates[1][8:])  # epoch 2 of task 1 (steps 8-11), rerun from its start
    np.testing.assert_allclose(resumed["R"], reference["R"], rtol=0, atol=1e-6)


def test_coda_prompt_config_uses_the_authors_schedule():
    from cl_lightning.config import compose

    method = compose(["method=coda_prompt"])["method"]
    plugins = method["init_args"]["plugins"]
    assert [p["class_path"] for p in plugins] == ["cl_lightning.callbacks.CosineLR"]
    assert plugins[0]["init_args"] == {"shape": "quarter", "interval": "epoch"}
