"""What a run leaves: one spelling of each benchmark's name, heatmaps that name the tasks and read at both
ends of the colormap, and regression runs that say MSE (title, axis, loggers), never ACC."""

from __future__ import annotations

from types import SimpleNamespace

import matplotlib
import numpy as np
import pytest
from lightning.pytorch.loggers import Logger, WandbLogger

from cl_lightning.config import available, compose, instantiate
from cl_lightning.outputs import draw_heatmap, heatmap_figure, heatmap_title, log_final, log_task_row
from tests.helpers.image_folders import WITHOUT_DATA

matplotlib.use("Agg")


@pytest.mark.parametrize("name", available("benchmark"))
def test_a_benchmark_is_named_as_its_config_file(name):
    info = instantiate(compose([f"benchmark={name}", *WITHOUT_DATA.get(name, [])])["benchmark"], "benchmark").info
    assert info.name == name
    assert all(task.name.startswith(f"{name}/") for task in info.tasks)


def luminance(color):
    r, g, b, _ = matplotlib.colors.to_rgba(color)
    return 0.299 * r + 0.587 * g + 0.114 * b


@pytest.mark.parametrize("metric, R", [("accuracy", [[1.0, 0.0], [0.5, 0.97]]),
                                       ("mse", [[0.001, 900.0], [0.02, 0.003]])])
def test_cell_text_contrasts_with_its_cell_and_ticks_name_the_tasks(metric, R):
    import matplotlib.pyplot as plt

    R = np.asarray(R)
    fig, ax = plt.subplots()
    im = draw_heatmap(ax, R, metric, ["poly_regression/(x+3)^3", "poly_regression/2x^2-1"])
    for text in ax.texts:
        j, i = (round(v) for v in text.get_position())
        cell = im.cmap(im.norm(R[i, j]))
        assert abs(luminance(cell) - luminance(text.get_color())) > 0.4, (R[i, j], cell, text.get_color())
    colors = {text.get_text(): text.get_color() for text in ax.texts}
    best, worst = ("1.00", "0.00") if metric == "accuracy" else ("0.001", "900")
    assert colors[best] == "black" and colors[worst] == "white"  # bright best cell, dark worst cell
    assert [t.get_text() for t in ax.get_xticklabels()] == ["(x+3)^3", "2x^2-1"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["(x+3)^3", "2x^2-1"]
    plt.close(fig)


def test_a_regression_heatmap_says_mse_and_its_title_fits():
    import matplotlib.pyplot as plt

    metrics = {"method": "hnet", "benchmark": "poly_regression", "scenario": "task", "metric": "mse",
               "ACC": 0.0302}
    title = heatmap_title(metrics)
    assert "MSE 0.0302" in title and "ACC" not in title
    fig = heatmap_figure(np.array([[0.06, 0.7, 0.2], [0.06, 0.001, 0.2], [0.06, 0.001, 0.02]]), "mse", title,
                         ["poly_regression/(x+3)^3", "poly_regression/2x^2-1", "poly_regression/(x-3)^3"])
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    ax, colorbar = fig.axes
    for artist in (ax.title, ax.xaxis.label, colorbar.yaxis.label, *ax.get_xticklabels()):
        box = artist.get_window_extent(renderer)
        assert box.x0 >= 0 and box.y0 >= 0 and box.x1 <= fig.bbox.x1 and box.y1 <= fig.bbox.y1, artist
    assert "MSE" in colorbar.get_ylabel()
    plt.close(fig)


class Recorder(Logger):
    name, version = "recorder", 0

    def __init__(self):
        super().__init__()
        self.metrics: dict = {}

    def log_metrics(self, metrics, step=None):
        self.metrics.update(metrics)

    def log_hyperparams(self, params):
        pass


class FakeWandb(WandbLogger):
    """W&B's logger without a W&B run: records the table, image and summary it is given."""

    def __init__(self):
        super().__init__(offline=True)
        self.logged: dict = {}
        self._summary: dict = {}

    @property
    def experiment(self):
        return SimpleNamespace(summary=SimpleNamespace(update=self._summary.update))

    def log_table(self, key, **kwargs):
        self.logged[key] = kwargs

    def log_image(self, key, **kwargs):
        self.logged[key] = kwargs

    def log_hyperparams(self, params):
        pass

    def save(self):
        pass


def test_loggers_say_mse_for_regression_and_acc_for_classification(tmp_path):
    for prefix, seen in (("mse", "cl/MSE_seen"), ("acc", "cl/ACC_seen")):
        recorder = Recorder()
        log_task_row([recorder], 1, [0.1, 0.2], prefix, 10, {"ACC_seen": 0.15, "ARI": None})
        assert recorder.metrics == {f"{prefix}/task_0": 0.1, f"{prefix}/task_1": 0.2, seen: 0.15, "task": 1.0,
                                    "step": 10.0}

    R = [[0.1, 0.2], [0.1, 0.05]]
    metrics = {"R": R, "metric": "mse", "ACC": 0.075, "BWT": 0.0, "FWT": None, "forgetting": 0.0,
               "learning_accuracy": 0.075}
    wandb = FakeWandb()
    log_final([wandb], metrics, ["a", "b"], tmp_path / "x.png", {})
    assert set(wandb.logged) == {"mse_matrix", "mse_matrix_heatmap"}
    assert wandb._summary == {"cl/MSE": 0.075, "cl/BWT": 0.0, "cl/forgetting": 0.0, "cl/learning_MSE": 0.075}
    wandb = FakeWandb()
    log_final([wandb], {**metrics, "metric": "accuracy"}, ["a", "b"], tmp_path / "x.png", {})
    assert set(wandb.logged) == {"accuracy_matrix", "accuracy_matrix_heatmap"} and "cl/ACC" in wandb._summary
