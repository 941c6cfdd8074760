"""Runs the MARK authors' ``main.py`` (``JuliousHurtado/meta-training-setup``) on Split-MNIST from their checkout.

Started by ``benchmarks/authors_mark.py`` in a subprocess, with the interpreter meant for the authors' code, so it
imports only the standard library, torch, omegaconf (theirs) and the checkout. Nothing of theirs is copied or
edited; at run time it

- writes a config from their ``configs/config_cifar100.yml`` with only these keys changed: the seed, one run
  (``num_runs``), 5 tasks, 1 channel, the batch size, the latent size, ``lr_task`` / ``lr_meta`` (given or theirs),
  no loader workers, and the folders (``checkpoint``, ``data_dir``, ``experiment_name``);
- gives their ``main.py`` its own flags for the schedule: ``--feats-epochs`` (the epochs of every phase: F, KB
  pre-training, masks, final), ``--meta-epochs`` (outer steps per task), ``--mini-tasks``, ``--inner-loop``,
  ``--use-relu``;
- injects what the final version of their code lacks, a Split-MNIST loader: their ``main.run`` picks its data
  generator by ``args.experiment`` among ``cifar100`` / ``miniimagenet`` / ``imagenet`` only (their MNIST loaders
  were removed in commit 3aa0beb), so the config keeps ``experiment: cifar100`` and the module
  ``dataloaders.cifar100`` is replaced, in ``sys.modules`` only, by :class:`SplitMNISTGen`, a ``DatasetGen`` of the
  shape theirs has (``taskcla``, ``inputsize``, ``get(t)`` giving ``{t: {'train', 'valid', 'test', 'name'}}`` whose
  batches are ``(x, y, x_feats)``). Its tensors come from ``--data``, written by ``authors_mark.py`` from our
  benchmark, so both sides train and test on the same images. ``experiment: cifar100`` also fixes their network:
  KB 64/128/256 channels, F 32/32 channels (their ``Private`` has no MNIST branch; its CIFAR-100 one, flatten 1152,
  is exactly what a 28 x 28 input gives with the kernels ``size // 8``, ``size // 10``);
- runs ``main.py`` as ``__main__`` (``runpy``) in ``--run-dir`` and, from the log their ``utils.print_log_acc_bwt``
  pickles there, prints ``authors-shim result {json}`` (the accuracy matrix, ACC, BWT, wall time).

    python benchmarks/authors_mark_shim.py --checkout /work/ext/mark --data DATA.pt --run-dir OUT --seed 1 \\
        --batch-size 64 --latent-dim 64 --feats-epochs 3 --meta-epochs 5 --mini-tasks 5 --inner-loop 20
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import runpy
import sys
import time
import types
from typing import Any

CONFIG = os.path.join("configs", "config_cifar100.yml")
#: What ``--data`` holds, set before their ``main.run`` builds its data generator.
DATA: dict[str, Any] = {}


class SplitMNISTGen:
    """A data generator in the shape of their ``dataloaders/cifar100.DatasetGen`` over the tasks in :data:`DATA`.

    ``train`` is shuffled (by torch's global generator, which their ``main.run`` seeds); ``valid``, which their code
    only prints accuracies on, is the training split in order (nothing of theirs selects on it), so both sides
    train on the same images; ``test`` is the task's test split. ``x_feats`` (their ResNet input) is ``x``."""

    def __init__(self, args: Any) -> None:
        import torch

        self.batch_size = int(args.batch_size)
        self.tasks = DATA["tasks"]
        if int(args.ntasks) != len(self.tasks):
            raise ValueError(f"ntasks={args.ntasks} but the data has {len(self.tasks)} tasks")
        self.taskcla = [[t, int(DATA["classes_per_task"])] for t in range(len(self.tasks))]
        self.inputsize = [int(s) for s in DATA["input_shape"]]
        self.dataloaders: dict[int, dict[str, Any]] = {}
        self._torch = torch

    def _loader(self, x: Any, y: Any, shuffle: bool) -> Any:
        data = self._torch.utils.data.TensorDataset(x, y, x)
        return self._torch.utils.data.DataLoader(data, batch_size=self.batch_size, shuffle=shuffle, num_workers=0)

    def get(self, task_id: int) -> dict[int, dict[str, Any]]:
        task = self.tasks[task_id]
        self.dataloaders[task_id] = {
            "train": self._loader(task["train_x"], task["train_y"], shuffle=True),
            "valid": self._loader(task["train_x"], task["train_y"], shuffle=False),
            "test": self._loader(task["test_x"], task["test_y"], shuffle=False),
            "name": task["name"],
        }
        print(f"authors-shim task {task_id} {task['name']}: {len(task['train_y'])} training, "
              f"{len(task['test_y'])} test images", flush=True)
        return self.dataloaders


def write_config(checkout: str, run_dir: str, opts: argparse.Namespace) -> str:
    """Their CIFAR-100 config with the keys of the module docstring changed; returns its path."""
    from omegaconf import OmegaConf

    cfg: Any = OmegaConf.load(os.path.join(checkout, CONFIG))
    changes = {"seed": opts.seed, "num_runs": 1, "ntasks": len(DATA["tasks"]), "n_channels": 1,
               "batch_size": opts.batch_size, "latent_dim": opts.latent_dim, "workers": 0,
               "data_dir": run_dir, "checkpoint": run_dir, "experiment_name": "split_mnist"}
    if opts.lr_task is not None:
        changes["lr_task"] = opts.lr_task
    if opts.lr_meta is not None:
        changes["lr_meta"] = opts.lr_meta
    if cfg.experiment != "cifar100":
        raise SystemExit(f"{CONFIG}: experiment={cfg.experiment!r}, expected 'cifar100'")
    for key, value in changes.items():
        cfg[key] = value
    path = os.path.join(run_dir, "config_split_mnist.yml")
    OmegaConf.save(cfg, path)
    return path


def set_kb_channels(conv: Any, channels: list[int]) -> None:
    """Their ``Net`` picks the KB widths by ``args.experiment`` (cifar100: 64/128/256) and hands them to ``Shared``
    (the KB) and ``Private`` (the mask sizes); this passes ``channels`` to both instead. Only the argument changes:
    their F keeps its fixed 32/32 channels."""
    for cls in (conv.Shared, conv.Private):
        init = cls.__init__

        def patched(self: Any, args: Any, hiddens: Any, *rest: Any, _init: Any = init) -> None:
            _init(self, args, [*channels, *list(hiddens)[len(channels):]], *rest)

        cls.__init__ = patched
    print("authors-shim kb_channels", channels, flush=True)


def result_from_log(run_dir: str, wall: float) -> dict[str, Any]:
    """Their pickled log (``utils.print_log_acc_bwt``): accuracy matrix (row = after task, fractions), ACC, BWT."""
    with open(os.path.join(run_dir, "logs_run_id_0.p"), "rb") as f:
        logs = pickle.load(f)
    acc = [[float(v) for v in row] for row in logs["acc"]]
    return {"R": acc, "acc": sum(acc[-1]) / len(acc[-1]), "bwt": float(logs["gem_bwt"]),
            "wall_seconds": round(wall, 1)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkout", required=True, help="the meta-training-setup checkout (main.py, approach.py)")
    parser.add_argument("--data", required=True, help="the Split-MNIST tensors written by authors_mark.py")
    parser.add_argument("--run-dir", required=True, help="their cwd and args.checkpoint (logs, results/)")
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--latent-dim", type=int, required=True)
    parser.add_argument("--feats-epochs", type=int, required=True, help="epochs of each phase (theirs: 50)")
    parser.add_argument("--meta-epochs", type=int, required=True, help="outer steps per task (theirs: 10)")
    parser.add_argument("--mini-tasks", type=int, required=True, help="K (theirs: 10)")
    parser.add_argument("--inner-loop", type=int, required=True, help="S (theirs: 40)")
    parser.add_argument("--use-relu", type=int, choices=(0, 1), default=1, help="0: sigmoid masks")
    parser.add_argument("--lr-task", type=float, help="their lr_task (config: 0.1)")
    parser.add_argument("--lr-meta", type=float, help="their lr_meta: inner lr, outer lr = 0.1 x it (config: 0.01)")
    parser.add_argument("--kb-channels", type=int, nargs=3, help="the KB's widths, passed to their Shared and "
                        "Private (mask sizes) in place of Net's 64/128/256 (not given: theirs)")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    opts = parser.parse_args(argv)

    checkout = os.path.abspath(opts.checkout)
    main_py = os.path.join(checkout, "main.py")
    if not os.path.isfile(main_py) or not os.path.isfile(os.path.join(checkout, "approach.py")):
        raise SystemExit(f"--checkout {checkout}: no main.py / approach.py there (not a meta-training-setup checkout)")
    run_dir = os.path.abspath(opts.run_dir)
    os.makedirs(os.path.join(run_dir, "results"), exist_ok=True)  # their main saves results/<name>.pth in its cwd

    import torch

    torch.set_num_threads(opts.threads)
    DATA.update(torch.load(opts.data))
    config = write_config(checkout, run_dir, opts)

    sys.path.insert(0, checkout)
    os.chdir(run_dir)
    import importlib

    package = importlib.import_module("dataloaders")  # their namespace package; its cifar100 module is not imported
    module = types.ModuleType("dataloaders.cifar100", "Split-MNIST in the slot of their CIFAR-100 loader (shim)")
    module.DatasetGen = SplitMNISTGen  # type: ignore[attr-defined]
    sys.modules["dataloaders.cifar100"] = module
    package.cifar100 = module  # type: ignore[attr-defined]

    if opts.kb_channels:
        set_kb_channels(importlib.import_module("models.conv"), list(opts.kb_channels))
    sys.argv = [main_py, "--config", config, "--feats-epochs", str(opts.feats_epochs),
                "--meta-epochs", str(opts.meta_epochs), "--mini-tasks", str(opts.mini_tasks),
                "--inner-loop", str(opts.inner_loop), "--use-relu", str(opts.use_relu)]
    print("authors-shim argv", json.dumps(sys.argv[1:]), flush=True)
    began = time.perf_counter()
    runpy.run_path(main_py, run_name="__main__")
    print("authors-shim result", json.dumps(result_from_log(run_dir, time.perf_counter() - began)), flush=True)


if __name__ == "__main__":
    main()
