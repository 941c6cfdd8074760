"""EWC's end-of-task Fisher pass against one training epoch over the same samples (prints, never asserts).

    python benchmarks/ewc_fisher_speed.py [--samples 2000] [--threads 2] [--reps 3]

Split-MNIST task-IL shape (784-400-400 trunk, 5 tasks of 2 outputs), MNIST-sized random inputs (timing does
not depend on the pixel values). Times, in one run, best of ``--reps``: one training epoch over the samples
(batch 128, forward + backward + Adam), the per-sample Fisher through ``torch.func`` only (the previous
implementation), the per-sample Fisher with the Linear-layer shortcut (the default now) and the minibatch
estimator. Only the ratios are meaningful on a shared machine.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cl_lightning.callbacks import EWC  # noqa: E402
from cl_lightning.methods import ContinualModule  # noqa: E402
from cl_lightning.nets import MLP  # noqa: E402
from cl_lightning.tasks import BenchmarkInfo, Scenario, Task  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    n = args.samples
    x, y, t = torch.rand(n, 1, 28, 28), torch.randint(0, 2, (n,)), torch.full((n,), 1)
    info = BenchmarkInfo("split_mnist", tuple(Task(i, str(i)) for i in range(5)), Scenario.TASK_IL, (1, 28, 28), 2)
    model = ContinualModule(MLP(hidden_sizes=(400, 400)))
    model.setup_tasks(info)
    data = SimpleNamespace(task_dataloader=lambda task, split="train", batch_size=None, limit=None: DataLoader(
        TensorDataset(x[:limit], y[:limit], t[:limit]), batch_size=batch_size))
    trainer = SimpleNamespace(datamodule=data, strategy=SimpleNamespace(reduce=lambda v, reduce_op="sum": v),
                              world_size=1)

    def epoch() -> None:
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        model.train()
        for i in range(0, n, 128):
            loss = torch.nn.functional.cross_entropy(model(x[i:i + 128], t[i:i + 128]), y[i:i + 128])
            opt.zero_grad()
            loss.backward()
            opt.step()

    runs = {
        "one training epoch (batch 128, Adam)": epoch,
        "per-sample Fisher, torch.func only (before)": lambda: EWC().fisher(trainer, model, 1, use_vmap_only=True),
        "per-sample Fisher, Linear shortcut (default)": lambda: EWC().fisher(trainer, model, 1),
        "minibatch Fisher (fisher_estimator=minibatch)": lambda: EWC(fisher_estimator="minibatch").fisher(
            trainer, model, 1),
    }
    times = {}
    for _ in range(args.reps):
        for name, fn in runs.items():
            began = time.perf_counter()
            fn()
            times[name] = min(times.get(name, float("inf")), time.perf_counter() - began)
    base = times["one training epoch (batch 128, Adam)"]
    print(f"{n} samples, 784-400-400 trunk, task-IL heads, {args.threads} threads, best of {args.reps}")
    for name, s in times.items():
        print(f"{name:<48} {s:7.3f} s  {s / base:5.2f} x epoch")


if __name__ == "__main__":
    main()
