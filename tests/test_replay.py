"""Generative replay: the Replay plugin's batch and loss, DGR and HNET+R against fine-tuning in class-IL, the
hypernetwork-protected decoder against an unprotected one, resume inside a task, 2-process DDP (with SI's path
integral), and the Table 1 experiment configs.

The runs here are many small matrix products: one thread is faster than two on a shared CPU, so they use one.
"""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cl_lightning.callback import ContinualCallback
from cl_lightning.callbacks.generative_replay import Replay, distillation_loss
from cl_lightning.callbacks.hnet_regularizer import OutputRegularizer
from cl_lightning.datamodules import SplitMNIST
from cl_lightning.methods import DGR, HNETR, ContinualModule
from cl_lightning.nets import MLP
from cl_lightning.nets.hypernetwork import ChunkedHyperNetwork
from tests.helpers.crash import CrashAt
from tests.helpers.run import run_tasks, train_py


def small_vae(kind: str, plugins, beta: float = 0.01):
    """The methods at test size: classifier 100-100, VAE 100 / 100 with a 16-dimensional latent."""
    L.seed_everything(0, verbose=False)
    common = {"encoder_hidden": [100], "decoder_hidden": [100], "latent_dim": 16, "lr": 1e-3}
    if kind == "dgr":
        return DGR(MLP(hidden_sizes=[100, 100]), plugins=plugins, **common)
    hnet = ChunkedHyperNetwork(hidden_sizes=[50, 50], activation="elu", embedding_dim=32, chunk_size=4000,
                               chunk_embedding_dim=32)
    return HNETR(MLP(hidden_sizes=[100, 100]), hypernetwork=hnet, plugins=[*plugins, OutputRegularizer(beta=beta)],
                 **common)


# ---------------------------------------------------------------------------------------- the plugin
def test_replay_batch_is_spread_evenly_over_past_tasks():
    rp = Replay(batch_size=10)
    assert rp.replay_tasks(1).tolist() == [0] * 10
    assert rp.replay_tasks(3).tolist() == [0] * 4 + [1] * 3 + [2] * 3
    with pytest.raises(ValueError, match="targets='soft-ish'"):
        Replay(targets="soft-ish")
    with pytest.raises(ValueError, match="source: int"):
        Replay(source=3)


def test_distillation_loss_is_cross_entropy_to_the_softened_teacher():
    student, teacher = torch.randn(5, 4), torch.randn(5, 4)
    probs = F.softmax(teacher / 2.0, 1)
    expected = 4.0 * -(probs * F.log_softmax(student / 2.0, 1)).sum(1).mean()
    torch.testing.assert_close(distillation_loss(student, probs, 2.0), expected)
    # its gradient vanishes where the student matches the teacher
    s = teacher.clone().requires_grad_(True)
    distillation_loss(s, probs, 2.0).backward()
    assert s.grad.abs().max() < 1e-6



@pytest.mark.parametrize("padding", ["probability", "logit"])
def test_class_il_soft_targets_widen_the_teachers_outputs_as_configured(padding):
    """On task 1 of a class-IL split (2 classes a task), the teacher knows classes 0-1 and the student 0-3:
    ``probability`` gives classes 2-3 zero probability (DGR+distill), ``logit`` pads the teacher's logits with
    zeros before the softmax (the HNET authors' code); the loss is the distillation loss to those targets."""
    dm = SplitMNIST(scenario="class")
    model = ContinualModule(MLP(hidden_sizes=[8]))
    plugin = Replay(class_il_padding=padding)
    model.setup_tasks(dm.info)
    model.current_task = 1
    torch.manual_seed(0)
    plugin.teacher = {n: t.detach().clone() for n, t in [*model.named_parameters(), *model.named_buffers()]}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5 * torch.randn_like(p))
    x, t = torch.randn(6, 1, 28, 28), torch.zeros(6, dtype=torch.long)
    teacher = torch.func.functional_call(model, plugin.teacher, (x, t))[:, :2].detach()
    if padding == "probability":
        probs = torch.cat([F.softmax(teacher / 2.0, 1), torch.zeros(6, 2)], 1)
    else:
        probs = F.softmax(torch.cat([teacher, torch.zeros(6, 2)], 1) / 2.0, 1)
    expected = distillation_loss(model(x, t)[:, :4], probs, 2.0)
    torch.testing.assert_close(plugin.classifier_loss(model, x, t, None), expected)
    assert (probs[:, 2:] > 0).all() == (padding == "logit")
    with pytest.raises(ValueError, match="class_il_padding='zeros'"):
        Replay(class_il_padding="zeros")

# ---------------------------------------------------------------------------------------- class-IL forgetting
class Task0Images(ContinualCallback):
    """After every task: the images the generator makes now for task 0 from fixed latents."""

    def __init__(self):
        super().__init__()
        self.images: list[torch.Tensor] = []

    def on_task_end(self, trainer, module, task_id):
        z = torch.randn(64, module.latent_dim, generator=torch.Generator().manual_seed(0))
        self.images.append(module.generate_inputs(0, z).cpu())

    def drift(self) -> list[float]:
        """Mean absolute pixel change of task 0's images since task 0 ended, after each later task."""
        return [float((im - self.images[0]).abs().mean()) for im in self.images[1:]]


@pytest.mark.slow
def test_dgr_and_hnetr_forget_less_than_finetuning_class_incremental(mnist_root, tmp_path, one_thread):
    def dm():
        return SplitMNIST(data_dir=str(mnist_root), scenario="class", train_samples_per_task=800, batch_size=64)

    L.seed_everything(0, verbose=False)
    ft = run_tasks(ContinualModule(MLP(hidden_sizes=[100, 100]), lr=1e-3), dm(), tmp_path / "ft", max_epochs=16)
    runs, probes = {}, {}
    for kind in ("dgr", "hnetr"):
        probes[kind] = Task0Images()
        runs[kind] = run_tasks(small_vae(kind, [Replay(batch_size=64), probes[kind]]), dm(), tmp_path / kind,
                               max_epochs=16)
    R_ft = np.asarray(ft["R"])
    assert R_ft[-1, :-1].max() < 0.05, "fine-tuning overwrites every old class in class-IL"
    for kind, run in runs.items():
        R = np.asarray(run["R"])
        assert np.mean(np.diag(R)) > 0.85, f"{kind}: each task is learnt"
        assert run["ACC"] > ft["ACC"] + 0.3, (kind, run["ACC"], ft["ACC"])
        assert run["BWT"] > ft["BWT"] + 0.4, (kind, run["BWT"], ft["BWT"])
        assert R[-1, 0] > 0.2, f"{kind}: the first task survives four later tasks"
    # the hypernetwork-protected decoder keeps task 0's images; DGR's, protected only by its own replay, drifts
    assert max(probes["hnetr"].drift()) < 0.5 * probes["dgr"].drift()[-1]


def test_hypernetwork_protected_decoder_keeps_old_images_an_unprotected_one_drifts(mnist_root, tmp_path, one_thread):
    drifts = {}
    for beta in (0.05, 0.0):  # 0.05: the paper's HNET+TIR replay beta; 0: no output regularizer
        probe = Task0Images()
        dm = SplitMNIST(data_dir=str(mnist_root), scenario="task", train_samples_per_task=300, batch_size=64)
        run_tasks(small_vae("hnetr", [probe], beta=beta), dm, tmp_path / f"b{beta}", max_epochs=6)
        drifts[beta] = probe.drift()
    protected, unprotected = drifts[0.05], drifts[0.0]
    assert max(protected) < 0.02, protected
    assert unprotected[-1] > 3 * max(protected), (unprotected, protected)
    assert unprotected[-1] > unprotected[0], "without the regularizer the drift grows with the tasks"


# ---------------------------------------------------------------------------------------- resume
def test_hnetr_resumes_inside_a_task(mnist_root, tmp_path, one_thread):
    def make(marker):
        model = small_vae("hnetr", [Replay(batch_size=32), CrashAt(1, 7, str(marker), hard=False)])
        return model, SplitMNIST(data_dir=str(mnist_root), scenario="class", num_tasks=2,
                                 train_samples_per_task=300, batch_size=64)

    marker = tmp_path / "crashed"
    marker.write_text("never crash")
    reference = run_tasks(*make(marker), tmp_path / "ref", max_epochs=2)
    marker.unlink()  # crash in the second epoch of task 1 (5 steps per epoch), while replaying task 0
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_tasks(*make(marker), tmp_path / "run", max_epochs=2)
    resumed = run_tasks(*make(marker), tmp_path / "run", resume=True, max_epochs=2)
    np.testing.assert_allclose(resumed["R"], reference["R"], rtol=0, atol=1e-6)
    assert resumed["optimizer_steps"] == reference["optimizer_steps"]


# ---------------------------------------------------------------------------------------- DDP
@pytest.mark.slow
def test_dgr_with_si_on_two_processes_matches_one(mnist_root, tmp_path):
    """The replay path (replayed batches sharded like data, the VAE's noise drawn for the global batch) and
    SI's path integral under 2-process DDP: the result of one process, and the same state on both ranks."""
    def train(out, dump, *extra):
        plugins = ("method.plugins=[{class_path: cl_lightning.callbacks.generative_replay.Replay, "
                   "init_args: {batch_size: 32}}, "
                   "{class_path: cl_lightning.callbacks.SI, init_args: {strength: 10.0}}, "
                   f"{{class_path: tests.helpers.dump_replay.DumpReplayState, init_args: {{folder: '{dump}'}}}}]")
        return train_py(["method=dgr", plugins, "benchmark.scenario=class", "method.backbone.hidden_sizes=[64]",
                         "method.encoder_hidden=[64]", "method.decoder_hidden=[64]", "method.latent_dim=8",
                         "trainer.max_epochs=2", *extra], out, mnist_root)

    single = train(tmp_path / "single", tmp_path / "d1", "trainer.devices=1")
    ddp = train(tmp_path / "ddp", tmp_path / "d2", "trainer.devices=2", "trainer.strategy=ddp")
    np.testing.assert_allclose(ddp["R"], single["R"], atol=5e-3)
    assert ddp["optimizer_steps"] == single["optimizer_steps"]
    for task in (0, 1):
        rank0 = torch.load(tmp_path / "d2" / f"rank0_task{task}.pt")
        rank1 = torch.load(tmp_path / "d2" / f"rank1_task{task}.pt")
        alone = torch.load(tmp_path / "d1" / f"rank0_task{task}.pt")
        for name in rank0:
            assert torch.equal(rank0[name], rank1[name]), f"{name} differs between ranks"
            torch.testing.assert_close(rank0[name], alone[name], rtol=1e-2, atol=1e-4)


# ---------------------------------------------------------------------------------------- configs
@pytest.mark.parametrize("method", ["hnet_r", "dgr", "si", "online_ewc"])
def test_table_1_experiment_configs_build(method):
    """Every Table 1 row's config composes and builds its method for the benchmark (no training)."""
    from cl_lightning.config import compose
    from cl_lightning.experiment import build

    for cl, scenario in ((1, "task"), (2, "domain"), (3, "class")):
        cfg = compose([f"experiment={method}_split_mnist_cl{cl}", "logger=none"])
        assert cfg["trainer"]["max_steps"] == 2000 and cfg["benchmark"]["init_args"]["scenario"] == scenario
        model, dm = build(cfg)
        model.setup_tasks(dm.info)
        if method == "hnet_r":
            assert model.decoder_target.num_params == model.hypernetwork.num_target_weights
