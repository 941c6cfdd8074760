"""Overhead of cl-lightning against a plain PyTorch loop on the same workload (prints, never asserts).

Permuted-MNIST-10, MLP 784-100-100-10, batch 128, Adam 1e-3, one epoch per task, evaluation of all
tasks after each task; fine-tuning and EWC, each run through the task loop (fresh Trainer per task) and
as a hand-written loop over the same in-memory tensors.

Every side runs in its own fresh Python process, so the three figures of issue 19 come from one script run:
training (the optimizer steps, EWC's Fisher pass included), evaluation (the untrained baseline row and one row
of R after every task: 11 rows for 10 tasks) and the process wall (start of the interpreter to its exit: imports,
reading MNIST, training, evaluation, the run folder's files). The bare loop's process imports torch only and
reads the IDX files itself.

The fine-tuning rows end with the fixed cost of a whole run as a user starts one (issue 32): the ``python train.py``
process (``method=finetune``, MLP 100-100, one epoch per task, ``logger=none``, no progress bar) against the bare
loop's process, and the same run again in one process with each phase timed apart (imports, composing the config,
building the benchmark and method, Trainer construction, training, evaluation, boundary checkpoints, the run
folder's files at the end); whatever the phases leave of the process wall is interpreter start-up and exit.

    python benchmarks/speed_permuted_mnist.py [--tasks 10] [--threads 2] [--ewc-strength 1000]
    python benchmarks/speed_permuted_mnist.py --ewc-strength 0 --train-py-only   # the fixed-cost rows alone
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

REPO = Path(__file__).resolve().parents[1]


def read_idx(path: Path) -> torch.Tensor:
    """An MNIST IDX file as a tensor (the bare side reads its data without torchvision)."""
    raw = path.read_bytes()
    dims = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims)]
    return torch.from_numpy(np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape).copy())


def permutations(tasks: int, seed: int = 0) -> list[torch.Tensor]:
    """The benchmark's permutations, computed as ``PermutedMNIST`` does (checked against it in ``ours``)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randperm(784, generator=g) for _ in range(tasks)]


def plain_loop(tasks: int, data_dir: str, ewc_strength: float | None, fisher_samples: int, seed: int) -> dict:
    """The same training written as a bare loop: final average accuracy and the seconds of each part."""
    torch.manual_seed(seed)
    raw = Path(data_dir) / "MNIST" / "raw"
    x_train, y_train = read_idx(raw / "train-images-idx3-ubyte"), read_idx(raw / "train-labels-idx1-ubyte").long()
    x_test, y_test = read_idx(raw / "t10k-images-idx3-ubyte"), read_idx(raw / "t10k-labels-idx1-ubyte").long()
    perms = permutations(tasks)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 100), nn.ReLU(), nn.Linear(100, 100), nn.ReLU(),
                          nn.Linear(100, 10))

    def inputs(x, t):
        return x.flatten(1).float().div(255.0)[:, perms[t]]

    precision: dict[str, torch.Tensor] = {}
    anchor: dict[str, torch.Tensor] = {}
    def evaluate() -> list[float]:
        with torch.no_grad():
            return [float((model(inputs(x_test, j)).argmax(1) == y_test).float().mean()) for j in range(tasks)]

    began = time.perf_counter()
    accs = evaluate()  # the untrained row, as the task loop's FWT baseline
    eval_s, train_s = time.perf_counter() - began, 0.0
    for t in range(tasks):
        began = time.perf_counter()
        opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)  # the kernel our modules pick on CPU too
        order = torch.randperm(len(y_train))
        for idx in order.split(128):
            loss = F.cross_entropy(model(inputs(x_train[idx], t)), y_train[idx])
            if precision:
                loss = loss + 0.5 * ewc_strength * sum(
                    (precision[n] * (p - anchor[n]).pow(2)).sum() for n, p in model.named_parameters())
            opt.zero_grad()
            loss.backward()
            opt.step()
        if ewc_strength is not None:
            params = {n: p.detach() for n, p in model.named_parameters()}

            def nll(p, x, y):
                return F.cross_entropy(functional_call(model, p, (x.unsqueeze(0),)), y.unsqueeze(0))

            sq = {n: torch.zeros_like(p) for n, p in params.items()}
            for idx in torch.arange(fisher_samples).split(256):
                g = vmap(grad(nll), in_dims=(None, 0, 0))(params, inputs(x_train[idx], t), y_train[idx])
                for n in sq:
                    sq[n] += g[n].pow(2).sum(0)
            for n in sq:
                f = sq[n] / fisher_samples
                if n in precision:
                    total = precision[n] + f
                    anchor[n] = (precision[n] * anchor[n] + f * params[n]) / total.clamp_min(1e-30)
                    precision[n] = total
                else:
                    precision[n], anchor[n] = f, params[n].clone()
        train_s += time.perf_counter() - began
        began = time.perf_counter()
        accs = evaluate()
        eval_s += time.perf_counter() - began
    return {"acc": sum(accs) / len(accs), "train": train_s, "eval": eval_s}


def ours(tasks: int, data_dir: str, ewc_strength: float | None, fisher_samples: int, seed: int) -> dict:
    import lightning as L

    from cl_lightning.callbacks import EWC
    from cl_lightning.datamodules import PermutedMNIST
    from cl_lightning.methods import ContinualModule
    from cl_lightning.nets import MLP
    from cl_lightning.runner import ContinualRunner

    L.seed_everything(seed, verbose=False)
    plugins = [EWC(strength=ewc_strength, fisher_samples=fisher_samples)] if ewc_strength is not None else None
    model = ContinualModule(MLP(hidden_sizes=[100, 100]), lr=1e-3, plugins=plugins)
    dm = PermutedMNIST(num_tasks=tasks, data_dir=data_dir, batch_size=128)
    if not all(torch.equal(a, b) for a, b in zip(dm.permutations, permutations(tasks), strict=True)):
        raise SystemExit("the bare loop's permutations differ from PermutedMNIST's: fix permutations()")
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = {"accelerator": "cpu", "devices": 1, "max_epochs": 1, "enable_progress_bar": False}
        metrics = ContinualRunner(model, dm, run_dir, seed=seed, trainer_kwargs=trainer).run()
    return {"acc": metrics["ACC"], "train": metrics["train_seconds"], "eval": metrics["eval_seconds"]}


def train_py_overrides(tasks: int, data_dir: str, seed: int, run_dir: str) -> list[str]:
    """``python train.py`` words for the fixed-cost rows: the same work as the bare fine-tuning loop."""
    return ["method=finetune", "benchmark=permuted_mnist", "method.backbone.init_args.hidden_sizes=[100,100]",
            "trainer.max_epochs=1", "logger=none", "trainer.enable_progress_bar=false",
            f"benchmark.num_tasks={tasks}", f"seed={seed}", f"data_dir={data_dir}", f"output_dir={run_dir}"]


def phases(tasks: int, data_dir: str, seed: int) -> dict:
    """One ``train.py`` run inside this process, as ``train.py`` makes it, with the seconds of each phase (the
    calls of the function that does it, wrapped in a timer)."""
    from cl_lightning import (
        experiment,
        usage,  # noqa: F401  # what train.py imports first (--help)
    )
    # from the parent's launch of this process: interpreter start-up, this script's torch and numpy, then ours
    seconds = {"start-up + imports": time.time() - float(os.environ["SPEED_LAUNCHED_AT"])}

    import lightning as L

    from cl_lightning import runner
    from cl_lightning.datamodules.mnist import PermutedMNIST

    def timed(label: str, fn: Any) -> Any:
        def wrapper(*a: Any, **kw: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                seconds[label] = seconds.get(label, 0.0) + time.perf_counter() - start
        return wrapper

    for label, owner, name in (
            ("config composition", experiment, "resolve_config"),
            ("benchmark + method built", experiment, "build"),
            ("data files checked (prepare_data)", PermutedMNIST, "prepare_data"),
            ("run folder opened", experiment, "open_run_dir"),
            ("Trainer construction", runner.ContinualRunner, "make_trainer"),
            ("training (Trainer.fit)", L.Trainer, "fit"),
            ("evaluation (Trainer.test)", runner.ContinualRunner, "evaluate"),
            ("boundary checkpoints", runner.ContinualRunner, "save_boundary"),
            ("run files (metrics, CSV, heatmap)", runner, "write_run_files")):
        setattr(owner, name, timed(label, getattr(owner, name)))
    with tempfile.TemporaryDirectory() as tmp:
        code = experiment.main(train_py_overrides(tasks, data_dir, seed, str(Path(tmp) / "run")))
    if code:
        raise SystemExit(f"train.py exited with {code}")
    return {"phases": seconds}


def side(args: argparse.Namespace, label: str, strength: float | None) -> dict:
    """Runs one side in a fresh process; its figures plus the process's whole wall time."""
    cmd = [sys.executable, __file__, "--side", label, "--tasks", str(args.tasks), "--threads", str(args.threads),
           "--fisher-samples", str(args.fisher_samples), "--data-dir", args.data_dir, "--seed", str(args.seed)]
    if strength is not None:
        cmd += ["--ewc-strength", str(strength)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "SPEED_LAUNCHED_AT": repr(time.time())}
    began = time.perf_counter()
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    wall = time.perf_counter() - began
    return {**json.loads(out.strip().splitlines()[-1]), "wall": wall}


def train_py(args: argparse.Namespace) -> float:
    """Wall seconds of a whole ``python train.py`` process doing the bare fine-tuning loop's work."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": str(args.threads)}
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, str(REPO / "train.py"),
               *train_py_overrides(args.tasks, args.data_dir, args.seed, str(Path(tmp) / "run"))]
        began = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True, text=True, env=env, cwd=tmp)
        return time.perf_counter() - began


def fixed_cost(args: argparse.Namespace, plain: dict) -> None:
    """The fixed-cost rows: ``python train.py`` against the bare loop's process, then the phases of one run."""
    wall = train_py(args)
    print(f"| finetune | train.py process wall | {wall:.1f} | {plain['wall']:.1f} | {wall / plain['wall']:.2f} | "
          f"{'met' if wall / plain['wall'] <= 1.2 else 'missed'} (1.2x) |", flush=True)
    began = time.perf_counter()
    timing = side(args, "phases", None)
    total = time.perf_counter() - began
    print(f"\nPhases of one train.py run in one process ({total:.1f} s wall):\n")
    print("| phase | seconds |")
    print("|---|---|")
    for label, value in timing["phases"].items():
        print(f"| {label} | {value:.2f} |")
    print(f"| the rest (between phases, exit) | {total - sum(timing['phases'].values()):.2f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ewc-strength", type=float, default=1000.0, help="0: fine-tuning only")
    parser.add_argument("--fisher-samples", type=int, default=2000)
    parser.add_argument("--data-dir", default=os.environ.get("CL_DATA_DIR", str(REPO / "data")))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-py-only", action="store_true",
                        help="only the fixed-cost rows: the bare loop's process, train.py's, and its phases")
    parser.add_argument("--side", choices=["plain", "ours", "phases"], help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.side:  # one side, in its own process: print its figures as the last line
        torch.set_num_threads(args.threads)
        strength = args.ewc_strength if args.ewc_strength else None
        if args.side == "phases":
            print(json.dumps(phases(args.tasks, args.data_dir, args.seed)))
            return
        fn = plain_loop if args.side == "plain" else ours
        print(json.dumps(fn(args.tasks, args.data_dir, strength, args.fisher_samples, args.seed)))
        return
    print(f"Permuted-MNIST-{args.tasks}, MLP 784-100-100-10, batch 128, Adam 1e-3, 1 epoch/task, "
          f"{args.threads} threads, seed {args.seed}; each side in its own process\n")
    print("| method | part | ours (s) | bare loop (s) | ratio | target |")
    print("|---|---|---|---|---|---|")
    targets = {"training": 1.25, "evaluation": 1.5, "process wall": 1.3}
    methods = [("finetune", None)] + ([("ewc", args.ewc_strength)] if args.ewc_strength else [])
    if args.train_py_only:
        methods = methods[:1]
    for name, strength in methods:
        plain = side(args, "plain", strength)
        if name == "finetune" and args.train_py_only:
            fixed_cost(args, plain)
            return
        mine = side(args, "ours", strength)
        for part, key in (("training", "train"), ("evaluation", "eval"), ("process wall", "wall")):
            ratio = mine[key] / plain[key]
            print(f"| {name} | {part} | {mine[key]:.1f} | {plain[key]:.1f} | {ratio:.2f} | "
                  f"{'met' if ratio <= targets[part] else 'missed'} ({targets[part]}x) |", flush=True)
        print(f"| {name} | ACC | {mine['acc']:.3f} | {plain['acc']:.3f} | | |", flush=True)
        if name == "finetune":
            fixed_cost(args, plain)


if __name__ == "__main__":
    main()
