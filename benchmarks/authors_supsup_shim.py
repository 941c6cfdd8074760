"""Runs the SupSup authors' ``experiments/GNu/MNISTRotate/supsup.py`` (``RAIVNLab/supsup``) from their checkout.

Started by ``benchmarks/authors_code.py`` (row ``supsup_gn_rotated``) in a subprocess, with the interpreter meant
for the authors' code (it needs seaborn and tensorboard besides torch/torchvision), so it imports only the
standard library, torch and the checkout. Nothing of theirs is copied or edited; at run time it

- lets their experiment script set its arguments (FC 1024-1024, 200 outputs, RMSprop 1e-4, 1,000 iterations per
  mask, binary entropy search over 128 images, normalised pixels) and then overrides only what is given here: the
  seed, the number of tasks, the angle step, iterations and epochs per mask, when to evaluate, and the folders;
- runs on the CPU (``multigpu = None``, their own CPU branch of ``utils.set_gpu``);
- points their ``datasets.MNIST(<data>/mnist, download=True)`` at an existing torchvision ``MNIST/raw`` folder
  through a symlink, so nothing is downloaded;
- replaces ``RotatingMNIST.update_task`` (``angle = i * (360 // num_tasks)``) only when ``--angle-step`` is given
  (``angle = i * step``, e.g. 18 for our 10 rotations in [0, 180));
- measures what their adaptor computes but does not print: a forward hook on the model sees the one-hot task the
  binary search chose for each test batch, and the test loader is wrapped to see each batch's labels. Their
  ``unshared_labels`` is switched off so that every batch is classified with the mask it inferred (as ours does);
  the accuracy their setting prints (a batch whose task is wrong counts as all wrong) is computed from the same
  records, so one run gives both.

At the end of every evaluation of a task it prints ``authors-shim gn {json}`` and at the end
``authors-shim result {json}``.

    python benchmarks/authors_supsup_shim.py --checkout /work/ext/supsup --data-dir /work/shared/data \\
        --log-dir OUT --seed 0 --num-tasks 10 --angle-step 18 --iter-lim 1000 --epochs 3 --eval-ckpts 10
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from typing import Any

EXPERIMENT = os.path.join("experiments", "GNu", "MNISTRotate", "supsup.py")


class _RecordingLoader:
    """Their test loader, with the labels of every batch it hands out kept (their adaptor reads ``.dataset``)."""

    def __init__(self, loader: Any, targets: list[Any]) -> None:
        self.loader, self.dataset, self.targets = loader, loader.dataset, targets

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Any:
        for data, target in self.loader:
            self.targets.append(target.clone())
            yield data, target


def gn_scores(task: int, targets: list[Any], records: list[tuple[int, Any]], dataset_size: int) -> dict[str, Any]:
    """From the batches' labels and the (inferred task, predictions) of each classified batch, in order: the
    fraction of batches whose task was inferred, the accuracy with the inferred mask, and the accuracy their
    ``unshared_labels`` setting reports (batches with a wrong task count as all wrong)."""
    if len(records) != len(targets):
        raise RuntimeError(f"{len(records)} classified batches for {len(targets)} test batches")
    hits = [inferred == task for inferred, _ in records]
    correct = [int((pred.flatten() == y.flatten()).sum()) for (_, pred), y in zip(records, targets, strict=True)]
    return {"task_inference": sum(hits) / len(targets), "acc": sum(correct) / dataset_size,
            "acc_unshared": sum(c for c, h in zip(correct, hits, strict=True) if h) / dataset_size,
            "inferred": [inferred for inferred, _ in records]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkout", required=True, help="the supsup checkout (holds main.py, args.py, data/)")
    parser.add_argument("--experiment", default=EXPERIMENT, help="their experiment script, relative to --checkout")
    parser.add_argument("--data-dir", required=True, help="folder holding MNIST/raw (torchvision's layout)")
    parser.add_argument("--log-dir", required=True, help="their args.log_dir (checkpoints, csv, tensorboard)")
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--num-tasks", type=int, help="their args.num_tasks (script: 36)")
    parser.add_argument("--angle-step", type=int, help="degrees between tasks (theirs: 360 // num_tasks)")
    parser.add_argument("--iter-lim", type=int, help="iterations per mask (script: 1000)")
    parser.add_argument("--epochs", type=int, help="epochs per mask, cut at --iter-lim (script: 3)")
    parser.add_argument("--eval-ckpts", type=int, nargs="*", help="tasks learned at which GN is tested "
                        "(script: 2 5 10 ... 35; always after the last task)")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    opts = parser.parse_args(argv)

    checkout = os.path.abspath(opts.checkout)
    script = os.path.join(checkout, opts.experiment)
    if not os.path.isfile(os.path.join(checkout, "main.py")) or not os.path.isfile(script):
        raise SystemExit(f"--checkout {checkout}: no main.py or {opts.experiment} there (not a supsup checkout)")
    raw = os.path.join(os.path.abspath(opts.data_dir), "MNIST", "raw")
    if not os.path.isdir(raw):
        raise SystemExit(f"--data-dir {opts.data_dir}: no MNIST/raw folder")
    log_dir = os.path.abspath(opts.log_dir)
    data_root = os.path.join(log_dir, "data")
    os.makedirs(data_root, exist_ok=True)
    link = os.path.join(data_root, "mnist")  # their data_root is <args.data>/mnist, torchvision adds MNIST/raw
    if not os.path.islink(link):
        os.symlink(os.path.abspath(opts.data_dir), link)

    # their args module parses sys.argv at import: give it none of ours
    sys.argv = [script]
    sys.path.insert(0, checkout)
    os.chdir(checkout)
    import torch

    torch.set_num_threads(opts.threads)
    args: Any = importlib.import_module("args").args
    supsup_main: Any = importlib.import_module("main")
    adaptors: Any = importlib.import_module("adaptors")
    utils: Any = importlib.import_module("utils")
    default_trainer: Any = importlib.import_module("trainers.default")
    rotating: Any = importlib.import_module("data.rotatingmnist")

    if opts.angle_step is not None:
        step = opts.angle_step

        def update_task(self: Any, i: int) -> None:
            self.rotater.angle = i * step

        rotating.RotatingMNIST.update_task = update_task

    records: list[tuple[int, Any]] = []
    gg: dict[int, float] = {}
    gn: dict[int, dict[int, dict[str, Any]]] = {}

    def record_choice(module: Any, inputs: Any, output: Any) -> None:
        # the no-grad forward after the search is the one that classifies, with one-hot alphas on the inferred task
        if not torch.is_grad_enabled() and getattr(module, "task", 0) < 0 and module.alphas is not None:
            out = output.unsqueeze(0) if output.dim() == 1 else output
            records.append((int(module.alphas.flatten().argmax()), out.argmax(dim=1).cpu()))

    get_model = utils.get_model

    def get_recorded_model() -> Any:
        model = get_model()
        model.alphas = None
        model.register_forward_hook(record_choice)
        return model

    utils.get_model = get_recorded_model

    test = default_trainer.test

    def recorded_test(model: Any, writer: Any, criterion: Any, test_loader: Any, epoch: int, task_idx: int) -> Any:
        gg[task_idx] = test(model, writer, criterion, test_loader, epoch, task_idx)
        return gg[task_idx]

    default_trainer.test = recorded_test

    def wrap_adaptor(adapt: Any) -> Any:
        def adapted(model: Any, writer: Any, test_loader: Any, num_tasks_learned: int, task: int) -> Any:
            records.clear()
            targets: list[Any] = []
            printed = adapt(model, writer, _RecordingLoader(test_loader, targets), num_tasks_learned, task)
            scores = gn_scores(task, targets, records, len(test_loader.dataset))
            scores.update(learned=num_tasks_learned, task=task, printed=printed, gg=gg.get(task))
            gn.setdefault(num_tasks_learned, {})[task] = scores
            print("authors-shim gn", json.dumps(scores), flush=True)
            return printed
        return adapted

    spec = importlib.util.spec_from_file_location("supsup_experiment", script)
    assert spec is not None and spec.loader is not None
    experiment: Any = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(experiment)

    def run() -> Any:
        # their script has set its arguments; only the budget, the seed, the device and the folders change
        args.seed, args.multigpu = opts.seed, None
        args.data, args.log_dir = data_root, log_dir
        for name in ("num_tasks", "iter_lim", "epochs", "eval_ckpts"):
            if getattr(opts, name) is not None:
                setattr(args, name, getattr(opts, name))
        args.unshared_labels = False  # every batch classified with its inferred mask; acc_unshared is theirs
        setattr(adaptors, args.adaptor, wrap_adaptor(getattr(adaptors, args.adaptor)))
        shown = {k: getattr(args, k) for k in ("set", "num_tasks", "model", "output_size", "optimizer", "lr",
                                                 "iter_lim", "epochs", "batch_size", "test_batch_size",
                                                 "data_to_repeat", "adaptor", "log_base", "eval_ckpts", "seed")}
        print("authors-shim args", json.dumps(shown), "angle_step",
              opts.angle_step if opts.angle_step is not None else 360 // args.num_tasks, flush=True)
        return supsup_main.main()

    experiment.run = run
    began = time.perf_counter()
    experiment.main()
    final = gn.get(args.num_tasks, {})
    result = {"num_tasks": args.num_tasks, "gg": [gg.get(t) for t in range(args.num_tasks)],
              "gn": {str(k): v for k, v in gn.items()},
              "wall_seconds": round(time.perf_counter() - began, 1)}
    if final:
        tasks = sorted(final)
        result.update({key: [final[t][key] for t in tasks] for key in ("acc", "acc_unshared", "task_inference")})
    print("authors-shim result", json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
