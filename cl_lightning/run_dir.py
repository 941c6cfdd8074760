"""Which run folder a command works in, resumed or new: the one owner of that decision.

``train.py`` and ``cl-lightning`` (through ``experiment.run_config``) and the sweep (for each of its runs) ask
here. ``resume=<folder>`` is read from the command line only by :func:`resume_folder`; a folder holding
``sweep.json`` is a sweep (:func:`is_sweep_folder`), one holding ``config.yaml`` a run (:func:`run_state`).
Under ``strategy=ddp`` Lightning re-executes the script on every rank: the parent hands its run folder to those
children through the ``CL_LIGHTNING_RUN_DIR`` environment variable (:func:`open_run_dir` sets and reads it), and
a sweep starts its runs without it (:func:`child_run_environment`), as each is a run of its own.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from cl_lightning.config import ConfigError, override_word

RUN_DIR_ENV = "CL_LIGHTNING_RUN_DIR"
#: Set by wandb in a process that started a W&B run: its children would share that process's wandb-core
#: service, and one run's fallback or teardown could then stall another's (wandb's own agent drops it too).
WANDB_SERVICE_ENV = "WANDB_SERVICE"
#: What a sweep folder holds (the plan and its runs).
SWEEP_FILE = "sweep.json"


def _key(word: str) -> str:
    return word.split("=", 1)[0].strip().lstrip("+")


def resume_folder(words: Sequence[str]) -> str | None:
    """The folder the last ``resume=`` of ``words`` names (``""`` when empty), or ``None`` for no resume (absent or
    ``resume=null``)."""
    given = [w.split("=", 1)[1].strip() for w in words if "=" in w and _key(w) == "resume"]
    if not given or given[-1] == "null":
        return None
    return given[-1]


def without_resume(words: Sequence[str]) -> list[str]:
    """``words`` without their ``resume=`` overrides."""
    return [w for w in words if not ("=" in w and _key(w) == "resume")]


def is_sweep_folder(folder: str | Path | None) -> bool:
    """Whether ``folder`` holds a sweep (its ``sweep.json``)."""
    return bool(folder) and (Path(str(folder)) / SWEEP_FILE).is_file()


def resumed_run_config(folder: str) -> dict[str, Any]:
    """The saved config of the run in ``folder``, which a resume continues; a named error when there is none."""
    if not folder:
        raise ConfigError("resume= needs the folder of the run to continue (resume=outputs/<benchmark>/<method>/...)")
    saved = Path(folder) / "config.yaml"
    if not saved.is_file():
        raise ConfigError(f"resume={folder}: this folder holds no run (no config.yaml); "
                          "pass the folder of a run started by train.py or cl-lightning")
    loaded: dict[str, Any] = yaml.safe_load(saved.read_text())
    return loaded


def run_state(run_dir: Path) -> str:
    """``finished`` (metrics.json), ``interrupted`` (started: config.yaml) or ``pending``."""
    if (run_dir / "metrics.json").is_file():
        return "finished"
    if (run_dir / "config.yaml").is_file():
        return "interrupted"
    return "pending"


def run_words(run_dir: Path, overrides: Sequence[str]) -> list[str]:
    """The ``train.py`` words that run ``overrides`` in ``run_dir``: ``resume=`` the folder once the run has
    started there, else the overrides with ``output_dir=`` the folder."""
    if run_state(run_dir) == "interrupted":
        return [f"resume={run_dir}"]
    return [*overrides, override_word("output_dir", str(run_dir))]


def open_run_dir(cfg: Mapping[str, Any]) -> Path:
    """The run folder of a resolved config: the parent's under DDP (``CL_LIGHTNING_RUN_DIR``), the resumed one
    (``cfg["resume"]``), else a new one (``output_dir``, by default ``outputs/<benchmark>/<method>/<time>``),
    made and given the config; refuses a new run in a folder that holds files. Hands the folder to the ranks
    Lightning starts."""
    inherited = os.environ.get(RUN_DIR_ENV)
    if inherited:
        return Path(inherited)
    if cfg.get("resume"):
        run_dir = Path(cfg["resume"])
    else:
        stamp = dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
        run_dir = Path(cfg.get("output_dir") or Path("outputs") / cfg["benchmark_name"] / cfg["method_name"] / stamp)
        if run_dir.exists() and not run_dir.is_dir():
            raise ConfigError(f"output_dir={run_dir} is a file, not a folder")
        if run_dir.exists() and any(run_dir.iterdir()):
            raise ConfigError(f"output_dir={run_dir} already holds files; continue that run with "
                              f"resume={run_dir} or choose another output_dir")
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(dict(cfg), sort_keys=False))
    os.environ[RUN_DIR_ENV] = str(run_dir.resolve())
    return run_dir


def is_rank_child() -> bool:
    """Whether this process was started for a run whose folder another process opened (a DDP rank)."""
    return RUN_DIR_ENV in os.environ


def child_run_environment(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` for a process that is a run of its own (a sweep's run): its own run folder, its own W&B service."""
    return {k: v for k, v in env.items() if k not in (RUN_DIR_ENV, WANDB_SERVICE_ENV)}
