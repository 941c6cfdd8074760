"""HNET reproduction (von Oswald et al., ICLR 2020): our figures beside the paper's.

    python benchmarks/hnet_reproduce.py poly                      # Fig. 2 toy, with and without the regularizer
    python benchmarks/hnet_reproduce.py split_cl1 --steps 2000    # Split-MNIST CL1 (paper 99.79)
    python benchmarks/hnet_reproduce.py pmnist_cl1 --small        # Permuted-MNIST-10 CL1 (paper 97.57)
    python benchmarks/hnet_reproduce.py split_cl3                 # HNET+ENT Split-MNIST CL3 (paper 69.48)
    python benchmarks/hnet_reproduce.py pmnist_cl3 --small        # HNET+ENT Permuted-MNIST-10 CL3 (paper 91.75)
    python benchmarks/hnet_reproduce.py regcost --tasks 100       # regularizer cost per step vs past tasks

Each run uses the experiment config named in its line (``configs/experiment/hnet_*.yaml``) through the
same runner as ``train.py``; ``--steps`` and ``--small`` scale it down and the printout says so. It prints
the accuracy matrix's diagonal ("during": just after each task) and last row ("after": at the end).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import data_dir  # noqa: E402
from cl_lightning.config import compose  # noqa: E402
from cl_lightning.experiment import build  # noqa: E402
from cl_lightning.runner import ContinualRunner  # noqa: E402

PAPER = {"split_cl1": 99.79, "pmnist_cl1": 97.57, "split_cl3": 69.48, "pmnist_cl3": 91.75}
EXPERIMENT = {"split_cl1": "hnet_split_mnist_cl1", "pmnist_cl1": "hnet_permuted_mnist_cl1",
              "split_cl3": "hnet_split_mnist_cl3", "pmnist_cl3": "hnet_permuted_mnist_cl3"}


def run_experiment(name: str, overrides: list[str]) -> tuple[dict, object]:
    cfg = compose([f"experiment={name}", "logger=none", f"data_dir={data_dir()}",
                   "trainer.enable_progress_bar=false", *overrides])
    model, dm = build(cfg)
    with tempfile.TemporaryDirectory() as run_dir:
        runner = ContinualRunner(model, dm, run_dir, trainer_kwargs=cfg["trainer"], seed=cfg["seed"],
                                 method_name=cfg.get("method_name"))
        began = time.perf_counter()
        metrics = runner.run()
        metrics["wall_seconds"] = time.perf_counter() - began
    return metrics, model


def report(key: str, metrics: dict, model, overrides: list[str]) -> None:
    R = np.asarray(metrics["R"]) * 100
    print(f"\n== {key}: experiment={EXPERIMENT[key]} {' '.join(overrides)}")
    print(f"compression ratio {model.compression_ratio():.3f}, target weights {model.hypernetwork.num_target_weights}, "
          f"steps {metrics['optimizer_steps']}, wall {metrics['wall_seconds']:.0f} s")
    print("during (diag R): " + " ".join(f"{v:6.2f}" for v in np.diag(R)))
    print("after (last row): " + " ".join(f"{v:6.2f}" for v in R[-1]))
    print(f"ACC ours {R[-1].mean():.2f}   paper {PAPER[key]:.2f}   (during-mean {np.diag(R).mean():.2f})")


def cmd_mnist(key: str, args: argparse.Namespace) -> None:
    name = EXPERIMENT[key] + ("_small" if args.small and key.startswith("pmnist") else "")
    overrides = [f"trainer.max_steps={args.steps}"] if args.steps else []
    overrides += args.overrides
    if args.train_samples:
        overrides.append(f"benchmark.train_samples_per_task={args.train_samples}")
    EXPERIMENT[key] = name
    metrics, model = run_experiment(name, overrides)
    report(key, metrics, model, overrides)


def cmd_poly(args: argparse.Namespace) -> None:
    results = {}
    for beta, name in ((0.0, "hnet_poly_regression_no_reg"), (0.05, "hnet_poly_regression")):
        metrics, model = run_experiment(name, [])
        results[beta] = (metrics, model)
        R = np.asarray(metrics["R"])
        print(f"beta={beta}: test MSE during (diag) {np.round(np.diag(R), 4).tolist()}  "
              f"after (last row) {np.round(R[-1], 4).tolist()}  drift of h(e_old) "
              f"{np.round(model.plugins[0].drift(model).tolist(), 4).tolist()}")
    print("paper Fig. 2: with the regularizer all three polynomials stay fitted; without it only the last one.")
    if args.plot:
        plot_poly(results, Path(args.plot))


def plot_poly(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cl_lightning.datamodules.poly_regression import FUNCTIONS

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5), sharey=True)
    for ax, (beta, (_, model)) in zip(axes, results.items(), strict=True):
        model.eval()
        for t, (label, f, (lo, hi)) in enumerate(FUNCTIONS):
            x = torch.linspace(lo, hi, 100).unsqueeze(1)
            with torch.no_grad():
                y = model(x, torch.full((100,), t))
            ax.plot(x, f(x), "k--", lw=1)
            ax.plot(x, y, lw=2, label=f"task {t + 1}: {label}")
        ax.set_title(f"beta={beta}" + (" (no regularizer)" if beta == 0 else " (output regularizer)"))
        ax.set_xlabel("x")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


def cmd_regcost(args: argparse.Namespace) -> None:
    """Time of one training step (task loss + regularizer, forward + backward + Adam) as the number of past
    tasks grows, all past tasks vs a random subset of K, on the Permuted-MNIST setting."""
    from cl_lightning.callbacks.hnet_regularizer import OutputRegularizer
    from cl_lightning.methods.hnet import HNET
    from cl_lightning.nets import MLP
    from cl_lightning.nets.hypernetwork import ChunkedHyperNetwork
    from cl_lightning.tasks import BenchmarkInfo, Scenario, Task

    torch.set_num_threads(args.threads)
    T = args.tasks
    info = BenchmarkInfo("permuted_mnist", tuple(Task(i, str(i)) for i in range(T)), Scenario.TASK_IL,
                         (1, 28, 28), 10)
    hidden = [int(h) for h in args.target.split(",")]
    print(f"target 784-{'-'.join(map(str, hidden))}-10, chunked hnet {args.hnet} chunks {args.chunk}, batch 128, "
          f"{args.threads} thread(s), {args.form} regularizer; ms per step (median of {args.reps})")
    print(f"{'past tasks':>10} {'no reg':>8} {'all past':>9} {'K=' + str(args.k):>8}")
    x, y = torch.rand(128, 1, 28, 28), torch.randint(0, 10, (128,))
    for past in args.past:
        if past >= T:
            continue
        row = []
        for K in (None, -1, args.k):
            reg = OutputRegularizer(beta=0.01, max_past_tasks=None if K in (None, -1) else K,
                                    form=args.form)
            model = HNET(target=MLP(hidden_sizes=hidden),
                         hypernetwork=ChunkedHyperNetwork(hidden_sizes=[int(h) for h in args.hnet.split(",")],
                                                          embedding_dim=24, chunk_size=args.chunk,
                                                          chunk_embedding_dim=8),
                         plugins=[reg])
            model.setup_tasks(info)
            model.current_task = past
            model.setup("fit")
            if past and K is not None:  # the snapshot of the past tasks' targets, as at a task start
                reg.on_task_start(None, model, past)
            opt = model.configure_optimizers()
            t = torch.full((128,), past)
            times = []
            for i in range(args.reps + 2):
                began = time.perf_counter()
                loss, _ = model.training_objective((x, y, t))
                opt.zero_grad()
                loss.backward()
                opt.step()
                if i >= 2:
                    times.append(time.perf_counter() - began)
            row.append(1000 * float(np.median(times)))
        print(f"{past:>10} {row[0]:>8.1f} {row[1]:>9.1f} {row[2]:>8.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["poly", *PAPER, "regcost"])
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per task (scales the run down)")
    parser.add_argument("--small", action="store_true", help="Permuted-MNIST: the 100-100 target config")
    parser.add_argument("--train-samples", type=int, default=None, help="training samples per task")
    parser.add_argument("--plot", default="benchmarks/hnet_poly.png", help="poly: where to save the plot")
    parser.add_argument("--tasks", type=int, default=100, help="regcost: number of tasks")
    parser.add_argument("--past", type=int, nargs="+", default=[0, 1, 4, 16, 32, 64, 99])
    parser.add_argument("--k", type=int, default=32, help="regcost: random subset size")
    parser.add_argument("--target", default="100,100", help="regcost: target hidden sizes")
    parser.add_argument("--hnet", default="25,25", help="regcost: hypernetwork hidden sizes")
    parser.add_argument("--chunk", default=2000, type=int, help="regcost: chunk size")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--form", choices=["auto", "algebraic", "direct"], default="auto",
                        help="regcost: the output regularizer's form")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("overrides", nargs="*",
                        help="MNIST runs: further config overrides, e.g. method.hypernetwork.init_args.init=pytorch")
    args = parser.parse_args()
    if args.what == "poly":
        cmd_poly(args)
    elif args.what == "regcost":
        cmd_regcost(args)
    else:
        cmd_mnist(args.what, args)


if __name__ == "__main__":
    main()
