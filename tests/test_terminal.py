"""What a run prints: the banner, a line per task, the final table, a line per epoch in a log (no bar frames),
Lightning's device lines once per run and its known warnings filtered only while a run lasts."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import warnings

import numpy as np
import pytest

from cl_lightning.datamodules import PolynomialRegression
from cl_lightning.methods import ContinualModule
from cl_lightning.nets import MLP
from cl_lightning.run_dir import child_run_environment
from cl_lightning.runner import ContinualRunner
from cl_lightning.terminal import matrix_table, quiet_run
from tests.helpers.run import REPO

TASK_LINE = re.compile(r"^Task (\d+)/(\d+) \((.+)\) done · (acc|MSE) ([\d.e+-]+) · mean (?:acc|MSE) over seen tasks "
                       r"([\d.e+-]+) · [\d.]+ s$")


def train_log(out, *overrides, mnist_root=None):
    """``python train.py`` with stdout a pipe (as under CI or nohup), the progress bar left on."""
    env = child_run_environment(os.environ)
    if mnist_root is not None:
        env["CL_DATA_DIR"] = str(mnist_root)
    proc = subprocess.run([sys.executable, "train.py", *overrides, "logger=csv", "trainer.accelerator=cpu",
                           f"output_dir={out}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, proc.stderr


def check_quiet(stdout, stderr):
    both = stdout + stderr
    assert "\r" not in both and "it/s" not in both, "a progress bar redrawn per step went into the log"
    assert "v_num" not in both
    assert both.count("GPU available:") == 1 and both.count("TPU available:") == 1, "device lines once per run"
    assert "`Trainer.fit` stopped" not in both and "LeafSpec" not in both


@pytest.mark.slow
def test_a_logged_split_mnist_run_tells_what_happened(mnist_root, tmp_path):
    out = tmp_path / "run"
    stdout, stderr = train_log(out, "method=finetune", "benchmark.train_samples_per_task=128",
                               "benchmark.batch_size=64", "benchmark.eval_batch_size=1000", "trainer.max_epochs=2",
                               "method.backbone.hidden_sizes=[32]", mnist_root=mnist_root)
    metrics = json.loads((out / "metrics.json").read_text())
    R = np.asarray(metrics["R"])
    lines = stdout.splitlines()
    check_quiet(stdout, stderr)

    # the banner, once, before anything else
    assert lines[0] == "== finetune on split_mnist (task-IL) · 5 tasks · seed 0"
    assert lines[1] == f"   run folder: {out}"
    assert sum(line.startswith("== ") for line in lines) == 1

    # a line per epoch (2 per task), then a line per task with its accuracy and the mean over seen tasks
    epoch_line = re.compile(r"^  Task \d/5 · epoch \d/2 · step \d+ · loss [\d.e+-]+ · [\d.]+ s$")
    epochs = [line for line in lines if epoch_line.match(line)]
    assert [e.split(" · ")[:2] for e in epochs] == [[f"  Task {t}/5", f"epoch {e}/2"] for t in range(1, 6)
                                                    for e in (1, 2)]
    tasks = [TASK_LINE.match(line) for line in lines if line.startswith("Task ")]
    names = ["0-1", "2-3", "4-5", "6-7", "8-9"]
    assert all(tasks) and [m.group(1, 2, 3, 4) for m in tasks] == [(str(t + 1), "5", names[t], "acc") for t in range(5)]
    for t, m in enumerate(tasks):
        assert float(m.group(5)) == pytest.approx(100 * R[t, t], abs=0.006)
        assert float(m.group(6)) == pytest.approx(100 * R[t, : t + 1].mean(), abs=0.006)
    assert lines.index(epochs[1]) < lines.index(next(x for x in lines if x.startswith("Task 1/5")))

    # the matrix as a table, the summary rounded, and where the outputs are
    head = lines.index("accuracy (%), row: after training task, column: evaluated on task")
    table = [line.split() for line in lines[head + 1: head + 7]]
    assert table[0] == ["after", *names] and [row[0] for row in table[1:]] == names
    np.testing.assert_allclose(np.asarray([row[1:] for row in table[1:]], dtype=float), 100 * R, atol=0.006)
    summary = lines[head + 7]
    assert summary.startswith(f"ACC {100 * metrics['ACC']:.2f} · BWT {100 * metrics['BWT']:+.2f} · ")
    assert lines[-2:] == [f"heatmap: {out / 'accuracy_matrix.png'}", f"metrics: {out / 'metrics.json'}"]


def test_a_regression_run_says_mse_and_a_resume_says_where_it_resumed(tmp_path):
    out = tmp_path / "run"
    small = ["benchmark=poly_regression", "method=finetune", "method.backbone.hidden_sizes=[8]",
             "benchmark.num_tasks=2", "benchmark.train_samples=64"]
    stdout, stderr = train_log(out, *small)
    check_quiet(stdout, stderr)
    assert "acc" not in stdout.lower().replace("accuracy_matrix", "")
    tasks = [TASK_LINE.match(line) for line in stdout.splitlines() if line.startswith("Task ")]
    assert [m.group(4) for m in tasks] == ["MSE", "MSE"]
    assert "MSE, row: after training task" in stdout and re.search(r"^MSE [\d.e+-]+ · BWT ", stdout, re.M)

    again, _ = train_log(out, *small, f"resume={out}")
    assert again.splitlines()[2] == "   resumed after task 2: every task has finished"
    assert not [line for line in again.splitlines() if line.startswith("Task ")]  # nothing trained again
    assert "MSE, row: after training task" in again


def test_filters_last_as_long_as_the_run():
    """Nothing filtered at import or after a run; inside one, the device lines pass once and the known
    dependency warning not at all, while other warnings still show."""
    log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    before = (list(warnings.filters), list(log.filters))
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    log.addHandler(handler)
    try:
        for _ in range(2):  # two runs: each says it once
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                with quiet_run():
                    for _ in range(3):
                        log.info("GPU available: False, used: False")
                        log.info("`Trainer.fit` stopped: `max_epochs=1` reached.")
                    warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning,
                                  stacklevel=1)
                    warnings.warn("something else", FutureWarning, stacklevel=1)
            assert [str(w.message) for w in caught] == ["something else"]
        assert [r.getMessage() for r in records] == ["GPU available: False, used: False"] * 2
    finally:
        log.removeHandler(handler)
    assert (list(warnings.filters), list(log.filters)) == before
    with warnings.catch_warnings(record=True) as caught:  # outside a run the warning is the user's to see
        warnings.simplefilter("always")
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated", FutureWarning, stacklevel=1)
    assert len(caught) == 1


def test_only_rank_zero_prints(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LOCAL_RANK", "1")
    runner = ContinualRunner(ContinualModule(MLP(hidden_sizes=[4])), PolynomialRegression(), tmp_path)
    runner.terminal.banner("m", "b", "task", 3, 0, tmp_path)
    runner.terminal.task_line(0, 3, "t", [0.5, 0.1, 0.1], False, 1.0)
    assert capsys.readouterr().out == ""


def test_a_long_run_shows_the_last_row_only():
    R = np.full((30, 30), 0.5).tolist()
    table = matrix_table(R, [f"b/{i}" for i in range(30)], regression=False).splitlines()
    assert len(table) == 3 and "last row only" in table[0] and table[2].split()[0] == "29"
