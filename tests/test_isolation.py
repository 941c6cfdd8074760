"""Parameter isolation: HAT (unit masks from task embeddings, gradients of old units masked) and PackNet (weights
pruned and frozen per task). Each is checked on its mechanism (old outputs unchanged, masked gradients zero,
frozen weights bitwise, exact pruning) and against fine-tuning on the same small task-IL Permuted-MNIST (ACC and
BWT); a run killed inside a task resumes to the same R; HAT and PackNet on 2 DDP processes match 1 process."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from cl_lightning.callback import ContinualCallback
from cl_lightning.callbacks.hat import HardAttention
from cl_lightning.callbacks.packnet import FREE, PackNetPruning
from cl_lightning.methods import HAT, ContinualModule, PackNet
from cl_lightning.nets import MLP
from cl_lightning.nets.hat import HATMLP, annealed_temperature
from tests.helpers.crash import CrashAt
from tests.helpers.run import run_tasks, train_py
from tests.helpers.supermask_data import PermutedBlobs, SmallPermutedMNIST

pytestmark = pytest.mark.usefixtures("one_thread")

TASKS, EPOCHS, HIDDEN = 5, 6, [64, 64]


def data() -> PermutedBlobs:
    """Permuted-MNIST-like: 5 tasks, each its own permutation of the same 4 Gaussian classes in 32 dimensions,
    512 training samples per task (16 steps per epoch), a head per task."""
    return PermutedBlobs(num_tasks=TASKS, classes=4, dim=32, samples=512, spread=0.6, scenario="task", batch_size=32)


def finetune(out: Path, optimizer: str, lr: float, momentum: float = 0.0) -> dict:
    L.seed_everything(0, verbose=False)
    model = ContinualModule(MLP(hidden_sizes=HIDDEN), lr=lr, optimizer=optimizer, momentum=momentum)
    return run_tasks(model, data(), out, max_epochs=EPOCHS)


class HATProbe(ContinualCallback):
    """Listed after ``HardAttention``: records task 0's outputs on fixed inputs when task 1 starts and ends, and
    checks every masked gradient of task 1's steps."""

    def __init__(self, x: torch.Tensor):
        super().__init__()
        self.x, self.outputs, self.checked, self.free_grads = x, [], 0, 0.0

    def old_outputs(self, module) -> torch.Tensor:
        module.eval()
        with torch.no_grad():
            out = module(self.x, torch.zeros(len(self.x), dtype=torch.long)).clone()
        module.train()
        return out

    def on_task_start(self, trainer, module, task_id):
        if task_id == 1:
            self.outputs.append(self.old_outputs(module))

    def on_task_end(self, trainer, module, task_id):
        if task_id == 1:
            self.outputs.append(self.old_outputs(module))

    def on_before_optimizer_step(self, trainer, module, optimizer):
        hat = next(p for p in module.plugins if isinstance(p, HardAttention))
        if module.current_task == 0:
            assert hat.cumulative is None
            return
        cum = hat.cumulative
        for i, layer in enumerate(module.gated_layers):
            post = (cum[i] == 1).unsqueeze(1)
            used = (post if i == 0 else post & (cum[i - 1] == 1).unsqueeze(0)).expand_as(layer.weight)
            assert used.any()
            assert torch.count_nonzero(layer.weight.grad[used]) == 0, "a weight between two old units moved"
            assert torch.count_nonzero(layer.bias.grad[cum[i] == 1]) == 0
            self.free_grads += float(layer.weight.grad[~used].abs().sum())
        for emb in module.task_embeddings:  # only the current task's embedding learns
            others = torch.ones(len(emb), dtype=torch.bool)
            others[module.current_task] = False
            assert torch.count_nonzero(emb.grad[others]) == 0
        self.checked += 1


def test_annealing_runs_from_one_over_s_max_to_s_max():
    assert annealed_temperature(0, 10, 400.0) == pytest.approx(1 / 400)
    assert annealed_temperature(9, 10, 400.0) == 400.0
    assert annealed_temperature(0, 1, 400.0) == 400.0
    s = [annealed_temperature(b, 7, 50.0) for b in range(7)]
    assert np.allclose(np.diff(s), np.diff(s)[0])  # linear in the batch index


def test_hat_masks_old_units_keeps_old_outputs_and_beats_finetuning(tmp_path):
    dm = data()
    dm.setup()
    x = next(iter(dm.test_dataloader()[0]))[0]
    L.seed_everything(0, verbose=False)
    probe = HATProbe(x)
    hat = HardAttention()
    model = HAT(HATMLP(hidden_sizes=HIDDEN), lr=0.05, momentum=0.9, plugins=[hat, probe])
    run = run_tasks(model, data(), tmp_path / "hat", max_epochs=EPOCHS)
    assert probe.checked > 0 and probe.free_grads > 0  # task 1's steps were checked; free units still learn

    # task 0's gates at s_max are saturated: (almost) all exactly 0 or 1, so its function cannot move
    g0 = torch.cat(model.gates(0))
    assert ((g0 == 0) | (g0 == 1) | (g0 < 1e-6)).float().mean() > 0.97, g0
    before, after = probe.outputs
    assert (before - after).abs().max() < 1e-3 * before.abs().max(), (before - after).abs().max()
    assert (before.argmax(1) == after.argmax(1)).all()
    # the cumulative mask holds what the tasks used, and the regulariser kept free units for later tasks
    assert all(((c >= 0) & (c <= 1)).all() for c in hat.cumulative)
    assert float(torch.cat(hat.cumulative).mean()) < 0.95

    ft = finetune(tmp_path / "ft", "sgd", 0.05, momentum=0.9)
    assert ft["BWT"] < -0.05, ft["R"]  # fine-tuning forgets, so the comparison means something
    assert run["ACC"] > 0.8, run["R"]  # chance is 0.25
    assert run["BWT"] > ft["BWT"] + 0.04, (run["R"], ft["R"])
    assert run["BWT"] > -0.01, run["R"]
    assert run["ACC"] > ft["ACC"] + 0.02, (run["ACC"], ft["ACC"])


class Snapshots(ContinualCallback):
    """Listed after ``PackNetPruning``: the parameters and owners at the end of every task (after its pruning)."""

    def __init__(self):
        super().__init__()
        self.params, self.owners = [], []

    def on_task_start(self, trainer, module, task_id):
        if task_id == 0:
            self.start = {n: p.detach().clone() for n, p in module.named_parameters()}

    def on_task_end(self, trainer, module, task_id):
        self.params.append({n: p.detach().clone() for n, p in module.named_parameters()})
        self.owners.append({n: o.clone() for n, _, o in module.prunable()})


def test_packnet_freezes_each_task_bitwise_prunes_exactly_and_beats_finetuning(tmp_path):
    L.seed_everything(0, verbose=False)
    snaps, pruning = Snapshots(), PackNetPruning(prune_fraction=0.5, retrain_fraction=0.5)
    model = PackNet(MLP(hidden_sizes=HIDDEN), lr=3e-3, plugins=[pruning, snaps])
    run = run_tasks(model, data(), tmp_path / "packnet", max_epochs=EPOCHS)
    final = dict(model.named_parameters())
    k = model.info.outputs_per_task
    for t in range(TASKS):
        for name, owners in snaps.owners[t].items():
            w_t, w_end = snaps.params[t][f"backbone.{name}"], final[f"backbone.{name}"]
            kept = owners <= t
            # weights of tasks <= t: bitwise the same at the end of the run
            assert torch.equal(w_t[kept], w_end[kept]), (t, name)
            # exact pruning: task t kept n - round(n/2) of the n weights it trained, per layer
            trained = (snaps.owners[t - 1][name] == FREE) if t else torch.ones_like(owners, dtype=torch.bool)
            n = int(trained.sum())
            assert int((owners == t).sum()) == n - round(0.5 * n), (t, name)
            assert ((owners == t) | (owners == FREE))[trained].all()  # trained weights: kept or freed
            assert (w_t[owners == FREE] == 0).all()  # freed weights are zero
            if t:  # task t changed only what it trained (disjoint from every earlier task's weights)
                before = snaps.params[t - 1][f"backbone.{name}"]
                assert torch.equal(before[~trained], w_t[~trained])
                assert (before[trained] != w_t[trained]).any()
        rows = slice(t * k, (t + 1) * k)  # its head never changes after its task
        assert torch.equal(snaps.params[t]["head.weight"][rows], final["head.weight"][rows])
    for name in ("backbone.layers.1.bias", "backbone.layers.3.bias"):  # biases: trained in task 0, then shared
        assert not torch.equal(snaps.start[name], snaps.params[0][name])
        assert torch.equal(snaps.params[0][name], final[name])
    assert pruning.freed[0] > 0 and set(pruning.freed) == set(range(TASKS))

    R = np.asarray(run["R"])
    for j in range(TASKS):  # a frozen task scores the same for ever: BWT exactly 0
        assert np.all(R[j:, j] == R[j, j]), R
    ft = finetune(tmp_path / "ft", "adam", 3e-3)
    assert ft["BWT"] < -0.03, ft["R"]
    assert run["ACC"] > 0.8, R
    assert run["BWT"] > ft["BWT"] + 0.03 and run["ACC"] > ft["ACC"] + 0.005, (R, ft["R"])


def test_packnet_equal_shares_leave_each_task_one_over_t():
    p = PackNetPruning(prune_fraction="equal")
    kept, free = [], 1.0
    for t in range(4):
        kept.append(free * (1 - p.fraction_for(t, 4)))
        free -= kept[-1]
    assert np.allclose(kept, 0.25) and p.fraction_for(3, 4) == 0.0
    with pytest.raises(ValueError, match="prune_fraction"):
        PackNetPruning(prune_fraction="half")
    with pytest.raises(ValueError, match="weight_decay"):
        PackNet(weight_decay=1e-4)
    with pytest.raises(ValueError, match="weight_decay"):
        HAT(weight_decay=1e-4)


@pytest.mark.parametrize("method", ["packnet", "hat"])
def test_resume_inside_a_task_equals_the_uninterrupted_run(mnist_root, tmp_path, method):
    def make(marker):
        L.seed_everything(0, verbose=False)
        crash = CrashAt(1, 7, str(marker), hard=False)  # task 1, second epoch (5 steps each), after the pruning
        if method == "packnet":
            model = PackNet(MLP(hidden_sizes=[64]), lr=1e-3, plugins=[PackNetPruning(), crash])
        else:
            model = HAT(HATMLP(hidden_sizes=[64]), lr=0.05, plugins=[HardAttention(), crash])
        return model, SmallPermutedMNIST(data_dir=str(mnist_root), num_tasks=2, scenario="task",
                                         train_samples_per_task=300, batch_size=64)

    marker = tmp_path / "crashed"
    marker.write_text("never crash")
    reference_model, dm = make(marker)
    reference = run_tasks(reference_model, dm, tmp_path / "ref", max_epochs=2)
    marker.unlink()
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_tasks(*make(marker), tmp_path / "run", max_epochs=2)
    model, dm = make(marker)
    resumed = run_tasks(model, dm, tmp_path / "run", resume=True, max_epochs=2)
    np.testing.assert_allclose(resumed["R"], reference["R"], rtol=0, atol=1e-6)
    ref_state, state = reference_model.state_dict(), model.state_dict()
    assert ref_state.keys() == state.keys()
    for name, value in ref_state.items():
        torch.testing.assert_close(state[name], value, rtol=0, atol=1e-6, msg=name)
    if method == "hat":
        ref_cum = next(p for p in reference_model.plugins if isinstance(p, HardAttention)).cumulative
        cum = next(p for p in model.plugins if isinstance(p, HardAttention)).cumulative
        for a, b in zip(ref_cum, cum, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_packnet_ddp_two_cpu_processes_match_one(mnist_root, tmp_path):
    args = ["method=packnet", "benchmark=permuted_mnist", "benchmark.scenario=task"]
    one = train_py([*args, "trainer.devices=1"], tmp_path / "one", mnist_root, threads=1)
    two = train_py([*args, "trainer.strategy=ddp", "trainer.devices=2"], tmp_path / "two", mnist_root)
    R1, R2 = torch.tensor(one["R"]), torch.tensor(two["R"])
    assert R1.shape == (2, 2) and (R1.diag() > 0.3).all(), R1  # 8 steps per task; chance is 0.1
    assert torch.allclose(R1, R2, atol=0.02), (R1, R2)
    assert R2[1, 0] == R2[0, 0]  # task 0 frozen on 2 processes too
    states = [torch.load(tmp_path / run / "checkpoints" / "after_task_1.ckpt", weights_only=False)["state_dict"]
              for run in ("one", "two")]
    for name, value in states[0].items():  # owners: float noise may flip a weight at the pruning threshold
        if name.startswith("owners__"):
            assert (states[1][name] != value).float().mean() < 0.01, name


def test_hat_ddp_two_cpu_processes_match_one(mnist_root, tmp_path):
    """HAT's gradient gating, compensation and clamp act on the all-reduced gradients: 2 processes give 1's R."""
    args = ["method=hat", "benchmark=split_mnist", "benchmark.scenario=task", "trainer.max_epochs=3", "method.lr=0.2"]
    one = train_py([*args, "trainer.devices=1"], tmp_path / "one", mnist_root, threads=1)
    two = train_py([*args, "trainer.strategy=ddp", "trainer.devices=2"], tmp_path / "two", mnist_root)
    R1, R2 = torch.tensor(one["R"]), torch.tensor(two["R"])
    assert R1.shape == (2, 2) and (R1.diag() > 0.5).all(), R1  # 24 steps on 5 digits a task; chance is 0.2
    assert torch.allclose(R1, R2, atol=0.02), (R1, R2)
    assert R2[1, 0] == R2[0, 0]  # task 0's units are protected on 2 processes too
