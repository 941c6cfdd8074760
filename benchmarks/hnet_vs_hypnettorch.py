"""Speed of our HNET against the authors' library ``hypnettorch`` on the same Split-MNIST CL1 workload.

    pip install hypnettorch            # optional; only this benchmark uses it
    python benchmarks/hnet_vs_hypnettorch.py --steps 2000

Same target (784-400-400 and 2-way task heads), same chunked hypernetwork (hidden 10-10, chunks of 42000,
task and chunk embeddings of 96: 465,192 weights in both), Adam lr 1e-3, batch 128, beta 0.01, the same
batches in the same order. Both are run in the same plain PyTorch loop (no Lightning), so the figures
compare the two implementations, not the trainers. hypnettorch's target packs all five heads (10 outputs)
and its regularizer runs the hypernetwork once per past task; ours generates each task's own 2-way head
and its output regularizer's form is chosen by ``--form``: ``algebraic`` (Gram matrices of the hypernetwork's
last layer, no past task's weights generated; what ``auto``, the default, picks here), ``direct`` (all past
tasks' weights generated in one batched pass and compared with the targets) or ``both``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import data_dir  # noqa: E402
from cl_lightning.callbacks.hnet_regularizer import OutputRegularizer  # noqa: E402
from cl_lightning.datamodules.mnist import SplitMNIST  # noqa: E402
from cl_lightning.methods.hnet import HNET  # noqa: E402
from cl_lightning.nets import MLP  # noqa: E402
from cl_lightning.nets.hypernetwork import ChunkedHyperNetwork  # noqa: E402


def batches(dm: SplitMNIST, task: int, steps: int, batch: int, seed: int):
    data = dm.split(task, "train")
    g = torch.Generator().manual_seed(seed * 100 + task)
    for _ in range(steps):
        idx = torch.randint(0, len(data), (batch,), generator=g)
        x, y, _ = data[idx]
        yield x.flatten(1), y


def evaluate(predict, dm: SplitMNIST, tasks: int) -> list[float]:
    accs = []
    with torch.no_grad():
        for t in range(tasks):
            x, y, _ = dm.split(t, "test")[torch.arange(len(dm.split(t, "test")))]
            accs.append(float((predict(x.flatten(1), t).argmax(1) == y).float().mean()))
    return accs


def run_ours(dm, args) -> tuple[list[float], list[float], float]:
    torch.manual_seed(args.seed)
    reg = OutputRegularizer(beta=args.beta, form=args.form)
    model = HNET(target=MLP(hidden_sizes=(400, 400)),
                 hypernetwork=ChunkedHyperNetwork(hidden_sizes=(10, 10), embedding_dim=96, chunk_size=42000,
                                                  chunk_embedding_dim=96), lr=args.lr, plugins=[reg])
    model.setup_tasks(dm.info)
    ms, began = [], time.perf_counter()
    for t in range(dm.num_tasks):
        model.current_task = t
        model.setup("fit")
        reg.on_task_start(None, model, t)
        opt = model.configure_optimizers()  # the optimizer train.py uses (Adam, fused kernel where torch has one)
        model.train()
        start = time.perf_counter()
        for x, y in batches(dm, t, args.steps, args.batch, args.seed):
            tid = torch.full((len(y),), t)
            loss, _ = model.training_objective((x, y, tid))
            opt.zero_grad()
            loss.backward()
            opt.step()
        ms.append(1000 * (time.perf_counter() - start) / args.steps)
    wall = time.perf_counter() - began
    model.eval()
    return evaluate(lambda x, t: model(x, torch.full((len(x),), t)), dm, dm.num_tasks), ms, wall


def run_hypnettorch(dm, args) -> tuple[list[float], list[float], float]:
    from hypnettorch.hnets import ChunkedHMLP
    from hypnettorch.mnets import MLP as HMLP
    from hypnettorch.utils.hnet_regularizer import calc_fix_target_reg, get_current_targets

    torch.manual_seed(args.seed)
    T, k = dm.num_tasks, dm.info.outputs_per_task
    mnet = HMLP(n_in=784, n_out=T * k, hidden_layers=(400, 400), no_weights=True, verbose=False)
    hnet = ChunkedHMLP(mnet.param_shapes, layers=(10, 10), chunk_size=42000, chunk_emb_size=96, cond_in_size=96,
                       num_cond_embs=T, verbose=False)
    hnet.apply_chunked_hyperfan_init(mnet=mnet)
    ms, began = [], time.perf_counter()
    for t in range(T):
        targets = get_current_targets(t, hnet) if t > 0 else None
        opt = torch.optim.Adam(list(hnet.unconditional_params) + [hnet.conditional_params[t]], lr=args.lr,
                               fused=args.fused_hypnettorch)
        start = time.perf_counter()
        for x, y in batches(dm, t, args.steps, args.batch, args.seed):
            weights = hnet.forward(cond_id=t)
            loss = F.cross_entropy(mnet.forward(x, weights=weights)[:, t * k:(t + 1) * k], y)
            if t > 0:
                loss = loss + args.beta * calc_fix_target_reg(hnet, t, targets=targets, mnet=mnet)
            opt.zero_grad()
            loss.backward()
            opt.step()
        ms.append(1000 * (time.perf_counter() - start) / args.steps)
    wall = time.perf_counter() - began

    def predict(x, t):
        return mnet.forward(x, weights=hnet.forward(cond_id=t))[:, t * k:(t + 1) * k]

    return evaluate(predict, dm, T), ms, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2000, help="steps per task")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--beta", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--form", choices=["auto", "algebraic", "direct", "both"], default="auto",
                        help="our output regularizer's form (both: ours twice, algebraic and direct)")
    parser.add_argument("--no-hypnettorch", action="store_true", help="ours only")
    parser.add_argument("--fused-hypnettorch", action="store_true",
                        help="give hypnettorch torch's fused Adam too (its own scripts use the default Adam)")
    parser.add_argument("--warmup", type=int, default=20,
                        help="untimed steps per task of every implementation first (else the first one pays "
                             "for the process' warm-up)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dm = SplitMNIST(num_tasks=5, scenario="task", data_dir=data_dir())
    for t in range(dm.num_tasks):  # load and split the data before any timing (else the first run pays for it)
        dm.split(t, "train"), dm.split(t, "test")
    print(f"Split-MNIST CL1, {args.steps} steps/task, batch {args.batch}, beta {args.beta}, {args.threads} thread(s)")
    runs = {f"ours-{form}": (run_ours, argparse.Namespace(**{**vars(args), "form": form}))
            for form in (["algebraic", "direct"] if args.form == "both" else [args.form])}
    if not args.no_hypnettorch:
        try:
            import hypnettorch  # noqa: F401
        except ImportError as err:
            print(f"hypnettorch is not importable ({err}); `pip install hypnettorch` to compare. Ours only.")
        else:
            runs["hypnettorch"] = (run_hypnettorch, args)
    if args.warmup:
        for run, run_args in runs.values():
            run(dm, argparse.Namespace(**{**vars(run_args), "steps": args.warmup}))
    rows = {name: run(dm, run_args) for name, (run, run_args) in runs.items()}
    print(f"{'impl':<16} {'wall s':>7} {'ACC':>7}  ms/step per task")
    for name, (accs, ms, wall) in rows.items():
        print(f"{name:<16} {wall:>7.1f} {100 * np.mean(accs):>7.2f}  " + " ".join(f"{m:6.1f}" for m in ms))
    if "hypnettorch" in rows:
        for name in rows:
            if name.startswith("ours"):
                print(f"wall-time ratio {name} / hypnettorch: {rows[name][2] / rows['hypnettorch'][2]:.2f}")


if __name__ == "__main__":
    main()
