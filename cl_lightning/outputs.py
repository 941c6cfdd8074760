"""What a run leaves behind: files a person can read without W&B, and the same figures on the loggers."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
from lightning.pytorch.loggers import Logger, WandbLogger


def write_matrix_csv(path: Path, R: np.ndarray, task_names: list[str]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["after_task"] + task_names)
        for i, row in enumerate(R):
            writer.writerow([task_names[i]] + [f"{v:.6f}" for v in row])


def short_task_names(task_names: list[str] | None, T: int) -> list[str]:
    """Tick labels: the part of each task's name after the benchmark (``split_mnist/0-1`` -> ``0-1``)."""
    if not task_names or len(task_names) != T:
        return [str(j) for j in range(T)]
    return [name.rsplit("/", 1)[-1] for name in task_names]


def score_label(metric: str) -> str:
    """What the matrix holds, for titles and axes: ``accuracy`` or ``MSE (lower is better)``."""
    return "accuracy" if metric == "accuracy" else "MSE (lower is better)"


def plot_heatmap(path: Path, R: np.ndarray, metric: str, title: str, task_names: list[str] | None = None) -> None:
    """The accuracy (or MSE) matrix as an annotated heatmap PNG (rows: after task i; columns: task j)."""
    heatmap_figure(R, metric, title, task_names).savefig(path, dpi=110)


def heatmap_figure(R: np.ndarray, metric: str, title: str, task_names: list[str] | None = None) -> Any:
    """The heatmap's matplotlib figure, laid out so that the title, ticks and colorbar label fit.

    A figure on the Agg canvas, outside pyplot (no backend to choose, no figure manager to close; pyplot's import
    is a part of every run's fixed cost that drawing one PNG does not need)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    T = R.shape[1]
    size = max(5.0, 0.6 * T + 2.5)
    fig = Figure(figsize=(size, size * 0.85))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    im = draw_heatmap(ax, R, metric, task_names)
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, label=score_label(metric))
    fig.tight_layout()
    return fig


def draw_heatmap(ax: Any, R: np.ndarray, metric: str, task_names: list[str] | None = None,
                 fontsize: float = 8) -> Any:
    """Draws R on a matplotlib axis, ticks named by task, cells annotated up to 20 tasks; returns the image.

    Accuracy spans [0, 1] on viridis; MSE uses reversed viridis (dark = large error) on a log scale when
    it spans more than two decades (forgetting turns small errors into very large ones). Cell text is
    black or white by the luminance of the cell's colour, so it reads at both ends of the colormap."""
    from matplotlib.colors import LogNorm, Normalize

    T = R.shape[1]
    if metric == "accuracy":
        cmap, norm = "viridis", Normalize(0.0, 1.0)
    else:
        positive = R[R > 0]
        wide = positive.size and positive.max() / positive.min() > 100
        cmap = "viridis_r"
        norm = LogNorm(positive.min(), positive.max()) if wide else Normalize(float(R.min()), float(R.max()))
    im = ax.imshow(R, cmap=cmap, norm=norm)
    if T <= 20:
        for i in range(R.shape[0]):
            for j in range(T):
                r, g, b, _ = im.cmap(im.norm(R[i, j]))
                dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.5
                ax.text(j, i, f"{R[i, j]:.2f}" if metric == "accuracy" else f"{R[i, j]:.3g}",
                        ha="center", va="center", color="white" if dark else "black", fontsize=fontsize)
    names = short_task_names(task_names, T)
    ax.set_xlabel("evaluated on task")
    ax.set_ylabel("after training task")
    ax.set_xticks(range(T), names, rotation=45 if max(map(len, names)) > 3 else 0,
                  ha="right" if max(map(len, names)) > 3 else "center", fontsize=fontsize)
    ax.set_yticks(range(R.shape[0]), names[: R.shape[0]], fontsize=fontsize)
    return im


def heatmap_title(metrics: dict[str, Any]) -> str:
    """``method on benchmark (scenario-IL)`` over the final score: ``ACC 0.971`` or ``mean MSE 0.0302``."""
    final = f"ACC {metrics['ACC']:.3f}" if metrics["metric"] == "accuracy" else f"mean MSE {metrics['ACC']:.3g}"
    return f"{metrics['method']} on {metrics['benchmark']} ({metrics['scenario']}-IL)\n{final}"


def write_run_files(run_dir: Path, metrics: dict[str, Any], task_names: list[str]) -> dict[str, Path]:
    """metrics.json, accuracy_matrix.csv and accuracy_matrix.png in the run folder."""
    R = np.asarray(metrics["R"], dtype=float)
    paths = {"json": run_dir / "metrics.json", "csv": run_dir / "accuracy_matrix.csv",
             "png": run_dir / "accuracy_matrix.png"}
    paths["json"].write_text(json.dumps(metrics, indent=2))
    write_matrix_csv(paths["csv"], R, task_names)
    plot_heatmap(paths["png"], R, metrics["metric"], heatmap_title(metrics), task_names)
    return paths


#: Names of the summary metrics on the loggers when R holds MSE: what they average is an error, not accuracy.
MSE_NAMES = {"ACC": "MSE", "ACC_seen": "MSE_seen", "learning_accuracy": "learning_MSE"}


def _named(key: str, prefix: str) -> str:
    return MSE_NAMES.get(key, key) if prefix == "mse" else key


def log_task_row(loggers: list[Logger], task: int, row: list[float], prefix: str, step: int,
                 summary: dict[str, Any]) -> None:
    """After each task: ``acc/task_j`` (``mse/task_j``) for every task and the running CL metrics
    (``cl/ACC_seen``, or ``cl/MSE_seen`` for regression), on one step axis."""
    values = {f"{prefix}/task_{j}": v for j, v in enumerate(row)}
    values.update({f"cl/{_named(k, prefix)}": v for k, v in summary.items() if v is not None})
    values["task"] = float(task)
    values["step"] = float(step)
    for logger in loggers:
        logger.log_metrics(values, step=step)


def log_final(loggers: list[Logger], metrics: dict[str, Any], task_names: list[str], png: Path,
              config: dict[str, Any]) -> None:
    """The matrix as a table, the heatmap as an image, the summary metrics, and the config (for regression:
    ``mse_matrix``, ``cl/MSE``, ``cl/learning_MSE``)."""
    R = metrics["R"]
    prefix = "acc" if metrics.get("metric", "accuracy") == "accuracy" else "mse"
    matrix = "accuracy_matrix" if prefix == "acc" else "mse_matrix"
    for logger in loggers:
        logger.log_hyperparams(config)
        if isinstance(logger, WandbLogger):
            data = [[task_names[i]] + list(row) for i, row in enumerate(R)]
            logger.log_table(matrix, columns=["after_task"] + task_names, data=data)
            logger.log_image(f"{matrix}_heatmap", images=[str(png)])
            logger.experiment.summary.update(
                {f"cl/{_named(k, prefix)}": metrics[k] for k in ("ACC", "BWT", "FWT", "forgetting",
                                                                 "learning_accuracy") if metrics[k] is not None})
        logger.save()
