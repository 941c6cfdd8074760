"""MARK reproduction at a CPU scale (Hurtado et al., NeurIPS 2021; the report in shared/papers/004): MARK with
both signs of the outer step and the ablations, on the MNIST family (task-IL), beside the paper's and the
report's Split CIFAR-100 figures; and the vectorised against the sequential meta-update.

    python benchmarks/mark_reproduce.py split_mnist                 # every run below, seed 0
    python benchmarks/mark_reproduce.py split_fashion_mnist --runs mark kb_frozen baseline1
    python benchmarks/mark_reproduce.py permuted_mnist --runs mark kb_frozen --seeds 0 1 2   # larger scale, below
    python benchmarks/mark_reproduce.py speed                       # vmap vs sequential meta-update

Every run is an experiment config through the same runner as ``train.py``: ``experiment=mark_<benchmark>_short``
(``experiment=mark_<benchmark>`` shortened to fit a 2-core CPU) and ``experiment=mark_<benchmark>_short_<run>``
(the ablation's method keys on it, the same ones as ``experiment=mark_split_cifar100_<run>``). The scale: 1,000
training images per task, KB of 16/32/32 channels (the authors': 64/128/256; their MNIST code 32/64/128), latent
64, F of 8/8 channels, 3 epochs per phase (authors: 50), K=5 mini-tasks of S=20 inner steps (authors: 10 x 40), 5
outer steps per task (authors: 10), batch 64, task lr 0.1, inner lr 0.01 and outer lr 0.001 as the authors; the
meta-update runs its sequential form (equal, and faster on a CPU). Permuted-MNIST-10's files go further (its KB
learns nothing at the scale above: mark.md): 5,000 standardised images per task, KB of 32/64/128 channels, task lr
0.01 and 10 epochs per phase (``kb_epochs`` stays 3); ``--override`` after it gives back the smaller scale. Prints
ACC, BWT, mean diagonal of R (learning accuracy), the KB's relative drift over each task, storage and wall time.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import data_dir, timed_run  # noqa: E402
from cl_lightning.callbacks.mark_meta_update import (  # noqa: E402
    InnerConfig,
    MiniTasks,
    inner_loop_sequential,
    inner_loop_vectorised,
)
from cl_lightning.config import compose  # noqa: E402
from cl_lightning.nets.mark import KnowledgeBase, MaskFunctions  # noqa: E402

#: Split CIFAR-100 20 x 5 (task-IL), ACC / BWT in %: the paper (3 runs) and the report's re-implementation.
PAPER = {"mark": (78.31, -0.27)}
REPORT = {"mark": (80.36, -0.025), "baseline1": (30.61, -34.76), "masks_off": (39.62, -5.19),
          "baseline3": (30.69, -18.47), "kb_frozen": (80.13, 0.0)}

#: The runs, each an experiment file: ``mark_<benchmark>_short`` (MARK at the shortened scale) and
#: ``mark_<benchmark>_short_<run>`` (the run's method keys on it, the same ones as ``mark_split_cifar100_<run>``).
RUNS = ("mark", "reptile", "kb_frozen", "no_meta", "masks_off", "random_f", "random_kb", "baseline1", "baseline3",
        "supsup",  # the report's section 6 (experiment=mark_split_mnist_supsup)
        "sigmoid")  # the authors' other mask activation (never all-zero)


def experiment(benchmark: str, name: str) -> str:
    """The experiment file of a run (``python train.py experiment=<it>`` reruns it)."""
    return f"mark_{benchmark}_short" + ("" if name == "mark" else f"_{name}")


def run(benchmark: str, name: str, seed: int, override: list[str] | None = None) -> tuple[dict, object]:
    cfg = compose([f"experiment={experiment(benchmark, name)}", "logger=none", f"data_dir={data_dir()}",
                   "trainer.enable_progress_bar=false", f"seed={seed}", *(override or [])])
    return timed_run(cfg)


def speed(repeats: int = 3) -> None:
    """One outer step of the authors' size (K=10 mini-tasks, S=40 inner steps, batch 128) on the scaled KB,
    both ways, in this one process: the ratio is what counts (the machine may be loaded)."""
    torch.manual_seed(0)
    kb = KnowledgeBase(1, 28, (16, 32, 32), latent_dim=64, dropout=0.5)
    k, b, s = 10, 128, 40
    masks = [m.view(k, b, -1).detach() for m in MaskFunctions(64, kb.channels)(torch.rand(k * b, 64))]
    tasks = MiniTasks(x=torch.randn(k, b, 1, 28, 28), y=torch.randint(0, 2, (k, b)), masks=masks,
                      keep=(torch.rand(s, k, b, 64) >= 0.5).float(), head_w=torch.randn(k, 2, 64) * 0.1,
                      head_b=torch.zeros(k, 2))
    cfg = InnerConfig(steps=s)
    times: dict[str, list[float]] = {"vectorised": [], "sequential": []}
    for _ in range(repeats):
        for label, fn in (("vectorised", inner_loop_vectorised), ("sequential", inner_loop_sequential)):
            began = time.perf_counter()
            adapted, _ = fn(kb, tasks, cfg)
            times[label].append(time.perf_counter() - began)
    vec, seq = np.median(times["vectorised"]), np.median(times["sequential"])
    print(f"one outer step, K={k} S={s} batch {b}, KB 16/32/32 on 28x28, {torch.get_num_threads()} thread(s), "
          f"median of {repeats}: vectorised {vec:.2f} s, sequential {seq:.2f} s, sequential / vectorised = "
          f"{seq / vec:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("benchmark", choices=["split_mnist", "split_fashion_mnist", "permuted_mnist", "speed"])
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=RUNS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for these small nets)")
    parser.add_argument("--override", nargs="*", default=[],
                        help="config overrides after the scale's, e.g. benchmark.train_samples_per_task=5000")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.benchmark == "speed":
        speed()
        return
    rows = []
    for name in args.runs:
        accs, bwts, diags, walls, drifts = [], [], [], [], []
        for seed in args.seeds:
            metrics, model = run(args.benchmark, name, seed, args.override)
            R = 100 * np.asarray(metrics["R"])
            accs.append(100 * metrics["ACC"])
            bwts.append(100 * metrics["BWT"])
            diags.append(float(R.diagonal().mean()))
            walls.append(metrics["wall_seconds"])
            drifts.append([model.kb_drift[t] for t in sorted(model.kb_drift)])
            print(f"\n== {name} seed {seed}: experiment={experiment(args.benchmark, name)}", flush=True)
            print("R (%):\n" + np.array2string(R, precision=1, max_line_width=150))
            print("KB drift per task: " + " ".join(f"{d:.2e}" for d in drifts[-1]))
            print("storage: " + ", ".join(f"{k} {v}" for k, v in metrics["storage"].items()), flush=True)
        rows.append((name, accs, bwts, diags, walls, np.mean(drifts, 0), metrics["storage"]))
    print(f"\n{args.benchmark} (task-IL), shortened schedule (see the docstring), seeds {args.seeds}"
          + (f", overrides {args.override}" if args.override else ""))
    print("| run | ACC | BWT | mean R[j,j] | KB drift (task 0; mean of later tasks) | values stored (KB + tasks) | "
          "one net per task | wall s | CIFAR-100 paper | CIFAR-100 report |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, accs, bwts, diags, walls, drift, store in rows:
        sd = lambda v: f" ± {np.std(v, ddof=1):.2f}" if len(v) > 1 else ""  # sample std  # noqa: E731
        fig = lambda d, n=name: f"{d[n][0]} / {d[n][1]}" if n in d else "-"  # noqa: E731
        later = f"{np.mean(drift[1:]):.1e}" if len(drift) > 1 else "-"
        print(f"| {name} | {np.mean(accs):.2f}{sd(accs)} | {np.mean(bwts):.2f}{sd(bwts)} | {np.mean(diags):.2f} | "
              f"{drift[0]:.2f}; {later} | {store['total']} | {store['one_network_per_task']} | {np.mean(walls):.0f} | "
              f"{fig(PAPER)} | {fig(REPORT)} |")


if __name__ == "__main__":
    main()
