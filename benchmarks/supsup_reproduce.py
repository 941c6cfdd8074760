"""SupSup / ImpressLearn reproduction, scaled down for a small CPU.

For Permuted-MNIST and Rotated-MNIST with a masked LeNet-300-100 (density 0.5, signed-constant backbone):

1. SupSup: one mask per task for tasks 0..B (B = largest basis size); GG accuracy (task id given) of every
   task, and GN task-inference accuracy (one-shot and binary search) over test batches of all B+1 tasks.
2. ImpressLearn on the held-out tasks B..B+K-1 (``--new-tasks K``): new-task accuracy (mean over them) of a
   learned alpha [|M| x 3] against the basis size |M| for three bases: heterogeneous (the SupSup masks of
   tasks 0..|M|-1), homogeneous (|M| masks trained at once on task 0, different seeds) and random (uniform
   random masks at the density). Also a single "incorrect" mask (task 0's) on task B.
3. The storage table (bytes per mask as bitmap / index list, alpha bytes, amortised compression).

Training uses the project's modules (SupSup's masks and inference, the masked nets' batched
``forward``/``forward_each``) driven by a plain loop, so one basis serves every |M| of the sweep.

    python benchmarks/supsup_reproduce.py   # defaults: --samples 12000 --epochs 3 --alpha-epochs 6
    #                                         --sizes 1 2 4 8 16 32 --random-extra 64 --new-tasks 3
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cl_lightning.datamodules.mnist import PermutedMNIST, RotatedMNIST  # noqa: E402
from cl_lightning.methods.impresslearn import ImpressLearn  # noqa: E402
from cl_lightning.methods.supsup import SupSup  # noqa: E402
from cl_lightning.nets.masked import MaskedLeNet300100  # noqa: E402


def task_tensors(dm, t: int, n_test: int) -> tuple[torch.Tensor, ...]:
    tr, te = dm.split(t, "train"), dm.split(t, "test")
    return tr.transform(tr.x).flatten(1), tr.y, te.transform(te.x[:n_test]).flatten(1), te.y[:n_test]


def fit(params, loss_fn, x, y, epochs: int, lr: float, batch: int, seed: int) -> None:
    opt = torch.optim.Adam(params, lr=lr)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=g).split(batch):
            opt.zero_grad()
            loss_fn(x[idx], y[idx]).backward()
            opt.step()


@torch.no_grad()
def accuracy(forward, x, y) -> float:
    return (forward(x).argmax(1) == y).float().mean().item()


def set_trainable(net, slots) -> None:
    for layer in net.masked_layers:
        for s, p in enumerate(layer.scores):
            p.requires_grad_(s in slots)


def learn_alpha(net, slots, data, args, seed) -> float:
    """New-task accuracy of alpha [|M| x layers] over the frozen masks ``slots`` (init 1/|M|)."""
    set_trainable(net, ())
    x, y, xt, yt = data
    alpha = torch.nn.Parameter(torch.full((len(slots), net.num_layers), 1.0 / len(slots)))
    fit([alpha], lambda a, b: F.cross_entropy(net(a, slots, alpha), b), x, y, args.alpha_epochs, args.alpha_lr,
        args.batch, seed)
    return accuracy(lambda a: net(a, slots, alpha.detach()), xt, yt)


def mean_alpha_accuracy(net, slots, tasks, args, seed) -> float:
    """``learn_alpha`` on each held-out task, averaged."""
    return sum(learn_alpha(net, slots, data, args, seed + 1000 * k) for k, data in enumerate(tasks)) / len(tasks)


def homogeneous_basis(size: int, data, args) -> MaskedLeNet300100:
    """``size`` masks trained at once on task 0 (one batched forward); mask m sees its own random half of
    every batch (the same scheme as ImpressLearn.homogeneous_loss)."""
    net = MaskedLeNet300100(score_seed=1)
    net.set_io(784, 10, size)
    set_trainable(net, range(size))
    x, y = data[0], data[1]
    step = [0]

    def loss(a, b):
        g = torch.Generator().manual_seed(step[0] * 65_537 + 17)
        step[0] += 1
        idx = torch.rand(size, len(b), generator=g).argsort(1)[:, : max(1, len(b) // 2)]
        out = net.forward_each(a[idx], list(range(size)))
        return size * F.cross_entropy(out.flatten(0, 1), b[idx].flatten())

    fit([p for p in net.parameters() if p.requires_grad], loss, x, y, args.epochs, args.lr, args.batch, 0)
    return net


def run_benchmark(name: str, dm, args) -> dict:
    B = max(args.sizes)
    began = time.perf_counter()
    dm.setup()
    data = [task_tensors(dm, t, args.test) for t in range(B + args.new_tasks)]
    # ---------------------------------------------------------------- SupSup on tasks 0..B
    sup = SupSup(backbone=MaskedLeNet300100(), task_inference="oneshot")
    sup.setup_tasks(dm.info)
    net = sup.backbone
    gg = []
    for t in range(B + 1):
        sup.prepare_task(t)
        x, y, xt, yt = data[t]
        fit([p for p in net.parameters() if p.requires_grad], lambda a, b, t=t: F.cross_entropy(net(a, [t]), b),
            x, y, args.epochs, args.lr, args.batch, t)
        gg.append(accuracy(lambda a, t=t: net(a, [t]), xt, yt))
    set_trainable(net, ())
    sup.current_task = B
    gn = {}
    with torch.inference_mode():
        for mode in ("oneshot", "binary"):
            hits = total = 0
            for t in range(B + 1):
                for xb in data[t][2].split(args.gn_batch):
                    hits += int(sup.infer_task(xb, mode) == t)
                    total += 1
            gn[mode] = hits / total
    new = data[B:]
    wrong = accuracy(lambda a: net(a, [0]), new[0][2], new[0][3])
    t_supsup = time.perf_counter() - began
    # ---------------------------------------------------------------- ImpressLearn sweep on the new tasks
    curves: dict[str, dict[int, float]] = {"heterogeneous": {}, "homogeneous": {}, "random": {}}
    for m in args.sizes:
        curves["heterogeneous"][m] = mean_alpha_accuracy(net, list(range(m)), new, args, seed=100 + m)
    homo = homogeneous_basis(B, data[0], args)
    for m in args.sizes:
        curves["homogeneous"][m] = mean_alpha_accuracy(homo, list(range(m)), new, args, seed=200 + m)
    rand_sizes = sorted({*args.sizes, *args.random_extra})
    rnd = MaskedLeNet300100(score_seed=2)
    rnd.set_io(784, 10, max(rand_sizes))
    for m in rand_sizes:
        curves["random"][m] = mean_alpha_accuracy(rnd, list(range(m)), new, args, seed=300 + m)
    il = ImpressLearn(basis_kind="heterogeneous", basis_size=B)
    il.setup_tasks(dm.info)
    return {"name": name, "gg": gg, "gn": gn, "wrong": wrong, "curves": curves, "supsup_table": sup.storage_table(),
            "il_table": il.storage_table(), "seconds": time.perf_counter() - began, "supsup_seconds": t_supsup}


def report(res: dict, args) -> None:
    B = max(args.sizes)
    print(f"\n## {res['name']}  ({res['seconds']:.0f} s)")
    print(f"SupSup GG accuracy, tasks 0..{B}: " + ", ".join(f"{a:.3f}" for a in res["gg"])
          + f"  (mean {sum(res['gg']) / len(res['gg']):.3f})")
    print(f"SupSup GN task inference over {B + 1} tasks, batches of {args.gn_batch}: "
          f"one-shot {res['gn']['oneshot']:.3f}, binary search {res['gn']['binary']:.3f}")
    print(f"incorrect single mask (task 0's) on the new task {B}: {res['wrong']:.3f}")
    sizes = sorted({m for c in res["curves"].values() for m in c})
    print("\n| basis kind | " + " | ".join(f"|M|={m}" for m in sizes) + " |")
    print("|---|" + "---|" * len(sizes))
    for kind, curve in res["curves"].items():
        print(f"| {kind} | " + " | ".join(f"{curve[m]:.3f}" if m in curve else "" for m in sizes) + " |")
    print(f"| SupSup GG (own mask) | {res['gg'][-1]:.3f} |" + " |" * (len(sizes) - 1))
    print("\n" + res["supsup_table"] + "\n" + res["il_table"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default=os.environ.get("CL_DATA_DIR", "./data"))
    p.add_argument("--benchmarks", nargs="+", default=["permuted", "rotated"])
    p.add_argument("--samples", type=int, default=12000, help="training samples per task")
    p.add_argument("--test", type=int, default=2000, help="test samples per task")
    p.add_argument("--epochs", type=int, default=3, help="epochs per mask")
    p.add_argument("--alpha-epochs", type=int, default=6)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--alpha-lr", type=float, default=0.05)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--gn-batch", type=int, default=128)
    p.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    p.add_argument("--random-extra", type=int, nargs="*", default=[64])
    p.add_argument("--new-tasks", type=int, default=3, help="held-out tasks the alpha curves are averaged over")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    B = max(args.sizes)
    print(f"config: {vars(args)}")
    for bench in args.benchmarks:
        cls = {"permuted": PermutedMNIST, "rotated": RotatedMNIST}[bench]
        dm = cls(num_tasks=B + args.new_tasks, data_dir=args.data_dir, train_samples_per_task=args.samples)
        report(run_benchmark(f"{cls.__name__} ({B + args.new_tasks} tasks)", dm, args), args)


if __name__ == "__main__":
    main()
