"""SupSup and ImpressLearn through `python train.py` with DDP on 2 CPU processes."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.run import train_py


def test_supsup_gn_ddp_two_cpu_processes_match_one(mnist_root, tmp_path):
    args = ["method=supsup", "benchmark=permuted_mnist", "method.task_inference=oneshot"]
    one = train_py([*args, "trainer.devices=1"], tmp_path / "one", mnist_root, threads=1)
    two = train_py([*args, "trainer.strategy=ddp", "trainer.devices=2"], tmp_path / "two", mnist_root)
    R1, R2 = torch.tensor(one["R"]), torch.tensor(two["R"])
    assert R1.shape == R2.shape == (2, 2)
    assert (R1.diag() > 0.4).all(), R1  # 8 steps per task: well above chance (0.1)
    # the same global batches and DDP-averaged gradients, each process on one thread like each DDP rank
    # (edge-popup's top-k turns the float differences of another thread count into flipped connections)
    assert torch.allclose(R1, R2, atol=0.03), (R1, R2)


def test_impresslearn_homogeneous_basis_under_ddp_matches_one_process(mnist_root, tmp_path):
    """The batched homogeneous basis (each mask on its own random subset of the global batch), the freezing
    plugin (its digest check raises on any change) and alpha training, on 2 processes and on 1."""
    args = ["method=impresslearn", "benchmark=permuted_mnist", "method.basis_kind=homogeneous",
            "method.basis_size=2", "method.task_inference=given"]
    two = train_py([*args, "trainer.strategy=ddp", "trainer.devices=2"], tmp_path / "two", mnist_root)
    one = train_py([*args, "trainer.devices=1"], tmp_path / "one", mnist_root, threads=1)
    assert two["R"][-1][0] > 0.4, two["R"]  # 8 steps; chance is 0.1
    assert two["storage"]["basis_masks"] == 2 and two["storage"]["bytes_per_task_alpha"] == 4 * 2 * 3
    # the same subsets of the same global batches; float summation order may flip a few connections
    assert torch.allclose(torch.tensor(one["R"]), torch.tensor(two["R"]), atol=0.03), (one["R"], two["R"])
    assert one["ARI"] == pytest.approx(two["ARI"], abs=0.03)
    # the basis masks' scores after task 0 agree up to float summation order (per-rank subsets: ~0.1 apart)
    scores = [{k: v for k, v in torch.load(tmp_path / run / "checkpoints" / "after_task_0.ckpt",
                                           weights_only=False)["state_dict"].items() if ".scores." in k}
              for run in ("one", "two")]
    assert len(scores[0]) == 6
    # (Adam turns float noise in near-zero gradients into steps of about lr, so a few scores move apart: 0.8 %
    # of one layer's with torch 2.14; per-rank subsets would change every mask's gradient, hence most scores)
    for name, s1 in scores[0].items():
        apart = ((s1 - scores[1][name]).abs() > 1e-3).float().mean().item()
        assert apart < 0.02, (name, apart)
