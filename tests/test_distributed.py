"""Two real processes (Lightning DDP over gloo on CPU) give the single-process result."""

from __future__ import annotations

import json

import numpy as np
import torch

from tests.helpers.launch import train_process


def train(mnist_root, out, dump, *extra):
    plugins = ("method.plugins=[{class_path: cl_lightning.callbacks.EWC, "
               "init_args: {strength: 100, fisher_samples: 300}}, "
               f"{{class_path: tests.helpers.dump.DumpEWCPrecision, init_args: {{folder: '{dump}'}}}}]")
    cmd = ["method=ewc", f"data_dir={mnist_root}", f"output_dir={out}",
           "logger=none",
           plugins, "benchmark.num_tasks=2", "benchmark.class_order=[0,1,2,3,4,5,6,7,8,9]",
           "benchmark.train_samples_per_task=512", "benchmark.batch_size=64", "method.backbone.hidden_sizes=[64]",
           "trainer.enable_progress_bar=false", "trainer.accelerator=cpu", *extra]
    proc = train_process(cmd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "metrics.json").read_text())


def test_ddp_on_two_processes_matches_one_process(mnist_root, tmp_path):
    single = train(mnist_root, tmp_path / "single", tmp_path / "dump1", "trainer.devices=1")
    ddp = train(mnist_root, tmp_path / "ddp", tmp_path / "dump2", "trainer.devices=2", "trainer.strategy=ddp")

    np.testing.assert_allclose(ddp["R"], single["R"], atol=2e-3)
    np.testing.assert_allclose(ddp["baseline"], single["baseline"], atol=1e-9)
    assert ddp["optimizer_steps"] == single["optimizer_steps"]

    for task in (0, 1):
        rank0 = torch.load(tmp_path / "dump2" / f"rank0_task{task}.pt")
        rank1 = torch.load(tmp_path / "dump2" / f"rank1_task{task}.pt")
        alone = torch.load(tmp_path / "dump1" / f"rank0_task{task}.pt")
        for name in rank0:
            assert torch.equal(rank0[name], rank1[name]), f"EWC Fisher differs between ranks for {name}"
            torch.testing.assert_close(rank0[name], alone[name], rtol=1e-3, atol=1e-7)
