"""SupSup: edge-popup masks over a frozen backbone, GG/GN task inference, storage accounting."""

from __future__ import annotations

import math

import pytest
import torch

from cl_lightning.config import compose
from cl_lightning.experiment import build
from cl_lightning.methods.base import ContinualModule
from cl_lightning.methods.supsup import SupSup, mask_bytes
from cl_lightning.nets import MLP
from cl_lightning.nets.masked import EdgePopup, MaskedConv2d, MaskedLeNet300100, MaskedLinear, MaskedMLP
from tests.helpers.run import run_tasks
from tests.helpers.supermask_data import PermutedBlobs, SmallPermutedMNIST


# ------------------------------------------------------------------------------------------ layers
@pytest.mark.parametrize("density", [0.1, 1 / 3, 0.5, 0.9])
def test_edge_popup_keeps_exactly_the_density_per_layer(density):
    net = MaskedMLP(hidden_sizes=(37, 23), density=density)
    net.set_io(50, 7, num_slots=3)
    conv = MaskedConv2d(3, 5, 3, num_slots=2, density=density)
    for layer in [*net.masked_layers, conv]:
        n = layer.weight.numel()
        for slot in range(layer.num_slots):
            m = layer.mask(slot)
            assert set(m.unique().tolist()) <= {0.0, 1.0}
            assert int(m.sum()) == layer.k == max(1, round(density * n))
            # the kept connections are exactly those with the largest |score|
            s = layer.scores[slot].detach().abs().flatten()
            assert s[m.flatten().bool()].min() >= s[~m.flatten().bool()].max()


def test_gradients_reach_the_scores_and_not_the_frozen_weights():
    layer = MaskedLinear(20, 10, num_slots=3, density=0.5)
    for slot, p in enumerate(layer.scores):
        p.requires_grad_(slot == 1)
    x = torch.randn(8, 20)
    layer(x, [1]).pow(2).sum().backward()
    assert layer.weight.grad is None and not layer.weight.requires_grad
    assert layer.scores[0].grad is None and layer.scores[2].grad is None
    g = layer.scores[1].grad
    assert g is not None and g.abs().sum() > 0
    # straight-through: d/dscores = d/dmask * sign(scores), also on connections the mask dropped
    dropped = layer.mask(1).detach() == 0
    assert g[dropped].abs().sum() > 0
    scores = torch.randn(4, 5, requires_grad=True)
    EdgePopup.apply(scores, 7).mul(torch.arange(20.0).view(4, 5)).sum().backward()
    assert torch.equal(scores.grad, torch.arange(20.0).view(4, 5))


def test_superposition_is_one_batched_combination():
    net = MaskedMLP(hidden_sizes=(16,), density=0.4)
    net.set_io(12, 5, num_slots=4)
    x = torch.randn(6, 12)
    coeffs = torch.rand(4, net.num_layers)
    layer = net.masked_layers[0]
    loop = sum(coeffs[m, 0] * layer.mask(m) for m in range(4)) * layer.weight
    assert torch.allclose(layer.effective_weight(range(4), coeffs[:, 0]), loop)
    # one-hot coefficients are the single mask
    onehot = torch.zeros(4, net.num_layers)
    onehot[2] = 1.0
    assert torch.allclose(net(x, range(4), onehot), net(x, [2]), atol=1e-6)
    # forward_each: M masked copies at once == each mask alone
    xs = torch.randn(4, 6, 12)
    each = net.forward_each(xs, range(4))
    for m in range(4):
        assert torch.allclose(each[m], net(xs[m], [m]), atol=1e-5)
    conv = MaskedConv2d(2, 3, 3, padding=1, num_slots=2)
    xs = torch.randn(2, 4, 2, 6, 6)
    out = conv.forward_each(xs, [0, 1])
    assert torch.allclose(out[1], conv(xs[1], [1]), atol=1e-5)


def test_cached_masks_follow_the_scores():
    layer = MaskedLinear(10, 4, num_slots=2, density=0.5)
    for p in layer.scores:
        p.requires_grad_(False)
    before = layer.mask(0).clone()
    assert layer.mask(0) is layer.mask(0)  # cached
    layer.load_state_dict({**layer.state_dict(), "scores.0": torch.randn(4, 10)})
    after = layer.mask(0)
    assert not torch.equal(before, after)
    assert int(after.sum()) == layer.k


def test_backbone_init_kinds_and_seeds():
    a, b = MaskedLeNet300100(init="signed_constant"), MaskedLeNet300100(init="kaiming_normal", weight_seed=1)
    a.set_io(784, 10, 1)
    b.set_io(784, 10, 1)
    w = a.masked_layers[0].weight
    assert torch.allclose(w.abs(), torch.full_like(w, math.sqrt(2 / 784)))
    assert b.masked_layers[0].weight.abs().std() > 0
    c = MaskedLeNet300100()
    c.set_io(784, 10, 1)
    assert torch.equal(c.masked_layers[0].weight, w)  # the backbone depends on its seed only
    with pytest.raises(ValueError, match="density"):
        MaskedLeNet300100(density=0.0)
    with pytest.raises(ValueError, match="init"):
        MaskedMLP(init="xavier")


def test_storage_bytes_as_bitmap_and_index_list():
    b = mask_bytes([235200, 30000, 1000], [117600, 15000, 500])
    assert b["bitmap"] == 29400 + 3750 + 125
    assert b["indices_int32"] == 4 * (117600 + 15000 + 500)
    assert b["indices_min"] == 3 * 117600 + 2 * 15000 + 2 * 500


# ------------------------------------------------------------------------------------------ method
def test_gg_task_il_trains_one_mask_per_task_and_never_forgets(tmp_path):
    torch.manual_seed(0)
    dm = PermutedBlobs(num_tasks=3, scenario="task")
    model = SupSup(backbone=MaskedMLP(hidden_sizes=(64,), density=0.5), lr=0.05)
    m = run_tasks(model, dm, tmp_path, max_epochs=3)
    R = torch.tensor(m["R"])
    assert model.inference == "given"
    assert (R.diag() > 0.9).all(), R
    assert torch.equal(R[-1], R.diag()), R  # later tasks never change an earlier task's mask
    assert m["BWT"] == 0.0
    assert m["storage"]["stored_masks"] == 3


def test_class_il_places_logits_in_the_inferred_task_block(tmp_path):
    torch.manual_seed(0)
    dm = PermutedBlobs(num_tasks=3, scenario="class")
    model = SupSup(backbone=MaskedMLP(hidden_sizes=(64,), density=0.5), lr=0.05)
    m = run_tasks(model, dm, tmp_path, max_epochs=3)
    assert model.inference == "oneshot"
    x = dm.split(1, "test").x[:16]
    out = model(x, torch.full((16,), 1))
    assert out.shape == (16, 12)
    assert torch.isinf(out[:, :4]).all() and torch.isinf(out[:, 8:]).all() and torch.isfinite(out[:, 4:8]).all()
    # one-shot inference is recorded per test batch; on this toy it is right for most batches (chance: 1/3),
    # and where it is right the task's own block classifies well
    inferred = model.last_task_inference
    assert sum(inferred) / 3 > 0.6, inferred
    assert all(acc > 0.85 for acc, hit in zip(m["R"][-1], inferred, strict=True) if hit == 1.0), (m["R"], inferred)
    with pytest.raises(ValueError, match="class-IL"):
        SupSup(task_inference="given").setup_tasks(dm.info)


@pytest.fixture(scope="module")
def permuted_run(mnist_root, tmp_path_factory):
    """SupSup GN (domain-IL, no id at test) and fine-tuning on 3 small Permuted-MNIST tasks."""
    def dm():
        return SmallPermutedMNIST(num_tasks=3, data_dir=str(mnist_root), train_samples_per_task=1500, batch_size=64,
                                  eval_batch_size=250)

    torch.manual_seed(0)
    model = SupSup(backbone=MaskedLeNet300100(), lr=0.01)
    m = run_tasks(model, dm(), tmp_path_factory.mktemp("supsup"), max_epochs=2)
    torch.manual_seed(0)
    lenet = MLP(hidden_sizes=(300, 100))  # LeNet-300-100, unmasked
    ft = run_tasks(ContinualModule(backbone=lenet), dm(), tmp_path_factory.mktemp("ft"), max_epochs=2)
    return model, m, ft, dm()


def test_gn_one_shot_picks_the_correct_task(permuted_run):
    model, m, ft, _ = permuted_run
    assert model.inference == "oneshot"
    assert min(model.last_task_inference) >= 0.9, model.last_task_inference
    R = torch.tensor(m["R"])
    # every task is scored with its own mask after the last task: the last row is the diagonal, well learnt
    assert torch.equal(R[-1], R.diag()) and (R[-1] > 0.7).all(), R
    # a mask evaluated on a task it was not trained for is near chance (after task 0 only mask 0 exists)
    assert (R[0, 1:] < 0.2).all(), R
    # compared with fine-tuning, which forgets the earlier permutations
    assert m["BWT"] > -0.02 and ft["BWT"] < m["BWT"] - 0.05, (m["BWT"], ft["BWT"])


def test_binary_search_agrees_with_one_shot(permuted_run):
    model, _, _, dm = permuted_run
    dm.setup()
    for t in range(3):
        x = dm.split(t, "test").x[:256]
        x = dm.split(t, "test").transform(x)
        with torch.inference_mode():
            assert model.infer_task(x, "oneshot") == t
            assert model.infer_task(x, "binary") == t


def test_supsup_configs_compose_and_build(mnist_root):
    for overrides in (["method=supsup", "benchmark=permuted_mnist"],
                      ["method=supsup", "benchmark=split_mnist", "benchmark.scenario=class"]):
        cfg = compose([*overrides, f"data_dir={mnist_root}", "logger=none"])
        model, dm = build(cfg)
        assert isinstance(model, SupSup)
        assert model.inference == "oneshot"
    cfg = compose(["experiment=supsup_permuted_mnist_gg", f"data_dir={mnist_root}", "logger=none"])
    model, dm = build(cfg)
    assert model.inference == "given" and dm.num_tasks == 10
    model, dm = build(compose(["experiment=supsup_permuted_mnist_gn", f"data_dir={mnist_root}", "logger=none"]))
    model.setup_tasks(dm.info)
    assert model.inference == "oneshot" and model.inference_objective == "superfluous"
    assert model.backbone.layers[-1].out_features == 100


def test_gn_inference_also_runs_with_trainer_inference_mode_off(tmp_path):
    torch.manual_seed(0)
    model = SupSup(backbone=MaskedMLP(hidden_sizes=(32,), density=0.5), lr=0.05, task_inference="binary")
    m = run_tasks(model, PermutedBlobs(num_tasks=3, scenario="domain"), tmp_path, max_epochs=1,
                  inference_mode=False)
    assert model.last_task_inference is not None and len(model.last_task_inference) == 3
    assert len(m["R"]) == 3
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


# ------------------------------------------------------------------------------------------ superfluous neurons
def test_superfluous_neurons_widen_the_output_but_not_the_prediction(tmp_path):
    torch.manual_seed(0)
    dm = PermutedBlobs(num_tasks=2, scenario="domain")
    model = SupSup(backbone=MaskedMLP(hidden_sizes=(32,), density=0.5), lr=0.05, output_neurons=12)
    m = run_tasks(model, dm, tmp_path, max_epochs=2)
    assert model.backbone.layers[-1].out_features == 12
    x = dm.split(0, "test").x[:8]
    assert model.all_outputs(x, 0).shape == (8, 12)
    assert model(x, torch.zeros(8, dtype=torch.long)).shape == (8, 4)  # the task's 4 classes only
    assert min(m["R"][-1]) > 0.8, m["R"]
    # the extra outputs are never a label: training pushes them below the real classes
    with torch.no_grad():
        out = model.all_outputs(dm.split(0, "test").x, 0)
    assert out[:, 4:].max(1).values.mean() < out[:, :4].max(1).values.mean() - 1.0


def test_the_superfluous_objective_sends_gradient_only_through_the_extra_outputs():
    from cl_lightning.methods.supsup import mean_entropy, superfluous_objective

    logits = torch.randn(5, 12, requires_grad=True)
    (g,) = torch.autograd.grad(superfluous_objective(logits, 4), logits)
    assert torch.equal(g[:, :4], torch.zeros(5, 4)) and (g[:, 4:] != 0).all()
    # its value is the full log-sum-exp, and the entropy objective differentiates every output
    assert torch.isclose(superfluous_objective(logits, 4), logits.logsumexp(1).mean())
    (h,) = torch.autograd.grad(mean_entropy(logits), logits)
    assert (h[:, :4] != 0).all()


def test_superfluous_settings_are_checked_against_the_benchmark():
    info = PermutedBlobs(num_tasks=2, scenario="domain").info
    with pytest.raises(ValueError, match="output_neurons=3 is fewer than the 4 classes"):
        SupSup(backbone=MaskedMLP(hidden_sizes=(8,)), output_neurons=3).setup_tasks(info)
    with pytest.raises(ValueError, match="inference_objective='superfluous' needs output_neurons"):
        SupSup(backbone=MaskedMLP(hidden_sizes=(8,)), inference_objective="superfluous").setup_tasks(info)
    with pytest.raises(ValueError, match="inference_objective='g'"):
        SupSup(inference_objective="g")
    with pytest.raises(ValueError, match="output_neurons=0"):
        SupSup(output_neurons=0)


def test_superfluous_neurons_make_one_image_enough_to_infer_the_task(mnist_root, tmp_path):
    """SupSup's GN runs use 100 outputs for 10 classes; with 10, the entropy gradient of a single image often
    picks a wrong mask after 5 short tasks, with 100 and the G objective it picks the right one."""
    runs = {}
    for width, objective in [(None, "entropy"), (100, "superfluous")]:
        torch.manual_seed(0)
        dm = SmallPermutedMNIST(num_tasks=5, data_dir=str(mnist_root), train_samples_per_task=3000, batch_size=64,
                                eval_batch_size=1000)
        model = SupSup(backbone=MaskedMLP(hidden_sizes=(100,)), lr=0.01, output_neurons=width,
                       inference_objective=objective)
        m = run_tasks(model, dm, tmp_path / str(width), max_epochs=1)
        hits = []
        with torch.inference_mode():
            for t in range(5):
                test = dm.split(t, "test")
                x = test.transform(test.x[:40])
                hits.append(sum(model.infer_task(x[i:i + 1]) == t for i in range(40)) / 40)
        runs[width] = (hits, m["R"][-1])
    (plain, plain_r), (wide, wide_r) = runs[None], runs[100]
    assert min(wide) >= 0.95, wide
    assert sum(plain) / 5 < sum(wide) / 5 - 0.1, (plain, wide)
    # on whole test batches (1000 images) both infer the task and classify well: the gain is in one image
    assert min(wide_r) > 0.75 and min(plain_r) > 0.75, (plain_r, wide_r)
