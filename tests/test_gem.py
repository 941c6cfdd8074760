"""GEM and A-GEM: the dual quadratic program against brute force, the projections' inner products on hand-made
gradients and inside real training, and both against fine-tuning on Permuted-MNIST; beside them, at the same
memory, the gradient-sign filter whose old-task direction is a memory gradient (``reference: memory``)."""

from __future__ import annotations

import itertools

import lightning as L
import pytest
import torch

from cl_lightning.callback import ContinualCallback
from cl_lightning.callbacks import AGEM, GEM, GradientSignFilter
from cl_lightning.callbacks.gem import agem_project, gem_project, solve_nonneg_qp
from cl_lightning.datamodules import PermutedMNIST
from cl_lightning.methods import ContinualModule
from cl_lightning.nets import MLP
from tests.helpers.run import run_tasks


def brute_force_nonneg_qp(Q: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The minimum over every active set: solve on the free variables, keep feasible points, take the best."""
    k, best, best_value = len(b), None, float("inf")
    for r in range(k + 1):
        for free in itertools.combinations(range(k), r):
            u = torch.zeros(k, dtype=torch.float64)
            if free:
                f = list(free)
                u[f] = torch.linalg.solve(Q[f][:, f], -b[f])
            if (u >= -1e-12).all():
                value = float(0.5 * u @ Q @ u + b @ u)
                if value < best_value:
                    best, best_value = u.clamp_min(0), value
    return best


def test_the_dual_solver_matches_brute_force_on_a_batch_of_problems():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(30, 6, 9, generator=g, dtype=torch.float64)
    Q = A @ A.transpose(1, 2) + 1e-3 * torch.eye(6, dtype=torch.float64)
    b = torch.randn(30, 6, generator=g, dtype=torch.float64)
    u = solve_nonneg_qp(Q, b)  # all 30 at once
    for i in range(30):
        torch.testing.assert_close(u[i], brute_force_nonneg_qp(Q[i], b[i]), rtol=1e-7, atol=1e-8)
    mixed = (u > 0).any(-1) & (u == 0).any(-1)
    assert mixed.sum() > 10  # most problems have both active and free constraints


def test_gem_projection_has_non_negative_inner_products_and_is_the_closest():
    g = torch.Generator().manual_seed(1)
    G = torch.randn(5, 40, generator=g, dtype=torch.float64)
    grad = -G.sum(0) + 0.3 * torch.randn(40, generator=g, dtype=torch.float64)  # against every memory gradient
    assert (G @ grad < 0).all()
    new = gem_project(grad, G, margin=0.0, eps=0.0)
    assert (G @ new >= -1e-9).all()
    # the closest feasible vector: no feasible random perturbation of it is closer to the gradient
    for _ in range(200):
        other = new + 0.05 * torch.randn(40, generator=g, dtype=torch.float64)
        if (G @ other >= 0).all():
            assert (other - grad).norm() >= (new - grad).norm() - 1e-12
    assert (G @ gem_project(grad, G, margin=0.5, eps=0.0) >= -1e-9).all()
    # the GEM code's margin bounds the dual variables below: on orthonormal memory gradients g~ = g + max(m, -G g)
    eye = torch.eye(2, dtype=torch.float64)
    torch.testing.assert_close(gem_project(torch.tensor([-0.1, 1.0], dtype=torch.float64), eye, 0.5, 0.0),
                               torch.tensor([0.4, 1.5], dtype=torch.float64))
    torch.testing.assert_close(gem_project(torch.tensor([-0.1, 1.0], dtype=torch.float64), eye, 0.0, 0.0),
                               torch.tensor([0.0, 1.0], dtype=torch.float64))
    untouched = gem_project(G.sum(0), G, margin=0.0, eps=0.0)
    torch.testing.assert_close(untouched, G.sum(0))  # an agreeing gradient is its own projection


def test_agem_projection_removes_only_the_disagreeing_component():
    ref = torch.tensor([1.0, 0.0, 0.0])
    assert agem_project(torch.tensor([0.5, 2.0, 1.0]), ref).tolist() == [0.5, 2.0, 1.0]
    new = agem_project(torch.tensor([-0.5, 2.0, 1.0]), ref)
    assert new.tolist() == [0.0, 2.0, 1.0] and float(new @ ref) == 0.0


@pytest.mark.parametrize("scenario", ["task", "domain"])
def test_gem_task_gradients_are_each_tasks_mean_loss_gradient(scenario):
    from cl_lightning.tasks import BenchmarkInfo, Scenario, Task

    info = BenchmarkInfo("toy", tuple(Task(i, str(i)) for i in range(3)), Scenario.parse(scenario), (1, 4, 4), 3)
    module = ContinualModule(MLP(hidden_sizes=[8]))
    module.setup_tasks(info)
    gem = GEM(10)  # quotas 4 / 3 / 3: the stacked tasks are padded
    g = torch.Generator().manual_seed(0)
    gem.memory.set_group("task", {"x": torch.randn(11, 1, 4, 4, generator=g),
                                  "y": torch.randint(0, 3, (11,), generator=g),
                                  "t": torch.tensor([0] * 4 + [1] * 4 + [2] * 3)})
    names = [n for n, _ in module.named_parameters()]
    G = gem.task_gradients(L.Trainer(accelerator="cpu", logger=False), module, names)
    data = gem.memory.data
    for k in range(3):
        rows = data["t"] == k
        module.zero_grad()
        torch.nn.functional.cross_entropy(module(data["x"][rows], data["t"][rows]), data["y"][rows]).backward()
        torch.testing.assert_close(G[k], torch.cat([p.grad.reshape(-1) for p in module.parameters()]))


class GradientSpy(ContinualCallback):
    """Runs after GEM / A-GEM and checks the gradient the optimizer will use against the memory gradients."""

    def __init__(self, plugin):
        super().__init__()
        self.plugin, self.checked = plugin, 0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        plugin = self.plugin
        if plugin.memory.is_empty:
            return
        params = plugin.trainable(pl_module)
        g = torch.cat([p.grad.reshape(-1) for _, p in params])
        if isinstance(plugin, GEM):
            G = plugin.task_gradients(trainer, pl_module, [n for n, _ in params])  # recomputed independently
            dots = G @ g / (G.norm(dim=1) * g.norm())
        else:
            dots = (plugin.last_reference @ g / (plugin.last_reference.norm() * g.norm())).reshape(1)
        assert float(dots.min()) >= -1e-5, dots
        self.checked += 1


class SignSpy(ContinualCallback):
    """Runs after the gradient-sign filter (Adam: update mode) and checks that every coordinate's step agrees in
    sign with the memory gradient the filter used."""

    def __init__(self, plugin):
        super().__init__()
        self.plugin, self.before, self.checked = plugin, None, 0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.before = [p.detach().clone() for p in pl_module.parameters()] if self.plugin.active else None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.before is None:
            return
        for before, p, ref in zip(self.before, pl_module.parameters(), self.plugin.last_reference, strict=True):
            assert ((before - p.detach()) * ref >= 0).all()  # the descent step never opposes the old tasks' one
        self.checked += 1


def permuted(root):
    return PermutedMNIST(num_tasks=3, data_dir=str(root), train_samples_per_task=2000, batch_size=32)


def mlp(plugins):
    L.seed_everything(0, verbose=False)
    return ContinualModule(MLP(hidden_sizes=[100, 100]), lr=3e-3, plugins=plugins)


@pytest.fixture(scope="module")
def finetune(mnist_root, tmp_path_factory):
    return run_tasks(mlp([]), permuted(mnist_root), tmp_path_factory.mktemp("ft"))


@pytest.mark.parametrize("name", ["gem", "agem", "gradsign_memory"])
def test_projection_methods_forget_less_than_finetune_and_their_steps_agree(mnist_root, tmp_path, finetune, name):
    if name == "gradsign_memory":
        plugin = GradientSignFilter(reference="memory", memory_size=300, memory_batch_size=64)
        spy = SignSpy(plugin)
    else:
        plugin = GEM(300, eps=0.0) if name == "gem" else AGEM(300, batch_size=64)
        spy = GradientSpy(plugin)
    got = run_tasks(mlp([plugin, spy]), permuted(mnist_root), tmp_path)
    assert spy.checked == 2 * 63  # every step of tasks 1 and 2 (2000 / 32 steps each)
    if name == "gradsign_memory":
        assert 0.3 < plugin.kept_fraction < 0.95  # it filtered, and not everything
        copy = GradientSignFilter(reference="memory", memory_size=300, memory_batch_size=64)
        copy.load_state_dict(plugin.state_dict())  # the memory travels in the checkpoint
        assert torch.equal(copy.rehearsal.memory.data["x"], plugin.rehearsal.memory.data["x"])
        plugin = plugin.rehearsal  # for the memory checks below
    else:
        assert 0 < plugin.projections < plugin.steps  # projected where the gradient disagreed, only there
    assert finetune["BWT"] < -0.08, "fine-tuning forgets at this learning rate"
    assert got["BWT"] > finetune["BWT"] + 0.04
    assert got["ACC"] > finetune["ACC"] + 0.025
    # the memory holds its budget split equally between the tasks
    assert torch.bincount(plugin.memory.data["t"]).tolist() == [100, 100, 100]
    assert got["storage"][f"plugin_{type(spy.plugin).__name__}"] == 300 * (784 + 2)


def test_invalid_reference_names_the_key():
    with pytest.raises(ValueError, match="reference='memo'"):
        GradientSignFilter(reference="memo")
