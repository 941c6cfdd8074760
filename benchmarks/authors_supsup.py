"""SupSup GN on Rotated-MNIST: the authors' own code beside ours, same seed, tasks, angles and steps (issue 34).

    python benchmarks/authors_supsup.py --seed 0 --tasks 10 --angle-step 18 --iters 469 \\
        --checkout /work/ext/supsup --python /work/ext/supsup_venv/bin/python     # authors + ours, then the table
    python benchmarks/authors_supsup.py --side ours --ours-setting authors ...       # ours switched to their setting
    python benchmarks/authors_supsup.py --table                                    # every stored result

``--checkout`` is a checkout of ``RAIVNLab/supsup`` (never copied into this repository), ``--python`` an interpreter
that can run it (seaborn and tensorboard besides torch/torchvision). Their
``experiments/GNu/MNISTRotate/supsup.py`` runs in a subprocess through ``benchmarks/authors_supsup_shim.py`` with
its own settings (FC 1024-1024, 200 outputs, RMSprop 1e-4, binary entropy search), only the seed, the number of
tasks, the angle step, iterations and epochs per mask changed (``--iters`` iterations within at most ``--epochs``
epochs; 469 batches of 128 are one epoch), on the CPU, and the GN evaluation done once, after the last task.
Ours runs at the same tasks, angles and steps through the same runner as ``train.py``, either on
``method=supsup``'s defaults (``--ours-setting default``: LeNet-300-100, 10 outputs, Adam 0.01, one-shot) or on
``experiment=supsup_rotated_mnist_gn``, the authors' setting (``--ours-setting authors``). Each side's result is a
JSON file in ``--results`` (kept; ``--force`` reruns); the authors' full log lies beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SHIM = REPO / "benchmarks" / "authors_supsup_shim.py"
SIDES = ("authors", "ours-default", "ours-authors")
EXPERIMENT = "supsup_rotated_mnist_gn"  # the authors' setting as an experiment file
PAPER = "Fig. 6 (GNu, 36 rotations 10 degrees apart, FC 1024-1024): a curve, no table"


def angles(tasks: int, step: float) -> list[float]:
    return [i * step for i in range(tasks)]


def run_name(seed: int, tasks: int, step: float, iters: int, side: str) -> str:
    return f"supsup_rot_t{tasks}_a{step:g}_i{iters}_seed{seed}_{side}"


def authors_command(python: str, checkout: str, seed: int, tasks: int, step: float, iters: int, epochs: int,
                    data_dir: Path, log_dir: Path) -> list[str]:
    """The subprocess that runs their MNISTRotate/supsup.py at this seed and budget, GN tested after the last task."""
    if step != int(step):
        raise ValueError(f"angle step {step}: their RotatingMNIST takes whole degrees")
    return [python, str(SHIM), "--checkout", checkout, "--data-dir", str(data_dir), "--log-dir", str(log_dir),
            "--seed", str(seed), "--num-tasks", str(tasks), "--angle-step", str(int(step)),
            "--iter-lim", str(iters), "--epochs", str(epochs), "--eval-ckpts"]


def ours_overrides(setting: str, seed: int, tasks: int, step: float, iters: int) -> list[str]:
    """Our side as ``train.py`` overrides: the benchmark's tasks and angles, ``iters`` steps per task; with
    ``setting="default"`` on ``method=supsup``'s defaults, with ``setting="authors"`` on the experiment file that
    holds their network, output width, optimiser, inference search and pixel scaling (``supsup_rotated_mnist_gn``)."""
    if setting not in ("default", "authors"):
        raise ValueError(f"setting={setting!r} is not 'default' or 'authors'")
    listed = ",".join(f"{a:g}" for a in angles(tasks, step))
    start = ["method=supsup", "benchmark=rotated_mnist"] if setting == "default" else [f"experiment={EXPERIMENT}"]
    return [*start, f"seed={seed}", f"benchmark.num_tasks={tasks}", f"benchmark.angles=[{listed}]",
            f"trainer.max_steps={iters}", "trainer.max_epochs=-1", "logger=none"]


def parse_authors_log(log: str) -> dict[str, Any]:
    """The shim's last ``authors-shim result {json}`` line, as percentages."""
    found = re.findall(r"^authors-shim result (\{.*\})$", log, flags=re.M)
    if not found:
        raise ValueError("no 'authors-shim result' line in the authors' log")
    raw = json.loads(found[-1])
    if "acc" not in raw:
        raise ValueError(f"the authors' run has no GN evaluation after its {raw.get('num_tasks')} tasks")
    pct = lambda xs: [100.0 * x for x in xs]  # noqa: E731
    return {"acc": statistics.mean(pct(raw["acc"])), "acc_unshared": statistics.mean(pct(raw["acc_unshared"])),
            "after": pct(raw["acc"]), "task_inference": pct(raw["task_inference"]),
            "gg": pct(raw["gg"]), "wall_s": raw["wall_seconds"]}


def run_authors(args: argparse.Namespace, name: str) -> dict[str, Any]:
    log_dir, log_path = args.results / name, args.results / f"{name}.log"
    cmd = authors_command(args.python, str(Path(args.checkout).resolve()), args.seed, args.tasks, args.angle_step,
                          args.iters, args.epochs, args.cl_data_dir, log_dir)
    if args.force or not log_path.exists() or "authors-shim result" not in log_path.read_text():
        print("authors:", " ".join(cmd), flush=True)
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        with log_path.open("w") as log:
            done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        if done.returncode != 0:
            raise SystemExit(f"the authors' run failed (exit {done.returncode}); see {log_path}")
    return {**parse_authors_log(log_path.read_text()), "command": " ".join(cmd)}


def run_ours(args: argparse.Namespace, setting: str) -> dict[str, Any]:
    import numpy as np
    import torch

    sys.path.insert(0, str(REPO))
    from benchmarks.common import timed_run
    from cl_lightning.config import compose

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    overrides = ours_overrides(setting, args.seed, args.tasks, args.angle_step, args.iters)
    cfg = compose([*overrides, f"data_dir={args.cl_data_dir}", "trainer.enable_progress_bar=false"])
    print("ours: python train.py", " ".join(overrides), flush=True)
    metrics, model = timed_run(cfg)
    R = np.asarray(metrics["R"]) * 100
    inferred = [100.0 * x for x in (model.last_task_inference or [])]
    return {"acc": float(R[-1].mean()), "after": R[-1].tolist(), "task_inference": inferred,
            "gg": None, "wall_s": metrics["wall_seconds"], "command": "python train.py " + " ".join(overrides)}


def load_all(results: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(results.glob("supsup_rot_*.json"))]


def table(records: list[dict[str, Any]]) -> str:
    """Markdown: per setting (tasks, angle step, steps, seed), one line per side."""
    lines = ["| tasks x step | steps/mask | seed | side | ACC % | their metric (wrong task = wrong) % | "
             "task inference % (mean; min over tasks) | wall s |", "|---|---|---|---|---|---|---|---|"]
    for r in sorted(records, key=lambda r: (r["tasks"], r["angle_step"], r["iters"], r["seed"],
                                            SIDES.index(r["side"]))):
        ti = r.get("task_inference") or []
        inf = f"{statistics.mean(ti):.1f}; {min(ti):.1f}" if ti else "—"
        unshared = f"{r['acc_unshared']:.2f}" if r.get("acc_unshared") is not None else "—"
        wall = f"{r['wall_s']:.0f}" if r.get("wall_s") else "—"
        lines.append(f"| {r['tasks']} x {r['angle_step']:g}° | {r['iters']} | {r['seed']} | {r['side']} | "
                     f"{r['acc']:.2f} | {unshared} | {inf} | {wall} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tasks", type=int, default=10, help="rotations (ours: 10; their script: 36)")
    parser.add_argument("--angle-step", type=float, default=18.0, help="degrees apart (ours: 18; theirs: 10)")
    parser.add_argument("--iters", type=int, default=469, help="steps per mask, both sides (theirs: 1000)")
    parser.add_argument("--epochs", type=int, default=1, help="their epoch cap per mask (theirs: 3)")
    parser.add_argument("--side", choices=("both", "authors", "ours"), default="both")
    parser.add_argument("--ours-setting", choices=("default", "authors"), default="default")
    parser.add_argument("--checkout", help="the RAIVNLab/supsup checkout (needed for the authors' side)")
    parser.add_argument("--python", default=sys.executable, help="interpreter for the authors' code")
    parser.add_argument("--results", type=Path, default=Path(os.environ.get("AUTHORS_RESULTS", "authors_results")))
    parser.add_argument("--cl-data-dir", type=Path, default=Path(os.environ.get("CL_DATA_DIR", "data")))
    parser.add_argument("--force", action="store_true", help="rerun a side whose result is stored")
    parser.add_argument("--table", action="store_true", help="only print the table of the stored results")
    args = parser.parse_args(argv)
    args.results.mkdir(parents=True, exist_ok=True)
    args.cl_data_dir = args.cl_data_dir.resolve()
    if not args.table:
        if args.side in ("both", "authors") and not args.checkout:
            parser.error("--checkout is required for the authors' side")
        sides = {"both": ["authors", f"ours-{args.ours_setting}"], "authors": ["authors"],
                 "ours": [f"ours-{args.ours_setting}"]}[args.side]
        for side in sides:
            name = run_name(args.seed, args.tasks, args.angle_step, args.iters, side)
            stored = args.results / f"{name}.json"
            if stored.exists() and not args.force:
                print(f"{side}: stored in {stored}")
                continue
            result = run_authors(args, name) if side == "authors" else run_ours(args, side.split("-", 1)[1])
            record = {"seed": args.seed, "tasks": args.tasks, "angle_step": args.angle_step, "iters": args.iters,
                      "side": side, **result}
            stored.write_text(json.dumps(record, indent=1))
            print(f"{side}: ACC {result['acc']:.2f}, task inference {result['task_inference']}", flush=True)
    print(table(load_all(args.results)))


if __name__ == "__main__":
    main()
