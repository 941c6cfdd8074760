"""ARI lifelong learner reproduction (Srivastava et al., CVPR-W 2023): our figures beside the paper's.

    python benchmarks/ari_reproduce.py split      # Split-MNIST, GEM protocol (paper ACC 88.7, F 0.5)
    python benchmarks/ari_reproduce.py permuted   # Permuted-MNIST-10, GEM protocol (paper ACC 84.2, F 0.2)
    python benchmarks/ari_reproduce.py split --seeds 0 1 2

Each benchmark runs four methods under the same protocol (1,000 training images per task, full test
set, one epoch of batch 10, single-headed 784-100-100-10, Adam lr 1e-3 with weight decay 1e-3) through
the same runner as ``train.py``: the ARI learner with its estimator (``experiment=ari_*``), with random
selection (``experiment=ari_*_random``, the paper's Table 2 ablation), fine-tuning (``experiment=ari_*_finetune``)
and EWC (``experiment=ari_*_ewc``). It prints
ACC and forgetting F (both in %), the mean training-trajectory ARI, wall time, the storage of the ARI
learner against one base model, and what consolidation did at each task.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import data_dir, timed_run  # noqa: E402
from cl_lightning.config import compose  # noqa: E402

PAPER = {  # (ACC, F) in %, the paper's Table 1 / Table 2
    "split": {"ari": (88.7, 0.5), "ari_random": (60.1, 40.1)},
    "permuted": {"ari": (84.2, 0.2), "ari_random": (45.4, 68.2)},
}
BENCHMARK = {"split": "split_mnist", "permuted": "permuted_mnist"}


def runs(key: str) -> dict[str, list[str]]:
    """Each method's experiment file: the ARI learner's, and the baselines' under the same protocol (same
    benchmark settings, same base network: ``experiment=ari_<benchmark>_<method>``)."""
    name = BENCHMARK[key]
    return {
        "ari": [f"experiment=ari_{name}"],
        "ari_random": [f"experiment=ari_{name}_random"],
        "finetune": [f"experiment=ari_{name}_finetune"],
        "ewc": [f"experiment=ari_{name}_ewc"],
    }


def run(overrides: list[str], seed: int) -> tuple[dict, object]:
    cfg = compose([*overrides, "logger=none", f"data_dir={data_dir()}", "trainer.enable_progress_bar=false",
                   f"seed={seed}"])
    return timed_run(cfg)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("benchmark", choices=sorted(BENCHMARK))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--methods", nargs="+", default=["ari", "ari_random", "finetune", "ewc"])
    parser.add_argument("--override", nargs="*", default=[], help="extra overrides for the ARI runs, e.g. "
                        "method.plugins.ARIConsolidation.estimator_weight_decay=0.1")
    args = parser.parse_args()
    rows = []
    for method in args.methods:
        overrides = runs(args.benchmark)[method] + (args.override if method.startswith("ari") else [])
        accs, fs, aris, walls = [], [], [], []
        for seed in args.seeds:
            metrics, model = run(overrides, seed)
            accs.append(100 * metrics["ACC"])
            fs.append(100 * metrics["forgetting"])
            aris.append(float(np.mean([a for a in metrics["ARI"] if a is not None])))
            walls.append(metrics["wall_seconds"])
            print(f"\n== {method} seed {seed}: {' '.join(overrides)}")
            print("R (%):\n" + np.array2string(100 * np.asarray(metrics["R"]), precision=1, max_line_width=150))
            if method.startswith("ari"):
                s = metrics["storage"]
                print(f"storage: {s['total']} values kept ({s['total'] / s['base_model_parameters']:.1f} base models "
                      f"of {s['base_model_parameters']}): " + ", ".join(f"{k} {v}" for k, v in s.items()
                                                                           if k not in ("total",)))
                for h in model.plugins[0].history:
                    picked = [f"{a}{i}" for a, i in h["candidates"]]
                    print(f"  task {h['task']}: candidates {picked} true ARI {np.round(h['candidate_ari'], 3).tolist()}"
                          f" | estimator MSE {h['estimator_mse']:.2e} | KB {h['kb_size']} sets, relative MSE "
                          f"{h['kb_relative_mse']:.3f} after {h['kb_steps']} steps")
        rows.append((method, accs, fs, aris, walls))
    print(f"\n{args.benchmark}: GEM protocol, seeds {args.seeds}")
    print("| method | ACC ours | F ours | ACC paper | F paper | mean ARI | wall s |")
    print("|---|---|---|---|---|---|---|")
    for method, accs, fs, aris, walls in rows:
        paper = PAPER[args.benchmark].get(method)
        pa, pf = (f"{paper[0]:.1f}", f"{paper[1]:.1f}") if paper else ("-", "-")
        sd = lambda v: f" ± {np.std(v):.1f}" if len(v) > 1 else ""  # noqa: E731
        print(f"| {method} | {np.mean(accs):.1f}{sd(accs)} | {np.mean(fs):.1f}{sd(fs)} | {pa} | {pf} | "
              f"{np.mean(aris):.3f} | {np.mean(walls):.0f} |")


if __name__ == "__main__":
    main()
