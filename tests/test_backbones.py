"""Backbones: the full CIFAR ResNet-18 (Mammoth's layout and parameter count), pretrained torchvision / timm
bodies built offline from a weights file the test writes (equal outputs, named bad keys, freezing, the input
adapter's renormalisation on a hand-made case, a 2-task run that trains only the head), and ``compile``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cl_lightning.datamodule import ContinualDataModule, TaskData
from cl_lightning.methods import ContinualModule
from cl_lightning.nets import MLP, ResNet18
from cl_lightning.nets.pretrained import InputAdapter, PretrainedBackbone
from cl_lightning.tasks import Description, Scenario, Task
from tests.helpers.run import run_tasks

pytestmark = pytest.mark.usefixtures("one_thread")

NORM = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))  # CIFAR-100's


def test_resnet18_is_mammoths_cifar_layout_with_11_17m_parameters():
    net = ResNet18()
    head = nn.Linear(net.out_features, 10)
    assert sum(p.numel() for p in [*net.parameters(), *head.parameters()]) == 11_173_962
    assert net.stem.kernel_size == (3, 3) and net.stem.stride == (1, 1) and net.stem.bias is None
    assert not any(isinstance(m, nn.MaxPool2d) for m in net.modules())
    convs = [(b.conv1.in_channels, b.conv1.out_channels, b.conv1.stride[0], len(b.shortcut) > 0) for b in net.blocks]
    assert convs == [(64, 64, 1, False), (64, 64, 1, False), (64, 128, 2, True), (128, 128, 1, False),
                     (128, 256, 2, True), (256, 256, 1, False), (256, 512, 2, True), (512, 512, 1, False)]
    x = torch.randn(2, 3, 32, 32)
    assert net(x).shape == (2, 512) and net.out_features == 512
    assert torch.equal(net.eval()(x), net(x.flatten(1)))  # flat inputs are reshaped to 3x32x32


# ---------------------------------------------------------------------------------------- data
class Templates(ContinualDataModule):
    """Images whose pixels are CIFAR-normalised: each class a fixed random [0, 1] template plus noise, normalised
    with ``NORM`` (as SplitCIFAR's), so a pretrained backbone's adapter has a real normalisation to convert."""

    def __init__(self, num_tasks: int = 2, classes: int = 2, side: int = 16, samples: int = 64, test_samples: int = 64,
                 noise: float = 0.15, batch_size: int = 32, scenario: str = "task", seed: int = 0):
        super().__init__(num_tasks=num_tasks, batch_size=batch_size, scenario=scenario, seed=seed, eval_batch_size=128)
        self.classes, self.side, self.noise = classes, side, noise
        self.samples, self.test_samples = samples, test_samples

    def describe(self) -> Description:
        k = self.classes
        return Description("templates", tuple(Task(i, f"templates/{i}", tuple(range(i * k, (i + 1) * k)))
                                              for i in range(self.num_tasks)),
                           input_shape=(3, self.side, self.side), outputs_per_task=k, normalization=NORM)

    def _load(self) -> None:
        g = torch.Generator().manual_seed(self.seed)
        self.templates = torch.rand(self.num_tasks * self.classes, 3, self.side, self.side, generator=g)

    def _task_split(self, task_id: int, split: str) -> TaskData:
        n = self.samples if split == "train" else self.test_samples
        g = torch.Generator().manual_seed(self.seed * 1000 + task_id * 2 + (split == "test"))
        y = task_id * self.classes + torch.randint(self.classes, (n,), generator=g)
        pixels = (self.templates[y] + self.noise * torch.randn(n, 3, self.side, self.side, generator=g)).clamp(0, 1)
        mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in NORM)
        if self.scenario is not Scenario.CLASS_IL:
            y = y - task_id * self.classes
        return TaskData((pixels - mean) / std, y, task_id)


def bound(model, dm=None):
    dm = dm or Templates()
    dm.prepare_data()
    dm.setup()
    model.setup_tasks(dm.info)
    return model, dm


# ---------------------------------------------------------------------------------------- pretrained
TINY_VIT = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2}


def tiny_vit(seed: int = 0, **kw) -> PretrainedBackbone:
    torch.manual_seed(seed)
    return PretrainedBackbone("vit_tiny_patch16_224", source="timm", model_kwargs=TINY_VIT, **kw)


@pytest.fixture
def vit_file(tmp_path):
    """A tiny timm ViT's full state dict (classifier included, as a hub checkpoint has it) and that model."""
    import timm

    torch.manual_seed(7)
    source = timm.create_model("vit_tiny_patch16_224", num_classes=5, **TINY_VIT).eval()
    path = tmp_path / "tiny_vit.pth"
    torch.save(source.state_dict(), path)
    return path, source


def test_timm_weights_from_a_file_give_the_source_models_features(vit_file):
    path, source = vit_file
    net = tiny_vit(weights=str(path))
    assert net.out_features == 32 and net.adapter.size == (32, 32)
    assert net.adapter.target_mean.flatten().tolist() == [0.5, 0.5, 0.5]  # timm's pretrained_cfg for the name
    net.set_input_normalization(NORM, (3, 16, 16))
    x = torch.randn(4, 3, 16, 16)
    before = net.eval()(x)
    net.load_pretrained()  # lazily: building loaded nothing
    after = net(x)
    expected = source.forward_head(source.forward_features(net.adapter(x)), pre_logits=True)
    assert not torch.allclose(before, expected) and torch.allclose(after, expected, atol=1e-6)


def test_torchvision_resnet18_weights_from_a_file_at_32px(tmp_path):
    from torchvision.models import resnet18

    torch.manual_seed(3)
    source = resnet18(num_classes=7).eval()
    torch.save(source.state_dict(), tmp_path / "r18.pth")
    net = PretrainedBackbone("resnet18", weights=str(tmp_path / "r18.pth"), image_size=32)
    net.load_pretrained()
    x = torch.rand(2, 3, 32, 32)  # pixels: no benchmark normalisation stated
    source.fc = nn.Identity()
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)))
    assert net.out_features == 512 and torch.allclose(net.eval()(x), source((x - mean) / std), atol=1e-5)


def test_weights_that_do_not_fit_name_their_keys(tmp_path, vit_file):
    path, source = vit_file
    state = source.state_dict()
    state["blocks.0.attn.qkv_renamed.weight"] = state.pop("blocks.0.attn.qkv.weight")
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"missing keys \[blocks\.0\.attn\.qkv\.weight\], unexpected keys "
                                         r"\[blocks\.0\.attn\.qkv_renamed\.weight\]"):
        tiny_vit(weights=str(tmp_path / "bad.pth")).load_pretrained()
    with pytest.raises(RuntimeError, match="absent.pth"):
        tiny_vit(weights=str(tmp_path / "absent.pth")).load_pretrained()
    with pytest.raises(ValueError, match="resnet19"):
        PretrainedBackbone("resnet19")
    with pytest.raises(ValueError, match="takes 32px inputs only"):
        tiny_vit(image_size=64)


def test_the_adapter_maps_benchmark_normalised_images_to_the_weights_normalisation():
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(3, 3, 8, 8, generator=g)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in NORM)
    w_mean, w_std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    wm, ws = (torch.tensor(v).view(1, 3, 1, 1) for v in (w_mean, w_std))
    adapter = InputAdapter(mean=w_mean, std=w_std)
    adapter.set_input_normalization(NORM)
    assert torch.allclose(adapter((pixels - mean) / std), (pixels - wm) / ws, atol=1e-5)
    # a hand-made pixel: red 0.75 in CIFAR-100's normalisation is (0.75 - 0.5071) / 0.2673; in ImageNet's it is
    # (0.75 - 0.485) / 0.229
    one = torch.full((1, 3, 1, 1), 0.0)
    one[0, 0] = (0.75 - 0.5071) / 0.2673
    assert adapter(one)[0, 0, 0, 0].item() == pytest.approx((0.75 - 0.485) / 0.229, abs=1e-5)
    # with a resize: the same as resizing the weights-normalised pixels
    resized = InputAdapter(size=16, mean=w_mean, std=w_std)
    resized.set_input_normalization(NORM)
    assert torch.allclose(resized((pixels - mean) / std),
                          F.interpolate((pixels - wm) / ws, size=(16, 16), mode="bilinear", align_corners=False),
                          atol=1e-5)
    # grey, flat, standardised MNIST-style inputs to three channels at 0.5 / 0.5
    grey = InputAdapter(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    grey.set_input_normalization(((0.1307,), (0.3081,)), (1, 8, 8))
    p = torch.rand(2, 1, 8, 8, generator=g)
    out = grey(((p - 0.1307) / 0.3081).flatten(1))
    assert out.shape == (2, 3, 8, 8) and torch.allclose(out, ((p - 0.5) / 0.5).expand(-1, 3, -1, -1), atol=1e-5)


def test_a_frozen_backbone_gets_no_gradient_and_keeps_its_batch_norm_statistics():
    net = PretrainedBackbone("resnet18", freeze=True, image_size=32)
    net.train()
    bn = net.model.bn1
    before = {k: v.clone() for k, v in net.model.state_dict().items()}
    head = nn.Linear(512, 3)
    F.cross_entropy(head(net(torch.randn(8, 3, 32, 32))), torch.randint(3, (8,))).backward()
    assert not bn.training and all(p.grad is None and not p.requires_grad for p in net.parameters())
    assert head.weight.grad is not None
    assert all(torch.equal(before[k], v) for k, v in net.model.state_dict().items())


def test_a_trained_unfrozen_backbone_restored_from_a_checkpoint_is_not_overwritten(vit_file):
    path, _ = vit_file
    trained = tiny_vit(seed=5, weights=str(path))
    assert "model.cls_token" in trained.state_dict()  # unfrozen: its weights are in checkpoints
    net = tiny_vit(seed=0, weights=str(path))
    net.load_state_dict(trained.state_dict())
    net.load_pretrained()  # what a resumed run's setup calls: must keep the restored weights
    assert torch.equal(net.model.cls_token, trained.model.cls_token)


def test_two_tasks_with_a_frozen_pretrained_backbone_train_the_head_only(vit_file, tmp_path):
    path, source = vit_file
    model, dm = bound(ContinualModule(tiny_vit(weights=str(path), freeze=True), lr=0.05))
    head_before = model.head.weight.detach().clone()
    result = run_tasks(model, dm, tmp_path / "run", max_epochs=10)
    loaded = source.state_dict()
    assert all(torch.equal(v, loaded[k]) for k, v in model.backbone.model.state_dict().items())  # the file's, unchanged
    assert not torch.equal(model.head.weight, head_before)
    assert min(result["R"][-1]) > 0.9, result["R"]  # task-IL, 2 classes a task: chance 0.5
    assert model.backbone.adapter.source_mean.flatten().tolist() == pytest.approx(NORM[0])  # fit_body told it
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "after_task_1.ckpt", weights_only=False)
    assert "head.weight" in ckpt["state_dict"] and not any(k.startswith("backbone.") for k in ckpt["state_dict"])


# ---------------------------------------------------------------------------------------- compile
# backend aot_eager: dynamo's graph capture and AOTAutograd's forward/backward graphs, without inductor's code
# generation (a C++ compile of about 20 s per graph on this CPU, too slow for a unit test); benchmarks/compile_check.py
# runs the default backend (inductor).
BACKEND = "aot_eager"


def mlp_run(run_dir, compile, resume=False):
    torch.manual_seed(0)
    model, dm = bound(ContinualModule(MLP(hidden_sizes=(32,)), lr=0.01, compile=compile), Templates(noise=3.0))
    return model, run_tasks(model, dm, run_dir, resume=resume)


def test_compile_trains_like_the_uncompiled_model_with_the_same_state_dict_keys(tmp_path):
    from torch._dynamo.utils import counters

    plain, expected = mlp_run(tmp_path / "plain", False)
    counters.clear()
    compiled, result = mlp_run(tmp_path / "compiled", BACKEND)
    assert counters["stats"]["unique_graphs"] >= 1  # the backbone did run compiled
    assert 0.6 < result["ACC"] < 1.0  # not a trivial run
    # float sums may be ordered otherwise in the compiled graph: at most one test image of 64 may flip
    assert (torch.tensor(result["R"]) - torch.tensor(expected["R"])).abs().max() <= 1 / 64, (result["R"], expected["R"])
    assert compiled.state_dict().keys() == plain.state_dict().keys()
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(compiled.state_dict().values(),
                                                                 plain.state_dict().values(), strict=True))
    ckpt = torch.load(tmp_path / "compiled" / "checkpoints" / "after_task_1.ckpt", weights_only=False)
    assert not any("_orig_mod" in k for k in ckpt["state_dict"])
    with pytest.raises(ValueError, match="not a torch.compile backend"):
        ContinualModule(MLP(), compile="no_such_backend").setup_tasks(Templates().info)


def test_a_compiled_run_resumes_after_a_task_boundary_with_the_same_accuracy_matrix(tmp_path):
    _, full = mlp_run(tmp_path / "run", BACKEND)
    (tmp_path / "run" / "checkpoints" / "after_task_1.ckpt").unlink()
    _, resumed = mlp_run(tmp_path / "run", BACKEND, resume=True)
    _, plain = mlp_run(tmp_path / "plain", False)
    (tmp_path / "plain" / "checkpoints" / "after_task_1.ckpt").unlink()
    _, across = mlp_run(tmp_path / "plain", BACKEND, resume=True)  # an uncompiled run resumed compiled
    assert resumed["R"] == full["R"] and len(full["R"]) == 2
    assert (torch.tensor(across["R"]) - torch.tensor(plain["R"])).abs().max() <= 1 / 64, (across["R"], plain["R"])
