"""Gradient-sign filtering on the paper's Fig. 1 setting, beside plain SGD.

Paper ("Enabling continual learning in neural networks with meta learning", 2019), Fig. 1: Permuted-MNIST,
5 tasks, MLP 784-256-256-256-10, 2,000 iterations per task, batch 64, SGD lr 0.003; the paper reports no
forgetting and some positive backward transfer (curves only, no table of numbers).

Prints the accuracy matrix, ACC and BWT of both runs, the share of gradient coordinates the filter let
through, the predictors' fit losses and the time, and saves a plot of every task's test accuracy over
training (like the paper's figure). The defaults are scaled down for a 2-core CPU; ``--paper`` runs the
full setting. Example:

    python benchmarks/gradsign_reproduce.py --steps 500 --out benchmarks/gradsign_curves.png
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cl_lightning.callbacks.gradient_sign import GradientSignFilter  # noqa: E402
from cl_lightning.datamodules.mnist import PermutedMNIST  # noqa: E402
from cl_lightning.methods.base import ContinualModule  # noqa: E402
from cl_lightning.nets import MLP  # noqa: E402
from cl_lightning.runner import ContinualRunner  # noqa: E402

PAPER = "no forgetting, some positive backward transfer (Fig. 1 curves; no numbers given)"


class AccuracyCurve(L.Callback):
    """Test accuracy of every task on a fixed subset, every ``every`` steps (the paper's curves)."""

    def __init__(self, dm: PermutedMNIST, every: int, samples: int, steps_per_task: int):
        self.dm, self.every, self.samples, self.steps_per_task = dm, every, samples, steps_per_task
        self.points: list[tuple[int, list[float]]] = []

    @torch.no_grad()
    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step % self.every:
            return
        was = module.training
        module.eval()
        accs = []
        for t in range(self.dm.num_tasks):
            data = self.dm.split(t, "test")
            idx = torch.arange(min(self.samples, len(data)))
            x, y, tid = data[idx]
            accs.append(float(module.scores_of(module(x, tid), y).mean()))
        module.train(was)
        self.points.append((module.current_task * self.steps_per_task + step, accs))


def run(method: str, args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    dm = PermutedMNIST(num_tasks=args.tasks, data_dir=args.data_dir, batch_size=64,
                       train_samples_per_task=args.train_samples)
    plugins = []
    if method.startswith("gradsign"):
        previous = method == "gradsign_previous"  # the previous value as a second input: no table
        plugins = [GradientSignFilter(hidden_sizes=args.predictor_hidden, predictor_steps=args.predictor_steps,
                                      distill_steps=args.predictor_steps, combine=args.combine,
                                      distill_points=args.distill_points, seed=args.seed,
                                      previous_value=previous, table_size=0 if previous else 4097)]
    model = ContinualModule(backbone=MLP(hidden_sizes=[256, 256, 256]), optimizer=args.optimizer, lr=args.lr,
                            plugins=plugins)
    curve = AccuracyCurve(dm, args.curve_every, args.curve_samples, args.steps)
    trainer = {"accelerator": "cpu", "devices": 1, "max_epochs": -1, "max_steps": args.steps,
               "enable_progress_bar": False, "log_every_n_steps": 50}
    runner = ContinualRunner(model, dm, tempfile.mkdtemp(prefix=f"gradsign_{method}_"), trainer_kwargs=trainer,
                             seed=args.seed)
    original = runner.make_trainer

    def make_trainer(task: int, train: bool = True) -> L.Trainer:
        tr = original(task, train)
        if train:
            tr.callbacks.append(curve)
        return tr

    runner.make_trainer = make_trainer  # type: ignore[method-assign]
    began = time.perf_counter()
    metrics = runner.run()
    metrics["wall_seconds"] = time.perf_counter() - began
    metrics["curve"] = curve.points
    if plugins:
        metrics["kept_fraction_last_task"] = plugins[0].kept_fraction
        metrics["fit_losses"] = plugins[0].fit_losses
        metrics["storage_breakdown"] = plugins[0].storage_breakdown()
    return metrics


def show(name: str, m: dict) -> None:
    print(f"\n== {name}: ACC {m['ACC']:.4f}  BWT {m['BWT']:+.4f}  ({m['wall_seconds']:.0f} s)")
    for i, row in enumerate(m["R"]):
        print(f"  after task {i}: " + " ".join(f"{v:.3f}" for v in row))
    if "kept_fraction_last_task" in m:
        print(f"  filter kept {m['kept_fraction_last_task']:.3f} of the coordinates in the last task")
        print("  predictor fits (normalised MSE, 1.0 = zero predictor):",
              ", ".join(f"{k}={v:.3f}" for d in m["fit_losses"] for k, v in d.items() if k != "task"))
        print("  storage:", m["storage"], m["storage_breakdown"])


def plot(results: dict[str, dict], path: str, steps: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4), sharey=True)
    for ax, (name, m) in zip(np.atleast_1d(axes), results.items(), strict=True):
        xs = [p[0] for p in m["curve"]]
        accs = np.array([p[1] for p in m["curve"]])
        for t in range(accs.shape[1]):
            ax.plot(xs, accs[:, t], label=f"task {t + 1}")
        for t in range(1, accs.shape[1]):
            ax.axvline(t * steps, color="grey", lw=0.5)
        ax.set_title(f"{name}: ACC {m['ACC']:.3f}, BWT {m['BWT']:+.3f}")
        ax.set_xlabel("iteration")
    np.atleast_1d(axes)[0].set_ylabel("test accuracy")
    np.atleast_1d(axes)[-1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--paper", action="store_true", help="the full setting: 2000 steps, 3x256 predictors")
    p.add_argument("--tasks", type=int, default=5)
    p.add_argument("--steps", type=int, default=500, help="iterations per task (paper: 2000)")
    p.add_argument("--train-samples", type=int, default=None, help="training images per task (default: all)")
    p.add_argument("--optimizer", default="sgd")
    p.add_argument("--lr", type=float, default=0.003)
    p.add_argument("--predictor-hidden", type=int, nargs="+", default=[64, 64, 64], help="paper: 256 256 256")
    p.add_argument("--predictor-steps", type=int, default=500)
    p.add_argument("--distill-points", type=int, default=50_000)
    p.add_argument("--combine", default="mean")
    p.add_argument("--curve-every", type=int, default=50)
    p.add_argument("--curve-samples", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data-dir", default=os.environ.get("CL_DATA_DIR", str(Path(__file__).resolve().parents[2]
                                                                              / "shared" / "data")))
    p.add_argument("--out", default="gradsign_curves.png")
    p.add_argument("--json", default=None, help="also write both runs' metrics here")
    p.add_argument("--previous-value", action="store_true",
                   help="also run the filter with the previous value as a predictor input")
    args = p.parse_args()
    if args.paper:
        args.steps, args.predictor_hidden, args.predictor_steps = 2000, [256, 256, 256], 1000
    torch.set_num_threads(args.threads)
    results = {"plain SGD" if args.optimizer == "sgd" else f"plain {args.optimizer}": run("plain", args),
               "gradient-sign filter": run("gradsign", args)}
    if args.previous_value:
        results["filter, previous value input"] = run("gradsign_previous", args)
    print(f"Permuted-MNIST, {args.tasks} tasks, MLP 784-256-256-256-10, {args.steps} it/task, batch 64, "
          f"{args.optimizer} lr {args.lr}; predictor hidden {args.predictor_hidden}")
    for name, m in results.items():
        show(name, m)
    print("\n| | ACC | BWT | paper |")
    print("|---|---|---|---|")
    for k, (name, m) in enumerate(results.items()):
        print(f"| {name} | {m['ACC']:.3f} | {m['BWT']:+.3f} | {'forgets' if k == 0 else PAPER} |")
    plot(results, args.out, args.steps)
    print(f"\nplot: {args.out}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
