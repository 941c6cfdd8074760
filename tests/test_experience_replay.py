"""Replay and distillation baselines on real MNIST against fine-tuning on the same data: ER, DER, DER++ and
ER-ACE in class-IL, LwF in task-IL; DER's stored outputs are the network's at insertion; a run killed inside
a task with a full memory resumes to the same R."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch

from cl_lightning.callback import ContinualCallback
from cl_lightning.callbacks import DarkExperienceReplay, ExperienceReplay, LwF
from cl_lightning.datamodules import SplitMNIST
from cl_lightning.methods import ERACE, ContinualModule
from cl_lightning.nets import MLP
from tests.helpers.crash import CrashAt
from tests.helpers.run import run_tasks


def split_mnist(root, scenario="class", n=2000, tasks=5):
    return SplitMNIST(data_dir=str(root), num_tasks=tasks, scenario=scenario, train_samples_per_task=n,
                      batch_size=32)


def mlp(plugins=(), cls=ContinualModule, lr=1e-3):
    L.seed_everything(0, verbose=False)
    return cls(MLP(hidden_sizes=[100, 100]), lr=lr, plugins=list(plugins))


@pytest.fixture(scope="module")
def finetune_class_il(mnist_root, tmp_path_factory):
    return run_tasks(mlp(), split_mnist(mnist_root), tmp_path_factory.mktemp("ft"))


class InsertionSpy(ContinualCallback):
    """After DER has written its step's rows, checks each newly written row against the network right now."""

    def __init__(self, der):
        super().__init__()
        self.der, self.before, self.checked = der, None, 0

    @torch.no_grad()
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        data = self.der.memory.data
        changed = torch.ones(len(data["y"]), dtype=torch.bool)
        if self.before is not None:
            n = len(self.before)
            changed[:n] = (data["x"][:n] != self.before).flatten(1).any(1)
        if changed.any():
            pl_module.eval()
            now = pl_module(data["x"][changed], data["t"][changed])
            pl_module.train()
            torch.testing.assert_close(data["logits"][changed], now, rtol=1e-5, atol=1e-5)
            self.checked += int(changed.sum())
        self.before = data["x"].clone()


@pytest.mark.parametrize("name", ["er", "der", "derpp", "er_ace"])
def test_replay_methods_beat_finetune_in_class_il(mnist_root, tmp_path, finetune_class_il, name):
    plugin = {"er": ExperienceReplay(200, 32), "er_ace": ExperienceReplay(200, 32),
              "der": DarkExperienceReplay(200, 32, alpha=0.3),
              "derpp": DarkExperienceReplay(200, 32, alpha=0.3, beta=0.5)}[name]
    spies = [InsertionSpy(plugin)] if name.startswith("der") else []
    model = mlp([plugin, *spies], ERACE if name == "er_ace" else ContinualModule)
    got = run_tasks(model, split_mnist(mnist_root), tmp_path)
    ft = finetune_class_il
    assert ft["ACC"] < 0.25 and ft["BWT"] < -0.8, "fine-tuning overwrites old classes"
    assert got["ACC"] > ft["ACC"] + 0.25
    assert got["BWT"] > ft["BWT"] + 0.15
    assert np.mean(np.diag(got["R"])) > 0.6 or name == "er_ace", "new tasks are still learnt"
    # the memory: exactly its budget, a reservoir of the stream (every task represented), counted in metrics
    mem = plugin.memory
    assert len(mem) == 200 and mem.seen == 5 * 2000
    assert (torch.bincount(mem.data["t"], minlength=5) > 15).all()
    per_row = 784 + 2 + (10 if name.startswith("der") else 0)
    assert got["storage"][f"plugin_{type(plugin).__name__}"] == 200 * per_row
    if spies:
        assert spies[0].checked >= 200  # every insertion (the first 200 and the replacements) was checked
        with torch.no_grad():  # ... and rows are not refreshed later: old ones differ from the final network
            final = model.eval()(mem.data["x"], mem.data["t"])
        assert (final - mem.data["logits"]).abs().amax(1).max() > 1.0


def test_lwf_forgets_less_than_finetune_in_task_il(mnist_root, tmp_path):
    ft = run_tasks(mlp(lr=3e-3), split_mnist(mnist_root, "task"), tmp_path / "ft")
    lwf = LwF(strength=1.0, temperature=2.0)
    got = run_tasks(mlp([lwf], lr=3e-3), split_mnist(mnist_root, "task"), tmp_path / "lwf")
    assert ft["BWT"] < -0.03
    assert got["BWT"] > ft["BWT"] + 0.02 and got["ACC"] > ft["ACC"] + 0.015
    assert got["storage"]["plugin_LwF"] == got["storage"]["model_parameters"]  # one snapshot, no samples


def test_resume_with_a_full_memory_matches_an_uninterrupted_run(mnist_root, tmp_path):
    def make(marker):
        der = DarkExperienceReplay(100, 32, alpha=0.3, beta=0.5)
        model = mlp([der, CrashAt(1, 40, str(marker), hard=False)])
        return model, split_mnist(mnist_root, n=800, tasks=2), der

    marker = tmp_path / "crashed"
    marker.write_text("never crash")
    model, dm, ref_der = make(marker)
    reference = run_tasks(model, dm, tmp_path / "ref", max_epochs=2)
    marker.unlink()  # crash in the second epoch of task 1 (25 steps per epoch): memory full, mid-task ckpt
    model, dm, _ = make(marker)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_tasks(model, dm, tmp_path / "run", max_epochs=2)
    model, dm, der = make(marker)
    resumed = run_tasks(model, dm, tmp_path / "run", resume=True, max_epochs=2)
    np.testing.assert_allclose(resumed["R"], reference["R"], rtol=0, atol=1e-6)
    for key in ("x", "y", "t", "logits"):
        torch.testing.assert_close(der.memory.data[key], ref_der.memory.data[key], rtol=0, atol=1e-6)


@pytest.mark.parametrize("plugin", [ExperienceReplay(10), LwF()], ids=["er", "lwf"])
def test_classification_plugins_reject_a_regression_benchmark(tmp_path, plugin):
    from cl_lightning.datamodules.poly_regression import PolynomialRegression

    with pytest.raises(ValueError, match="classification benchmark, not poly_regression"):
        run_tasks(ContinualModule(MLP(hidden_sizes=[8]), plugins=[plugin]), PolynomialRegression(num_tasks=2),
                  tmp_path)


def test_invalid_arguments_name_the_key():
    with pytest.raises(ValueError, match="insertion='stream'"):
        ExperienceReplay(10, insertion="stream")
    with pytest.raises(ValueError, match="alpha=-1"):
        DarkExperienceReplay(10, alpha=-1)
    with pytest.raises(ValueError, match="temperature=0"):
        LwF(temperature=0)


def test_er_ace_masks_only_the_old_classes_absent_from_the_incoming_batch():
    from cl_lightning.tasks import BenchmarkInfo, Scenario, Task

    info = BenchmarkInfo("toy", (Task(0, "a", (0, 1)), Task(1, "b", (2, 3))), Scenario.CLASS_IL, (1, 2, 2), 2)
    module = ERACE(MLP(hidden_sizes=[4]))
    module.setup_tasks(info)
    x, t = torch.randn(6, 1, 2, 2), torch.zeros(6, dtype=torch.long)
    module.task_loss((x, torch.tensor([0, 1, 0, 1, 0, 1]), t))  # task 0: classes 0 and 1 are now seen
    module.current_task = 1
    module.zero_grad()
    module.task_loss((x, torch.tensor([2, 2, 3, 2, 3, 2]), t + 1)).value.backward()
    bias = module.head.bias.grad
    assert bias[:2].abs().max() == 0 and bias[2:].abs().min() > 0  # old classes untouched, new ones trained
    module.zero_grad()
    module.task_loss((x, torch.tensor([0, 2, 3, 2, 3, 2]), t + 1)).value.backward()
    assert module.head.bias.grad[0] != 0 and module.head.bias.grad[1] == 0  # class 0 is present: it competes


@pytest.mark.parametrize("name", ["er", "der", "derpp", "er_ace", "gem", "agem", "lwf", "icarl", "gdumb",
                                  "gradsign_memory"])
def test_every_baseline_config_builds_its_method(name):
    from cl_lightning.experiment import build, resolve_config

    scenario = "class" if name in ("er_ace", "icarl") else "domain"
    model, dm = build(resolve_config([f"method={name}", "benchmark=split_mnist", f"benchmark.scenario={scenario}"]))
    assert model.plugins and dm.scenario.value == scenario
    model.setup_tasks(dm.info)  # the declared scenarios accept it
