"""HNET: hypernetworks, the functional target, the output regularizer, HNET+ENT and resume."""

from __future__ import annotations

import copy
import sys

import lightning as L
import numpy as np
import pytest
import torch

from cl_lightning.callback import TaskLoss
from cl_lightning.callbacks.hnet_regularizer import OutputRegularizer
from cl_lightning.datamodules.poly_regression import PolynomialRegression
from cl_lightning.methods.hnet import HNET
from cl_lightning.nets import MLP
from cl_lightning.nets.hypernetwork import ChunkedHyperNetwork, HyperNetwork
from cl_lightning.runner import ContinualRunner
from cl_lightning.tasks import BenchmarkInfo, Scenario, Task
from tests.helpers.run import run_tasks, train_py

STEPS = 200  # optimizer steps per task on the polynomial toy (one epoch of STEPS batches of 32)


def info(num_tasks: int = 3, scenario: Scenario = Scenario.TASK_IL, shape=(4,), k: int = 2) -> BenchmarkInfo:
    return BenchmarkInfo("toy", tuple(Task(i, f"t{i}") for i in range(num_tasks)), scenario, shape, k)


def poly_hnet(beta: float, **reg) -> HNET:
    return HNET(target=MLP(hidden_sizes=(10, 10)), hypernetwork=HyperNetwork(hidden_sizes=(10, 10), embedding_dim=2),
                lr=0.01, plugins=[OutputRegularizer(beta=beta, **reg)])


def poly_data() -> PolynomialRegression:
    return PolynomialRegression(train_samples=32 * STEPS, batch_size=32)


# ---------------------------------------------------------------------------------------- building blocks
@pytest.mark.parametrize("kind", ["full", "chunked"])
def test_batched_generation_and_functional_target_match_plain_modules(kind):
    torch.manual_seed(0)
    hnet = HyperNetwork(hidden_sizes=(8,), embedding_dim=3) if kind == "full" else \
        ChunkedHyperNetwork(hidden_sizes=(8,), embedding_dim=3, chunk_size=17, chunk_embedding_dim=2)
    m = HNET(target=MLP(hidden_sizes=(6,)), hypernetwork=hnet)
    m.setup_tasks(info())
    weights = m.generate([0, 1, 2])
    assert weights.shape == (3, m.target.num_params)
    for t in range(3):  # one batched pass == one pass per embedding
        torch.testing.assert_close(weights[t], m.generate([t])[0])
    # the weightless target on generated weights == an ordinary module holding those weights
    plain = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 2))
    params = m.target.split(weights[1])
    with torch.no_grad():
        for (name, p), q in zip(params.items(), plain.parameters(), strict=True):
            assert p.shape == q.shape, name
            q.copy_(p)
    x = torch.randn(5, 4)
    torch.testing.assert_close(m.run_task(1, x), plain(x))
    torch.testing.assert_close(m.target.batched(weights, x)[1], plain(x))
    assert all(p.device.type == "meta" for p in m.target.module.parameters())  # the target owns no weights
    assert not any(n.startswith("target") for n, _ in m.named_parameters())


def test_chunked_hypernetwork_is_compressive():
    """The paper's Split-MNIST classifier: target 784-400-400-2, chunks of 42000, hypernetwork 10-10."""
    m = HNET(target=MLP(hidden_sizes=(400, 400)),
             hypernetwork=ChunkedHyperNetwork(hidden_sizes=(10, 10), embedding_dim=96, chunk_size=42000,
                                              chunk_embedding_dim=96))
    m.setup_tasks(info(5, shape=(1, 28, 28)))
    target = 784 * 400 + 400 + 400 * 400 + 400 + 400 * 2 + 2
    assert m.hypernetwork.num_target_weights == target
    assert m.hypernetwork.num_trainable() < target
    assert m.compression_ratio() < 1.0
    full = HNET(target=MLP(hidden_sizes=(10,)), hypernetwork=HyperNetwork(hidden_sizes=(10,)))
    full.setup_tasks(info())
    assert full.compression_ratio() > 1.0  # a full hypernetwork never compresses


def test_last_layer_is_held_transposed_and_old_checkpoints_load():
    """The hypernetwork's wide last layer is one contiguous ``[in, out]`` parameter (the fused optimizer's fast
    path), ``weight`` is its ``[out, in]`` view, and a state dict in ``nn.Linear``'s layout still loads."""
    hn = ChunkedHyperNetwork(hidden_sizes=(8,), embedding_dim=3, chunk_size=17, chunk_embedding_dim=2)
    hn.set_target_shapes([("w", (5, 7)), ("b", (5,))])
    assert hn.out.weight_t.shape == (8, 17) and hn.out.weight_t.is_contiguous()
    assert hn.out.weight.shape == (17, 8) and hn.out.weight.data_ptr() == hn.out.weight_t.data_ptr()
    legacy = {k: v.clone() for k, v in hn.state_dict().items() if k != "out.weight_t"}
    legacy["out.weight"] = torch.randn(17, 8)
    other = ChunkedHyperNetwork(hidden_sizes=(8,), embedding_dim=3, chunk_size=17, chunk_embedding_dim=2)
    other.set_target_shapes([("w", (5, 7)), ("b", (5,))])
    other.load_state_dict(legacy)
    assert torch.equal(other.out.weight, legacy["out.weight"]) and other.out.weight_t.is_contiguous()
    e = torch.randn(2, 3)
    expected = torch.nn.functional.linear(other.last_hidden(e), legacy["out.weight"], other.out.bias)
    torch.testing.assert_close(other(e), (expected.flatten(1)[:, :40] * other.out_scale))


def test_pytorch_init_generates_the_raw_outputs():
    """``init="pytorch"`` (the paper's code): no output scale or offset, layers at PyTorch's defaults."""
    hn = HyperNetwork(hidden_sizes=(8,), embedding_dim=3, init="pytorch")
    hn.set_target_shapes([("w", (5, 7)), ("bn.weight", (5,))])
    assert torch.equal(hn.out_scale, torch.ones(40)) and not hn.has_offset
    e = torch.randn(2, 3)
    torch.testing.assert_close(hn(e), hn.out(hn.last_hidden(e)).flatten(1))
    assert hn.out.bias.abs().max() > 0  # PyTorch's default bias init, not zeros
    with pytest.raises(ValueError, match="init='glorot'"):
        HyperNetwork(init="glorot")


def test_embeddings_freeze_per_task_and_optimizer_sees_only_current():
    m = poly_hnet(0.01)
    m.setup_tasks(info(3, shape=(1,)))
    m.current_task = 1
    m.setup("fit")
    assert [e.requires_grad for e in m.task_embeddings] == [False, True, False]
    opt_params = {id(p) for g in m.configure_optimizers().param_groups for p in g["params"]}
    assert id(m.task_embeddings[1]) in opt_params and id(m.task_embeddings[0]) not in opt_params


def test_class_il_places_logits_in_task_slice_and_bn_stats_are_per_task():
    m = HNET(target=MLP(hidden_sizes=(8,), batch_norm=True), hypernetwork=HyperNetwork(hidden_sizes=(8,)),
             task_inference="entropy")
    m.setup_tasks(info(3, Scenario.CLASS_IL))
    m.train()
    out = m(torch.randn(16, 4), torch.full((16,), 1))
    assert out.shape == (16, 6)
    assert torch.isinf(out[:, [0, 1, 4, 5]]).all() and torch.isfinite(out[:, 2:4]).all()
    stats = m.task_buffers(slice(0, 3))["0.layers.2.running_mean"]
    assert stats[1].abs().sum() > 0 and stats[0].abs().sum() == 0 and stats[2].abs().sum() == 0
    assert any("running_mean" in k for k in m.state_dict())  # checkpointed with the model
    with pytest.raises(ValueError, match="task_inference='given'"):
        HNET(task_inference="given").setup_tasks(info(3, Scenario.CLASS_IL))


# ---------------------------------------------------------------------------------------- HNET+ENT
def test_entropy_inference_picks_the_task_of_clearly_separated_inputs():
    """Task t's generated linear classifier is confident on inputs along axis t and undecided (zero logits)
    elsewhere; lowest entropy must recover the task, and class-IL predictions land in its slice."""
    T = 3
    m = HNET(target=MLP(hidden_sizes=()), hypernetwork=HyperNetwork(hidden_sizes=(), embedding_dim=2 * T + 2),
             task_inference="entropy")
    m.setup_tasks(info(T, Scenario.CLASS_IL, shape=(T,)))
    hn = m.hypernetwork
    n = hn.num_target_weights
    with torch.no_grad():  # make h(e) = e: then the embeddings are the target weights themselves
        hn.out.weight.copy_(torch.diag(1.0 / hn.out_scale))
        hn.out.bias.zero_()
        for t in range(T):
            w = torch.zeros(2, T)
            w[0, t], w[1, t] = -8.0, 8.0
            m.task_embeddings[t].copy_(torch.cat([w.flatten(), torch.zeros(2)]) - hn.out_offset[:n])
    m.current_task = T - 1
    m.eval()
    g = torch.Generator().manual_seed(0)
    xs, tasks, labels = [], [], []
    for t in range(T):
        c = torch.randint(0, 2, (50,), generator=g)
        x = 0.05 * torch.randn(50, T, generator=g)
        x[:, t] = (2 * c - 1) * (1.0 + torch.rand(50, generator=g))
        xs.append(x), tasks.append(torch.full((50,), t)), labels.append(c + 2 * t)
    x, t, y = torch.cat(xs), torch.cat(tasks), torch.cat(labels)
    _, chosen = m.infer_task(x)
    assert (chosen == t).float().mean() == 1.0
    pred = m.predict_for_eval(x, torch.zeros_like(t))  # the given id is ignored
    assert (pred.argmax(1) == y).float().mean() == 1.0
    m.current_task = 0  # only seen tasks compete
    assert (m.infer_task(x)[1] == 0).all()


def test_all_heads_generates_every_task_head_and_each_task_reads_its_own():
    """``heads=all`` (the authors' Split-MNIST main network): the target is num_tasks x k wide, and a task's
    output, in training and in the entropy contest, is its own slice of its own generated weights."""
    T, k = 3, 2
    m = HNET(target=MLP(hidden_sizes=(8,)), hypernetwork=HyperNetwork(hidden_sizes=(8,)), heads="all",
             task_inference="entropy")
    m.setup_tasks(info(T, Scenario.CLASS_IL, k=k))
    own = HNET(target=MLP(hidden_sizes=(8,)), hypernetwork=HyperNetwork(hidden_sizes=(8,)), task_inference="entropy")
    own.setup_tasks(info(T, Scenario.CLASS_IL, k=k))
    assert m.target is not None and own.target is not None
    assert m.hypernetwork.num_target_weights - own.hypernetwork.num_target_weights == (T - 1) * k * (8 + 1)
    m.eval()
    x = torch.randn(10, 4)
    for t in range(T):
        full = m.target(m.generate([t])[0], x, m.task_buffers(t))
        assert full.shape == (10, T * k)
        assert torch.equal(m.run_task(t, x), full[:, t * k: (t + 1) * k])
    m.current_task = T - 1
    logits, chosen = m.infer_task(x)
    assert logits.shape == (10, k)
    expected = torch.stack([m.run_task(int(c), x[i: i + 1])[0] for i, c in enumerate(chosen)])
    torch.testing.assert_close(logits, expected)
    entropies = torch.stack([-(m.run_task(t, x).softmax(-1) * m.run_task(t, x).log_softmax(-1)).sum(-1)
                             for t in range(T)])
    assert torch.equal(chosen, entropies.argmin(0))
    with pytest.raises(ValueError, match="heads='some'"):
        HNET(heads="some")


# ---------------------------------------------------------------------------------------- regularizer
def test_lookahead_and_random_subset():
    torch.manual_seed(0)
    m = poly_hnet(0.1, max_past_tasks=2, lookahead=True)
    m.setup_tasks(info(5, shape=(1,), k=2, scenario=Scenario.DOMAIN_IL))
    reg = m.plugins[0]
    reg.targets = m.generate(range(4)).detach() + 0.1  # four past tasks, each off by 0.1 everywhere
    m.current_task = 4
    m.setup("fit")
    idx = reg.subset(m)
    assert len(idx) == 2 and torch.equal(idx, reg.subset(m))  # same draw for the same step (every rank)
    x, y, t = torch.randn(8, 1), torch.randint(0, 2, (8,)), torch.full((8,), 4)
    m.train()
    step = m.task_loss((x, y, t))
    ahead = reg.penalty(m, (x, y, t), step)
    reg.lookahead = False
    plain = reg.penalty(m, (x, y, t), step)
    expected = 0.1 / 2 * (0.1**2) * 2 * m.hypernetwork.num_target_weights
    assert plain.item() == pytest.approx(expected, rel=1e-4)
    assert torch.isfinite(ahead) and ahead.item() != pytest.approx(plain.item(), rel=1e-6)
    ahead_grad = torch.autograd.grad(ahead, m.hypernetwork.out.weight_t)[0]
    assert torch.isfinite(ahead_grad).all() and ahead_grad.abs().sum() > 0


def _reg_hnet(kind: str, dtype: torch.dtype = torch.float32, **reg) -> tuple[HNET, OutputRegularizer]:
    """Small HNETs for the algebraic-vs-direct checks. The chunked one has chunks of 17 (the last one
    padded; chunks that straddle tensors of different output scale) and batch norm in the target (gains
    with an output offset)."""
    torch.manual_seed(0)
    if kind == "full":
        hnet, target = HyperNetwork(hidden_sizes=(8,), embedding_dim=3), MLP(hidden_sizes=(6,))
    elif kind == "linear":  # no hidden layer: the last layer reads the (frozen) embeddings themselves
        hnet, target = HyperNetwork(hidden_sizes=(), embedding_dim=5), MLP(hidden_sizes=(6,))
    else:  # "chunked", or "chunked_pytorch": the paper code's initialisation (no output scale or offset)
        hnet = ChunkedHyperNetwork(hidden_sizes=(8, 7), embedding_dim=3, chunk_size=17, chunk_embedding_dim=2,
                                   init="pytorch" if kind.endswith("pytorch") else "scaled")
        target = MLP(hidden_sizes=(6, 5), batch_norm=True)
    reg.setdefault("form", "algebraic")
    m = HNET(target=target, hypernetwork=hnet, lr=0.05, plugins=[OutputRegularizer(beta=0.5, **reg)])
    m.setup_tasks(info(5, shape=(4,)))
    return m.to(dtype), m.plugins[0]


def _start_task(m: HNET, reg: OutputRegularizer, task: int) -> None:
    m.current_task = task
    m.setup("fit")
    reg.on_task_start(None, m, task)


def _penalty_and_grads(m: HNET, reg: OutputRegularizer, algebraic: bool,
                       step: TaskLoss | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The penalty of one form and its gradient w.r.t. every hypernetwork parameter and the embeddings."""
    reg.form = "algebraic" if algebraic else "direct"
    for e in m.task_embeddings:  # past embeddings are frozen in training; here their gradient is checked too
        e.requires_grad_(True)
    wrt = [*m.hypernetwork.parameters(), *m.task_embeddings]
    value = reg.penalty(m, None, step)
    grads = torch.autograd.grad(value, wrt, allow_unused=True, retain_graph=True)
    return value.detach(), [torch.zeros_like(p) if g is None else g for p, g in zip(wrt, grads, strict=True)]


def _assert_forms_agree(m: HNET, reg: OutputRegularizer, rtol: float = 1e-4, step: TaskLoss | None = None) -> float:
    direct, g_direct = _penalty_and_grads(m, reg, algebraic=False, step=step)
    algebraic, g_alg = _penalty_and_grads(m, reg, algebraic=True, step=step)
    torch.testing.assert_close(algebraic, direct, rtol=rtol, atol=0)
    gscale = max(g.abs().max().item() for g in g_direct)
    for ga, gd in zip(g_alg, g_direct, strict=True):
        torch.testing.assert_close(ga, gd, rtol=rtol, atol=rtol * 1e-2 * gscale)
    return direct.item()


def _drift(m: HNET, noise: float) -> None:
    with torch.no_grad():
        for p in m.hypernetwork.parameters():
            p.add_(noise * torch.randn_like(p))


@pytest.mark.parametrize("kind", ["full", "chunked", "linear", "chunked_pytorch"])
@pytest.mark.parametrize("lookahead", [False, True])
@pytest.mark.parametrize("subset", [None, 2])
def test_algebraic_penalty_equals_direct(kind, lookahead, subset):
    """The algebraic output penalty (Gram matrices of the last layer) has the direct form's value and
    gradients w.r.t. all hypernetwork parameters and the embeddings: at a task start (residual zero),
    after tiny and large drifts; with the lookahead and a random subset. Float64 checks the algebra to
    1e-7; float32 the practical regime (rtol 1e-4)."""
    for dtype, rtol, noises in ((torch.float64, 1e-7, (0.0, 1e-6, 1e-4, 3e-2)), (torch.float32, 1e-4, (3e-2,))):
        m, reg = _reg_hnet(kind, dtype, lookahead=lookahead, max_past_tasks=subset)
        _start_task(m, reg, 4)
        ref = reg.reference(m, torch.device("cpu"))
        assert ref.ve is None  # targets taken at the task start: nothing of size [P, N] is kept
        x, y, t = torch.randn(8, 4, dtype=dtype), torch.randint(0, 2, (8,)), torch.full((8,), 4)
        m.train()
        for noise in noises:
            _drift(m, noise)
            step = m.task_loss((x, y, t))  # the task loss whose step the lookahead takes
            if noise == 0.0 and not lookahead:  # zero: exactly in the algebraic form, to rounding in the direct
                assert _penalty_and_grads(m, reg, True, step)[0].item() == 0.0
                assert _penalty_and_grads(m, reg, False, step)[0].item() < 1e-20
                continue
            assert _assert_forms_agree(m, reg, rtol, step) > 0


@pytest.mark.parametrize("kind", ["full", "chunked"])
def test_algebraic_penalty_is_as_accurate_as_direct_in_float32(kind):
    """With a tiny residual (just after a task start) float32 resolves the residual only to a few digits,
    whatever the form; the algebraic form (built from differences to the reference, so nothing large
    cancels) must be no less accurate than the direct one, against a float64 evaluation."""
    m, reg = _reg_hnet(kind)
    _start_task(m, reg, 4)
    _drift(m, 1e-4)
    m64 = copy.deepcopy(m).double()
    reg64 = m64.plugins[0]
    reg64.targets = reg.past_targets(m).double()  # the float32 targets, as explicit float64 values
    truth, g_truth = _penalty_and_grads(m64, reg64, algebraic=False)
    errors = {}
    for algebraic in (False, True):
        value, grads = _penalty_and_grads(m, reg, algebraic)
        g_err = max(((g.double() - gt).norm() / gt.norm()).item() for g, gt in zip(grads, g_truth, strict=True)
                    if gt.norm() > 0)
        errors[algebraic] = abs(value.double() - truth).item() / truth.item(), g_err
    (direct_err, direct_g_err), (err, g_err) = errors[False], errors[True]
    assert err < 3 * direct_err + 1e-6 and g_err < 3 * direct_g_err + 1e-6, errors
    assert direct_g_err < 1e-2  # float32 gradients are still good to 1%


def test_algebraic_penalty_never_generates_past_weights():
    """On the paper's Split-MNIST hypernetwork (chunks of 42000, last hidden layer 10) with four past
    tasks, no tensor made by the algebraic penalty (forward and backward) is larger than the last layer
    itself, [K, H+1]; the direct form makes [4, N] ones."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class LargestOutput(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, tuple | list) else (out,):
                if isinstance(t, torch.Tensor):
                    LargestOutput.largest = max(LargestOutput.largest, t.numel())
            return out

    torch.manual_seed(0)
    reg = OutputRegularizer(beta=0.01)
    m = HNET(target=MLP(hidden_sizes=(400, 400)),
             hypernetwork=ChunkedHyperNetwork(hidden_sizes=(10, 10), embedding_dim=96, chunk_size=42000,
                                              chunk_embedding_dim=96), plugins=[reg])
    m.setup_tasks(info(5, shape=(1, 28, 28)))
    _start_task(m, reg, 4)
    _drift(m, 1e-3)
    ref = reg.reference(m, torch.device("cpu"))
    assert sum(t.numel() for t in (ref.z0, ref.w0t, ref.b0)) < m.hypernetwork.num_target_weights  # < one task's
    N, bound = m.hypernetwork.num_target_weights, 42000 * 11
    sizes = {}
    for algebraic in (True, False):
        reg.form = "algebraic" if algebraic else "direct"
        LargestOutput.largest = 0
        with LargestOutput():
            reg.penalty(m, None).backward()
        sizes[algebraic] = LargestOutput.largest
    assert sizes[True] <= bound < N and sizes[False] >= 4 * N


def test_auto_form_picks_the_cheaper_one():
    """``form=auto``: the algebraic form for a chunked hypernetwork with many chunks from the first past task
    on; for a full one with a wide last hidden layer (its Gram matrices cost ~H times one task's weights)
    the direct form until there are many past tasks. An unknown form is refused."""
    chunked = ChunkedHyperNetwork(hidden_sizes=(10, 10), embedding_dim=96, chunk_size=42000, chunk_embedding_dim=96)
    full = HyperNetwork(hidden_sizes=(100,), embedding_dim=8)
    for hnet, target in ((chunked, MLP(hidden_sizes=(400, 400))), (full, MLP(hidden_sizes=(50,)))):
        HNET(target=target, hypernetwork=hnet).setup_tasks(info(5, shape=(1, 28, 28)))
    assert chunked.output_penalty_is_cheaper(1)
    assert not full.output_penalty_is_cheaper(4) and full.output_penalty_is_cheaper(200)
    m = HNET(target=MLP(hidden_sizes=(50,)), hypernetwork=full, plugins=[OutputRegularizer()])
    assert not m.plugins[0].uses_algebraic(m, 4) and OutputRegularizer(form="algebraic").uses_algebraic(m, 4)
    with pytest.raises(ValueError, match="form="):
        OutputRegularizer(form="gram")


def test_algebraic_penalty_with_replaced_or_restored_targets():
    """Targets that the hypernetwork does not generate (set by hand, or restored from a checkpoint of the
    version that stored targets into a hypernetwork that moved on since): the reference is rebuilt lazily
    from the current hypernetwork and carries the difference; still exact."""
    m, reg = _reg_hnet("chunked")
    _start_task(m, reg, 3)
    with torch.no_grad():
        for p in m.hypernetwork.parameters():
            p.add_(1e-2 * torch.randn_like(p))
    state = reg.state_dict()
    assert set(state) == {"task_started", "task_finished", "snapshot", "past_tasks"}  # nothing derived
    before = _assert_forms_agree(m, reg)
    old = {"task_started": 3, "task_finished": 2, "targets": reg.past_targets(m).clone()}  # an old checkpoint
    fresh = OutputRegularizer(beta=0.5, form="algebraic")  # a resume in the middle of the task
    fresh.load_state_dict(old)
    m.plugins[0] = fresh
    assert fresh._reference is None and fresh.snapshot is None
    torch.testing.assert_close(_assert_forms_agree(m, fresh), before, rtol=1e-4, atol=0)
    assert fresh._reference.ve is not None  # the targets differ from what the moved hypernetwork generates
    # targets replaced (a new tensor) or changed in place: the reference follows
    fresh.targets = fresh.targets + 0.01 * torch.randn_like(fresh.targets)
    changed = _assert_forms_agree(m, fresh)
    fresh.targets[1].mul_(1.01)
    assert _assert_forms_agree(m, fresh) != changed
    assert fresh.stored_numel() == fresh.targets.numel()
    assert fresh.drift(m).shape == (3,)


def test_algebraic_penalty_trains_like_direct():
    """A few Adam steps with each form from the same start give the same weights."""
    finals = []
    for algebraic in (True, False):
        m, reg = _reg_hnet("chunked", lookahead=True, form="algebraic" if algebraic else "direct")
        _start_task(m, reg, 2)
        opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=0.01)
        g = torch.Generator().manual_seed(1)
        m.train()
        for _ in range(5):
            x, y = torch.randn(8, 4, generator=g), torch.randint(0, 2, (8,), generator=g)
            loss, logs = m.training_objective((x, y, torch.full((8,), 2)))
            opt.zero_grad()
            loss.backward()
            opt.step()
        assert logs["train/penalty_OutputRegularizer"].item() > 0
        finals.append(torch.cat([p.detach().flatten() for p in m.hypernetwork.parameters()]))
    torch.testing.assert_close(finals[0], finals[1], rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def poly_runs(tmp_path_factory):
    """The polynomial toy (3 tasks) with and without the output regularizer."""
    runs = {}
    for beta in (0.0, 0.05):
        L.seed_everything(0)
        model, dm = poly_hnet(beta), poly_data()
        run_dir = tmp_path_factory.mktemp(f"poly_beta{beta}")
        metrics = run_tasks(model, dm, run_dir)
        runs[beta] = (model, metrics, run_dir)
    return runs


def test_output_regularizer_prevents_forgetting_and_targets_stay_put(poly_runs):
    _, free, _ = poly_runs[0.0]
    model, reg, _ = poly_runs[0.05]
    R_free, R_reg = np.asarray(free["R"]), np.asarray(reg["R"])
    # both learn each task while it is trained (MSE just after the task)
    assert np.diag(R_reg).max() < 0.5 and np.diag(R_free).max() < 0.5
    # without the regularizer old tasks are forgotten; with it they keep their fit
    assert R_free[-1, 0] > 10 * max(R_reg[-1, 0], 0.05)
    assert R_reg[-1, :2].max() < 0.5
    plugin = model.plugins[0]
    assert plugin.targets is None and plugin.past_targets(model).shape == (2, model.hypernetwork.num_target_weights)
    assert plugin.drift(model).max() < 0.1  # h(e_t) of past tasks moved little during the last task
    assert plugin.stored_numel() == sum(p.numel() for p in model.hypernetwork.parameters())  # one snapshot


def test_resume_restores_embeddings_and_targets(poly_runs):
    model, metrics, run_dir = poly_runs[0.05]
    # a fresh model restored from the boundary after task 1 holds the frozen embeddings and stored targets
    L.seed_everything(123)
    fresh, dm = poly_hnet(0.05), poly_data()
    runner = ContinualRunner(fresh, dm, run_dir, trainer_kwargs={"accelerator": "cpu", "devices": 1})
    runner.restore(1)
    for t in range(2):  # past embeddings are frozen: identical to those of the finished run
        torch.testing.assert_close(fresh.task_embeddings[t], model.task_embeddings[t], rtol=0, atol=0)
    ckpt = torch.load(runner.boundary_ckpt(1), map_location="cpu", weights_only=False)
    assert fresh.plugins[0].past_targets(fresh).shape == (1, fresh.hypernetwork.num_target_weights)
    saved = ckpt["callbacks"][fresh.plugins[0].state_key]["snapshot"]
    for name, value in saved.items():
        torch.testing.assert_close(fresh.plugins[0].snapshot[name], value, rtol=0, atol=0)
    assert fresh.plugins[0].drift(fresh).max() < 0.1
    # and rerunning the last task from that boundary gives the uninterrupted run's accuracy matrix
    (run_dir / "checkpoints" / "after_task_2.ckpt").rename(run_dir / "after_task_2.bak")
    L.seed_everything(123)
    resumed = run_tasks(poly_hnet(0.05), poly_data(), run_dir, resume=True)
    np.testing.assert_allclose(resumed["R"], metrics["R"], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------- DDP
@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="gloo DDP test runs on Linux/macOS")
@pytest.mark.parametrize("batch_norm", [False, True])
def test_ddp_two_processes_match_one(tmp_path, batch_norm):
    """Same R with 2 DDP processes as with 1 (lookahead on); with a batch-norm target also the same per-task
    running statistics, since batch norm normalises with the global batch's statistics. (The batch-norm run
    uses SGD and fewer steps: the target's biases before batch norm have an exact gradient of zero, and Adam
    would blow its float rounding up to steps of size lr, different in the two runs.)"""
    args = ["method=hnet", "benchmark=poly_regression",
            "method.target.hidden_sizes=[10,10]", f"method.target.batch_norm={str(batch_norm).lower()}",
            "method.hypernetwork.class_path=cl_lightning.nets.hypernetwork.HyperNetwork",
            "method.hypernetwork.hidden_sizes=[10,10]", "method.hypernetwork.embedding_dim=2", "method.lr=0.01",
            "method.plugins.OutputRegularizer.beta=0.05", "method.plugins.OutputRegularizer.lookahead=true",
            "method.plugins.OutputRegularizer.form=algebraic",  # (auto would pick the direct form here)
            "benchmark.num_tasks=2", "benchmark.train_samples=640", "benchmark.batch_size=32"]
    if batch_norm:
        args += ["method.optimizer=sgd", "method.lr=0.001", "benchmark.train_samples=256"]
    results, stats = {}, {}
    for devices in (1, 2):
        out = tmp_path / f"d{devices}"
        extra = ["trainer.strategy=ddp", "trainer.devices=2"] if devices == 2 else []
        results[devices] = train_py([*args, *extra], out)["R"]
        state = torch.load(out / "checkpoints" / "after_task_1.ckpt", weights_only=False)["state_dict"]
        stats[devices] = {k: v for k, v in state.items() if k.startswith("task_stats__")}
    np.testing.assert_allclose(results[2], results[1], rtol=1e-3, atol=1e-4)
    assert len(stats[1]) == (6 if batch_norm else 0)  # mean, var, count of two layers
    for name, value in stats[1].items():
        torch.testing.assert_close(stats[2][name], value, rtol=1e-4, atol=1e-5, msg=name)


def test_two_algebraic_penalties_before_one_backward():
    """The reference's buffer holds the last penalty's ``X``; a backward through an earlier penalty (here
    the sum of one at theta and one at theta + d, as a lookahead-style caller could build) must rebuild its
    own ``X``: value and gradients equal the direct form's."""
    from torch.func import functional_call

    m, reg = _reg_hnet("chunked", torch.float64)
    _start_task(m, reg, 4)
    _drift(m, 1e-2)
    hnet = m.hypernetwork
    names = [n for n, _ in hnet.named_parameters()]
    params = list(hnet.parameters())
    shift = {n: p + 1e-2 * torch.randn_like(p) for n, p in zip(names, params, strict=True)}
    emb = m.embeddings(range(4)).detach()
    ref = reg.reference(m, torch.device("cpu"))
    algebraic = hnet.output_penalty(emb, ref) + hnet.output_penalty(emb, ref, params=shift)
    targets = reg.past_targets(m)
    direct = (hnet(emb) - targets).pow(2).sum() + (functional_call(hnet, shift, (emb,)) - targets).pow(2).sum()
    torch.testing.assert_close(algebraic, direct, rtol=1e-7, atol=0)
    for ga, gd in zip(torch.autograd.grad(algebraic, params), torch.autograd.grad(direct, params), strict=True):
        torch.testing.assert_close(ga, gd, rtol=1e-6, atol=1e-9)


# ---------------------------------------------------------------------------------------- memory flat in tasks
@pytest.mark.parametrize("kind", ["full", "chunked"])
@pytest.mark.parametrize("lookahead", [False, True])
@pytest.mark.parametrize("subset", [None, 2])
def test_snapshot_gives_the_penalty_of_stored_targets(kind, lookahead, subset):
    """The regularizer keeps the hypernetwork's parameters at the task start instead of the ``[P, N]``
    targets; its penalty and gradients (direct and algebraic forms) equal those of the targets stored at the
    task start (what the earlier version kept), in float64, at several training steps away from the start,
    with the lookahead and random subsets of the past tasks."""
    m, reg = _reg_hnet(kind, torch.float64, lookahead=lookahead, max_past_tasks=subset)
    _start_task(m, reg, 4)
    stored = OutputRegularizer(beta=0.5, lookahead=lookahead, max_past_tasks=subset, form="direct")
    stored.targets = m.generate(range(4)).detach().clone()
    assert reg.targets is None and reg.stored_numel() == sum(p.numel() for p in m.hypernetwork.parameters())
    opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=0.01)
    g = torch.Generator().manual_seed(2)
    params = list(m.hypernetwork.parameters())
    m.train()
    subsets = set()
    for step in range(4):
        m.steps_before_task = step  # another random subset at each step
        x, y = torch.randn(8, 4, generator=g, dtype=torch.float64), torch.randint(0, 2, (8,), generator=g)
        this_step = m.task_loss((x, y, torch.full((8,), 4)))
        task_loss = this_step.value
        expected = stored.penalty(m, None, this_step)
        g_expected = torch.autograd.grad(expected, params, retain_graph=True)
        subsets.add(tuple(reg.subset(m).tolist()))
        for form in ("direct", "algebraic"):
            reg.form = form
            value = reg.penalty(m, None, this_step)
            torch.testing.assert_close(value, expected, rtol=1e-7, atol=1e-18)
            for ga, ge in zip(torch.autograd.grad(value, params, retain_graph=True), g_expected, strict=True):
                torch.testing.assert_close(ga, ge, rtol=1e-6, atol=1e-12)
        if step:
            assert expected.item() > 0
        opt.zero_grad()
        (task_loss + expected).backward()
        opt.step()
    assert len(subsets) > 1 if subset else subsets == {(0, 1, 2, 3)}


@pytest.mark.parametrize("form", ["direct", "algebraic"])
def test_stored_values_and_checkpoint_do_not_grow_with_tasks(form, tmp_path):
    """From the second task to the fifth, the values the regularizer keeps (and checkpoints) stay one
    hypernetwork's parameters, and its checkpointed state has the same size in bytes."""
    import io

    m, reg = _reg_hnet("chunked", form=form)
    one_hnet = sum(p.numel() for p in m.hypernetwork.parameters())
    counts, sizes = [], []
    for task in range(1, 5):
        _start_task(m, reg, task)
        _drift(m, 1e-2)
        assert reg.penalty(m, None).item() > 0
        buffer = io.BytesIO()
        torch.save(reg.state_dict(), buffer)
        counts.append(reg.stored_numel())
        sizes.append(len(buffer.getvalue()))
    assert counts == [one_hnet] * 4 and one_hnet < 4 * m.hypernetwork.num_target_weights  # (4 stored targets)
    assert max(sizes) - min(sizes) <= 16, sizes  # (the task counters)
