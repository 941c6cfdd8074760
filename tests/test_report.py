"""``cl-lightning report``: runs grouped by method, benchmark, scenario and setting, mean ± std over seeds.

Real runs of train.py are reported in tests/test_sweep.py (a sweep writes its report at the end)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import yaml

from cl_lightning.cli import main as cli_main
from cl_lightning.metrics import summarize
from cl_lightning.report import find_runs, group_runs, markdown

PNG = b"\x89PNG\r\n\x1a\n"


def write_run(folder, method, seed, R, lr=0.001, ari=(0.5, 0.7), metric="accuracy", seconds=10.0,
              benchmark="split_mnist"):
    R = np.asarray(R, dtype=float)
    folder.mkdir(parents=True)
    baseline = np.full(R.shape[1], 0.5)
    metrics = {"method": method, "benchmark": benchmark, "scenario": "task", "metric": metric,
               "higher_is_better": metric == "accuracy", "tasks": [f"{benchmark}/{j}" for j in range(R.shape[1])],
               "R": R.tolist(), "baseline": baseline.tolist(), **summarize(R, baseline, metric == "accuracy"),
               "ARI": list(ari), "storage": {"model_parameters": 100, "total": 100}, "train_seconds": seconds,
               "seed": seed}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    config = {"seed": seed, "method_name": method, "output_dir": str(folder), "logger": {"offline": seed % 2 == 0},
              "method": {"class_path": "x.M", "init_args": {"lr": lr}}}
    (folder / "config.yaml").write_text(yaml.safe_dump(config))


def test_mean_and_std_over_seeds_by_hand(tmp_path, capsys):
    """Three seeds of EWC (ACC 0.90, 0.92, 0.94 -> 92.00 ± 2.00 in percent with the n-1 std), a second EWC
    learning rate kept apart, fine-tuning, and a regression run reported in MSE."""
    for seed, acc in enumerate((0.90, 0.92, 0.94)):
        write_run(tmp_path / "sweep" / f"ewc_{seed}", "ewc", seed, [[1.0, 0.5], [acc - 0.06, 1.0 - 0.04 * seed]],
                  ari=(0.5, 0.7 + 0.1 * seed), seconds=10.0 + 2 * seed)
    write_run(tmp_path / "sweep" / "ewc_lr", "ewc", 0, [[1.0, 0.5], [0.5, 1.0]], lr=0.1)
    write_run(tmp_path / "ft", "finetune", 3, [[0.99, 0.5], [0.6, 0.98]])
    write_run(tmp_path / "poly", "hnet", 0, [[0.01, 9.0], [0.02, 0.03]], metric="mse", ari=(None, None),
              benchmark="poly_regression")

    assert cli_main(["report", str(tmp_path / "sweep"), str(tmp_path / "ft"), str(tmp_path / "poly"),
                     "-o", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    groups = group_runs(find_runs([tmp_path / "sweep", tmp_path / "ft", tmp_path / "poly"]))
    assert [(g.method, g.setting, g.seeds) for g in groups] == [
        ("hnet", "", [0]), ("ewc", "method.lr=0.001", [0, 1, 2]), ("ewc", "method.lr=0.1", [0]),
        ("finetune", "", [3])]
    ewc = groups[1]
    # final rows: (0.84, 1.0), (0.86, 0.96), (0.88, 0.92) -> ACC 0.92, 0.91, 0.90
    acc, std = ewc.metric("ACC")
    assert acc == pytest.approx(0.91) and std == pytest.approx(0.01)
    bwt = [0.84 - 1.0, 0.86 - 1.0, 0.88 - 1.0]
    assert ewc.metric("BWT") == pytest.approx((np.mean(bwt), np.std(bwt, ddof=1)))
    la = [(1.0 + 1.0) / 2, (1.0 + 0.96) / 2, (1.0 + 0.92) / 2]
    assert ewc.metric("learning_accuracy") == pytest.approx((np.mean(la), np.std(la, ddof=1)))
    ari = [0.6, 0.65, 0.7]  # mean over tasks, then over seeds
    assert ewc.metric("ARI") == pytest.approx((0.65, np.std(ari, ddof=1)))
    assert groups[3].metric("ACC") == (pytest.approx(0.79), None)  # one seed: no std

    table = (tmp_path / "out/report.md").read_text()
    assert table in printed
    row = next(line for line in table.splitlines() if "method.lr=0.001" in line)
    assert "| 0, 1, 2 (n=3) |" in row and "| 91.00 ± 1.00 |" in row and "| -14.00 ± 2.00 |" in row
    assert "| 0.6500 ± 0.0500 |" in row and "| 12.0 ± 2.0 s |" in row and "| 100 |" in row
    poly = next(line for line in table.splitlines() if "poly_regression" in line)
    assert "| MSE |" in poly and "| 0.025 |" in poly and "%" not in poly  # mean final MSE, not a percentage
    rows = list(csv.DictReader((tmp_path / "out/report.csv").open()))
    assert float(rows[1]["ACC_mean"]) == pytest.approx(0.91) and float(rows[1]["ACC_std"]) == pytest.approx(0.01)
    assert rows[1]["seeds"] == "0 1 2" and rows[1]["runs"] == "3" and rows[0]["score"] == "mse"
    assert (tmp_path / "out/report.png").read_bytes()[:8] == PNG


def test_a_key_older_runs_lack_splits_no_seeds(tmp_path):
    """A sweep resumed after an upgrade has runs whose configs predate an option: they stay with the runs that
    record its value, unless those disagree among themselves."""
    for seed in (0, 1, 2):
        write_run(tmp_path / f"ewc_{seed}", "ewc", seed, [[1.0, 0.5], [0.9, 1.0]])
    for seed, pixels in ((1, "unit"), (2, "unit")):
        path = tmp_path / f"ewc_{seed}" / "config.yaml"
        config = yaml.safe_load(path.read_text())
        config["method"]["init_args"]["pixels"] = pixels
        path.write_text(yaml.safe_dump(config))
    groups = group_runs(find_runs([tmp_path]))
    assert [(g.setting, g.seeds) for g in groups] == [("", [0, 1, 2])]

    write_run(tmp_path / "ewc_3", "ewc", 3, [[1.0, 0.5], [0.9, 1.0]])
    config = yaml.safe_load((tmp_path / "ewc_3/config.yaml").read_text())
    config["method"]["init_args"]["pixels"] = "standard"
    (tmp_path / "ewc_3/config.yaml").write_text(yaml.safe_dump(config))
    groups = group_runs(find_runs([tmp_path]))
    assert [(g.setting, g.seeds) for g in groups] == [
        ("method.pixels=\"standard\"", [3]), ("method.pixels=\"unit\"", [1, 2]), ("method.pixels=null", [0])]


def test_report_errors_name_the_folder(tmp_path, capsys):
    assert cli_main(["report", str(tmp_path / "missing")]) == 2
    assert "missing: no such folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert cli_main(["report", str(tmp_path / "empty")]) == 2
    assert "no finished run here" in capsys.readouterr().err


def test_markdown_numbers_long_settings():
    from cl_lightning.report import Group, Run

    run = Run(folder=None, metrics={"method": "m", "benchmark": "b", "scenario": "task", "R": [[1.0]],
                                    "ACC": 1.0, "seed": 0}, config={})
    text = markdown([Group("m", "b", "task", "x" * 50, [run])])
    assert "| setting 1 |" in text and "1. " + "x" * 50 in text
