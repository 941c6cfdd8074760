"""Why MARK learns nothing on Permuted-MNIST at the CPU scale of ``mark_reproduce.py``: its knowledge base alone.

    python benchmarks/mark_kb_permuted.py                    # the grid in benchmarks/mark.md
    python benchmarks/mark_kb_permuted.py --samples 5000 --pixels standard --lr 0.01 --kb 32 64 128

Trains what MARK's KB pre-training phase trains on task 0 (the KB and the task's head, no masks, no dropout: SGD
with the config's momentum 0.9 and weight decay 0.01, batch 64) on the first permuted task of
``experiment=mark_permuted_mnist``, and prints the test accuracy (first 2,000 test images) after each epoch. Each
setting builds the model from the same seed, so the grid differs only in the settings it names.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import data_dir  # noqa: E402
from cl_lightning.config import compose  # noqa: E402
from cl_lightning.experiment import build  # noqa: E402

#: (training images, pixels, lr, KB channels) of the grid; the first is mark_reproduce.py's scale.
GRID = [(1000, "unit", 0.1, (16, 32, 32)), (1000, "unit", 0.01, (16, 32, 32)),
        (1000, "standard", 0.1, (16, 32, 32)), (1000, "standard", 0.01, (16, 32, 32)),
        (5000, "standard", 0.1, (16, 32, 32)), (5000, "standard", 0.1, (32, 64, 128)),
        (5000, "standard", 0.01, (32, 64, 128))]


def kb_alone(samples: int, pixels: str, lr: float, kb: tuple[int, ...], epochs: int, batch: int = 64) -> list[float]:
    """Test accuracy after each epoch of the KB and head trained on task 0 as MARK's pre-training phase does."""
    cfg = compose(["experiment=mark_permuted_mnist", "benchmark.num_tasks=1", "logger=none", f"data_dir={data_dir()}",
                   f"benchmark.train_samples_per_task={samples}", f"benchmark.pixels={pixels}",
                   f"benchmark.batch_size={batch}", f"method.kb_channels=[{','.join(map(str, kb))}]",
                   "method.latent_dim=64", "method.feature_channels=[8,8]"])
    model, dm = build(cfg)
    dm.prepare_data()
    dm.setup("fit")
    train, test = dm.split(0, "train"), dm.split(0, "test")
    x, y, _ = train[torch.arange(len(train))]
    xt, yt, _ = test[torch.arange(min(2000, len(test)))]
    params = list(model.kb.parameters()) + list(model.heads[0].parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.SGD(params, lr=lr, momentum=model.momentum, weight_decay=model.weight_decay)
    torch.manual_seed(0)
    accs = []
    for _ in range(epochs):
        order = torch.randperm(len(x))
        for i in range(0, len(x), batch):
            idx = order[i:i + batch]
            loss = F.cross_entropy(model.heads[0](model.kb(x[idx])), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            accs.append(float((model.heads[0](model.kb(xt)).argmax(1) == yt).float().mean()) * 100)
    return accs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=None, help="training images of task 0 (default: the grid)")
    parser.add_argument("--pixels", choices=["unit", "standard"], default="unit")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--kb", type=int, nargs=3, default=[16, 32, 32], help="KB channels")
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(1)
    grid = GRID if args.samples is None else [(args.samples, args.pixels, args.lr, tuple(args.kb))]
    print(f"MARK's KB + head alone on Permuted-MNIST task 0, {args.epochs} epochs, batch 64, SGD momentum 0.9, "
          "weight decay 0.01; test accuracy % (2,000 test images) after each epoch")
    print("| training images | pixels | lr | KB channels | accuracy after epochs 1..N | last |")
    print("|---|---|---|---|---|---|")
    for samples, pixels, lr, kb in grid:
        accs = kb_alone(samples, pixels, lr, kb, args.epochs)
        print(f"| {samples} | {pixels} | {lr} | {'/'.join(map(str, kb))} | {', '.join(f'{a:.1f}' for a in accs)} | "
              f"{accs[-1]:.1f} |", flush=True)


if __name__ == "__main__":
    main()
