"""Runs the HNET authors' ``mnist/train_splitMNIST.py`` (``chrhenning/hypercl``) from their checkout, unmodified.

Started by ``benchmarks/authors_code.py`` in a subprocess, with the interpreter meant for the authors' code, so it
imports only the standard library and the checkout. Nothing of theirs is copied or edited; at run time it

- puts their paper defaults (``_set_default``, which fixes 2000 steps and ``../datasets``) in place as they are and
  then overrides only ``n_iter`` (every part's steps per task) and ``data_dir``, so that a reduced budget is the
  only change;
- skips ``utils.misc.configure_matplotlib_params`` (figure style only; matplotlib 3.3+ refuses its LaTeX preamble
  list);
- gives numpy back the aliases ``np.int`` / ``np.bool`` / ``np.float`` (removed in numpy 1.24; the builtins);
- replaces ``tensorboardX`` (not installed here, and only written to) by a writer that discards everything, and
  their plotting helpers (pure matplotlib, no random numbers drawn) by no-ops, so nothing but drawing is skipped.

    python benchmarks/authors_hypercl_shim.py --checkout /work/ext/hypercl --steps 500 --data-dir DIR \\
        -- --cl_scenario 3 --infer_task_id --random_seed 0 --out_dir OUT
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
import types
from typing import Any


class _NullWriter:
    """Stands in for ``tensorboardX.SummaryWriter``: the authors' scripts only write to it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


def _install_null_tensorboardx() -> None:
    module = types.ModuleType("tensorboardX")
    module.SummaryWriter = _NullWriter  # type: ignore[attr-defined]
    module.__version__ = "0-null"  # type: ignore[attr-defined]
    sys.modules["tensorboardX"] = module


def _no_plot(*args: Any, **kwargs: Any) -> tuple[None, None]:
    return None, None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkout", required=True, help="the hypercl checkout (holds mnist/, utils/, data/)")
    parser.add_argument("--steps", type=int, required=True, help="n_iter: steps per task for every part")
    parser.add_argument("--data-dir", required=True, help="folder holding MNIST/*-ubyte.gz (their reader's layout)")
    parser.add_argument("rest", nargs=argparse.REMAINDER, help="-- then train_splitMNIST.py's own arguments")
    args = parser.parse_args(argv)
    rest = args.rest[1:] if args.rest[:1] == ["--"] else args.rest

    checkout = os.path.abspath(args.checkout)
    if not os.path.isfile(os.path.join(checkout, "mnist", "train_splitMNIST.py")):
        raise SystemExit(f"--checkout {checkout}: no mnist/train_splitMNIST.py there (not a hypercl checkout)")
    # their script begins with `import __init__` (mnist/__init__.py); both folders go on the path as when it is
    # started from mnist/ with '..' added
    sys.path[:0] = [os.path.join(checkout, "mnist"), checkout]
    _install_null_tensorboardx()
    import numpy as np

    # numpy 1.24 removed the aliases their data handlers use (np.int, np.bool); they meant the builtins
    for alias, builtin in (("int", int), ("bool", bool), ("float", float)):
        if alias not in np.__dict__:
            setattr(np, alias, builtin)

    # their modules, importable only after the path is set
    misc: Any = importlib.import_module("utils.misc")
    # the LaTeX preamble list it sets is refused by matplotlib >= 3.3 (a str is required); style only
    misc.configure_matplotlib_params = lambda *args, **kwargs: None
    plotting = importlib.import_module("mnist.plotting")
    train_replay = importlib.import_module("mnist.replay.train_replay")
    train_split: Any = importlib.import_module("mnist.train_splitMNIST")

    for module in (plotting, train_replay, train_split):
        for name in ("_plotImages", "_viz_init", "_viz_training"):
            if hasattr(module, name):
                setattr(module, name, _no_plot)

    paper_defaults = train_split._set_default

    def set_default(config: Any) -> Any:
        config = paper_defaults(config)
        config.n_iter = args.steps
        config.data_dir = os.path.abspath(args.data_dir)
        return config

    train_split._set_default = set_default
    sys.argv = [os.path.join(checkout, "mnist", "train_splitMNIST.py"), *rest]
    print("authors-shim argv:", " ".join(sys.argv[1:]), "| n_iter", args.steps, flush=True)
    began = time.perf_counter()
    train_split.run(mode="split")
    print(f"authors-shim wall_seconds {time.perf_counter() - began:.1f}", flush=True)


if __name__ == "__main__":
    main()
