"""HNET's output regularizer: memory and boundary-checkpoint size against the number of tasks (prints).

    python benchmarks/hnet_memory.py [--tasks 40]              # no training: task starts only (fast)
    python benchmarks/hnet_memory.py --tasks 5 --steps 100     # the real run, boundary checkpoints

The model of ``experiment=hnet_permuted_mnist_cl1_small`` (target 784-100-100-10, 89.6k weights; chunked
hypernetwork 100-75-50, chunks of 2000). Per task: the values the regularizer keeps (``stored_numel``, what
its checkpoint state holds) and a checkpoint's size, beside what the earlier version, which stored one
``[N]`` target per past task, kept (``t * N`` values, ``4 t N`` bytes more).

- ``--steps 0`` (default): no data and no training; for each task the regularizer's task start runs on the
  model (its hypernetwork moved randomly in between, as training would) and the model's state dict plus the
  regularizer's state are saved (the part of a boundary checkpoint that depends on the tasks; the real one
  adds Adam's state and the run record).
- ``--steps N``: the run through the runner with N steps per task, keeping every boundary checkpoint, read
  back afterwards (the 2-core development machine evaluates 40 x 40 tasks too slowly for 40 tasks).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import data_dir  # noqa: E402
from cl_lightning.config import compose  # noqa: E402
from cl_lightning.experiment import build  # noqa: E402
from cl_lightning.runner import ContinualRunner  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=40)
    parser.add_argument("--steps", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = compose(["experiment=hnet_permuted_mnist_cl1_small", "logger=none", f"data_dir={data_dir()}",
                   "trainer.enable_progress_bar=false", f"benchmark.num_tasks={args.tasks}",
                   f"trainer.max_steps={args.steps}", "checkpoints.keep=all"])
    model, dm = build(cfg)
    if args.steps == 0:
        simulate(model, dm, args.tasks)
    else:
        run(model, dm, cfg, args)


def _row(t: int, stored: int, size: int, N: int) -> tuple[int, int]:
    old_values = t * N  # the targets of tasks 0..t-1, kept while task t ran and at its boundary
    old_size = size - 4 * stored + 4 * old_values
    print(f"{t + 1:>10} {stored:>14,} {size / 1e6:>8.2f} {old_values:>24,} {old_size / 1e6:>8.2f}")
    return size, old_size


def _header(N: int, H: int, what: str) -> None:
    print(f"target weights N = {N}, hypernetwork weights {H}; {what}")
    print(f"{'task':>10} {'stored values':>14} {'MB':>8} {'targets version: values':>24} {'MB':>8}")


def simulate(model, dm, tasks: int) -> None:
    import io

    model.setup_tasks(dm.info)
    reg = model.plugins[0]
    N, H = model.hypernetwork.num_target_weights, sum(p.numel() for p in model.hypernetwork.parameters())
    _header(N, H, "no training (task starts only); MB = model state dict + regularizer state, torch.save")
    g = torch.Generator().manual_seed(0)
    for t in range(tasks):
        model.current_task = t
        model.setup("fit")
        reg.on_task_start(None, model, t)
        if t:
            reg.penalty(model, None)  # builds what the penalty derives (the algebraic form's reference)
        buffer = io.BytesIO()
        torch.save({"state_dict": model.state_dict(), "callbacks": {reg.state_key: reg.state_dict()}}, buffer)
        if t in (0, 1, 2, 4, 9, 19, 29, 39) or t == tasks - 1:
            _row(t, reg.stored_numel(), len(buffer.getvalue()), N)
        with torch.no_grad():  # training moves the hypernetwork between task starts
            for p in model.hypernetwork.parameters():
                p.add_(1e-3 * torch.randn(p.shape, generator=g))
    ref = reg._reference
    if ref is not None:
        print(f"derived in memory, never checkpointed (the algebraic form's reference at task {tasks}): "
              f"{sum(v.numel() for v in (ref.z0, ref.yt, ref.b0, ref.gram0)):,} values, of which "
              f"{ref.z0.numel():,} grow with the tasks (z0: {ref.z0.shape[1]} chunks x {ref.z0.shape[2]} per "
              f"past task; the targets version derived the same)")


def run(model, dm, cfg, args) -> None:
    with tempfile.TemporaryDirectory() as run_dir:
        runner = ContinualRunner(model, dm, run_dir, trainer_kwargs=cfg["trainer"], seed=cfg["seed"],
                                 method_name=cfg.get("method_name"))
        began = time.perf_counter()
        metrics = runner.run()
        wall = time.perf_counter() - began
        reg = model.plugins[0]
        N, H = model.hypernetwork.num_target_weights, sum(p.numel() for p in model.hypernetwork.parameters())
        _header(N, H, f"{args.steps} steps/task, run {wall:.0f} s, ACC {100 * metrics['ACC']:.2f}; "
                f"MB = boundary checkpoint after the task")
        total = total_old = 0
        for t in range(args.tasks):
            path = runner.boundary_ckpt(t)
            state = torch.load(path, map_location="cpu", weights_only=False)["callbacks"][reg.state_key]
            stored = sum(v.numel() for v in (state.get("snapshot") or {}).values())
            size, old_size = _row(t, stored, path.stat().st_size, N)
            total, total_old = total + size, total_old + old_size
        print(f"all boundary checkpoints: {total / 1e6:.1f} MB (targets version: {total_old / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
