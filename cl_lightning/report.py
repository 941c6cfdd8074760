"""``cl-lightning report RUN_OR_SWEEP...``: runs side by side, as papers report them.

Reads the ``metrics.json`` of every given run (a run folder, a sweep folder, or any folder holding run
folders) and groups the runs by method, benchmark, scenario and setting (the config keys that differ
between runs of one method other than the seed and where things are written), so a group's runs are seeds
of one setting. It prints and writes one table (``report.md``, ``report.csv``): seeds, ACC / BWT / FWT /
forgetting / learning accuracy / mean ARI as mean ± std over seeds (sample std, n-1), storage and
training time; and one figure (``report.png``): the mean score on the tasks seen so far after every
task, one line per group with a band of ± one std over seeds, beside each group's mean matrix R.
Markdown shows classification scores in percent; the CSV keeps the fractions of ``metrics.json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import yaml

from cl_lightning.config import flatten

METRICS = ("ACC", "BWT", "FWT", "forgetting", "learning_accuracy", "ARI")
HEADERS = {"ACC": "ACC", "BWT": "BWT", "FWT": "FWT", "forgetting": "forgetting", "learning_accuracy": "LA",
           "ARI": "mean ARI"}
#: Config keys that say where or how a run was executed, not what it computed; they never split a group.
IGNORED_KEYS = ("seed", "seed_everything", "output_dir", "resume", "name", "data_dir", "logger", "cli",
                "trainer.accelerator", "trainer.devices", "trainer.strategy", "trainer.num_nodes",
                "trainer.enable_progress_bar", "trainer.enable_model_summary", "trainer.log_every_n_steps")


@dataclass
class Run:
    folder: Path
    metrics: dict[str, Any]
    config: dict[str, Any]

    @property
    def cell(self) -> tuple[str, str, str]:
        return str(self.metrics["method"]), str(self.metrics["benchmark"]), str(self.metrics["scenario"])

    def value(self, key: str) -> float | None:
        """A summary metric of this run; ARI is the mean over its tasks (None where undefined)."""
        if key == "ARI":
            values = [a for a in self.metrics.get("ARI") or [] if a is not None]
            return float(np.mean(values)) if values else None
        value = self.metrics.get(key)
        return None if value is None else float(value)

    @property
    def storage(self) -> float | None:
        counts = self.metrics.get("storage") or {}
        if "total" in counts:
            return float(counts["total"])
        numbers = [v for v in counts.values() if isinstance(v, (int, float))]
        return float(sum(numbers)) if numbers else None

    @property
    def seen_curve(self) -> np.ndarray:
        """Mean score over the tasks seen so far, after every task."""
        R = np.asarray(self.metrics["R"], dtype=float)
        return np.array([R[t, : t + 1].mean() for t in range(R.shape[0])])


@dataclass
class Group:
    method: str
    benchmark: str
    scenario: str
    setting: str
    runs: list[Run] = field(default_factory=list)

    @property
    def regression(self) -> bool:
        return self.runs[0].metrics.get("metric") == "mse"

    @property
    def seeds(self) -> list[Any]:
        return sorted(r.metrics.get("seed") for r in self.runs)

    def stat(self, values: Iterable[float | None]) -> tuple[float | None, float | None]:
        """Mean and sample standard deviation over the runs that have the value."""
        xs = [v for v in values if v is not None]
        if not xs:
            return None, None
        return float(np.mean(xs)), float(np.std(xs, ddof=1)) if len(xs) > 1 else None

    def metric(self, key: str) -> tuple[float | None, float | None]:
        return self.stat(r.value(key) for r in self.runs)

    def label(self, with_benchmark: bool) -> str:
        parts = [self.method] + ([f"{self.benchmark} ({self.scenario}-IL)"] if with_benchmark else [])
        return " · ".join(parts + ([self.setting] if self.setting else []))


# ---------------------------------------------------------------------------------------- reading
def find_runs(paths: Sequence[str | Path]) -> list[Run]:
    """Every finished run in or below the given folders (a run, a sweep, or a folder of runs)."""
    runs: list[Run] = []
    for path in map(Path, paths):
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: no such folder (give run or sweep folders)")
        files = [path / "metrics.json"] if (path / "metrics.json").is_file() else sorted(path.rglob("metrics.json"))
        if not files:
            raise FileNotFoundError(f"{path}: no finished run here (no metrics.json in it or below it)")
        for file in files:
            config_file = file.parent / "config.yaml"
            config = yaml.safe_load(config_file.read_text()) if config_file.is_file() else {}
            runs.append(Run(file.parent, json.loads(file.read_text()), config if isinstance(config, dict) else {}))
    unique = {r.folder.resolve(): r for r in runs}
    return list(unique.values())


def _ignored(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") or key.endswith(".data_dir") for k in IGNORED_KEYS)


def group_runs(runs: Sequence[Run]) -> list[Group]:
    """Runs grouped by method, benchmark, scenario and the config values that differ within that cell."""
    groups: dict[tuple[str, ...], Group] = {}
    cells: dict[tuple[str, str, str], list[Run]] = {}
    for run in runs:
        cells.setdefault(run.cell, []).append(run)
    for cell, members in cells.items():
        flat = [{k.replace(".init_args", ""): v for k, v in flatten(r.config) if k and not _ignored(k)}
                for r in members]
        keys = sorted({k for f in flat for k in f})
        # a key only some configs have (runs begun before the option existed) splits nothing while those agree
        varying = [k for k in keys if len({json.dumps(f[k], sort_keys=True, default=str) for f in flat if k in f}) > 1]
        for run, values in zip(members, flat, strict=True):
            setting = ", ".join(f"{k}={json.dumps(values.get(k), default=str)}" for k in varying)
            key = (*cell, setting)
            if key not in groups:
                groups[key] = Group(*cell, setting)
            groups[key].runs.append(run)
    return sorted(groups.values(), key=lambda g: (g.benchmark, g.scenario, g.method, g.setting))


# ---------------------------------------------------------------------------------------- formatting
def fmt(mean: float | None, std: float | None, kind: str) -> str:
    """``mean ± std`` as ``percent`` (accuracies), ``fraction`` (ARI, 4 decimals) or ``raw`` (MSE)."""
    if mean is None or math.isnan(mean):
        return "—"
    if kind == "percent":
        mean, std = 100 * mean, None if std is None else 100 * std
    spec, std_spec = {"percent": (".2f", ".2f"), "fraction": (".4f", ".4f"), "raw": (".4g", ".2g")}[kind]
    return f"{mean:{spec}}" + ("" if std is None else f" ± {std:{std_spec}}")


def fmt_seconds(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "—"
    scale, unit = (60.0, "min") if mean >= 120 else (1.0, "s")
    return f"{mean / scale:.1f}" + ("" if std is None else f" ± {std / scale:.1f}") + f" {unit}"


def fmt_count(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "—"
    return f"{mean:,.0f}" + ("" if not std else f" ± {std:,.0f}")


def markdown(groups: Sequence[Group]) -> str:
    """The table: one row per group; long settings are numbered and listed under it."""
    notes: list[str] = []
    lines = ["| method | benchmark | scenario | setting | seeds | score | "
             + " | ".join(HEADERS[k] for k in METRICS) + " | storage | train time |",
             "|" + "---|" * (8 + len(METRICS))]
    for g in groups:
        setting = g.setting or "—"
        if len(setting) > 40:
            notes.append(f"{len(notes) + 1}. {g.setting}")
            setting = f"setting {len(notes)}"
        cells = [fmt(*g.metric(k), "fraction" if k == "ARI" else "raw" if g.regression else "percent")
                 for k in METRICS]
        seeds = ", ".join(str(s) for s in g.seeds)
        lines.append(f"| {g.method} | {g.benchmark} | {g.scenario} | {setting} | {seeds} (n={len(g.runs)}) | "
                     f"{'MSE' if g.regression else 'accuracy %'} | " + " | ".join(cells)
                     + f" | {fmt_count(*g.stat(r.storage for r in g.runs))} | "
                     f"{fmt_seconds(*g.stat(r.metrics.get('train_seconds') for r in g.runs))} |")
    text = "\n".join(lines) + "\n"
    if notes:
        text += "\nSettings:\n\n" + "\n".join(notes) + "\n"
    return text


def write_csv(path: Path, groups: Sequence[Group]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method", "benchmark", "scenario", "setting", "score", "runs", "seeds",
                         *[f"{k}_{s}" for k in (*METRICS, "storage", "train_seconds") for s in ("mean", "std")],
                         "folders"])
        for g in groups:
            stats = [g.metric(k) for k in METRICS] + [g.stat(r.storage for r in g.runs),
                                                      g.stat(r.metrics.get("train_seconds") for r in g.runs)]
            writer.writerow([g.method, g.benchmark, g.scenario, g.setting, "mse" if g.regression else "accuracy",
                             len(g.runs), " ".join(map(str, g.seeds)),
                             *["" if v is None else v for pair in stats for v in pair],
                             " ".join(str(r.folder) for r in g.runs)])


# ---------------------------------------------------------------------------------------- figure
def plot(path: Path, groups: Sequence[Group]) -> None:
    """Score on seen tasks after every task (mean line, ± std band over seeds) beside each group's mean R."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    from cl_lightning.outputs import draw_heatmap

    several_cells = len({(g.benchmark, g.scenario) for g in groups}) > 1
    cols = min(len(groups), 3)
    rows = math.ceil(len(groups) / cols)
    fig = plt.figure(figsize=(5.5 + 3.6 * cols, max(4.2, 3.6 * rows)))
    grid = fig.add_gridspec(rows, cols + 1, width_ratios=[1.5] + [1] * cols)
    ax = fig.add_subplot(grid[:, 0])
    kinds = {"mse" if g.regression else "accuracy" for g in groups}
    for g in groups:
        curves = [r.seen_curve for r in g.runs]
        T = max(len(c) for c in curves)
        curves = [c for c in curves if len(c) == T]
        mean = np.mean(curves, axis=0)
        x = np.arange(1, T + 1)
        (line,) = ax.plot(x, mean, marker="o", label=f"{g.label(several_cells)} (n={len(curves)})")
        if len(curves) > 1:
            std = np.std(curves, axis=0, ddof=1)
            ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.2)
    ax.set_xlabel("after training task")
    ax.set_ylabel(f"mean {kinds.pop() if len(kinds) == 1 else 'score'} on the tasks seen so far")
    cast(MaxNLocator, ax.xaxis.get_major_locator()).set_params(integer=True)  # the default locator
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    ax.set_title("seen tasks after every task (band: ± 1 std over seeds)", fontsize=10)
    for i, g in enumerate(groups):
        hax = fig.add_subplot(grid[i // cols, 1 + i % cols])
        matrices = [np.asarray(r.metrics["R"], dtype=float) for r in g.runs]
        shape = matrices[0].shape
        R = np.mean([m for m in matrices if m.shape == shape], axis=0)
        im = draw_heatmap(hax, R, "mse" if g.regression else "accuracy", g.runs[0].metrics.get("tasks"), fontsize=7)
        fig.colorbar(im, ax=hax, fraction=0.046, pad=0.03)
        hax.set_title(f"{g.label(several_cells)}\nmean R over {len(g.runs)} run(s)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------- entry point
def write_report(out: Path, runs: Sequence[Run]) -> dict[str, Path]:
    """report.md, report.csv and report.png in ``out``; returns their paths."""
    groups = group_runs(runs)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"md": out / "report.md", "csv": out / "report.csv", "png": out / "report.png"}
    paths["md"].write_text(markdown(groups))
    write_csv(paths["csv"], groups)
    plot(paths["png"], groups)
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="cl-lightning report",
        description="Table (Markdown, CSV) and figure of runs grouped by method, benchmark, scenario and setting, "
                    "mean ± std over seeds.")
    parser.add_argument("folders", nargs="+", metavar="RUN_OR_SWEEP",
                        help="run folders, sweep folders, or folders holding runs")
    parser.add_argument("-o", "--out", default=None,
                        help="where report.md/.csv/.png go (default: the folder when one is given, else ./report)")
    args = parser.parse_args(argv)
    try:
        runs = find_runs(args.folders)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else Path(args.folders[0]) if len(args.folders) == 1 else Path("report")
    paths = write_report(out, runs)
    print(paths["md"].read_text())
    print("\n".join(f"{kind}: {path}" for kind, path in paths.items()))
    return 0
