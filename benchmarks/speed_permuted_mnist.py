"""Overhead of cl-lightning against a plain PyTorch loop on the same workload (prints, never asserts).

Permuted-MNIST-10, MLP 784-100-100-10, batch 128, Adam 1e-3, one epoch per task, evaluation of all
tasks after each task; fine-tuning and EWC, each run through the task loop (fresh Trainer per task) and
as a hand-written loop over the same in-memory tensors.

    python benchmarks/speed_permuted_mnist.py [--tasks 10] [--threads 2] [--ewc-strength 1000]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from cl_lightning.callbacks import EWC
from cl_lightning.datamodules import PermutedMNIST
from cl_lightning.datamodules.mnist import default_data_dir, load_torchvision_split
from cl_lightning.methods import ContinualModule
from cl_lightning.nets import MLP
from cl_lightning.runner import ContinualRunner


def plain_loop(tasks: int, data_dir: str, ewc_strength: float | None, fisher_samples: int, seed: int) -> float:
    """The same training written as a bare loop: returns final average accuracy."""
    torch.manual_seed(seed)
    x_train, y_train = load_torchvision_split("MNIST", data_dir, True)
    x_test, y_test = load_torchvision_split("MNIST", data_dir, False)
    perms = PermutedMNIST(num_tasks=tasks, data_dir=data_dir).permutations
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 100), nn.ReLU(), nn.Linear(100, 100), nn.ReLU(),
                          nn.Linear(100, 10))

    def inputs(x, t):
        return x.flatten(1).float().div(255.0)[:, perms[t]]

    precision: dict[str, torch.Tensor] = {}
    anchor: dict[str, torch.Tensor] = {}
    accs = []
    for t in range(tasks):
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        order = torch.randperm(len(y_train))
        for idx in order.split(128):
            loss = F.cross_entropy(model(inputs(x_train[idx], t)), y_train[idx])
            if precision:
                loss = loss + 0.5 * ewc_strength * sum(
                    (precision[n] * (p - anchor[n]).pow(2)).sum() for n, p in model.named_parameters())
            opt.zero_grad()
            loss.backward()
            opt.step()
        if ewc_strength is not None:
            params = {n: p.detach() for n, p in model.named_parameters()}

            def nll(p, x, y):
                return F.cross_entropy(functional_call(model, p, (x.unsqueeze(0),)), y.unsqueeze(0))

            sq = {n: torch.zeros_like(p) for n, p in params.items()}
            for idx in torch.arange(fisher_samples).split(256):
                g = vmap(grad(nll), in_dims=(None, 0, 0))(params, inputs(x_train[idx], t), y_train[idx])
                for n in sq:
                    sq[n] += g[n].pow(2).sum(0)
            for n in sq:
                f = sq[n] / fisher_samples
                if n in precision:
                    total = precision[n] + f
                    anchor[n] = (precision[n] * anchor[n] + f * params[n]) / total.clamp_min(1e-30)
                    precision[n] = total
                else:
                    precision[n], anchor[n] = f, params[n].clone()
        with torch.no_grad():
            accs = [float((model(inputs(x_test, j)).argmax(1) == y_test).float().mean()) for j in range(tasks)]
    return sum(accs) / len(accs)


def ours(tasks: int, data_dir: str, ewc_strength: float | None, fisher_samples: int, seed: int) -> float:
    L.seed_everything(seed, verbose=False)
    plugins = [EWC(strength=ewc_strength, fisher_samples=fisher_samples)] if ewc_strength is not None else None
    model = ContinualModule(MLP(hidden_sizes=[100, 100]), lr=1e-3, plugins=plugins)
    dm = PermutedMNIST(num_tasks=tasks, data_dir=data_dir, batch_size=128)
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = {"accelerator": "cpu", "devices": 1, "max_epochs": 1, "enable_progress_bar": False}
        metrics = ContinualRunner(model, dm, run_dir, seed=seed, trainer_kwargs=trainer).run()
    return metrics["ACC"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ewc-strength", type=float, default=1000.0)
    parser.add_argument("--fisher-samples", type=int, default=2000)
    parser.add_argument("--data-dir", default=default_data_dir())
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_torchvision_split("MNIST", args.data_dir, True)  # read once, outside the timings
    load_torchvision_split("MNIST", args.data_dir, False)
    samples = 60_000 * args.tasks
    print(f"Permuted-MNIST-{args.tasks}, MLP 784-100-100-10, batch 128, Adam 1e-3, 1 epoch/task, "
          f"{args.threads} threads\n")
    print(f"{'method':<10}{'runner':>10}{'plain':>10}{'ratio':>8}{'samples/s':>12}{'plain s/s':>12}"
          f"{'ACC':>8}{'plain ACC':>11}")
    for name, strength in (("finetune", None), ("ewc", args.ewc_strength)):
        timings = {}
        accs = {}
        for label, fn in (("plain", plain_loop), ("ours", ours)):
            began = time.perf_counter()
            accs[label] = fn(args.tasks, args.data_dir, strength, args.fisher_samples, args.seed)
            timings[label] = time.perf_counter() - began
        print(f"{name:<10}{timings['ours']:>9.1f}s{timings['plain']:>9.1f}s{timings['ours'] / timings['plain']:>8.2f}"
              f"{samples / timings['ours']:>12.0f}{samples / timings['plain']:>12.0f}{accs['ours']:>8.3f}"
              f"{accs['plain']:>11.3f}", flush=True)


if __name__ == "__main__":
    main()
