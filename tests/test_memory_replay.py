"""The rehearsal memory as a replay source: the generative ``Replay`` plugin with ``source: memory`` replays
stored samples (with their labels) through the same batch, draws and loss it uses for a generator."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cl_lightning.callbacks import RehearsalPlugin
from cl_lightning.callbacks.generative_replay import Replay, ReplaySource
from cl_lightning.config import compose
from cl_lightning.datamodules import SplitMNIST
from cl_lightning.experiment import build
from cl_lightning.methods import ContinualModule
from cl_lightning.nets import MLP
from tests.helpers.run import run_tasks


def filled_memory() -> RehearsalPlugin:
    """A memory of 12 rows: tasks 0 and 1, six each; row i's input is the constant i, its label 100 + i."""
    plugin = RehearsalPlugin(memory_size=12, insertion="task_end", balance="task")
    for task in (0, 1):
        rows = torch.arange(6) + 6 * task
        plugin.memory.set_group("task", {"x": rows.float().view(-1, 1).repeat(1, 3), "y": 100 + rows,
                                         "t": torch.full((6,), task)})
    return plugin


def test_the_memory_replays_stored_rows_of_the_requested_tasks_with_their_labels():
    plugin = filled_memory()
    assert isinstance(plugin, ReplaySource)
    tasks = torch.tensor([0, 0, 0, 1, 1, 1, 1, 1])
    x, y = plugin.sample_replay(tasks, torch.Generator().manual_seed(0), {})
    assert y is not None
    rows = x[:, 0].long()
    assert torch.equal(y, 100 + rows), "each input comes with its own stored label"
    assert torch.equal(plugin.memory.data["t"][rows], tasks), "each draw is a stored row of the requested task"
    again, _ = plugin.sample_replay(tasks, torch.Generator().manual_seed(0), {})
    assert torch.equal(x, again), "the draws depend on the generator only (the same on every rank, after a resume)"
    # a task the (reservoir) memory holds nothing of is replaced by samples of the whole memory
    x, _ = plugin.sample_replay(torch.tensor([7, 7, 7]), torch.Generator().manual_seed(1), {})
    assert len(x) == 3
    with pytest.raises(ValueError, match="memory is empty"):
        RehearsalPlugin(memory_size=4).sample_replay(tasks, torch.Generator(), {})


def test_replay_source_errors_name_the_problem(mnist_root, tmp_path):
    with pytest.raises(ValueError, match="source='memry'"):
        Replay(source="memry")
    model = ContinualModule(MLP(hidden_sizes=[20]), plugins=[Replay(batch_size=8, source="memory")])
    dm = SplitMNIST(data_dir=str(mnist_root), scenario="class", num_tasks=2, train_samples_per_task=64, batch_size=32)
    with pytest.raises(ValueError, match=r"needs exactly one rehearsal plugin .* found none"):
        run_tasks(model, dm, tmp_path / "run")


def test_a_config_selects_the_memory_as_source():
    cfg = compose(["method=finetune", "benchmark=split_mnist", "benchmark.scenario=class",
                   "method.plugins=[{class_path: cl_lightning.callbacks.RehearsalPlugin, init_args: {memory_size: 50,"
                   " insertion: task_end, balance: class}},"
                   " {class_path: cl_lightning.callbacks.generative_replay.Replay,"
                   " init_args: {source: memory, batch_size: 16}}]"])
    model, _ = build(cfg)
    replay = next(p for p in model.plugins if isinstance(p, Replay))
    assert replay.source == "memory" and replay._source(model) is model.plugins[0]


def test_replaying_the_memory_keeps_old_classes_that_finetuning_forgets(mnist_root, tmp_path, one_thread):
    def dm():
        return SplitMNIST(data_dir=str(mnist_root), scenario="class", train_samples_per_task=300, batch_size=50)

    torch.manual_seed(0)
    ft = run_tasks(ContinualModule(MLP(hidden_sizes=[100]), lr=1e-3), dm(), tmp_path / "ft", max_epochs=10)
    torch.manual_seed(0)
    memory = RehearsalPlugin(memory_size=200, insertion="task_end", balance="class")
    replayed = run_tasks(ContinualModule(MLP(hidden_sizes=[100]), lr=1e-3,
                                         plugins=[memory, Replay(batch_size=50, source="memory")]),
                         dm(), tmp_path / "replay", max_epochs=10)
    R_ft, R = np.asarray(ft["R"]), np.asarray(replayed["R"])
    assert R_ft[-1, :-1].max() < 0.2, "fine-tuning overwrites the old classes in class-IL"
    assert np.mean(np.diag(R)) > 0.7, "the tasks are learnt with replay too (not a better score by learning less)"
    assert replayed["ACC"] > ft["ACC"] + 0.25, (replayed["ACC"], ft["ACC"])
    assert R[-1, 0] > 0.4, "the first task survives four later tasks"
