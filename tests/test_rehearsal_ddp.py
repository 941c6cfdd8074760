"""Rehearsal under two real processes (Lightning DDP over gloo on CPU): DER++'s reservoir of the gathered global
batch and GEM's projection with all-reduced memory gradients give the single-process R, and every rank holds
the single-process memory."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.helpers.launch import train_process


def train(mnist_root, out, dump, *extra):
    plugins = ("method.plugins=[{class_path: cl_lightning.callbacks.DarkExperienceReplay, init_args: "
               "{memory_size: 100, batch_size: 32, alpha: 0.3, beta: 0.5}}, "
               "{class_path: cl_lightning.callbacks.GEM, init_args: {memory_size: 200}}, "
               f"{{class_path: tests.helpers.dump_memory.DumpMemory, init_args: {{folder: '{dump}'}}}}]")
    cmd = ["method=derpp", "benchmark=permuted_mnist",
           f"data_dir={mnist_root}", f"output_dir={out}", "logger=none", plugins, "benchmark.num_tasks=2",
           "benchmark.train_samples_per_task=512", "benchmark.batch_size=64", "trainer.enable_progress_bar=false",
           "trainer.accelerator=cpu", *extra]
    proc = train_process(cmd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "metrics.json").read_text())


@pytest.mark.slow
def test_ddp_rehearsal_on_two_processes_matches_one_process(mnist_root, tmp_path):
    single = train(mnist_root, tmp_path / "single", tmp_path / "dump1", "trainer.devices=1")
    ddp = train(mnist_root, tmp_path / "ddp", tmp_path / "dump2", "trainer.devices=2", "trainer.strategy=ddp")

    np.testing.assert_allclose(ddp["R"], single["R"], atol=2e-3)
    assert ddp["optimizer_steps"] == single["optimizer_steps"]
    assert ddp["storage"] == single["storage"]
    for task in (0, 1):
        rank0 = torch.load(tmp_path / "dump2" / f"rank0_task{task}.pt")
        rank1 = torch.load(tmp_path / "dump2" / f"rank1_task{task}.pt")
        alone = torch.load(tmp_path / "dump1" / f"rank0_task{task}.pt")
        assert sorted(rank0) == ["0_DarkExperienceReplay", "1_GEM"]
        for name, memory in rank0.items():
            assert len(memory["y"]) == (100 if "Dark" in name else 200)
            for key, value in memory.items():
                assert torch.equal(value, rank1[name][key]), f"{name}.{key} differs between ranks"
                if key == "logits":  # outputs of networks trained apart in float32
                    torch.testing.assert_close(value, alone[name][key], rtol=1e-3, atol=1e-3)
                else:  # the same samples in the same slots
                    assert torch.equal(value, alone[name][key]), f"{name}.{key} differs from one process"
