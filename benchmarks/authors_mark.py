"""MARK on Split-MNIST (5 x 2, task-IL): the authors' own code beside ours, same images, seeds and budget (issue 34).

    python benchmarks/authors_mark.py --setting short --seeds 0 1 2 \\
        --checkout /work/ext/mark --python /work/ext/mark_venv/bin/python      # both sides, then the table
    python benchmarks/authors_mark.py --side ours --setting short --seeds 1    # one side only
    python benchmarks/authors_mark.py --table                                  # every stored result

``--checkout`` is a checkout of ``JuliousHurtado/meta-training-setup`` (never copied into this repository), ``--python``
an interpreter that can run it (torch and omegaconf; by default this one). Their ``main.py`` runs unmodified in a
subprocess through ``benchmarks/authors_mark_shim.py``, which feeds it Split-MNIST in the slot of their CIFAR-100
loader (their final version has no MNIST loader) and sets the budget through their own flags and config keys; the
tensors it trains and tests on are written here from our benchmark (``<results>/data/``), so both sides see the
same 1,000 training images per task and the same test images. Ours runs the setting's experiment config with the
overrides of :func:`ours_overrides` through the same runner as ``train.py``.

The settings (:data:`SETTINGS`) map every knob explicitly (:func:`mapping` prints the table): ``short`` is
``experiment=mark_split_mnist_short``'s schedule, ``authors`` the schedule of their ``config_cifar100.yml`` and
``main.py`` flag defaults; both at the network their code builds for a 28 x 28 input with ``experiment: cifar100``
(KB 64/128/256, F 32/32), which ours is switched to, since their widths are fixed in their code. Each side's result
is a JSON file in ``--results`` (kept; ``--force`` reruns); the authors' full log lies beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SHIM = REPO / "benchmarks" / "authors_mark_shim.py"
SIDES = ("authors", "ours")
#: Below this accuracy (%) a two-class task counts as not learnt (chance is 50).
CHANCE_BELOW = 60.0
#: The paper has no Split-MNIST figure; its Split CIFAR-100 (20 x 5) MARK result, ACC / BWT %.
PAPER = "not in the paper (its Split CIFAR-100 20 x 5: ACC 78.31 ± 0.3, BWT -0.27)"
#: The network their code builds with ``experiment: cifar100`` (models/conv.py: Net, Private), for ours too.
AUTHORS_KB_CHANNELS = (64, 128, 256)
AUTHORS_F_CHANNELS = (32, 32)


@dataclass(frozen=True)
class Setting:
    """One budget, given to both sides: what ours overrides and what their config and flags say."""

    label: str
    experiment: str          # ours, before the overrides
    train_samples: int       # training images per task (both sides: the same ones)
    batch_size: int
    latent_dim: int
    epochs: int              # every phase: F, KB pre-training (task 0), masks, final (their --feats-epochs)
    meta_steps: int          # outer steps per task (their --meta-epochs)
    mini_tasks: int          # K (their --mini-tasks)
    inner_steps: int         # S (their --inner-loop)
    lr_task: float = 0.1     # task phases (their lr_task)
    lr_meta: float = 0.01    # inner lr; outer lr = 0.1 x it (their lr_meta)
    relu: bool = True        # mask activation (their use_relu)
    kb_channels: tuple[int, int, int] = AUTHORS_KB_CHANNELS  # theirs: fixed by Net; others through the shim


SETTINGS: dict[str, Setting] = {
    "short": Setting("experiment=mark_split_mnist_short's schedule at their network", "mark_split_mnist_short",
                     train_samples=1000, batch_size=64, latent_dim=64, epochs=3, meta_steps=5, mini_tasks=5,
                     inner_steps=20),
    "short_kb16": Setting("as short, with mark_split_mnist_short's KB widths 16/32/32 (F stays their 32/32)",
                          "mark_split_mnist_short", train_samples=1000, batch_size=64, latent_dim=64, epochs=3,
                          meta_steps=5, mini_tasks=5, inner_steps=20, kb_channels=(16, 32, 32)),
    "authors": Setting("their config_cifar100.yml / main.py defaults (50 epochs, 10 x 10 x 40) on 1,000 images",
                       "mark_split_mnist", train_samples=1000, batch_size=128, latent_dim=128, epochs=50,
                       meta_steps=10, mini_tasks=10, inner_steps=40),
}


def run_name(setting: str, seed: int, side: str) -> str:
    return f"mark_split_mnist_{setting}_seed{seed}_{side}"


def ours_overrides(setting: Setting, seed: int) -> list[str]:
    """Our side as ``train.py`` overrides: the setting's budget and their network; the meta-update's sequential
    form (equal to the vectorised one, faster on a CPU)."""
    e = setting.epochs
    outer_lr, inner_lr = setting.lr_meta * 0.1, setting.lr_meta
    plugin = "method.plugins.MARKMetaUpdate"
    return [f"experiment={setting.experiment}", f"seed={seed}", "logger=none",
            f"benchmark.train_samples_per_task={setting.train_samples}", f"benchmark.batch_size={setting.batch_size}",
            "benchmark.pixels=unit", "benchmark.scenario=task",
            "method.kb_channels=[" + ",".join(map(str, setting.kb_channels)) + "]",
            "method.feature_channels=[" + ",".join(map(str, AUTHORS_F_CHANNELS)) + "]",
            f"method.latent_dim={setting.latent_dim}", "method.feature_dim=null",
            f"method.mask_activation={'relu' if setting.relu else 'sigmoid'}",
            f"method.feature_epochs={e}", f"method.pretrain_epochs={e}", f"method.mask_epochs={e}",
            f"method.final_epochs={e}", f"method.meta_steps={setting.meta_steps}", "method.kb_update=meta",
            f"method.lr={setting.lr_task}", "method.momentum=0.9", "method.weight_decay=0.01",
            f"method.outer_lr={outer_lr:g}", "method.outer_weight_decay=0.1", "method.dropout=0.5",
            f"{plugin}.sign=official", f"{plugin}.mini_tasks={setting.mini_tasks}",
            f"{plugin}.inner_steps={setting.inner_steps}", f"{plugin}.inner_lr={inner_lr:g}",
            f"{plugin}.inner_momentum=0.9", f"{plugin}.inner_weight_decay=0.1", f"{plugin}.inner_plateau=true",
            f"{plugin}.batch_size=null", f"{plugin}.vectorised=false"]


def authors_command(python: str, checkout: str, setting: Setting, seed: int, data: Path, run_dir: Path) -> list[str]:
    """The subprocess that runs their main.py at this setting and seed."""
    return [python, str(SHIM), "--checkout", checkout, "--data", str(data), "--run-dir", str(run_dir),
            "--seed", str(seed), "--batch-size", str(setting.batch_size), "--latent-dim", str(setting.latent_dim),
            "--feats-epochs", str(setting.epochs), "--meta-epochs", str(setting.meta_steps),
            "--mini-tasks", str(setting.mini_tasks), "--inner-loop", str(setting.inner_steps),
            "--use-relu", "1" if setting.relu else "0", "--lr-task", f"{setting.lr_task:g}",
            "--lr-meta", f"{setting.lr_meta:g}",
            *(["--kb-channels", *map(str, setting.kb_channels)] if setting.kb_channels != AUTHORS_KB_CHANNELS else [])]


def mapping(setting: Setting) -> list[tuple[str, str, str]]:
    """(knob, ours, theirs) for every setting the two sides share or differ in."""
    s = setting
    kb, f = "/".join(map(str, s.kb_channels)), "/".join(map(str, AUTHORS_F_CHANNELS))
    theirs_kb = kb if s.kb_channels == AUTHORS_KB_CHANNELS else f"{kb} (the shim's --kb-channels to Shared, Private)"
    return [
        ("data", f"split_mnist task-IL, {s.train_samples} training images per task (benchmark seed 0), all test "
         "images, pixels in [0, 1]", "the same tensors, in the slot of their CIFAR-100 loader"),
        ("KB", f"kb_channels {kb}, latent_dim {s.latent_dim}, dropout 0.5", f"Net(experiment=cifar100): {theirs_kb}, "
         f"latent_dim {s.latent_dim}, Dropout(0.5)"),
        ("F_t", f"feature_channels {f}, feature_dim = latent", f"Private(experiment=cifar100): {f}, flatten 1152"),
        ("masks", "relu" if s.relu else "sigmoid", f"use_relu {s.relu}"),
        ("epochs per phase (F, KB pre-training, masks, final)", f"feature/pretrain/mask/final_epochs {s.epochs}",
         f"--feats-epochs {s.epochs}"),
        ("meta-update", f"meta_steps {s.meta_steps} of K={s.mini_tasks} x S={s.inner_steps}, official sign",
         f"--meta-epochs {s.meta_steps} --mini-tasks {s.mini_tasks} --inner-loop {s.inner_steps}"),
        ("batch (task phases and mini-tasks)", f"benchmark.batch_size {s.batch_size}", f"batch_size {s.batch_size}"),
        ("lr", f"lr {s.lr_task:g} (momentum 0.9, wd 0.01), inner {s.lr_meta:g} (0.9, wd 0.1, plateau), outer "
         f"{s.lr_meta * 0.1:g} (wd 0.1)", f"lr_task {s.lr_task:g}, lr_meta {s.lr_meta:g} (outer: 0.1 x lr_meta)"),
    ]


def parse_authors_log(log: str) -> dict[str, Any]:
    """The shim's last ``authors-shim result {json}`` line: the accuracy matrix in %."""
    found = re.findall(r"^authors-shim result (\{.*\})$", log, flags=re.M)
    if not found:
        raise ValueError("no 'authors-shim result' line in the authors' log")
    raw = json.loads(found[-1])
    return {"R": [[100.0 * v for v in row] for row in raw["R"]], "wall_s": raw["wall_seconds"]}


def summarise(R: list[list[float]]) -> dict[str, Any]:
    """From the accuracy matrix R[i][j] (after task i, on task j, %): the last row, ACC, BWT (GEM's, as both
    codes compute it), the diagonal and the tasks never learnt (diagonal below :data:`CHANCE_BELOW`)."""
    n = len(R)
    if n == 0 or any(len(row) < n for row in R):
        raise ValueError("R must be square (a row per task learnt, a column per task)")
    last, diag = [float(v) for v in R[-1][:n]], [float(R[j][j]) for j in range(n)]
    bwt = sum(last[j] - diag[j] for j in range(n - 1)) / (n - 1) if n > 1 else 0.0
    return {"after": last, "acc": statistics.mean(last), "bwt": bwt, "diag": diag,
            "unlearnt": [j for j in range(n) if diag[j] < CHANCE_BELOW]}


def export_data(setting: Setting, cl_data_dir: Path, dest: Path) -> Path:
    """Our benchmark's tasks at the setting (train subset, test split) as tensors for the shim."""
    path = dest / f"split_mnist_n{setting.train_samples}.pt"
    if path.exists():
        return path
    import torch

    sys.path.insert(0, str(REPO))
    from cl_lightning.config import compose
    from cl_lightning.experiment import build

    cfg = compose([*ours_overrides(setting, 0), f"data_dir={cl_data_dir}"])
    _, dm = build(cfg)
    dm.prepare_data()
    tasks = []
    for t, task in enumerate(dm.info.tasks):
        parts = {}
        for split in ("train", "test"):
            data = dm.split(t, split)
            x, y, _ = data[torch.arange(len(data))]
            parts[f"{split}_x"], parts[f"{split}_y"] = x.float().contiguous(), y.long().contiguous()
        tasks.append({"name": task.name, **parts})
    dest.mkdir(parents=True, exist_ok=True)
    torch.save({"tasks": tasks, "classes_per_task": dm.info.outputs_per_task,
                "input_shape": list(dm.info.input_shape)}, path)
    return path


def run_authors(args: argparse.Namespace, setting: Setting, seed: int, name: str) -> dict[str, Any]:
    run_dir, log_path = args.results / name, args.results / f"{name}.log"
    data = export_data(setting, args.cl_data_dir, args.results / "data")
    cmd = authors_command(args.python, str(Path(args.checkout).resolve()), setting, seed, data.resolve(),
                          run_dir.resolve())
    if args.force or not log_path.exists() or "authors-shim result" not in log_path.read_text():
        print("authors:", " ".join(cmd), flush=True)
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONUNBUFFERED": "1"}
        with log_path.open("w") as log:
            done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        if done.returncode != 0:
            raise SystemExit(f"the authors' run failed (exit {done.returncode}); see {log_path}")
    return {**parse_authors_log(log_path.read_text()), "command": " ".join(cmd)}


def run_ours(args: argparse.Namespace, setting: Setting, seed: int) -> dict[str, Any]:
    import numpy as np
    import torch

    sys.path.insert(0, str(REPO))
    from benchmarks.common import timed_run
    from cl_lightning.config import compose

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    overrides = ours_overrides(setting, seed)
    cfg = compose([*overrides, f"data_dir={args.cl_data_dir}", "trainer.enable_progress_bar=false"])
    print("ours: python train.py", " ".join(overrides), flush=True)
    command = "python train.py " + " ".join(overrides)
    try:
        metrics, _ = timed_run(cfg)
    except FloatingPointError as err:  # MARKMetaUpdate.check_finite: the shared KB would be lost
        return {"R": None, "diverged": " ".join(str(err).split(":")[0].split()), "command": command}
    R = (np.asarray(metrics["R"]) * 100).tolist()
    return {"R": R, "wall_s": metrics["wall_seconds"], "command": command}


def load_all(results: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(results.glob("mark_split_mnist_*.json"))]


def _mean_sd(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def table(records: list[dict[str, Any]]) -> str:
    """Markdown: per setting, the paper, then one line per side and seed (accuracy on each task after the last
    task, ACC, BWT, tasks never learnt; a run whose meta-update diverged says where), then each side's mean ±
    sample std over the seeds that did not diverge, with how many did."""
    lines = []
    for key in [k for k in SETTINGS if any(r["setting"] == k for r in records)]:
        rows = sorted((r for r in records if r["setting"] == key), key=lambda r: (SIDES.index(r["side"]), r["seed"]))
        n = len(rows[0]["R"])
        lines += [f"Setting `{key}`: {SETTINGS[key].label}", "",
                  "| side | seed | " + " | ".join(f"task {j}" for j in range(n)) +
                  " | ACC | BWT | tasks never learnt (R[j,j] < 60) | wall s |",
                  "|---|---|" + "---|" * n + "---|---|---|---|",
                  f"| paper | - | {' | '.join('-' for _ in range(n))} | {PAPER} | | | |"]
        for r in rows:
            if r["R"] is None:
                lines.append(f"| {r['side']} | {r['seed']} | " + " | ".join("-" for _ in range(n)) +
                             f" | - | - | all: {r['diverged']} | - |")
                continue
            s = summarise(r["R"])
            dead = ", ".join(str(j) for j in s["unlearnt"]) or "none"
            wall = f"{r['wall_s']:.0f}" if r.get("wall_s") else "-"
            lines.append(f"| {r['side']} | {r['seed']} | " + " | ".join(f"{v:.2f}" for v in s["after"]) +
                         f" | {s['acc']:.2f} | {s['bwt']:.2f} | {dead} | {wall} |")
        for side in SIDES:
            runs = [r for r in rows if r["side"] == side]
            mine = [summarise(r["R"]) for r in runs if r["R"] is not None]
            diverged = len(runs) - len(mine)
            if len(mine) < 2:
                continue
            seeds = ",".join(str(r["seed"]) for r in runs if r["R"] is not None)
            per_task = [_mean_sd([m["after"][j] for m in mine]) for j in range(n)]
            dead = sum(len(m["unlearnt"]) for m in mine)
            note = f"; {diverged} of {len(runs)} runs diverged, not in the mean" if diverged else ""
            lines.append(f"| **{side}, mean ± sd** | {seeds} | " + " | ".join(per_task) +
                         f" | **{_mean_sd([m['acc'] for m in mine])}** | {_mean_sd([m['bwt'] for m in mine])} | "
                         f"{dead} of {n * len(mine)}{note} | |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", choices=list(SETTINGS), default="short")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--side", choices=("both", *SIDES), default="both")
    parser.add_argument("--checkout", help="the meta-training-setup checkout (needed for the authors' side)")
    parser.add_argument("--python", default=sys.executable, help="interpreter for the authors' code")
    parser.add_argument("--results", type=Path, default=Path(os.environ.get("AUTHORS_RESULTS", "authors_results")))
    parser.add_argument("--cl-data-dir", type=Path, default=Path(os.environ.get("CL_DATA_DIR", "data")))
    parser.add_argument("--force", action="store_true", help="rerun a side whose result is stored")
    parser.add_argument("--table", action="store_true", help="only print the table of the stored results")
    parser.add_argument("--mapping", action="store_true", help="only print the setting's mapping of the two sides")
    args = parser.parse_args(argv)
    setting = SETTINGS[args.setting]
    if args.mapping:
        print("| setting | ours | authors |\n|---|---|---|")
        print("\n".join(f"| {k} | {o} | {a} |" for k, o, a in mapping(setting)))
        return
    args.results.mkdir(parents=True, exist_ok=True)
    args.cl_data_dir = args.cl_data_dir.resolve()
    if not args.table:
        if args.side in ("both", "authors") and not args.checkout:
            parser.error("--checkout is required for the authors' side")
        sides = list(SIDES) if args.side == "both" else [args.side]
        for seed in args.seeds:
            for side in sides:
                name = run_name(args.setting, seed, side)
                stored = args.results / f"{name}.json"
                if stored.exists() and not args.force:
                    print(f"{side} seed {seed}: stored in {stored}")
                    continue
                result = run_authors(args, setting, seed, name) if side == "authors" else run_ours(args, setting, seed)
                record = {"setting": args.setting, "seed": seed, "side": side, **result}
                stored.write_text(json.dumps(record, indent=1))
                if result["R"] is None:
                    print(f"{side} seed {seed}: {result['diverged']}", flush=True)
                    continue
                s = summarise(result["R"])
                print(f"{side} seed {seed}: ACC {s['acc']:.2f}, after the last task {s['after']}, "
                      f"never learnt {s['unlearnt']}", flush=True)
    print(table(load_all(args.results)))


if __name__ == "__main__":
    main()
