"""Vectorised against sequential candidate training of the ARI learner (Q candidates, one task).

    python benchmarks/ari_speed.py --candidates 10 --steps 100 --threads 2

The same Q parameter sets of the base MLP 784-100-100-10 are trained for the same steps on the same
MNIST batches (batch 10, Adam lr 1e-3, weight decay 1e-3; the GEM protocol's task of 1,000 images):

- vectorised: the ARI learner's own training step, one ``[Q, P]`` parameter through
  ``torch.func.vmap`` (what ``ARILearner.task_loss`` runs under Lightning);
- sequential: Q ordinary ``nn.Module`` copies, each with its own Adam, trained one after another in a
  plain PyTorch loop (the cheapest way to run them one at a time).

It prints the wall time of both, the ratio, and the largest weight difference between the two results
(they are the same computation).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import data_dir  # noqa: E402
from cl_lightning.callbacks import ARIConsolidation  # noqa: E402
from cl_lightning.datamodules import SplitMNIST  # noqa: E402
from cl_lightning.methods import ARILearner  # noqa: E402
from cl_lightning.nets import MLP  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--candidates", type=int, default=10)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dm = SplitMNIST(data_dir=data_dir(), scenario="class", train_samples_per_task=1000, batch_size=args.batch)
    dm.setup()
    learner = ARILearner(base=MLP(hidden_sizes=(100, 100)), num_init_sets=args.candidates,
                         max_candidates=args.candidates, plugins=[ARIConsolidation()])
    learner.setup_tasks(dm.info)
    data = dm.split(0, "train")
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))
    batches = [data[order[(i * args.batch) % len(data):][: args.batch]] for i in range(args.steps)]
    start = learner.init_sets.clone()

    def vectorised() -> torch.Tensor:
        learner.candidates.data = start.clone()
        learner.candidates.requires_grad_(True)
        opt = torch.optim.Adam([learner.candidates], lr=1e-3, weight_decay=1e-3)
        for batch in batches:
            opt.zero_grad(set_to_none=True)
            learner.task_loss(batch).value.backward()
            opt.step()
        return learner.candidates.detach().clone()

    template = torch.nn.Sequential(MLP(in_features=784, hidden_sizes=(100, 100)), torch.nn.Linear(100, 10))

    def sequential() -> torch.Tensor:
        results = []
        for k in range(args.candidates):
            net = copy.deepcopy(template)
            torch.nn.utils.vector_to_parameters(start[k], net.parameters())
            opt = torch.optim.Adam(net.parameters(), lr=1e-3, weight_decay=1e-3)
            for x, y, _ in batches:
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(net(x), y).backward()
                opt.step()
            results.append(torch.nn.utils.parameters_to_vector(net.parameters()).detach())
        return torch.stack(results)

    times = {"vectorised": [], "sequential": []}
    results = {}
    for _ in range(args.repeats):  # interleaved, so load changes hit both alike
        for name, fn in (("vectorised", vectorised), ("sequential", sequential)):
            began = time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - began)
    v, s = min(times["vectorised"]), min(times["sequential"])
    diff = (results["vectorised"] - results["sequential"]).abs().max().item()
    print(f"Q={args.candidates} candidates, {args.steps} steps of batch {args.batch}, {args.threads} threads "
          f"(best of {args.repeats})")
    print("| training | wall s | ms/step (all candidates) |")
    print("|---|---|---|")
    print(f"| vectorised (vmap, one [Q, P] parameter) | {v:.3f} | {1000 * v / args.steps:.2f} |")
    print(f"| sequential (Q plain PyTorch loops) | {s:.3f} | {1000 * s / args.steps:.2f} |")
    print(f"ratio sequential / vectorised: {s / v:.2f}x; max weight difference {diff:.2e}")


if __name__ == "__main__":
    main()
