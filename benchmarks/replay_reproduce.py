"""HNET paper Table 1 and Appendix D, the replay methods and their baselines: ours beside the paper's.

    python benchmarks/replay_reproduce.py --steps 500 --seeds 0           # Split-MNIST CL2 / CL3, scaled
    python benchmarks/replay_reproduce.py --methods hnet_r --scenarios 1  # S-CL1, "during" vs "after"
    python benchmarks/replay_reproduce.py --steps 2000 --seeds 0 1 2      # the paper's budget
    python benchmarks/replay_reproduce.py --methods hnet_tir --steps 500  # HNET+TIR (CL1 runs HNET: the task is given)
    python benchmarks/replay_reproduce.py --benchmark permuted_mnist --methods hnet_r dgr hnet_tir \
        --scenarios 2 3 --steps 500 --override method.lr=0.001        # Permuted-MNIST-10, scaled

Each run is the experiment config ``configs/experiment/<method>_<benchmark>_cl<1|2|3>.yaml`` through the same
runner as ``train.py``; ``--steps`` replaces its steps per task (Split-MNIST 2000, Permuted-MNIST-10 5000),
``--train-samples`` subsamples each task's training data, and the printout says what was scaled. It prints ACC
(mean of the last row of R, in %) per seed and the mean +- std over seeds, and the "during" (diagonal) mean. For
HNET+TIR it also prints the task classifier's task-inference accuracy on each task's test inputs, and HNET+ENT's
entropy rule's on the same trained model (the ACC that rule would give is printed beside it). In task-IL (CL1)
the task is given, so HNET+TIR's classifier is the HNET experiment ``hnet_<benchmark>_cl1`` (the paper's CL1
column for HNET+TIR and HNET+ENT is that one number too).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import data_dir, timed_run  # noqa: E402
from cl_lightning.config import compose  # noqa: E402

#: von Oswald et al. 2020, Table 1 (mean +- std over their seeds): benchmark -> method -> (CL1, CL2, CL3).
PAPER = {
    "split_mnist": {"hnet_r": ((99.83, 0.01), (98.00, 0.03), (95.30, 0.13)),
                    "dgr": ((99.61, 0.02), (96.83, 0.20), (91.79, 0.32)),
                    "si": ((99.09, 0.15), (65.36, 1.57), (19.99, 0.06)),
                    "online_ewc": ((99.12, 0.11), (64.32, 1.90), (19.96, 0.07)),
                    "hnet_tir": ((99.79, 0.01), (94.43, 0.28), (89.59, 0.59))},
    "permuted_mnist": {"hnet_r": ((97.87, 0.01), (97.60, 0.01), (97.76, 0.01)),
                       "dgr": ((97.51, 0.01), (97.35, 0.02), (96.38, 0.03)),
                       "si": ((94.75, 0.14), (95.33, 0.11), (29.31, 0.62)),
                       "online_ewc": ((95.96, 0.06), (94.42, 0.13), (33.88, 0.49)),
                       "hnet_tir": ((97.57, 0.02), (97.58, 0.02), (97.59, 0.01))},
}
#: Appendix D, "during" (each task just after its training) in CL1.
PAPER_DURING_CL1 = {"split_mnist": {"hnet_r": 99.82, "hnet_tir": 99.79},
                    "permuted_mnist": {"hnet_r": 98.03, "hnet_tir": 97.58}}
BENCHMARK_NAMES = {"split_mnist": "Split-MNIST", "permuted_mnist": "Permuted-MNIST-10"}
PAPER_STEPS = {"split_mnist": 2000, "permuted_mnist": 5000}
NAMES = {"hnet_r": "HNET+R", "dgr": "DGR+distill", "si": "SI", "online_ewc": "online EWC", "hnet_tir": "HNET+TIR"}
CONFIG_DIR = REPO / "configs" / "experiment"


def experiment(method: str, benchmark: str, cl: int) -> str:
    """The experiment config of a table cell; HNET+TIR in task-IL is HNET (the task is given, nothing to infer)."""
    name = f"hnet_{benchmark}_cl1" if (method == "hnet_tir" and cl == 1) else f"{method}_{benchmark}_cl{cl}"
    if not (CONFIG_DIR / f"{name}.yaml").exists():
        raise SystemExit(f"no experiment config configs/experiment/{name}.yaml for {NAMES[method]} "
                         f"{BENCHMARK_NAMES[benchmark]} CL{cl}")
    return name


def run(method: str, benchmark: str, cl: int, seed: int, steps: int | None, samples: int | None,
        extra: list[str] | None = None) -> tuple[dict, object, object]:
    overrides = [f"experiment={experiment(method, benchmark, cl)}", "logger=none", f"data_dir={data_dir()}",
                 "trainer.enable_progress_bar=false", f"seed={seed}"]
    if steps is not None:
        overrides.append(f"trainer.max_steps={steps}")
    if samples is not None:
        overrides.append(f"benchmark.train_samples_per_task={samples}")
    overrides += extra or []
    cfg = compose(overrides)
    metrics, model = timed_run(cfg)
    return metrics, model, cfg


@torch.no_grad()
def task_inference(model, cfg: dict) -> dict[str, list[float]]:
    """HNET+TIR: per task, the share of its test inputs whose task each rule picks, and the accuracy that rule
    gives, on the trained model ("classifier": the task classifier, HNET+TIR; "entropy": HNET+ENT's rule)."""
    from cl_lightning.experiment import build
    from cl_lightning.methods.base import place_task_logits

    _, dm = build(cfg)
    model.eval()
    out: dict[str, list[float]] = {}
    rule_before = model.inference
    for rule in ("classifier", "entropy"):
        model.inference = rule
        picked, correct = [], []
        for t in range(dm.info.num_tasks):
            test = dm.split(t, "test")
            x, y, tid = test[torch.arange(len(test))]
            logits, chosen = model.infer_task(x)
            picked.append(float((chosen == t).float().mean()) * 100)
            correct.append(float((place_task_logits(logits, chosen, dm.info).argmax(1) == y).float().mean()) * 100)
        out[rule], out[rule + "_acc"] = picked, correct
    model.inference = rule_before
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--benchmark", default="split_mnist", choices=list(PAPER))
    parser.add_argument("--methods", nargs="+", default=["hnet_r", "dgr", "si", "online_ewc"], choices=list(NAMES))
    parser.add_argument("--scenarios", nargs="+", type=int, default=[2, 3], choices=[1, 2, 3])
    parser.add_argument("--steps", type=int, default=None,
                        help="optimizer steps per task (default: the config's, the paper's 2000 / 5000)")
    parser.add_argument("--train-samples", type=int, default=None, help="training samples per task (paper: all)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--override", nargs="*", default=[],
                        help="further config overrides, e.g. method.replay_hypernetwork.init=xavier")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    bench, paper_steps = args.benchmark, PAPER_STEPS[args.benchmark]
    for method in args.methods:  # a missing config fails before any run
        for cl in args.scenarios:
            experiment(method, bench, cl)
    print(f"{BENCHMARK_NAMES[bench]}, {args.steps or paper_steps} steps per task (paper {paper_steps}), "
          f"batch 128 (+128 replayed), "
          f"train samples per task: {args.train_samples or 'all'}, seeds {args.seeds}, {args.threads} thread(s)"
          + (f", overrides {args.override}" if args.override else ""))
    rows = []
    for method in args.methods:
        for cl in args.scenarios:
            accs, during, walls = [], [], []
            for seed in args.seeds:
                m, model, cfg = run(method, bench, cl, seed, args.steps, args.train_samples, args.override)
                R = np.asarray(m["R"]) * 100
                accs.append(R[-1].mean())
                during.append(np.diag(R).mean())
                walls.append(m["wall_seconds"])
                print(f"  {NAMES[method]:12s} CL{cl} seed {seed}: ACC {accs[-1]:6.2f}  during {during[-1]:6.2f}  "
                      f"last row {np.round(R[-1], 1).tolist()}  ({walls[-1]:.0f} s)", flush=True)
                if method == "hnet_tir" and cl > 1:
                    ti = task_inference(model, cfg)
                    for rule, name in (("classifier", "task classifier"), ("entropy", "entropy (ENT)")):
                        print(f"    task inference by {name:15s}: {np.round(ti[rule], 1).tolist()} "
                              f"(mean {np.mean(ti[rule]):.2f}); ACC with it {np.mean(ti[rule + '_acc']):.2f}",
                              flush=True)
            paper, paper_std = PAPER[bench][method][cl - 1]
            rows.append((NAMES[method], cl, np.mean(accs), np.std(accs), np.mean(during), paper, paper_std,
                         np.mean(walls), method))
    print(f"\n| method | scenario | ours ACC (mean +- std, {len(args.seeds)} seeds) | ours during | paper | "
          "paper during | wall s/run |")
    print("|---|---|---|---|---|---|---|")
    for name, cl, acc, std, dur, paper, paper_std, wall, method in rows:
        paper_during = PAPER_DURING_CL1[bench].get(method) if cl == 1 else None
        cell = f"{'S' if bench == 'split_mnist' else 'P10'}-CL{cl}"
        print(f"| {name} | {cell} | {acc:.2f} +- {std:.2f} | {dur:.2f} | {paper:.2f} +- {paper_std:.2f} | "
              f"{'-' if paper_during is None else f'{paper_during:.2f}'} | {wall:.0f} |")


if __name__ == "__main__":
    main()
