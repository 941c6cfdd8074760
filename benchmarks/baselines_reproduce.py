"""The baselines side by side: ACC, BWT and training time of each method, in one script run.

Two settings (``--part``):

- ``pmnist``: the issue's workload, Permuted-MNIST-10 single head (domain-IL), MLP 784-100-100-10, Adam 1e-3,
  batch 128, one epoch per task, memories as in the Avalanche runs quoted in benchmarks/baselines.md (Replay
  200 samples, GEM / A-GEM 256 per task). ``--samples`` scales the training samples per task (60000 = full).
- ``seqmnist``: the DER paper's Seq-MNIST class-IL (5 tasks of 2 digits, MLP 784-100-100-10, one epoch per
  task) at buffers 200 and 500, for ER, GEM, A-GEM, iCaRL, LwF, DER, DER++, fine-tuning, ER-ACE and GDumb;
  ``--seq-samples`` and ``--seq-batch`` scale it (the paper: all samples, batch 10, SGD with its tuned lr;
  we keep Adam 1e-3).

Times are ``train_seconds`` of the run (training only, evaluation excluded) and, as the machine may be shared,
each is also given as a ratio to fine-tuning measured in the same script run.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import data_dir  # noqa: E402
from cl_lightning.callbacks import (  # noqa: E402
    AGEM,
    EWC,
    GEM,
    DarkExperienceReplay,
    ExperienceReplay,
    GradientSignFilter,
    LwF,
    RehearsalPlugin,
)
from cl_lightning.callbacks.icarl import ICaRLExemplars  # noqa: E402
from cl_lightning.datamodules import PermutedMNIST, SplitMNIST  # noqa: E402
from cl_lightning.methods import ERACE, ContinualModule, GDumb, ICaRL  # noqa: E402
from cl_lightning.nets import MLP  # noqa: E402
from cl_lightning.runner import ContinualRunner  # noqa: E402


def pmnist_methods(tasks: int, batch: int) -> dict:
    per_task = 256 * tasks
    return {
        "finetune": lambda: (ContinualModule, []),
        "er (200)": lambda: (ContinualModule, [ExperienceReplay(200, batch)]),
        "der (200)": lambda: (ContinualModule, [DarkExperienceReplay(200, batch, alpha=0.3)]),
        "derpp (200)": lambda: (ContinualModule, [DarkExperienceReplay(200, batch, alpha=0.1, beta=0.5)]),
        f"agem (256/task, {per_task})": lambda: (ContinualModule, [AGEM(per_task, 256)]),
        f"gem (256/task, {per_task})": lambda: (ContinualModule, [GEM(per_task)]),
        f"gradsign memory ({per_task})": lambda: (ContinualModule, [GradientSignFilter(
            reference="memory", memory_size=per_task, memory_batch_size=256)]),
        "lwf": lambda: (ContinualModule, [LwF()]),
        "ewc (1000)": lambda: (ContinualModule, [EWC(strength=1000.0, fisher_samples=2000)]),
    }


def seqmnist_methods(buffer: int, batch: int) -> dict:
    return {
        "finetune": lambda: (ContinualModule, []),
        "lwf": lambda: (ContinualModule, [LwF()]),
        f"er ({buffer})": lambda: (ContinualModule, [ExperienceReplay(buffer, batch)]),
        f"gem ({buffer})": lambda: (ContinualModule, [GEM(buffer)]),
        f"agem ({buffer})": lambda: (ContinualModule, [AGEM(buffer, min(buffer, 256))]),
        f"icarl ({buffer})": lambda: (ICaRL, [ICaRLExemplars(buffer, batch)]),
        f"der ({buffer})": lambda: (ContinualModule, [DarkExperienceReplay(buffer, batch, alpha=0.3)]),
        f"derpp ({buffer})": lambda: (ContinualModule, [DarkExperienceReplay(buffer, batch, alpha=0.1, beta=0.5)]),
        f"er_ace ({buffer})": lambda: (ERACE, [ExperienceReplay(buffer, batch)]),
        f"gdumb ({buffer})": lambda: (GDumb, [RehearsalPlugin(buffer, insertion="task_end", balance="class")]),
    }


def run(make, dm, seed: int, out: Path) -> dict:
    cls, plugins = make()
    L.seed_everything(seed, verbose=False)
    if cls is GDumb:  # its own recipe: SGD + cosine schedule from scratch on the memory, 30 epochs
        model = GDumb(MLP(hidden_sizes=[100, 100]), plugins=plugins)
    else:
        model = cls(MLP(hidden_sizes=[100, 100]), lr=1e-3, optimizer="adam", plugins=plugins)
    kwargs = {"accelerator": "cpu", "devices": 1, "max_epochs": 1, "enable_progress_bar": False,
              "log_every_n_steps": 50}
    began = time.perf_counter()
    metrics = ContinualRunner(model, dm, out, trainer_kwargs=kwargs, seed=seed).run()
    metrics["wall_seconds"] = time.perf_counter() - began
    return metrics


def spread(values: list[float]) -> str:
    return f"{np.mean(values):.2f} ± {np.std(values):.2f}" if len(values) > 1 else f"{values[0]:.2f}"


def table(title: str, methods: dict, make_dm, seeds: list[int], root: Path, only: list[str] | None) -> None:
    if only:
        methods = {k: v for k, v in methods.items() if k.split()[0] in only}
    print(f"\n### {title}\n")
    print("| method | ACC (%) | BWT (%) | train s | x fine-tuning |")
    print("|---|---|---|---|---|")
    base = None
    for name, make in methods.items():
        accs, bwts, secs = [], [], []
        for seed in seeds:
            m = run(make, make_dm(), seed, root / f"run_{len(list(root.iterdir()))}")
            accs.append(100 * m["ACC"])
            bwts.append(100 * m["BWT"])
            secs.append(m["train_seconds"])
        t = float(np.mean(secs))
        base = base or t
        print(f"| {name} | {spread(accs)} | {spread(bwts)} | {t:.1f} | {t / base:.2f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=["pmnist", "seqmnist", "all"], default="all")
    parser.add_argument("--samples", type=int, default=60000, help="P-MNIST training samples per task")
    parser.add_argument("--tasks", type=int, default=10)
    parser.add_argument("--seq-samples", type=int, default=None, help="Seq-MNIST training samples per task")
    parser.add_argument("--seq-batch", type=int, default=32)
    parser.add_argument("--buffers", type=int, nargs="+", default=[200, 500])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 avoids oversubscription on a "
                        "shared machine)")
    parser.add_argument("--methods", nargs="+", default=None, help="only these (first word of the row name; "
                        "put finetune first for the ratio column)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    root = data_dir()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.part in ("pmnist", "all"):
            def pm():
                return PermutedMNIST(num_tasks=args.tasks, data_dir=root, batch_size=128,
                                     train_samples_per_task=args.samples, eval_batch_size=2000)
            table(f"Permuted-MNIST-{args.tasks}, domain-IL, {args.samples} samples/task, batch 128, Adam 1e-3, "
                  f"1 epoch, seeds {args.seeds}", pmnist_methods(args.tasks, 128), pm, args.seeds, tmp, args.methods)
        if args.part in ("seqmnist", "all"):
            for buffer in args.buffers:
                def seq():
                    return SplitMNIST(data_dir=root, scenario="class", batch_size=args.seq_batch,
                                      train_samples_per_task=args.seq_samples, eval_batch_size=2000)
                table(f"Seq-MNIST class-IL, buffer {buffer}, {args.seq_samples or 'all'} samples/task, batch "
                      f"{args.seq_batch}, Adam 1e-3, 1 epoch, seeds {args.seeds}",
                      seqmnist_methods(buffer, args.seq_batch), seq, args.seeds, tmp, args.methods)


if __name__ == "__main__":
    main()
