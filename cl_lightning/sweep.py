"""``python train.py -m seed=0,1,2 method=ewc,online_ewc``: the Cartesian product of comma lists, one run each.

Every combination becomes its own run folder under one sweep folder, trained by its own
``python train.py ...`` process: one after another by default, ``sweep.parallel=N`` at once (with
``sweep.devices=[0,1]`` each process sees one of those GPUs). Separate processes, not a loop in this
one, because a run owns process-wide state (the DDP re-launch of ``sys.argv``, the run-folder
environment variable, CUDA memory). The plan is written to ``sweep.json`` before anything trains; what
happened to each run is read back from its folder (``metrics.json``: finished; ``config.yaml`` only:
interrupted), so ``train.py resume=<sweep folder>`` after any kill keeps the finished runs, resumes the
interrupted ones (``train.py resume=<run folder>``) and starts the rest. Runs are grouped on W&B under
the sweep's name. At the end the sweep folder gets ``runs.csv`` (one row per run) and the report of
``cl-lightning report`` over its finished runs (``report.md``, ``.csv``, ``.png``: seeds as mean ± std).

Only top-level commas split a value: ``benchmark.class_order=[9,8,7,6,5,4,3,2,1,0]`` is one value,
``benchmark.class_order=[0,1],[1,0]`` two; commas inside brackets, braces or quotes never split.

Ours because no library in the dependencies does it: jsonargparse and LightningCLI parse one run's arguments
and have no multirun (no product of value lists, no process per run, no resumable plan); Hydra's ``-m`` would
bring another config system beside the one ``config.py`` and LightningCLI share.
"""

from __future__ import annotations

import csv
import datetime as dt
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cl_lightning.config import ConfigError, compose, override_word
from cl_lightning.run_dir import (
    SWEEP_FILE,
    child_run_environment,
    is_sweep_folder,
    resume_folder,
    run_state,
    run_words,
    without_resume,
)

TRAIN_PY = Path(__file__).resolve().parents[1] / "train.py"
MULTIRUN_FLAGS = ("-m", "--multirun")
#: Keys of the sweep itself (not passed to the runs).
SWEEP_OPTIONS = ("sweep.parallel", "sweep.devices")
#: Top-level keys a sweep owns: one folder and one name for all of its runs.
SWEEP_OWNED = ("output_dir", "name", "resume")
SUMMARY_KEYS = ("ACC", "BWT", "FWT", "forgetting", "learning_accuracy", "train_seconds")


# ---------------------------------------------------------------------------------------- parsing
def split_values(raw: str) -> list[str]:
    """The values of a sweep axis: ``raw`` split at commas outside brackets, braces and quotes."""
    parts, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(raw):
        if quote:
            if ch == quote:
                quote = ""
        elif ch in "'\"":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(raw[start:i])
            start = i + 1
    parts.append(raw[start:])
    return parts


def is_sweep(args: Sequence[str]) -> bool:
    """True for ``-m`` / ``--multirun``, a ``sweep.*`` key, or ``resume=`` naming a sweep folder."""
    if any(word in MULTIRUN_FLAGS or word.split("=", 1)[0] in SWEEP_OPTIONS for word in args):
        return True
    return is_sweep_folder(resume_folder(args))


@dataclass
class SweepRun:
    """One combination: its folder (relative to the sweep folder) and the overrides that define it."""

    id: str
    overrides: list[str]
    values: dict[str, str] = field(default_factory=dict)  # the swept keys' values, for tables


@dataclass
class Sweep:
    dir: Path
    name: str
    runs: list[SweepRun]
    command: list[str]
    parallel: int = 1
    devices: list[str] | None = None

    def run_dir(self, run: SweepRun) -> Path:
        return self.dir / run.id

    def save(self) -> None:
        record = {"name": self.name, "command": self.command, "parallel": self.parallel, "devices": self.devices,
                  "runs": [asdict(r) for r in self.runs]}
        (self.dir / SWEEP_FILE).write_text(json.dumps(record, indent=2))

    @classmethod
    def load(cls, folder: Path) -> Sweep:
        record = json.loads((folder / SWEEP_FILE).read_text())
        return cls(dir=folder, name=record["name"], runs=[SweepRun(**r) for r in record["runs"]],
                   command=record["command"], parallel=record.get("parallel", 1), devices=record.get("devices"))


def _options(words: Sequence[str]) -> tuple[dict[str, Any], list[str]]:
    """The ``sweep.*`` options and the remaining words."""
    options: dict[str, Any] = {}
    rest: list[str] = []
    for word in words:
        key, _, raw = word.partition("=")
        if key.startswith("sweep."):
            if key not in SWEEP_OPTIONS:
                raise ConfigError(f"unknown sweep option {key!r}: valid: {', '.join(SWEEP_OPTIONS)}")
            options[key.removeprefix("sweep.")] = yaml.safe_load(raw) if raw.strip() else None
        else:
            rest.append(word)
    parallel = options.get("parallel", 1)
    if not isinstance(parallel, int) or isinstance(parallel, bool) or parallel < 1:
        raise ConfigError(f"sweep.parallel={parallel!r} must be a positive integer (runs at once)")
    devices = options.get("devices")
    if devices is not None:
        if not isinstance(devices, list) or not devices:
            raise ConfigError(f"sweep.devices={devices!r} must be a list of device indices, e.g. [0,1]")
        options["devices"] = [str(d) for d in devices]
    return options, rest


def plan(args: Sequence[str]) -> Sweep:
    """A new sweep from the command line: axes, combinations, folder; every run's config is checked."""
    command = list(args)
    options, words = _options([w for w in args if w not in MULTIRUN_FLAGS])
    base: list[str] = []
    axes: list[tuple[str, list[str]]] = []
    owned: dict[str, str] = {}
    for word in words:
        if "=" not in word:
            raise ConfigError(f"override {word!r} is not of the form key=value")
        key, raw = word.split("=", 1)
        values = split_values(raw)
        if key in SWEEP_OWNED:
            if len(values) > 1:
                raise ConfigError(f"{key} names the whole sweep and cannot take several values ({raw!r})")
            owned[key] = raw
        elif key in [k for k, _ in axes] or (len(values) > 1 and any(w.split("=", 1)[0] == key for w in base)):
            raise ConfigError(f"sweep key {key!r} is given twice")
        elif len(values) > 1:
            axes.append((key, values))
        else:
            base.append(word)
    if owned.get("resume") not in (None, "", "null"):
        raise ConfigError(f"resume={owned['resume']}: no {SWEEP_FILE} there; continue a single run without -m, "
                          "or pass a sweep folder")
    stamp = dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    folder = Path(owned.get("output_dir") or Path("outputs") / "sweeps" / stamp)
    if folder.exists() and any(folder.iterdir()):
        raise ConfigError(f"output_dir={folder} already holds files; continue that sweep with resume={folder} "
                          "or choose another output_dir")
    name = owned.get("name") or folder.name
    runs = []
    combos = list(itertools.product(*[values for _, values in axes]))
    for i, combo in enumerate(combos):
        chosen = {key: value for (key, _), value in zip(axes, combo, strict=True)}
        label = "_".join(f"{k}={v}" for k, v in chosen.items())
        label = re.sub(r"[^A-Za-z0-9._=+-]+", "-", label).strip("-")[:80]
        width = len(str(len(combos) - 1))
        run_id = f"{i:0{width}d}" + (f"_{label}" if label else "")
        overrides = base + [f"{k}={v}" for k, v in chosen.items()]
        try:
            cfg = compose(overrides)
        except ConfigError as err:
            raise ConfigError(f"sweep run {run_id}: {err}") from None
        logger = cfg.get("logger") or {}
        if str(logger.get("class_path", "")).endswith("WandbLogger") and "group" not in (logger.get("init_args") or {}):
            overrides.append(override_word("logger.group", name))
        runs.append(SweepRun(run_id, overrides, chosen))
    return Sweep(dir=folder, name=name, runs=runs, command=command, parallel=options.get("parallel", 1),
                 devices=options.get("devices"))


def reopen(args: Sequence[str]) -> Sweep:
    """The sweep named by ``resume=<sweep folder>``; only ``sweep.*`` options may change."""
    options, words = _options([w for w in args if w not in MULTIRUN_FLAGS])
    folder = Path(str(resume_folder(words)))
    extra = without_resume(words)
    if extra:
        raise ConfigError(f"resume={folder} continues a sweep as it was planned; {extra[0]!r} cannot change it "
                          "(only sweep.parallel and sweep.devices can)")
    sweep = Sweep.load(folder)
    sweep.parallel = options.get("parallel", sweep.parallel)
    sweep.devices = options.get("devices", sweep.devices)
    return sweep


# ---------------------------------------------------------------------------------------- running
def run_command(sweep: Sweep, run: SweepRun) -> list[str]:
    """``python train.py ...`` for a run: its overrides into its folder, or ``resume=`` its folder
    (``run_dir.run_words`` decides)."""
    return [sys.executable, str(TRAIN_PY), *run_words(sweep.run_dir(run).resolve(), run.overrides)]


def _environment(device: str | None) -> dict[str, str]:
    env = child_run_environment(os.environ)
    if device is not None:
        env["CUDA_VISIBLE_DEVICES"] = device
    return env


def execute(sweep: Sweep) -> dict[str, str]:
    """Runs every run that is not finished, ``sweep.parallel`` at a time; returns each run's final state.

    One at a time, a run writes to this terminal; several at once, each writes to ``logs/<run>.log``.
    Interrupted (Ctrl-C, SIGTERM), it stops the runs it started and says how to continue.
    """
    outcome = {r.id: "finished" for r in sweep.runs if run_state(sweep.run_dir(r)) == "finished"}
    todo = [r for r in sweep.runs if r.id not in outcome]
    for run in sweep.runs:
        if run.id in outcome:
            _say(sweep, run, "kept (finished before)")
    logs = sweep.dir / "logs"
    running: dict[str, tuple[subprocess.Popen, float, str | None, Any]] = {}

    def launch(run: SweepRun) -> None:
        busy = [dev for _, _, dev, _ in running.values()]
        device = min(sweep.devices, key=busy.count) if sweep.devices else None
        resumed = run_state(sweep.run_dir(run)) == "interrupted"
        out = None
        if sweep.parallel > 1:
            logs.mkdir(exist_ok=True)
            out = open(logs / f"{run.id}.log", "a")  # noqa: SIM115 (closed when the run ends)
        proc = subprocess.Popen(run_command(sweep, run), env=_environment(device), stdout=out,
                                stderr=subprocess.STDOUT if out else None)
        running[run.id] = (proc, time.monotonic(), device, out)
        where = f" on device {device}" if device is not None else ""
        log = f", log: {logs / (run.id + '.log')}" if out else ""
        _say(sweep, run, f"{'resumed' if resumed else 'started'}{where}{log}")

    def reap(block: bool) -> None:
        for run_id, (proc, began, _, out) in list(running.items()):
            code = proc.wait() if block else proc.poll()
            if code is None:
                continue
            if out:
                out.close()
            del running[run_id]
            run = next(r for r in sweep.runs if r.id == run_id)
            outcome[run_id] = "finished" if code == 0 and run_state(sweep.run_dir(run)) == "finished" else "failed"
            took = f"{time.monotonic() - began:.0f} s"
            if outcome[run_id] == "finished":
                acc = json.loads((sweep.run_dir(run) / "metrics.json").read_text()).get("ACC")
                _say(sweep, run, f"finished in {took}" + (f", ACC {acc:.4f}" if isinstance(acc, float) else ""))
            else:
                _say(sweep, run, f"failed (exit code {code}) after {took}")
            if block:
                return

    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        for run in todo:
            while len(running) >= sweep.parallel:
                reap(block=sweep.parallel == 1)
                if len(running) >= sweep.parallel:
                    time.sleep(0.5)
            launch(run)
        while running:
            reap(block=sweep.parallel == 1)
            if running:
                time.sleep(0.5)
    except KeyboardInterrupt:
        for proc, _, _, _ in running.values():
            if proc.poll() is None:
                proc.terminate()
        for proc, _, _, out in running.values():
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
            if out:
                out.close()
        print(f"[sweep {sweep.name}] interrupted; continue with: python train.py resume={sweep.dir}", flush=True)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    return outcome


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _say(sweep: Sweep, run: SweepRun, what: str) -> None:
    index = sweep.runs.index(run) + 1
    print(f"[sweep {sweep.name}] run {index}/{len(sweep.runs)} {run.id}: {what}", flush=True)


# ---------------------------------------------------------------------------------------- aggregate
def write_runs_table(sweep: Sweep, outcome: dict[str, str]) -> Path:
    """``runs.csv``: one row per run, its swept values, state and summary metrics."""
    keys = list(dict.fromkeys(k for r in sweep.runs for k in r.values))
    path = sweep.dir / "runs.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["run", *keys, "state", *SUMMARY_KEYS, "folder"])
        for run in sweep.runs:
            metrics_file = sweep.run_dir(run) / "metrics.json"
            metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
            writer.writerow([run.id, *[run.values.get(k, "") for k in keys], outcome.get(run.id, run_state(
                sweep.run_dir(run))), *[metrics.get(k, "") for k in SUMMARY_KEYS], run.id])
    return path


def main(args: Sequence[str]) -> int:
    """Plans (or reopens) the sweep, runs what is left, writes the aggregate (runs.csv and the report of the
    finished runs); 1 if a run failed."""
    try:
        resume = is_sweep_folder(resume_folder(args))
        sweep = reopen(args) if resume else plan(args)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    if not resume:
        sweep.dir.mkdir(parents=True, exist_ok=True)
        sweep.save()
    print(f"[sweep {sweep.name}] {len(sweep.runs)} runs in {sweep.dir}, {sweep.parallel} at a time", flush=True)
    try:
        outcome = execute(sweep)
    except KeyboardInterrupt:
        return 130
    table = write_runs_table(sweep, outcome)
    if any(s == "finished" for s in outcome.values()):
        from cl_lightning.report import find_runs, write_report

        report = write_report(sweep.dir, find_runs([sweep.dir]))
        print(report["md"].read_text(), flush=True)
    failed = [run_id for run_id, s in outcome.items() if s != "finished"]
    print(f"[sweep {sweep.name}] {len(sweep.runs) - len(failed)}/{len(sweep.runs)} runs finished; {table}",
          flush=True)
    if failed:
        print(f"[sweep {sweep.name}] failed: {', '.join(failed)}; rerun them with: python train.py "
              f"resume={sweep.dir}", file=sys.stderr)
        return 1
    return 0
