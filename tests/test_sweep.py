"""``python train.py -m a=1,2 b=x,y``: one run folder per combination, grouped on W&B, resumable after a kill;
the W&B sweep file's command lines are accepted by our config parser."""

from __future__ import annotations

import csv
import itertools
import json
import os
import sys

import numpy as np
import pytest
import yaml

from cl_lightning.config import ConfigError, compose
from cl_lightning.experiment import make_loggers
from cl_lightning.sweep import SWEEP_FILE, Sweep, is_sweep, plan, split_values
from tests.helpers.launch import train_process
from tests.helpers.run import REPO


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CL_LIGHTNING_RUN_DIR", raising=False)


def test_only_top_level_commas_split_a_value():
    assert split_values("0,1,2") == ["0", "1", "2"]
    assert split_values("[9,8,7,6,5,4,3,2,1,0]") == ["[9,8,7,6,5,4,3,2,1,0]"]
    assert split_values("[0,1],[1,0]") == ["[0,1]", "[1,0]"]
    assert split_values("{a: 1, b: 2},{a: 3}") == ["{a: 1, b: 2}", "{a: 3}"]
    assert split_values("'a,b',c") == ["'a,b'", "c"]
    assert split_values('"x,y"') == ['"x,y"']
    assert split_values("0.01") == ["0.01"]


def test_the_product_of_the_comma_lists_one_run_each(tmp_path):
    import wandb

    sweep = plan(["-m", "seed=0,1,2", "method=ewc,online_ewc", "benchmark.class_order=[9,8,7,6,5,4,3,2,1,0]",
                  "method.lr=0.01", f"output_dir={tmp_path / 'sw'}"])
    assert len(sweep.runs) == 6 and sweep.dir == tmp_path / "sw" and sweep.name == "sw"
    assert [r.values for r in sweep.runs] == [{"seed": s, "method": m} for s, m in
                                              itertools.product("012", ["ewc", "online_ewc"])]
    assert len({r.id for r in sweep.runs}) == 6 and sweep.runs[3].id == "3_seed=1_method=online_ewc"
    for run in sweep.runs:
        cfg = compose(run.overrides)  # every run's overrides are a valid train.py config
        assert cfg["seed"] == int(run.values["seed"]) and cfg["method_name"] == run.values["method"]
        assert cfg["benchmark"]["init_args"]["class_order"] == [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]  # one value
        assert cfg["method"]["init_args"]["lr"] == 0.01
        # grouped on W&B under the sweep's name, passed to the WandbLogger
        assert cfg["logger"]["init_args"]["group"] == "sw"
        logger, = make_loggers({**cfg["logger"], "init_args": {**cfg["logger"]["init_args"], "offline": True}},
                               tmp_path / run.id, None)
        assert logger._wandb_init["group"] == "sw" and logger._wandb_init["name"] == run.id
        wandb.finish()
    assert all("logger.group" not in " ".join(r.overrides) for r in plan(["-m", "seed=0,1", "logger=csv"]).runs)


def test_sweep_mistakes_fail_before_anything_runs(tmp_path):
    with pytest.raises(ConfigError, match=r"sweep run 0_method.lrr=1: unknown key method.lrr"):
        plan(["-m", "method=ewc", "method.lrr=1,0.1"])
    with pytest.raises(ConfigError, match="sweep.parallel=0 must be a positive integer"):
        plan(["-m", "seed=0,1", "sweep.parallel=0"])
    with pytest.raises(ConfigError, match="unknown sweep option 'sweep.paralel'"):
        plan(["-m", "seed=0,1", "sweep.paralel=2"])
    with pytest.raises(ConfigError, match="output_dir names the whole sweep"):
        plan(["-m", "output_dir=a,b"])
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(ConfigError, match="already holds files"):
        plan(["-m", "seed=0,1", f"output_dir={tmp_path / 'full'}"])
    assert is_sweep(["-m"]) and is_sweep(["sweep.parallel=2"]) and not is_sweep(["seed=0", "method=ewc"])


def test_the_wandb_sweep_file_builds_command_lines_our_parser_accepts(tmp_path):
    """The command W&B's agent builds for every grid point (its own functions, no server), parsed by train.py's
    config composition, with the run id left to the agent."""
    import wandb
    from wandb.sdk.launch.sweeps.utils import create_sweep_command, create_sweep_command_args

    spec = yaml.safe_load((REPO / "configs/sweeps/wandb_split_mnist_seeds.yaml").read_text())
    assert spec["program"] == "train.py" and (REPO / spec["program"]).is_file()
    assert "${args_no_hyphens}" in spec["command"]
    params = spec["parameters"]
    grid = [[(k, v) for v in p["values"]] if "values" in p else [(k, p["value"])] for k, p in params.items()]
    points = list(itertools.product(*grid))
    assert len(points) == 9
    for point in points:
        args = create_sweep_command_args({"args": {k: {"value": v} for k, v in point}})  # as the agent does
        macros = {"args_no_hyphens": args["args_no_hyphens"], "program": [spec["program"]],
                  "interpreter": ["python"], "env": ["/usr/bin/env"]}
        command = [word for chunk in create_sweep_command(list(spec["command"]))
                   for word in (macros[chunk[2:-1]] if chunk.startswith("${") else [chunk])]
        assert command[:3] == ["/usr/bin/env", "python", "train.py"]
        cfg = compose(command[3:])
        values = dict(point)
        assert cfg["method_name"] == values["method"] and cfg["seed"] == values["seed"]
        assert cfg["benchmark"]["init_args"]["class_order"] == list(range(10))
        assert cfg["logger"]["init_args"]["offline"] is False and cfg["logger"]["init_args"]["id"] is None
        logger, = make_loggers({**cfg["logger"], "init_args": {**cfg["logger"]["init_args"], "offline": True}},
                               tmp_path / "unused", None)
        assert logger._wandb_init["id"] is None  # wandb.init then takes WANDB_RUN_ID from the agent
        wandb.finish()


def sweep_py(*args, cwd):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return train_process(list(args), env, cwd)


@pytest.mark.slow
def test_a_killed_sweep_resumes_keeping_finished_runs(mnist_root, tmp_path):
    """Three seeds; the sweep process is killed at the first step of the second task of the second run. Resumed
    two at a time: the first run is kept as it was, the second continues from its task-boundary checkpoint, the
    third starts, and runs.csv lists all three."""
    out = tmp_path / "sweep"
    marker = tmp_path / "killed"
    kill = ("method.plugins=[{class_path: tests.helpers.crash.KillSweepAt, "
            f"init_args: {{task: 1, step: 0, marker: '{marker}', run: 'seed=1'}}}}]")
    common = ["method=finetune", "method.backbone.hidden_sizes=[32]", f"data_dir={mnist_root}",
              "benchmark.num_tasks=2", "benchmark.train_samples_per_task=256", "benchmark.batch_size=64",
              "benchmark.eval_batch_size=1000", "logger=none", "trainer.enable_progress_bar=false"]
    killed = sweep_py("-m", "seed=0,1,2", kill, *common, f"output_dir={out}", cwd=tmp_path)
    assert killed.returncode == -9, killed.stderr[-3000:]  # SIGKILL
    runs = Sweep.load(out).runs
    assert [r.id for r in runs] == ["0_seed=0", "1_seed=1", "2_seed=2"]
    first, second, third = (out / r.id for r in runs)
    assert (first / "metrics.json").is_file()
    assert (second / "checkpoints/after_task_0.ckpt").is_file() and not (second / "metrics.json").exists()
    assert not third.exists()
    kept = (first / "metrics.json").stat().st_mtime_ns
    boundary = (second / "checkpoints/after_task_0.ckpt").stat().st_mtime_ns

    resumed = sweep_py(f"resume={out}", "sweep.parallel=2", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    assert "run 1/3 0_seed=0: kept" in resumed.stdout and "run 2/3 1_seed=1: resumed" in resumed.stdout
    assert "run 3/3 2_seed=2: started" in resumed.stdout
    assert (first / "metrics.json").stat().st_mtime_ns == kept
    assert (second / "checkpoints/after_task_0.ckpt").stat().st_mtime_ns == boundary  # not trained again
    assert {p.name for p in (out / "logs").glob("*.log")} == {"1_seed=1.log", "2_seed=2.log"}
    rows = list(csv.DictReader((out / "runs.csv").open()))
    assert [(r["seed"], r["state"]) for r in rows] == [("0", "finished"), ("1", "finished"), ("2", "finished")]
    for row, folder in zip(rows, (first, second, third), strict=True):
        metrics = json.loads((folder / "metrics.json").read_text())
        assert np.asarray(metrics["R"]).shape == (2, 2) and metrics["seed"] == int(row["seed"])
        assert float(row["ACC"]) == pytest.approx(metrics["ACC"])
    assert json.loads((out / SWEEP_FILE).read_text())["name"] == "sweep"

    # the sweep's report: the three seeds of one setting, mean ± std (n-1) of the runs' own metrics
    acc = [json.loads((f / "metrics.json").read_text())["ACC"] for f in (first, second, third)]
    row = next(line for line in (out / "report.md").read_text().splitlines() if line.startswith("| finetune |"))
    assert "| split_mnist | task | — | 0, 1, 2 (n=3) | accuracy % |" in row
    assert f"| {100 * np.mean(acc):.2f} ± {100 * np.std(acc, ddof=1):.2f} |" in row
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


FAKE_RUN = """
import json, os, sys, time
began = time.time()
time.sleep(0.4)
R = [[0.9, 0.5], [0.8, 0.9]]
json.dump({"method": "m", "benchmark": "b", "scenario": "task", "metric": "accuracy", "R": R, "ACC": 0.85,
           "seed": 0, "device": os.environ["CUDA_VISIBLE_DEVICES"], "began": began, "ended": time.time(),
           "wandb_service": os.environ.get("WANDB_SERVICE")},
          open(os.path.join(sys.argv[1], "metrics.json"), "w"))
"""


def test_parallel_runs_get_one_device_each(tmp_path, monkeypatch, capsys):
    """Four runs, two at a time on devices 0 and 1 (a stand-in process instead of train.py): runs that
    overlap in time never share a device, and none inherits the sweep process's wandb-core service."""
    import cl_lightning.sweep as sweep_module

    monkeypatch.setenv("WANDB_SERVICE", "2-12345-unix-/tmp/not-this-runs-service.sock")

    def fake_command(sweep, run):
        folder = sweep.run_dir(run)
        folder.mkdir()
        return [sys.executable, "-c", FAKE_RUN, str(folder)]

    monkeypatch.setattr(sweep_module, "run_command", fake_command)
    assert sweep_module.main(["-m", "seed=0,1,2,3", "logger=none", "sweep.parallel=2", "sweep.devices=[0,1]",
                              f"output_dir={tmp_path / 'sw'}"]) == 0
    runs = [json.loads(p.read_text()) for p in sorted((tmp_path / "sw").glob("*/metrics.json"))]
    assert len(runs) == 4 and {r["device"] for r in runs} == {"0", "1"}
    assert all(r["wandb_service"] is None for r in runs)
    for a, b in itertools.combinations(runs, 2):
        if a["began"] < b["ended"] and b["began"] < a["ended"]:
            assert a["device"] != b["device"]
    assert any(a["began"] < b["ended"] and b["began"] < a["ended"] for a, b in itertools.combinations(runs, 2))
    assert "on device 1" in capsys.readouterr().out


def test_one_owner_reads_resume_and_says_how_a_run_continues(tmp_path):
    from cl_lightning.run_dir import is_sweep_folder, resume_folder, run_words, without_resume

    assert resume_folder(["seed=1", "resume=a", "+resume=b"]) == "b"
    assert resume_folder(["resume=null"]) is None and resume_folder(["seed=1"]) is None
    assert without_resume(["seed=1", "resume=a"]) == ["seed=1"]
    run = tmp_path / "0_seed=1"
    assert run_words(run, ["seed=1"]) == ["seed=1", f"output_dir={run}"]  # not started: a new run there
    run.mkdir()
    (run / "config.yaml").write_text("seed: 1\n")
    assert run_words(run, ["seed=1"]) == [f"resume={run}"]  # started: continued
    assert not is_sweep_folder(run) and not is_sweep_folder(None)
    (tmp_path / SWEEP_FILE).write_text("{}")
    assert is_sweep_folder(tmp_path) and is_sweep(["resume=" + str(tmp_path)])
