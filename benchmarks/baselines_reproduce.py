"""The baselines side by side: ACC, BWT and training time of each method, in one script run.

Two settings (``--part``):

- ``pmnist``: the issue's workload, Permuted-MNIST-10 single head (domain-IL), MLP 784-100-100-10, Adam 1e-3,
  batch 128, one epoch per task, memories as in the Avalanche runs quoted in benchmarks/baselines.md (Replay
  200 samples, GEM / A-GEM 256 per task). ``--samples`` scales the training samples per task (60000 = full).
- ``seqmnist``: the DER paper's Seq-MNIST class-IL (5 tasks of 2 digits, MLP 784-100-100-10, one epoch per
  task) at buffers 200 and 500, for ER, GEM, A-GEM, iCaRL, LwF, DER, DER++, fine-tuning, ER-ACE and GDumb;
  ``--seq-samples`` and ``--seq-batch`` scale it (the paper: all samples, batch 10, SGD with its tuned lr;
  we keep Adam 1e-3).
- ``der``: the DER paper's own protocol and Mammoth's tuned hyper-parameters (``utils/best_args.py``), beside the
  paper's Table 2 means: Seq-MNIST class-IL (5 tasks, stream batch 10), P-MNIST and R-MNIST domain-IL (20 tasks,
  batch 128, a uniform random angle in [0, 180) per R-MNIST task); all training images, one epoch per task, plain
  SGD, MLP 784-100-100-10 (PyTorch's default initialisation). Every row is an experiment file,
  ``configs/experiment/mammoth_<benchmark>_<method>[_<buffer>].yaml``, that this script composes (``python train.py
  experiment=<name>`` reruns one row). ``--der-benchmarks`` picks among ``seq perm rot``. Mammoth's ER takes one
  cross-entropy over the current batch concatenated with the replayed one, ``(B CE_cur + m CE_mem) / (B + m)``, where
  our ``ExperienceReplay`` adds ``CE_cur + CE_mem``; with plain SGD that is the same step at the learning rate scaled
  by ``B / (B + m)``, which the ER files use.

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

from benchmarks.common import data_dir, timed_run  # noqa: E402
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
from cl_lightning.config import compose  # noqa: E402
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


#: The DER protocol's rows, in the table's order: experiment files ``configs/experiment/mammoth_<benchmark>_<method>``
#: (plus ``_<buffer>`` for a memory), Mammoth's tuned hyper-parameters for the DER paper's MNIST protocol
#: (aimagelab/mammoth ``utils/best_args.py``; its MNIST values are the same at commits 7ab9db97 and e75a491c) written
#: in each file. ``er_ace`` (not in the DER paper nor in Mammoth's MNIST arguments) takes ER's; ``gdumb`` keeps its own
#: recipe.
DER_METHODS = ("sgd", "lwf", "er", "gem", "agem", "icarl", "der", "derpp", "er_ace", "gdumb")
DER_BENCHMARKS = {"seq": "split_mnist", "perm": "permuted_mnist", "rot": "rotated_mnist"}
EXPERIMENTS = Path(__file__).resolve().parents[1] / "configs" / "experiment"

#: The DER paper's Table 2 means (%, "averaged across 10 runs"), as published with its code: the results table of
#: Mammoth's first README (aimagelab/mammoth ``README.md`` at commit 7ab9db97). Its standard deviations for the
#: MNIST columns were not available here.
DER_TABLE2: dict[str, dict[tuple[str, int], float]] = {
    "seq": {("sgd", 0): 19.60, ("lwf", 0): 19.62,
            ("er", 200): 80.43, ("gem", 200): 80.11, ("agem", 200): 45.72, ("icarl", 200): 70.51,
            ("der", 200): 84.55, ("derpp", 200): 85.61,
            ("er", 500): 86.12, ("gem", 500): 85.99, ("agem", 500): 46.66, ("icarl", 500): 70.10,
            ("der", 500): 90.54, ("derpp", 500): 91.00},
    "perm": {("sgd", 0): 40.70, ("er", 200): 72.37, ("gem", 200): 66.93, ("agem", 200): 66.42, ("der", 200): 81.74,
             ("derpp", 200): 83.58, ("er", 500): 80.60, ("gem", 500): 76.88, ("agem", 500): 67.56,
             ("der", 500): 87.29, ("derpp", 500): 88.21},
    "rot": {("sgd", 0): 67.66, ("er", 200): 85.01, ("gem", 200): 80.80, ("agem", 200): 81.91, ("der", 200): 90.04,
            ("derpp", 200): 90.43, ("er", 500): 88.91, ("gem", 500): 81.15, ("agem", 500): 80.31,
            ("der", 500): 92.24, ("derpp", 500): 92.77},
}


def der_experiment(bench: str, method: str, buffer: int) -> str | None:
    """The experiment file of a row of the DER protocol's table (None: the method has no row at that buffer)."""
    name = f"mammoth_{DER_BENCHMARKS[bench]}_{method}" + (f"_{buffer}" if buffer else "")
    return name if (EXPERIMENTS / f"{name}.yaml").exists() else None


def der_table(bench: str, root: str, seeds: list[int], buffers: list[int], only: list[str] | None,
              samples: int | None) -> None:
    title = {"seq": "Seq-MNIST class-IL", "perm": "P-MNIST domain-IL", "rot": "R-MNIST domain-IL"}[bench]
    extra = [f"benchmark.train_samples_per_task={samples}"] if samples else []
    setting = compose([f"experiment={der_experiment(bench, 'sgd', 0)}", "logger=none"])["benchmark"]["init_args"]
    print(f"\n### {title} ({setting['num_tasks']} tasks), the DER protocol: batch {setting['batch_size']}, SGD, "
          f"{samples or 'all'} samples/task, 1 epoch, seeds {seeds}\n")
    print("| method | buffer | experiment | ours ACC (%) | ours BWT (%) | DER paper (Table 2 mean) | train s | x sgd |")
    print("|---|---|---|---|---|---|---|---|")
    base = None
    for name in DER_METHODS:
        if only and name not in only:
            continue
        for buffer in [0, *buffers]:
            experiment = der_experiment(bench, name, buffer)
            if experiment is None:
                continue
            accs, bwts, secs = [], [], []
            for seed in seeds:
                cfg = compose([f"experiment={experiment}", "logger=none", f"data_dir={root}", f"seed={seed}",
                               "trainer.enable_progress_bar=false", *extra])
                m, _ = timed_run(cfg)
                accs.append(100 * m["ACC"])
                bwts.append(100 * m["BWT"])
                secs.append(m["train_seconds"])
            t = float(np.mean(secs))
            base = base or t
            paper = DER_TABLE2[bench].get((name, buffer))
            print(f"| {name} | {buffer or '-'} | `{experiment}` | {spread(accs)} | {spread(bwts)} | "
                  f"{'-' if paper is None else f'{paper:.2f}'} | {t:.1f} | {t / base:.2f} |", flush=True)


def run_model(model: ContinualModule, dm, seed: int, out: Path) -> dict:
    """One run of the task loop on the CPU, one epoch per task, quiet; ``wall_seconds`` added."""
    kwargs = {"accelerator": "cpu", "devices": 1, "max_epochs": 1, "enable_progress_bar": False,
              "log_every_n_steps": 50}
    began = time.perf_counter()
    metrics = ContinualRunner(model, dm, out, trainer_kwargs=kwargs, seed=seed).run()
    metrics["wall_seconds"] = time.perf_counter() - began
    return metrics


def run(make, dm, seed: int, out: Path) -> dict:
    cls, plugins = make()
    L.seed_everything(seed, verbose=False)
    if cls is GDumb:  # its own recipe: SGD + cosine schedule from scratch on the memory, 30 epochs
        model = GDumb(MLP(hidden_sizes=[100, 100]), plugins=plugins)
    else:
        model = cls(MLP(hidden_sizes=[100, 100]), lr=1e-3, optimizer="adam", plugins=plugins)
    return run_model(model, dm, seed, out)


def spread(values: list[float]) -> str:
    """Mean ± sample standard deviation (n-1), as ``cl-lightning report`` gives it."""
    return f"{np.mean(values):.2f} ± {np.std(values, ddof=1):.2f}" if len(values) > 1 else f"{values[0]:.2f}"


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
    parser.add_argument("--part", choices=["pmnist", "seqmnist", "der", "all"], default="all")
    parser.add_argument("--der-benchmarks", nargs="+", choices=["seq", "perm", "rot"], default=["seq", "perm", "rot"])
    parser.add_argument("--der-samples", type=int, default=None, help="DER protocol: training samples per task "
                        "(default: all, the paper's)")
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
        if args.part == "der":  # not in "all": the paper's full protocol takes hours on a laptop CPU
            for bench in args.der_benchmarks:
                der_table(bench, root, args.seeds, args.buffers, args.methods, args.der_samples)


if __name__ == "__main__":
    main()
