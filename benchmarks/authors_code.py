"""The HNET authors' own code beside ours, same seed, same steps per task, on this machine (issue 34).

    python benchmarks/authors_code.py --row hnet_ent_cl3 --seed 0 --steps 500 \\
        --checkout /work/ext/hypercl --python /work/ext/venv/bin/python      # both sides, then the table
    python benchmarks/authors_code.py --row hnet_r_cl3 --side authors ...      # one side only
    python benchmarks/authors_code.py --table                                  # every stored result

``--checkout`` is a checkout of ``chrhenning/hypercl`` (never copied into this repository); ``--python`` an
interpreter that can run it (it needs scikit-learn besides torch/numpy/matplotlib; by default this one). Their
``mnist/train_splitMNIST.py`` runs in a subprocess through ``benchmarks/authors_hypercl_shim.py`` with their paper
defaults, only ``n_iter`` (steps per task, every part) and the data folder changed; ours runs the row's experiment
config through the same runner as ``train.py``. The MNIST files come from ``$CL_DATA_DIR/MNIST/raw`` (torchvision's
layout), gzipped once into ``<results>/data/MNIST`` as the authors' reader wants them. Each side's result is a JSON
file in ``--results`` (kept, so the table can be printed later and a finished run is not repeated; ``--force``
reruns it); the authors' full log lies beside it.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SHIM = REPO / "benchmarks" / "authors_hypercl_shim.py"
MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
               "t10k-labels-idx1-ubyte")


@dataclass(frozen=True)
class Row:
    """One Table 1 cell: the paper's figure, the authors' switches for it, our experiment config."""

    label: str
    paper: str
    authors_args: tuple[str, ...]
    experiment: str


# von Oswald et al. 2020, Table 1 (../shared/papers/001_e0797c0d24809c92.txt), Split-MNIST S-CL3, ACC %.
# The switches are the ones their README gives for each method; _set_default then sets the paper's sizes.
ROWS: dict[str, Row] = {
    "hnet_ent_cl3": Row("HNET+ENT S-CL3", "69.48 ± 0.80",
                        ("--cl_scenario", "3", "--infer_task_id", "--infer_with_entropy"), "hnet_split_mnist_cl3"),
    "hnet_r_cl3": Row("HNET+R S-CL3", "95.30 ± 0.13", ("--cl_scenario", "3"), "hnet_r_split_mnist_cl3"),
    "hnet_tir_cl3": Row("HNET+TIR S-CL3", "89.59 ± 0.59", ("--cl_scenario", "3", "--infer_task_id"),
                        "hnet_tir_split_mnist_cl3"),
}


def run_name(row: str, seed: int, steps: int, side: str) -> str:
    return f"{row}_seed{seed}_steps{steps}_{side}"


def prepare_data(cl_data_dir: Path, dest: Path) -> Path:
    """``dest`` with ``MNIST/*-ubyte.gz`` made from ``cl_data_dir/MNIST/raw`` (the authors' reader opens .gz)."""
    target = dest / "MNIST"
    target.mkdir(parents=True, exist_ok=True)
    for name in MNIST_FILES:
        raw = cl_data_dir / "MNIST" / "raw" / name
        packed = target / f"{name}.gz"
        if packed.exists():
            continue
        if not raw.exists():
            raise SystemExit(f"CL_DATA_DIR={cl_data_dir}: {raw} is missing (torchvision's MNIST/raw layout wanted)")
        with raw.open("rb") as src, gzip.open(packed, "wb", compresslevel=1) as out:
            shutil.copyfileobj(src, out)
    return dest


def authors_command(python: str, checkout: str, row: str, seed: int, steps: int, data_dir: Path,
                    out_dir: Path) -> list[str]:
    """The subprocess that runs their train_splitMNIST.py at this row, seed and budget."""
    return [python, str(SHIM), "--checkout", checkout, "--steps", str(steps), "--data-dir", str(data_dir), "--",
            *ROWS[row].authors_args, "--random_seed", str(seed), "--out_dir", str(out_dir)]


def ours_overrides(row: str, seed: int, steps: int) -> list[str]:
    """Our side as ``train.py`` overrides (the row's experiment config, only seed and steps per task set)."""
    return [f"experiment={ROWS[row].experiment}", f"seed={seed}", f"trainer.max_steps={steps}", "logger=none"]


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")


def parse_summary(text: str) -> dict[str, list[float]]:
    """Their ``performance_overview.txt``: one ``key values...`` line each; values may print as ``tensor(x)``."""
    parsed: dict[str, list[float]] = {}
    for line in text.splitlines():
        key, _, rest = line.strip().partition(" ")
        if not key:
            continue
        rest = re.sub(r"device='[^']*'|dtype=\S+", "", rest)
        parsed[key] = [float(v) for v in _NUMBER.findall(rest)]
    for needed in ("acc_after_list", "acc_during_list", "acc_after_mean"):
        if not parsed.get(needed):
            raise ValueError(f"authors' summary has no values for {needed!r}: {text[:200]!r}")
    return parsed


def parse_wall(log: str) -> float | None:
    found = re.findall(r"authors-shim wall_seconds (\d+(?:\.\d+)?)", log)
    return float(found[-1]) if found else None


def authors_result(summary: str, log: str) -> dict[str, Any]:
    parsed = parse_summary(summary)
    result: dict[str, Any] = {"acc": parsed["acc_after_mean"][0], "after": parsed["acc_after_list"],
                              "during": parsed["acc_during_list"], "wall_s": parse_wall(log)}
    if parsed.get("overall_task_infer_accuracy_list"):
        result["task_inference"] = parsed["overall_task_infer_accuracy_list"]
    return result


def run_authors(args: argparse.Namespace, seed: int) -> dict[str, Any]:
    name = run_name(args.row, seed, args.steps, "authors")
    out_dir, log_path = args.results / name, args.results / f"{name}.log"
    summary = out_dir / "performance_overview.txt"
    cmd = authors_command(args.python, str(Path(args.checkout).resolve()), args.row, seed, args.steps,
                          prepare_data(args.cl_data_dir, args.results / "data"), out_dir)
    if not summary.exists() or args.force:
        if out_dir.exists():  # their script asks on stdin before deleting an existing folder
            shutil.rmtree(out_dir)
        print("authors:", " ".join(cmd), flush=True)
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        with log_path.open("w") as log:
            done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        if done.returncode != 0 or not summary.exists():
            raise SystemExit(f"the authors' run failed (exit {done.returncode}); see {log_path}")
    result = authors_result(summary.read_text(), log_path.read_text() if log_path.exists() else "")
    result["command"] = " ".join(cmd)
    return result


def run_ours(args: argparse.Namespace, seed: int) -> dict[str, Any]:
    import numpy as np
    import torch

    sys.path.insert(0, str(REPO))
    from benchmarks.common import timed_run
    from cl_lightning.config import compose

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    overrides = ours_overrides(args.row, seed, args.steps)
    cfg = compose([*overrides, f"data_dir={args.cl_data_dir}", "trainer.enable_progress_bar=false"])
    print("ours: python train.py", " ".join(overrides), flush=True)
    metrics, _ = timed_run(cfg)
    R = np.asarray(metrics["R"]) * 100
    return {"acc": float(R[-1].mean()), "after": R[-1].tolist(), "during": np.diag(R).tolist(),
            "wall_s": metrics["wall_seconds"], "command": "python train.py " + " ".join(overrides)}


def store(results: Path, row: str, seed: int, steps: int, side: str, result: dict[str, Any]) -> None:
    path = results / f"{run_name(row, seed, steps, side)}.json"
    path.write_text(json.dumps({"row": row, "seed": seed, "steps": steps, "side": side, **result}, indent=1))


def load_all(results: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(results.glob("*_authors.json")) + sorted(
        results.glob("*_ours.json"))]


def _mean(values: list[float]) -> str:
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def table(records: list[dict[str, Any]]) -> str:
    """Markdown: per row and budget, one line per seed and a mean ± sample std line over the seeds."""
    lines = ["| row | steps/task | seed | paper (2000 steps) | authors' code here | ours | wall s authors / ours |",
             "|---|---|---|---|---|---|---|"]
    keys = sorted({(r["row"], r["steps"]) for r in records}, key=lambda k: (list(ROWS).index(k[0]), k[1]))
    for row, steps in keys:
        group = [r for r in records if r["row"] == row and r["steps"] == steps]
        seeds = sorted({r["seed"] for r in group})
        by = {(r["seed"], r["side"]): r for r in group}
        for seed in seeds:
            cells = [by.get((seed, side)) for side in ("authors", "ours")]
            walls = " / ".join(f"{c['wall_s']:.0f}" if c and c.get("wall_s") else "—" for c in cells)
            accs = [f"{c['acc']:.2f}" if c else "—" for c in cells]
            lines.append(f"| {ROWS[row].label} | {steps} | {seed} | {ROWS[row].paper} | {accs[0]} | {accs[1]} | "
                         f"{walls} |")
        if len(seeds) > 1:
            both = [s for s in seeds if (s, "authors") in by and (s, "ours") in by]
            cols = [_mean([by[(s, side)]["acc"] for s in both]) for side in ("authors", "ours")]
            lines.append(f"| {ROWS[row].label} | {steps} | {', '.join(map(str, both))} (mean ± std) | "
                         f"{ROWS[row].paper} | {cols[0]} | {cols[1]} | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--row", choices=sorted(ROWS))
    parser.add_argument("--seed", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=500, help="steps per task, both sides (paper: 2000)")
    parser.add_argument("--side", choices=("both", "authors", "ours"), default="both")
    parser.add_argument("--checkout", help="the chrhenning/hypercl checkout (needed for the authors' side)")
    parser.add_argument("--python", default=sys.executable, help="interpreter for the authors' code")
    parser.add_argument("--results", type=Path, default=Path(os.environ.get("AUTHORS_RESULTS", "authors_results")))
    parser.add_argument("--cl-data-dir", type=Path, default=Path(os.environ.get("CL_DATA_DIR", "data")))
    parser.add_argument("--force", action="store_true", help="rerun a side whose result is stored")
    parser.add_argument("--table", action="store_true", help="only print the table of the stored results")
    args = parser.parse_args(argv)
    args.results.mkdir(parents=True, exist_ok=True)
    if not args.table:
        if args.row is None:
            parser.error("--row is required unless --table")
        if args.side in ("both", "authors") and not args.checkout:
            parser.error("--checkout is required for the authors' side")
        for seed in args.seed:
            for side in ("authors", "ours") if args.side == "both" else (args.side,):
                stored = args.results / f"{run_name(args.row, seed, args.steps, side)}.json"
                if stored.exists() and not args.force:
                    print(f"{side} seed {seed}: stored in {stored}")
                    continue
                began = time.perf_counter()
                result = run_authors(args, seed) if side == "authors" else run_ours(args, seed)
                store(args.results, args.row, seed, args.steps, side, result)
                during = statistics.mean(result["during"])
                print(f"{side} seed {seed}: ACC {result['acc']:.2f} (during mean {during:.2f}), "
                      f"{time.perf_counter() - began:.0f} s", flush=True)
    print(table(load_all(args.results)))


if __name__ == "__main__":
    main()
