"""``python train.py ...``: from overrides to a finished run folder.

Composes and validates the config (nothing trains before every key is known good), prepares the run
folder (never overwriting a run), builds the benchmark, method and loggers, and hands them to the
runner. Which run folder, resumed or new (and its hand-over to the DDP ranks), is ``run_dir.py``'s decision.
"""

from __future__ import annotations

import copy
import hashlib
import os
import re
import signal
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import Logger, WandbLogger

from cl_lightning.config import ConfigError, compose, instantiate
from cl_lightning.datamodule import ContinualDataModule, DataError
from cl_lightning.methods.base import ContinualModule
from cl_lightning.run_dir import (
    is_rank_child,
    open_run_dir,
    resume_folder,
    resumed_run_config,
    without_resume,
)
from cl_lightning.runner import ContinualRunner

#: Keys a resume may change: where the data lies, how the run is logged and shown, how many devices share
#: the work (a DDP run equals the one-process run) and which checkpoints are kept. Any other key changes what
#: the saved checkpoints mean, so a resume that changes it is refused.
RESUME_MAY_CHANGE = ("data_dir", "benchmark.data_dir", "logger", "name", "checkpoints",
                     "trainer.accelerator", "trainer.devices", "trainer.strategy", "trainer.num_nodes",
                     "trainer.enable_progress_bar", "trainer.enable_model_summary", "trainer.log_every_n_steps")


def resolve_config(overrides: Sequence[str]) -> dict[str, Any]:
    """The composed config; with ``resume=<dir>``, the run's saved config plus the overrides a resume allows."""
    folder = resume_folder(overrides)
    if folder is None:
        return compose(overrides)
    base = resumed_run_config(folder)
    rest = without_resume(overrides)
    given_dir = next((o.split("=", 1)[1] for o in rest if o.split("=", 1)[0].strip() == "output_dir"), None)
    if given_dir not in (None, "", "null") and Path(given_dir).resolve() != Path(folder).resolve():
        raise ConfigError(f"output_dir={given_dir}: a resume continues in its own folder ({folder})")
    cfg = compose([o for o in rest if o.split("=", 1)[0].strip() != "output_dir"], base=copy.deepcopy(base))
    check_resume_changes(base, cfg, folder)
    cfg["resume"] = folder
    cfg["output_dir"] = folder
    return cfg


def config_leaves(tree: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Every leaf of a config as (path, value), in override syntax: ``init_args`` skipped, list entries named
    by class (``method.plugins.EWC.strength``) or by index."""
    if isinstance(tree, dict) and tree:
        items = [(k, v) for k, v in tree.items() if k != "init_args"] + list((tree.get("init_args") or {}).items())
    elif isinstance(tree, list) and tree:
        names = [str(v.get("class_path", "")).rsplit(".", 1)[-1] if isinstance(v, dict) else "" for v in tree]
        items = [(n if n and names.count(n) == 1 else str(i), v) for i, (n, v) in enumerate(zip(names, tree,
                                                                                               strict=True))]
    else:
        return [(prefix, tree)]
    return [leaf for key, value in items for leaf in config_leaves(value, f"{prefix}.{key}" if prefix else str(key))]


def check_resume_changes(saved: dict[str, Any], cfg: dict[str, Any], folder: str) -> None:
    """Refuses a resume whose config differs from the saved one in a key that defines the run."""
    for group in ("method", "benchmark"):
        if saved.get(f"{group}_name") != cfg.get(f"{group}_name"):
            raise ConfigError(f"resume={folder}: {group}={cfg.get(f'{group}_name')} differs from the run's "
                              f"{group}={saved.get(f'{group}_name')}; a resumed run keeps its {group} "
                              "(start a new run for another one)")
    old, new = dict(config_leaves(saved)), dict(config_leaves(cfg))
    for path in sorted(old.keys() | new.keys()):
        if path in ("resume", "output_dir") or any(path == k or path.startswith(k + ".") for k in RESUME_MAY_CHANGE):
            continue
        if old.get(path) != new.get(path):
            raise ConfigError(f"resume={folder}: {path}={new.get(path)!r} differs from the saved "
                              f"{path}={old.get(path)!r}; it would change what the run's checkpoints mean. "
                              "A resume may change only: " + ", ".join(RESUME_MAY_CHANGE))


def make_loggers(node: dict[str, Any] | None, run_dir: Path, name: str | None) -> list[Logger]:
    """The configured logger writing into the run folder; W&B falls back to offline if unreachable."""
    if node is None:
        return []
    node = {"class_path": node["class_path"], "init_args": dict(node.get("init_args") or {})}
    args = node["init_args"]
    args.setdefault("save_dir", str(run_dir))
    run_name = name or run_dir.name
    if node["class_path"].endswith("WandbLogger"):
        args.setdefault("name", run_name)
        # a stable id, so a resumed run continues the same W&B run
        digest = hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:8]
        args.setdefault("id", re.sub(r"[^A-Za-z0-9_-]", "-", run_dir.name)[-40:] + "-" + digest)
        args.setdefault("resume", "allow")
        logger = instantiate(node, "logger")
        return [ensure_wandb_reachable(logger, args)]
    if node["class_path"].endswith("CSVLogger"):
        # one part per start of the run, so a resume never overwrites what was logged before it
        args.setdefault("name", "csv")
        parts = sorted((run_dir / args["name"]).glob("part_*")) if (run_dir / args["name"]).exists() else []
        args.setdefault("version", f"part_{len(parts)}")
    return [instantiate(node, "logger")]


#: Seconds a W&B run waits for its server before the run falls back to offline logging.
WANDB_INIT_TIMEOUT = "15"


def ensure_wandb_reachable(logger: WandbLogger, args: dict[str, Any]) -> WandbLogger:
    """Starts the W&B run now (on rank 0) without ever prompting: with no login, or no server answering
    within ``WANDB_INIT_TIMEOUT`` seconds, the run continues offline, said once."""
    if os.environ.get("LOCAL_RANK", "0") != "0":
        return logger
    import wandb

    if not args.get("offline"):
        os.environ.setdefault("WANDB_INIT_TIMEOUT", WANDB_INIT_TIMEOUT)
        try:
            if not wandb.login(prompt=False):
                raise RuntimeError("no W&B login: run `wandb login` or set WANDB_API_KEY")
            start_wandb(logger)
            return logger
        except Exception as err:  # any failure to reach the server must not stop the run
            wandb.teardown()  # drop a half-started online session before starting an offline one
            warnings.warn(f"W&B could not start online ({' '.join(str(err).split())[:300]}); "
                          f"logging offline to {args['save_dir']}/wandb", stacklevel=2)
            os.environ["WANDB_MODE"] = "offline"
            logger = WandbLogger(**{**args, "offline": True})
    start_wandb(logger)
    return logger


def start_wandb(logger: WandbLogger) -> None:
    """Starts the run and plots every metric against the runner's ``step``, one axis over all tasks and
    across resumes (Lightning's ``trainer/global_step`` restarts with every task's Trainer)."""
    run = logger.experiment
    run.define_metric("step")
    run.define_metric("*", step_metric="step", step_sync=True)


def build(cfg: dict[str, Any]) -> tuple[ContinualModule, ContinualDataModule]:
    """Benchmark and method from the config, bound to each other (so scenario errors come first)."""
    import lightning as L

    L.seed_everything(cfg["seed"], verbose=False)
    datamodule = instantiate(cfg["benchmark"], "benchmark")
    model = instantiate(cfg["method"], "method")
    if not isinstance(datamodule, ContinualDataModule):
        raise ConfigError(f"benchmark.class_path: {type(datamodule).__name__} is not a ContinualDataModule")
    if not isinstance(model, ContinualModule):
        raise ConfigError(f"method.class_path: {type(model).__name__} is not a ContinualModule")
    try:
        model.setup_tasks(datamodule.info)
    except ValueError as err:
        raise ConfigError(f"method {cfg.get('method_name', '')!r} on benchmark "
                          f"{cfg.get('benchmark_name', '')!r}: {err}") from None
    return model, datamodule


def run(overrides: Sequence[str]) -> dict[str, Any]:
    """``train.py`` overrides to a finished run folder."""
    return run_config(resolve_config(overrides))


def run_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """A resolved config (from either front door) to a finished run folder: the one path every run takes, so
    a run started by ``train.py`` or ``cl-lightning`` resumes with either."""
    model, datamodule = build(cfg)
    if not is_rank_child():
        datamodule.prepare_data()  # a missing data set stops the run before its folder is made
    run_dir = open_run_dir(cfg)
    loggers = make_loggers(cfg.get("logger"), run_dir, cfg.get("name"))
    runner = ContinualRunner(model, datamodule, run_dir, trainer_kwargs=cfg.get("trainer"), loggers=loggers,
                             seed=cfg["seed"], method_name=cfg.get("method_name"), config=cfg,
                             keep_checkpoints=(cfg.get("checkpoints") or {}).get("keep", "all"))
    try:
        metrics = runner.run(resume=bool(cfg.get("resume")))
    except RunInterrupted as stop:
        if runner.is_global_zero:
            done = len(runner.record.rows)
            print(f"\n{stop} after {done} of {datamodule.info.num_tasks} tasks; nothing finished is lost. "
                  f"Continue with:\n  python train.py resume={run_dir}\n  (or: cl-lightning --resume {run_dir})",
                  file=sys.stderr)
        raise
    for logger in loggers:
        if isinstance(logger, WandbLogger) and runner.is_global_zero:
            logger.experiment.finish()
    return metrics


class RunInterrupted(BaseException):
    """SIGINT or SIGTERM (a cluster's pre-emption): the run stops where it is, resumable from its checkpoints
    (every checkpoint is written atomically, so any instant is safe)."""


def raise_interrupted(signum: int, frame: Any) -> None:
    raise RunInterrupted(f"Stopped by {signal.Signals(signum).name}")


def guarded(start: Callable[[], Any]) -> int:
    """Runs ``start`` as a command: named errors instead of tracebacks (exit 2), and SIGINT / SIGTERM stop the
    run resumably (exit 130). Used by both front doors."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, raise_interrupted)
    try:
        start()
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    except (FileNotFoundError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except RunInterrupted:
        return 130
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    from cl_lightning import sweep, usage  # --help (usage.py); -m / sweep.* / resume=<sweep folder> (sweep.py)

    if usage.wants_help(args):
        return usage.main(args)
    if sweep.is_sweep(args):
        return sweep.main(args)
    return guarded(lambda: run(args))
