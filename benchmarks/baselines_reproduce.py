"""The baselines side by side: ACC, BWT and training time of each method, in one script run.

Every row is an experiment file that this script composes (``python train.py experiment=<name> logger=none`` reruns
one row; benchmarks/baselines.md has the tables). Three settings (``--part``):

- ``pmnist``: the issue's workload, Permuted-MNIST-10 single head (domain-IL), MLP 784-100-100-10, Adam 1e-3,
  batch 128, one epoch per task, memories as in the Avalanche runs quoted in benchmarks/baselines.md (Replay
  200 samples, GEM / A-GEM 256 per task): ``configs/experiment/baselines_permuted_mnist_<method>[_<memory>].yaml``,
  all on ``baselines_permuted_mnist_finetune``. ``--samples`` sets the training samples per task (60000 = full) and
  ``--tasks`` the number of tasks, and with it the memories of 256 per task (2560 in the files, for 10 tasks).
- ``seqmnist``: the DER paper's Seq-MNIST class-IL (5 tasks of 2 digits, MLP 784-100-100-10, one epoch per
  task) at buffers 200 and 500, for ER, GEM, A-GEM, iCaRL, LwF, DER, DER++, fine-tuning, ER-ACE and GDumb:
  ``configs/experiment/baselines_split_mnist_<method>[_<buffer>].yaml``, all on ``baselines_split_mnist_finetune``;
  ``--seq-samples`` and ``--seq-batch`` scale it (the paper: all samples, batch 10, SGD with its tuned lr;
  we keep Adam 1e-3; GDumb keeps its own recipe). The replay batches follow ``--seq-batch``.
- ``der``: the DER paper's own protocol and Mammoth's tuned hyper-parameters (``utils/best_args.py``), beside the
  paper's Table 2 means: Seq-MNIST class-IL (5 tasks, stream batch 10), P-MNIST and R-MNIST domain-IL (20 tasks,
  batch 128, a uniform random angle in [0, 180) per R-MNIST task); all training images, one epoch per task, plain
  SGD, MLP 784-100-100-10 (PyTorch's default initialisation):
  ``configs/experiment/mammoth_<benchmark>_<method>[_<buffer>].yaml``. ``--der-benchmarks`` picks among
  ``seq perm rot``. Mammoth's ER takes one cross-entropy over the current batch
  concatenated with the replayed one, ``(B CE_cur + m CE_mem) / (B + m)``, where our ``ExperienceReplay`` adds
  ``CE_cur + CE_mem``; with plain SGD that is the same step at the learning rate scaled by ``B / (B + m)``, which the
  ER files use.

``--buffers`` picks the files of those buffers (200 and 500 are written). Times are ``train_seconds`` of the run
(training only, evaluation excluded) and, as the machine may be shared, each is also given as a ratio to fine-tuning
measured in the same script run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import data_dir, timed_run  # noqa: E402
from cl_lightning.config import compose  # noqa: E402

EXPERIMENTS = Path(__file__).resolve().parents[1] / "configs" / "experiment"

#: ``--part pmnist``'s rows, in the table's order: (row name, experiment file
#: ``configs/experiment/baselines_permuted_mnist_<file>.yaml``, the plugin whose memory is 256 samples per task). That
#: memory is 2560 in the files (10 tasks) and follows ``--tasks``: ``{memory}`` in the row name is its size.
PMNIST_ROWS = (
    ("finetune", "finetune", None),
    ("er (200)", "er_200", None),
    ("der (200)", "der_200", None),
    ("derpp (200)", "derpp_200", None),
    ("agem (256/task, {memory})", "agem_2560", "AGEM"),
    ("gem (256/task, {memory})", "gem_2560", "GEM"),
    ("gradsign memory ({memory})", "gradsign_memory_2560", "GradientSignFilter"),
    ("lwf", "lwf", None),
    ("ewc (1000)", "ewc", None),
)
PER_TASK_MEMORY = 256

#: ``--part seqmnist``'s rows, in the table's order: ``configs/experiment/baselines_split_mnist_<method>_<buffer>.yaml``
#: (``baselines_split_mnist_<method>.yaml`` for the two without a memory, in every buffer's table).
SEQMNIST_METHODS = ("finetune", "lwf", "er", "gem", "agem", "icarl", "der", "derpp", "er_ace", "gdumb")


def pmnist_row(row: tuple[str, str, str | None], tasks: int) -> tuple[str, list[str]]:
    """A ``--part pmnist`` row at ``tasks`` tasks: (row name, overrides that compose it)."""
    name, file, per_task = row
    overrides = [f"experiment=baselines_permuted_mnist_{file}", f"benchmark.num_tasks={tasks}"]
    if per_task:
        overrides.append(f"method.plugins.{per_task}.memory_size={PER_TASK_MEMORY * tasks}")
    return name.format(memory=PER_TASK_MEMORY * tasks), overrides


def seqmnist_experiment(method: str, buffer: int) -> tuple[str, str] | None:
    """A ``--part seqmnist`` row at ``buffer``: (row name, experiment file); None when no file is written for it."""
    for name, row in ((f"baselines_split_mnist_{method}", method),
                      (f"baselines_split_mnist_{method}_{buffer}", f"{method} ({buffer})")):
        if (EXPERIMENTS / f"{name}.yaml").exists():
            return row, name
    return None


#: The DER protocol's rows, in the table's order: experiment files ``configs/experiment/mammoth_<benchmark>_<method>``
#: (plus ``_<buffer>`` for a memory), Mammoth's tuned hyper-parameters for the DER paper's MNIST protocol
#: (aimagelab/mammoth ``utils/best_args.py``; its MNIST values are the same at commits 7ab9db97 and e75a491c) written
#: in each file. ``er_ace`` (not in the DER paper nor in Mammoth's MNIST arguments) takes ER's; ``gdumb`` keeps its own
#: recipe.
DER_METHODS = ("sgd", "lwf", "er", "gem", "agem", "icarl", "der", "derpp", "er_ace", "gdumb")
DER_BENCHMARKS = {"seq": "split_mnist", "perm": "permuted_mnist", "rot": "rotated_mnist"}

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


def spread(values: list[float]) -> str:
    """Mean ± sample standard deviation (n-1), as ``cl-lightning report`` gives it."""
    return f"{np.mean(values):.2f} ± {np.std(values, ddof=1):.2f}" if len(values) > 1 else f"{values[0]:.2f}"


def table(title: str, rows: list[tuple[str, list[str]]], common: list[str], seeds: list[int],
          only: list[str] | None) -> None:
    """Runs each row (its name and the overrides that compose it, then ``common``) over ``seeds``; one table line
    per row. ``only``: the rows whose name starts with one of these words."""
    if only:
        rows = [(name, overrides) for name, overrides in rows if name.split()[0] in only]
    print(f"\n### {title}\n")
    print("| method | ACC (%) | BWT (%) | train s | x fine-tuning |")
    print("|---|---|---|---|---|")
    base = None
    for name, overrides in rows:
        accs, bwts, secs = [], [], []
        for seed in seeds:
            m, _ = timed_run(compose([*overrides, *common, f"seed={seed}"]))
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
    seq_rows = [(buffer, [seqmnist_experiment(name, buffer) for name in SEQMNIST_METHODS]) for buffer in args.buffers]
    missing = [f"{name} at buffer {b}" for b, rows in seq_rows for name, row in zip(SEQMNIST_METHODS, rows, strict=True)
               if row is None]
    if args.part in ("seqmnist", "all") and missing:
        parser.error(f"--buffers: no experiment file (configs/experiment/baselines_split_mnist_<method>_<buffer>.yaml) "
                     f"for {', '.join(missing)}")
    quiet = ["logger=none", f"data_dir={root}", "trainer.enable_progress_bar=false"]
    if args.part in ("pmnist", "all"):
        table(f"Permuted-MNIST-{args.tasks}, domain-IL, {args.samples} samples/task, batch 128, Adam 1e-3, "
              f"1 epoch, seeds {args.seeds}", [pmnist_row(row, args.tasks) for row in PMNIST_ROWS],
              [*quiet, f"benchmark.train_samples_per_task={args.samples}"], args.seeds, args.methods)
    if args.part in ("seqmnist", "all"):
        samples = "null" if args.seq_samples is None else args.seq_samples
        for buffer, rows in seq_rows:
            table(f"Seq-MNIST class-IL, buffer {buffer}, {args.seq_samples or 'all'} samples/task, batch "
                  f"{args.seq_batch}, Adam 1e-3, 1 epoch, seeds {args.seeds}",
                  [(name, [f"experiment={file}"]) for name, file in filter(None, rows)],
                  [*quiet, f"benchmark.batch_size={args.seq_batch}", f"benchmark.train_samples_per_task={samples}"],
                  args.seeds, args.methods)
    if args.part == "der":  # not in "all": the paper's full protocol takes hours on a laptop CPU
        for bench in args.der_benchmarks:
            der_table(bench, root, args.seeds, args.buffers, args.methods, args.der_samples)


if __name__ == "__main__":
    main()
