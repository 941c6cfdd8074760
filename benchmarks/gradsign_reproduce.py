"""Gradient-sign filtering on the paper's Fig. 1 setting, beside plain SGD and controls.

Paper ("Enabling continual learning in neural networks with meta learning", 2019), Fig. 1: Permuted-MNIST,
5 tasks, MLP 784-256-256-256-10, 2,000 iterations per task, batch 64, SGD lr 0.003, gradient predictors
MLPs 1-256-256-256-1; the paper shows accuracy curves only (no numbers) and states that with its method the
old tasks' accuracy "is maintained or even improved".

Runs (``--methods``), each for every seed in ``--seeds``:

- ``plain``: plain SGD (the paper's Fig. 1a);
- ``gradsign``: the filter with the meta-learned predictor (the paper's method, Fig. 1b);
- ``random``: the control, a random mask at the keep rate the ``gradsign`` run of the same seed produced
  (its mean over tasks 2..T; needs ``gradsign`` earlier in ``--methods``, else ``--keep-rate``);
- ``memory``: our extension, the sign rule against the gradient of a memory batch (``reference: memory``);
- ``agem``: A-GEM with the same memory (``--memory-size`` samples, ``--memory-batch`` per step).

Prints every run's accuracy matrix, ACC/BWT, the share of coordinates the filter kept per task and the
predictors' fit losses, then a mean ± std table over the seeds, and saves a plot of every task's test accuracy
over training for the first seed (like the paper's figure). ``--paper`` sets the full Fig. 1 setting.
Example (the run in benchmarks/gradsign.md):

    python benchmarks/gradsign_reproduce.py --paper --seeds 0 1 2 --methods plain gradsign random memory agem
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
from cl_lightning.config import compose  # noqa: E402
from cl_lightning.datamodules.mnist import PermutedMNIST  # noqa: E402
from cl_lightning.experiment import build  # noqa: E402
from cl_lightning.runner import ContinualRunner  # noqa: E402

PAPER = {"plain": "forgets: old tasks' accuracy decreases rapidly (Fig. 1a, curves only)",
         "gradsign": "old tasks' accuracy maintained or even improved (Fig. 1b, curves only)"}
NAMES = {"plain": "plain SGD", "gradsign": "gradient-sign filter (predictor, the paper's)",
         "random": "random mask at the filter's keep rate (control)",
         "memory": "sign filter, `reference: memory` (ours)", "agem": "A-GEM, same memory"}


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


#: The experiment file of each run (``python train.py experiment=<name>`` reruns it at the paper's setting); the
#: command line's values go on top of it as overrides (``overrides``).
EXPERIMENTS = {"plain": "gradsign_permuted_mnist_sgd", "gradsign": "gradsign_permuted_mnist",
               "gradsign_previous": "gradsign_permuted_mnist_previous", "random": "gradsign_permuted_mnist_random",
               "memory": "gradsign_permuted_mnist_memory", "agem": "gradsign_permuted_mnist_agem"}


def overrides(method: str, args: argparse.Namespace, seed: int, keep_rate: float | None = None) -> list[str]:
    """The run's experiment file and the command line's setting on top of it (the plugin's seed is the run's)."""
    words = [f"experiment={EXPERIMENTS[method]}", "logger=none", f"data_dir={args.data_dir}", f"seed={seed}",
             "trainer.enable_progress_bar=false", f"trainer.max_steps={args.steps}",
             f"benchmark.num_tasks={args.tasks}",  # the permutations stay fixed (the benchmark's own seed)
             f"benchmark.train_samples_per_task={'null' if args.train_samples is None else args.train_samples}",
             f"method.optimizer={args.optimizer}", f"method.lr={args.lr}"]
    plugin = "method.plugins.AGEM" if method == "agem" else "method.plugins.GradientSignFilter"
    if method.startswith("gradsign"):
        words += [f"{plugin}.hidden_sizes=[{','.join(map(str, args.predictor_hidden))}]",
                  f"{plugin}.predictor_steps={args.predictor_steps}", f"{plugin}.distill_steps={args.predictor_steps}",
                  f"{plugin}.combine={args.combine}", f"{plugin}.distill={str(args.distill).lower()}",
                  f"{plugin}.distill_points={args.distill_points}"]
    elif method == "random":
        words.append(f"{plugin}.keep_rate={keep_rate}")
    elif method == "memory":
        words += [f"{plugin}.memory_size={args.memory_size}", f"{plugin}.memory_batch_size={args.memory_batch}"]
    elif method == "agem":
        words += [f"{plugin}.memory_size={args.memory_size}", f"{plugin}.batch_size={args.memory_batch}"]
    return [*words, f"{plugin}.seed={seed}"] if method != "plain" else words


def run(method: str, args: argparse.Namespace, seed: int, keep_rate: float | None = None) -> dict:
    cfg = compose(overrides(method, args, seed, keep_rate))
    model, dm = build(cfg)
    plugins = model.plugins
    curve = AccuracyCurve(dm, args.curve_every, args.curve_samples, args.steps) if args.curve_every else None
    runner = ContinualRunner(model, dm, tempfile.mkdtemp(prefix=f"gradsign_{method}_"), trainer_kwargs=cfg["trainer"],
                             seed=cfg["seed"])
    original = runner.make_trainer

    def make_trainer(task: int, train: bool = True) -> L.Trainer:
        tr = original(task, train)
        if train and curve is not None:
            tr.callbacks.append(curve)
        return tr

    runner.make_trainer = make_trainer  # type: ignore[method-assign]
    began = time.perf_counter()
    try:
        metrics = runner.run()
    except FloatingPointError as error:  # the filter stops a run whose parameters became NaN / inf
        rows = np.asarray(runner.record.rows)
        metrics = {"diverged_in_task": len(rows), "error": str(error), "R": rows.tolist(), "ACC": None,
                   "BWT": None, "storage": None}
        if plugins and plugins[0].filtered_total:  # the share kept in the finished tasks, then in the diverging
            plugins[0].kept_history.append(plugins[0].kept_fraction)  # one until it stopped
    metrics["wall_seconds"] = time.perf_counter() - began
    metrics["curve"] = curve.points if curve is not None else []
    if plugins and isinstance(plugins[0], GradientSignFilter):
        metrics["kept_fraction_last_task"] = plugins[0].kept_fraction
        metrics["kept_per_task"] = plugins[0].kept_history
        metrics["fit_losses"] = plugins[0].fit_losses
        metrics["storage_breakdown"] = plugins[0].storage_breakdown()
    metrics["R"] = np.asarray(metrics["R"]).tolist()
    return metrics


def show(name: str, m: dict) -> None:
    if m["ACC"] is None:
        print(f"\n== {name}: DIVERGED (parameters not finite) in task {m['diverged_in_task']} (0-based); "
              f"({m['wall_seconds']:.0f} s)")
    else:
        print(f"\n== {name}: ACC {m['ACC']:.4f}  BWT {m['BWT']:+.4f}  ({m['wall_seconds']:.0f} s)")
    for i, row in enumerate(m["R"]):
        print(f"  after task {i}: " + " ".join(f"{v:.3f}" for v in row))
    if "kept_per_task" in m:
        print("  filter kept per task:", " ".join(f"{v:.3f}" for v in m["kept_per_task"]))
        if m["fit_losses"]:
            print("  predictor fits (normalised MSE, 1.0 = zero predictor):",
                  ", ".join(f"{k}={v:.3f}" for d in m["fit_losses"] for k, v in d.items() if k != "task"))
        print("  storage:", m["storage"], m["storage_breakdown"])


def table(runs: dict[str, list[dict]]) -> None:
    """Mean ± population std over the seeds of every method; diverged runs are counted, not averaged."""
    print("| | seeds | ACC | BWT | kept (tasks 2..T) | paper (Fig. 1) |")
    print("|---|---|---|---|---|---|")
    for method, ms in runs.items():
        done = [m for m in ms if m["ACC"] is not None]
        acc, bwt = [m["ACC"] for m in done], [m["BWT"] for m in done]
        kept = [np.mean(m["kept_per_task"][1:]) for m in ms if m.get("kept_per_task")]
        diverged = [f"seed {m['seed']}: task {m['diverged_in_task'] + 1}" for m in ms if m["ACC"] is None]
        cells = (f"{np.mean(acc):.3f} ± {np.std(acc):.3f} | {np.mean(bwt):+.3f} ± {np.std(bwt):.3f}" if done
                 else "- | -")
        note = f" (diverged: {', '.join(diverged)})" if diverged else ""
        print(f"| {NAMES[method]} | {len(done)} of {len(ms)}{note} | {cells} | "
              f"{f'{np.mean(kept):.3f}' if kept else '-'} | {PAPER.get(method, '-')} |")


def plot(results: dict[str, dict], path: str, steps: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4), sharey=True)
    for ax, (name, m) in zip(np.atleast_1d(axes), results.items(), strict=True):
        if not m["curve"]:
            continue
        xs = [p[0] for p in m["curve"]]
        accs = np.array([p[1] for p in m["curve"]])
        for t in range(accs.shape[1]):
            ax.plot(xs, accs[:, t], label=f"task {t + 1}")
        for t in range(1, accs.shape[1]):
            ax.axvline(t * steps, color="grey", lw=0.5)
        ax.set_title(f"{name}: ACC {m['ACC']:.3f}, BWT {m['BWT']:+.3f}" if m["ACC"] is not None else
                     f"{name}: diverged in task {m['diverged_in_task'] + 1}", fontsize=9)
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
    p.add_argument("--distill", action="store_true", help="distil the past predictors into one g (the paper's "
                   "Section 5.2, future work there); default: the mean of every past h (its Section 2.3, Fig. 1)")
    p.add_argument("--combine", default="mean")
    p.add_argument("--curve-every", type=int, default=50)
    p.add_argument("--curve-samples", type=int, default=1000)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--methods", nargs="+", default=["plain", "gradsign"],
                   choices=["plain", "gradsign", "random", "memory", "agem"])
    p.add_argument("--keep-rate", type=float, default=None, help="random mask's keep rate when gradsign is not run")
    p.add_argument("--memory-size", type=int, default=1000, help="memory and agem: samples across all tasks")
    p.add_argument("--memory-batch", type=int, default=64, help="memory and agem: memory samples per step")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data-dir", default=os.environ.get("CL_DATA_DIR", str(Path(__file__).resolve().parents[2]
                                                                              / "shared" / "data")))
    p.add_argument("--out", default="gradsign_curves.png")
    p.add_argument("--json", default=None, help="also write both runs' metrics here")
    p.add_argument("--previous-value", action="store_true",
                   help="also run the filter with the previous value as a predictor input")
    p.add_argument("--merge", nargs="+", default=None, help="only print the table of these --json files together")
    args = p.parse_args()
    if args.merge:  # runs of several invocations (e.g. seeds run one after another), one table
        runs: dict[str, list[dict]] = {}
        for path in args.merge:
            saved = json.loads(Path(path).read_text())
            print(saved["setting"])
            for method, ms in saved["runs"].items():
                runs.setdefault(method, []).extend(ms)
        table(runs)
        first = {NAMES[m]: ms[0] for m, ms in runs.items() if ms and ms[0]["curve"]}
        if first:
            plot(first, args.out, args.steps)
            print(f"\nplot (each method's first run with curves): {args.out}")
        return
    if args.paper:
        args.steps, args.predictor_hidden, args.predictor_steps = 2000, [256, 256, 256], 1000
    if "random" in args.methods and "gradsign" not in args.methods[: args.methods.index("random")] \
            and args.keep_rate is None:
        p.error("--methods random needs gradsign before it (its keep rate) or --keep-rate")
    torch.set_num_threads(args.threads)
    setting = (f"Permuted-MNIST, {args.tasks} tasks, MLP 784-256-256-256-10, {args.steps} it/task, batch 64, "
               f"{args.optimizer} lr {args.lr}; predictor hidden {args.predictor_hidden}, "
               f"{args.predictor_steps} fit steps; memory {args.memory_size} samples, {args.memory_batch} per step")
    print(setting, flush=True)
    runs: dict[str, list[dict]] = {m: [] for m in args.methods}
    for seed in args.seeds:
        keep = args.keep_rate
        for method in args.methods:
            if method == "random" and runs.get("gradsign"):  # the same seed's filter run came first
                keep = float(np.mean(runs["gradsign"][-1]["kept_per_task"][1:]))
            m = run(method, args, seed, keep if method == "random" else None)
            m["seed"] = seed
            if method == "random":
                m["keep_rate"] = keep
            runs[method].append(m)
            show(f"{NAMES[method]}, seed {seed}" + (f", keep rate {keep:.3f}" if method == "random" else ""), m)
            if args.json:  # after every run, so a cut-short session keeps what finished
                Path(args.json).write_text(json.dumps({"setting": setting, "seeds": args.seeds, "runs": runs}))
        if seed == args.seeds[0] and args.previous_value:
            show("filter, previous value input", run("gradsign_previous", args, seed))
    print(f"\n{setting}; seeds {args.seeds}, mean ± std (population std over the seeds)\n")
    table(runs)
    first = {NAMES[m]: ms[0] for m, ms in runs.items() if ms and ms[0]["curve"]}
    if first:
        plot(first, args.out, args.steps)
        print(f"\nplot (seed {args.seeds[0]}): {args.out}")


if __name__ == "__main__":
    main()
