"""ImpressLearn: mask basis kinds, bitwise basis freezing, per-layer coefficients, basis-GN, storage."""

from __future__ import annotations

import pytest
import torch

from cl_lightning.callback import ContinualCallback
from cl_lightning.callbacks.mask_basis import MaskBasisFreezing
from cl_lightning.config import compose
from cl_lightning.experiment import build
from cl_lightning.methods.impresslearn import ImpressLearn
from cl_lightning.methods.supsup import mean_entropy
from cl_lightning.nets.masked import MaskedLeNet300100, MaskedMLP
from tests.helpers.run import run_tasks
from tests.helpers.supermask_data import PermutedBlobs, SmallPermutedMNIST


class Snapshots(ContinualCallback):
    """Clones of backbone weights, all scores and all basis masks at the start of every task."""

    def __init__(self):
        super().__init__()
        self.at_start: dict[int, dict[str, torch.Tensor]] = {}

    def on_task_start(self, trainer, module, task_id):
        self.at_start[task_id] = snapshot(module)


def snapshot(module: ImpressLearn) -> dict[str, torch.Tensor]:
    out = {}
    for i, layer in enumerate(module.backbone.masked_layers):
        out[f"w{i}"] = layer.weight.detach().clone()
        for s in range(layer.num_slots):
            out[f"s{i}.{s}"] = layer.scores[s].detach().clone()
            out[f"m{i}.{s}"] = layer.mask(s).detach().clone()
    return out


def bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k].view(torch.uint8) if a[k].is_floating_point() else a[k],
                                                    b[k].view(torch.uint8) if b[k].is_floating_point() else b[k])
                                        for k in a)


def small_model(kind: str, size: int, **kw) -> tuple[ImpressLearn, Snapshots]:
    snaps = Snapshots()
    model = ImpressLearn(backbone=MaskedMLP(hidden_sizes=(48,), density=0.5), basis_kind=kind, basis_size=size,
                         lr=0.05, alpha_lr=0.1, plugins=[snaps, MaskBasisFreezing()], **kw)
    return model, snaps


@pytest.mark.parametrize("kind,size", [("heterogeneous", 2), ("homogeneous", 3), ("random", 3)])
def test_frozen_basis_and_backbone_never_change_bit_for_bit(tmp_path, kind, size):
    torch.manual_seed(0)
    model, snaps = small_model(kind, size, penalty=0.1)
    init = snapshot_after_build(model, PermutedBlobs(num_tasks=4, scenario="task"))
    m = run_tasks(model, PermutedBlobs(num_tasks=4, scenario="task"), tmp_path, max_epochs=2)
    nb = model.num_basis_tasks
    frozen = snaps.at_start[nb] if nb < 4 else None
    final = snapshot(model)
    assert bool(model.basis_frozen)
    assert bitwise_equal(frozen, final)
    for t in range(nb + 1, 4):  # and at every task start in between
        assert bitwise_equal(frozen, snaps.at_start[t])
    assert torch.equal(init["w0"], final["w0"])  # the backbone never trained, not even during the basis tasks
    trained = [s for s in range(size) if not torch.equal(init[f"s0.{s}"], final[f"s0.{s}"])]
    expected = {"heterogeneous": list(range(size)), "homogeneous": list(range(size)), "random": []}[kind]
    assert trained == expected
    if kind == "homogeneous":  # seeds differ, so do the masks learned on the same task
        assert not torch.equal(final["m0.0"], final["m0.1"])
    for a in model.alphas:  # every coefficient task trained its own alpha only
        assert not torch.equal(a.detach(), torch.full_like(a, 1 / size))
        assert a.shape == (size, model.backbone.num_layers)
    assert m["storage"]["bytes_per_task_alpha"] == 4 * size * model.backbone.num_layers


def snapshot_after_build(model: ImpressLearn, dm) -> dict[str, torch.Tensor]:
    model.setup_tasks(dm.info)
    return snapshot(model)


def test_the_freezing_plugin_detects_a_changed_basis(tmp_path):
    torch.manual_seed(0)
    model, _ = small_model("heterogeneous", 2)
    run_tasks(model, PermutedBlobs(num_tasks=3, scenario="task"), tmp_path, max_epochs=1)
    plugin = next(p for p in model.plugins if isinstance(p, MaskBasisFreezing))
    plugin.check(model)  # unchanged: passes
    with torch.no_grad():
        layer = model.backbone.masked_layers[1]
        layer.scores[0].copy_(torch.randn_like(layer.scores[0]))
    with pytest.raises(RuntimeError, match="frozen mask basis changed"):
        plugin.check(model)
    with pytest.raises(RuntimeError, match="basis task"):
        model.prepare_task(0)


def test_alpha_task_without_a_frozen_basis_is_refused():
    model = ImpressLearn(backbone=MaskedMLP(hidden_sizes=(8,)), basis_size=2)
    model.setup_tasks(PermutedBlobs(num_tasks=3).info)
    with pytest.raises(RuntimeError, match="not frozen"):
        model.prepare_task(2)
    with pytest.raises(ValueError, match="basis_kind"):
        ImpressLearn(basis_kind="mixed")
    with pytest.raises(ValueError, match="num_tasks"):
        ImpressLearn(basis_size=5).setup_tasks(PermutedBlobs(num_tasks=3).info)
    with pytest.raises(ValueError, match="class-IL"):
        model = ImpressLearn(task_inference="basis", basis_size=2)
        model.setup_tasks(PermutedBlobs(num_tasks=3, scenario="class").info)


def test_unit_l1_penalty():
    model = ImpressLearn(penalty=2.0, basis_size=3)
    alpha = torch.tensor([[0.5, -1.0], [0.5, 1.0], [0.5, 0.0]])
    # layer 0: |.| sums to 1.5 -> 0.25; layer 1: 2 -> 1
    assert torch.allclose(model.alpha_penalty(alpha), torch.tensor(2.0 * (0.25 + 1.0)))


def test_basis_gn_lowers_the_entropy_on_an_unlabelled_batch(tmp_path):
    torch.manual_seed(0)
    model, _ = small_model("random", 4, task_inference="basis", inference_steps=15)
    dm = PermutedBlobs(num_tasks=2, scenario="domain")
    m = run_tasks(model, dm, tmp_path, max_epochs=1)
    assert len(m["R"]) == 2
    x = dm.split(1, "test").x[:64]
    uniform = torch.full((4, model.backbone.num_layers), 0.25)
    with torch.inference_mode():  # as in Lightning's test loop
        alpha = model.basis_alpha(x)
        assert not alpha.is_inference()
        h_uniform = mean_entropy(model.backbone(x, model.basis_slots, uniform))
        h_fitted = mean_entropy(model.backbone(x, model.basis_slots, alpha))
    assert h_fitted < h_uniform


def test_learned_alpha_is_well_above_chance_where_a_single_mask_is_not(mnist_root, tmp_path):
    torch.manual_seed(0)
    dm = SmallPermutedMNIST(num_tasks=2, data_dir=str(mnist_root), train_samples_per_task=1500, batch_size=64,
                            eval_batch_size=500, scenario="task")
    model = ImpressLearn(backbone=MaskedLeNet300100(), basis_kind="random", basis_size=32, alpha_lr=0.05)
    m = run_tasks(model, dm, tmp_path, max_epochs=3)
    x, y = dm.split(1, "test").x, dm.split(1, "test").y
    x = dm.split(1, "test").transform(x)
    with torch.no_grad():
        single = [(model.backbone(x, [s]).argmax(1) == y).float().mean().item() for s in range(4)]
    assert max(single) < 0.2, single
    assert m["R"][-1][1] > 0.3, m["R"]
    assert m["R"][-1][1] > max(single) + 0.15
    s = m["storage"]
    assert s["bytes_per_task_alpha"] == 4 * 32 * 3 and s["compression_per_task"] > 80


def test_impresslearn_configs_compose_and_build(mnist_root):
    cfg = compose(["method=impresslearn", "benchmark=rotated_mnist", f"data_dir={mnist_root}", "logger=none"])
    model, _ = build(cfg)
    assert isinstance(model, ImpressLearn) and model.basis_kind == "heterogeneous"
    for kind in ("heterogeneous", "homogeneous", "random"):
        cfg = compose([f"experiment=impresslearn_permuted_mnist_{kind}", f"data_dir={mnist_root}", "logger=none"])
        model, dm = build(cfg)
        assert model.basis_kind == kind and model.basis_size == 5 and dm.num_tasks == 10
