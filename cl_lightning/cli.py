"""``cl-lightning`` / ``python -m cl_lightning``: the LightningCLI front door to the same runner.

It reads the same YAML files as ``train.py`` (``--model configs/method/ewc.yaml --data
configs/benchmark/split_mnist.yaml``), generates ``--help`` from the typed signatures of the methods and
benchmarks, and takes ``--config``, ``--print_config``, ``--model.*``, ``--data.*`` and ``--trainer.*``.
The Trainer it parses is used as a template: the runner builds a fresh one per task with those arguments.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from lightning.pytorch.cli import LightningCLI

import callbacks  # noqa: F401  (registers the plugins for --help and class-name lookup)
import cl_lightning.methods  # noqa: F401
import datamodules  # noqa: F401
from cl_lightning.experiment import prepare_run_dir
from cl_lightning.methods.base import ContinualModule
from cl_lightning.runner import RUNNER_OWNED_TRAINER_KEYS, ContinualRunner
from datamodules.base import ContinualDataModule


class ContinualCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--output_dir", type=str | None, default=None,
                            help="Run folder (default outputs/<benchmark>/<method>/<date_time>).")
        parser.add_argument("--resume", type=str | None, default=None,
                            help="A run folder to continue after its last finished task.")


def trainer_kwargs(config: Any) -> dict[str, Any]:
    """The parsed Trainer arguments, less those the runner owns (callbacks, logger, ...)."""
    kwargs = dict(config.trainer) if not hasattr(config.trainer, "as_dict") else config.trainer.as_dict()
    return {k: v for k, v in kwargs.items() if k not in RUNNER_OWNED_TRAINER_KEYS}


def main(args: list[str] | None = None) -> int:
    if (sys.argv[1:] if args is None else args)[:1] == ["report"]:  # cl-lightning report ... (report.py)
        from cl_lightning.report import main as report

        return report((sys.argv[1:] if args is None else args)[1:])
    cli = ContinualCLI(ContinualModule, ContinualDataModule, subclass_mode_model=True, subclass_mode_data=True,
                       run=False, save_config_callback=None, seed_everything_default=0, args=args,
                       trainer_defaults={"logger": False, "max_epochs": 1}, auto_configure_optimizers=False)
    config = cli.config
    model, datamodule = cli.model, cli.datamodule
    resume = config.get("resume")
    run_cfg = {"resume": resume, "output_dir": config.get("output_dir"),
               "benchmark_name": datamodule.info.name, "method_name": type(model).__name__.lower(),
               "cli": cli.parser.dump(config, skip_none=False)}
    run_dir = prepare_run_dir(run_cfg)
    if not resume:
        (Path(run_dir) / "config.yaml").write_text(run_cfg["cli"])
    runner = ContinualRunner(model, datamodule, run_dir, trainer_kwargs=trainer_kwargs(config),
                             loggers=list(cli.trainer.loggers), seed=int(config.seed_everything),
                             method_name=type(model).__name__, config={"cli": run_cfg["cli"]})
    metrics = runner.run(resume=bool(resume))
    if runner.is_global_zero:
        print(f"\nRun folder: {run_dir}\nACC {metrics['ACC']:.4f}  BWT {metrics['BWT']}  FWT {metrics['FWT']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
