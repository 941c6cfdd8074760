"""``cl-lightning`` / ``python -m cl_lightning``: the LightningCLI front door to the same runs as ``train.py``.

It reads the same YAML files (``--model configs/method/ewc.yaml --data configs/benchmark/split_mnist.yaml``),
generates ``--help`` from the typed signatures of the methods and benchmarks, and takes ``--config``,
``--print_config``, ``--model.*``, ``--data.*`` and ``--trainer.*``. What it parses becomes a ``train.py``
config (``method``, ``benchmark``, ``trainer``, ``logger``, ``seed``) and runs through the same
``experiment.run_config``: one run folder layout, one saved config, one resume for both doors.
``cl-lightning --resume DIR [--trainer.devices 2 ...]`` continues a run started by either.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml
from lightning.pytorch.cli import LightningCLI

import cl_lightning.callbacks
import cl_lightning.datamodules
import cl_lightning.methods
from cl_lightning.config import RUNNER_OWNED_TRAINER_KEYS, ConfigError, available, load_group_file, validate
from cl_lightning.datamodule import ContinualDataModule
from cl_lightning.experiment import guarded, resolve_config, run_config
from cl_lightning.methods.base import ContinualModule


def import_every_module(package: ModuleType) -> None:
    """Imports every module in ``package``'s folder: LightningCLI finds subclasses (``--model.plugins+=MyPlugin``,
    ``--model.help MyMethod``) among imported classes, so a file dropped there needs no import added anywhere."""
    for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        importlib.import_module(info.name)


for _package in (cl_lightning.callbacks, cl_lightning.datamodules, cl_lightning.methods):
    import_every_module(_package)


class ContinualCLI(LightningCLI):
    """Parses only: the objects are built by the shared run path from the parsed config."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--output_dir", type=str | None, default=None,
                            help="Run folder (default outputs/<benchmark>/<method>/<date_time>).")
        parser.add_argument("--logger", type=str, default="wandb",
                            help=f"Logger config under configs/logger/: {', '.join(available('logger'))}.")
        parser.add_argument("--checkpoints.keep", type=str, default="all",
                            help="Task-boundary checkpoints to keep: all, or the last (what a resume needs).")

    def instantiate_classes(self) -> None:
        """Nothing is built here (see the module docstring)."""


def trainer_arguments(parsed: dict[str, Any] | None) -> dict[str, Any]:
    """The Trainer arguments the user set (those that differ from Lightning's defaults), less the runner's."""
    import lightning as L

    defaults = {n: p.default for n, p in inspect.signature(L.Trainer.__init__).parameters.items()}
    return {k: v for k, v in (parsed or {}).items()
            if k not in RUNNER_OWNED_TRAINER_KEYS and k in defaults and v != defaults[k]}


def group_name(args: list[str], flag: str, node: dict[str, Any]) -> str:
    """The config file's name when ``--model``/``--data`` named one (``ewc``), else the class name."""
    for i, word in enumerate(args):
        value = word.split("=", 1)[1] if word.startswith(f"{flag}=") else (
            args[i + 1] if word == flag and i + 1 < len(args) else None)
        if value and value.endswith((".yaml", ".yml")):
            return Path(value).stem
    return str(node.get("class_path", "")).rsplit(".", 1)[-1].lower()


def to_run_config(parsed: dict[str, Any], args: list[str]) -> dict[str, Any]:
    """The parsed LightningCLI config as the config ``train.py`` would have composed."""
    method, benchmark = parsed["model"], parsed["data"]
    logger = parsed.get("logger") or "none"
    if logger not in (*available("logger"), "none"):
        raise ConfigError(f"--logger {logger}: one of {', '.join(available('logger'))}, none")
    cfg = {"benchmark": benchmark, "method": method, "trainer": trainer_arguments(parsed.get("trainer")),
           "logger": None if logger == "none" else load_group_file("logger", logger),
           "experiment": None, "seed": int(parsed.get("seed_everything") or 0),
           "data_dir": (benchmark.get("init_args") or {}).get("data_dir"), "output_dir": parsed.get("output_dir"),
           "resume": None, "name": None, "checkpoints": {"keep": (parsed.get("checkpoints") or {}).get("keep", "all")},
           "benchmark_name": group_name(args, "--data", benchmark), "method_name": group_name(args, "--model", method)}
    validate(cfg)
    return cfg


def resume_overrides(args: list[str]) -> list[str]:
    """``--resume DIR --trainer.devices 2`` as ``train.py`` overrides (``--model.x`` is ``method.x``,
    ``--data.x`` is ``benchmark.x``), so a resume is checked and run exactly as ``train.py`` does it."""
    rename = {"model": "method", "data": "benchmark"}
    out, i = [], 0
    while i < len(args):
        word = args[i]
        if not word.startswith("--"):
            raise ConfigError(f"unexpected argument {word!r}")
        key, value = word[2:], None
        if "=" in word:
            key, value = word[2:].split("=", 1)
        if value is None:
            if i + 1 >= len(args):
                raise ConfigError(f"{word} needs a value")
            value, i = args[i + 1], i + 1
        head, _, rest = key.partition(".")
        out.append(f"{rename.get(head, head)}{'.' + rest if rest else ''}={value}")
        i += 1
    return out


def main(args: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if args is None else args)
    if args[:1] == ["report"]:  # cl-lightning report ... (report.py)
        from cl_lightning.report import main as report

        return report(args[1:])
    if any(a == "--resume" or a.startswith("--resume=") for a in args):
        return guarded(lambda: run_config(resolve_config(resume_overrides(args))))

    def start() -> None:
        cli = ContinualCLI(ContinualModule, ContinualDataModule, subclass_mode_model=True, subclass_mode_data=True,
                           run=False, save_config_callback=None, seed_everything_default=0, args=args,
                           trainer_defaults={"logger": False, "max_epochs": 1}, auto_configure_optimizers=False)
        parsed = yaml.safe_load(cli.parser.dump(cli.config, skip_none=False))
        run_config(to_run_config(parsed, args))

    return guarded(start)


if __name__ == "__main__":
    sys.exit(main())
