"""Training images/s with augmentation on image benchmarks: cl-lightning against a bare PyTorch loop (prints only).

Two workloads, each side in its own fresh process, both sides in one run of this script:

- ``cifar``: Seq-CIFAR-10 (5 class-IL tasks of 2 classes), the full ResNet-18 (11.2M parameters), batch 32,
  SGD lr 0.03, random crop 32 (padding 4) and flip. Ours: ``SeqCIFAR10`` + ``nets.ResNet18`` through the task
  loop, its batch-wise augmentation on the batch's device. Bare: the same tensors, network and optimizer; crop
  and flip written with plain torch indexing.
- ``folder``: ``image_folder`` read from disk (JPEG files decoded in 2 DataLoader workers), resized to 64 px,
  the same ResNet-18, batch 32, random resized crop and flip. Ours: ``ImageFolder`` (decode and resize in the
  workers, crop and flip on the batch). Bare: ``torchvision.datasets.ImageFolder`` with per-sample
  ``transforms`` in 2 workers, the loop a PyTorch user writes by hand.

Each task trains ``--steps`` batches; the figure is training images per second (optimizer steps, data
loading and augmentation; evaluation excluded). The data are generated files in the real formats (CIFAR's
pickled batches, a folder of JPEGs; a few test images per class, so evaluation stays short): the speed does
not depend on what the pixels show. ``--cifar-dir`` points at a real CIFAR-10 folder instead.

    python benchmarks/speed_images.py [--steps 30] [--threads 2] [--workloads cifar folder]
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[1]
BATCH, LR, TASKS, FOLDER_SIZE = 32, 0.03, 5, 64
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


# ------------------------------------------------------------------------------------------ generated data
def cifar_train_per_class(steps: int) -> int:
    """Generated training images per class such that every task holds at least ``steps`` batches (both sides
    then train the same number of images), a multiple of CIFAR's 5 training batches."""
    return 5 * -(-max(500, steps * BATCH // 2 + 1) // 5)


def write_cifar10(root: Path, train_per_class: int, test_per_class: int) -> Path:
    """CIFAR-10's python batches (5 training batches and a test batch) of random images."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    per_batch = train_per_class // 5
    for name, per in [(f"data_batch_{i}", per_batch) for i in range(1, 6)] + [("test_batch", test_per_class)]:
        labels = np.arange(10).repeat(per)
        data = rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8)
        with open(folder / name, "wb") as fh:
            pickle.dump({b"data": data, b"labels": labels.tolist()}, fh)
    return root


def write_image_folder(root: Path, classes: int, per_class: int) -> Path:
    """``root/class_XX/img_Y.jpg``: random JPEGs of 72-96 px sides (resized to 64 when read)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class_{c:02d}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            h, w = rng.integers(72, 97, 2)
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
                root / f"class_{c:02d}" / f"img_{i}.jpg", quality=90)
    return root


# ------------------------------------------------------------------------------------------ the bare loops
def bare_network() -> nn.Module:
    from cl_lightning.nets import ResNet18  # the same network on both sides; only the loop around it differs

    return nn.Sequential(ResNet18(), nn.Linear(512, 10))


def crop_flip(x: torch.Tensor, fill: torch.Tensor, padding: int = 4) -> torch.Tensor:
    """RandomCrop(32, padding) + RandomHorizontalFlip on a batch, with plain torch indexing on the batch's device."""
    n, c, h, w = x.shape
    dev = x.device
    padded = fill.view(1, c, 1, 1).expand(n, c, h + 2 * padding, w + 2 * padding).clone()
    padded[:, :, padding:padding + h, padding:padding + w] = x
    dy, dx = torch.randint(0, 2 * padding + 1, (2, n), device=dev)
    rows = (dy[:, None] + torch.arange(h, device=dev)).view(n, 1, h, 1)
    cols = (dx[:, None] + torch.arange(w, device=dev)).view(n, 1, 1, w)
    out = padded[torch.arange(n, device=dev).view(n, 1, 1, 1), torch.arange(c, device=dev).view(1, c, 1, 1), rows, cols]
    flip = torch.rand(n, device=dev) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


def load_cifar_train(data_root: Path, device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor,
                                                                                     torch.Tensor]:
    """CIFAR-10's training images normalised, their labels and the padding's fill (a black pixel, normalised), read
    from the python batches by hand and put on ``device`` whole (the bare loops' data)."""
    folder = data_root / "cifar-10-batches-py"
    xs, ys = [], []
    for i in range(1, 6):
        with open(folder / f"data_batch_{i}", "rb") as fh:
            d = pickle.load(fh, encoding="bytes")
        xs.append(np.asarray(d[b"data"], np.uint8))
        ys.append(np.asarray(d[b"labels"]))
    mean, std = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1), torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    x = (torch.from_numpy(np.concatenate(xs)).view(-1, 3, 32, 32).float().div(255) - mean) / std
    y = torch.from_numpy(np.concatenate(ys)).long()
    return x.to(device), y.to(device), (-mean / std).view(3).to(device)


def bare_cifar_loop(x: torch.Tensor, y: torch.Tensor, fill: torch.Tensor, steps: int,
                    autocast_dtype: torch.dtype | None = None) -> dict:
    """The bare Seq-CIFAR-10 loop on the device ``x`` lies on (5 class-IL tasks, ``steps`` batches each, crop and
    flip per batch); under ``torch.autocast`` when ``autocast_dtype`` is given. Seconds of training only, CUDA
    synchronized before the clock starts and before it stops."""
    dev = x.device
    model = bare_network().to(dev)
    model.train()
    seen = 0
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    began = time.perf_counter()
    for t in range(TASKS):
        idx_t = torch.nonzero((y == 2 * t) | (y == 2 * t + 1)).squeeze(1)
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        order = idx_t[torch.randperm(len(idx_t), device=dev)]
        for idx in order.split(BATCH)[:steps]:
            with torch.autocast(device_type=dev.type, dtype=autocast_dtype or torch.bfloat16,
                                enabled=autocast_dtype is not None):
                loss = F.cross_entropy(model(crop_flip(x[idx], fill)), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            seen += len(idx)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return {"images": seen, "train": time.perf_counter() - began}


def bare_cifar(data_root: Path, steps: int, seed: int) -> dict:
    torch.manual_seed(seed)
    x, y, fill = load_cifar_train(data_root)
    return bare_cifar_loop(x, y, fill, steps)


def bare_folder(folder: Path, steps: int, seed: int, workers: int) -> dict:
    from torchvision import datasets, transforms

    torch.manual_seed(seed)
    tf = transforms.Compose([transforms.Resize((FOLDER_SIZE, FOLDER_SIZE)), transforms.RandomResizedCrop(FOLDER_SIZE),
                             transforms.RandomHorizontalFlip(), transforms.ToTensor(),
                             transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    data = datasets.ImageFolder(str(folder), transform=tf)
    targets = torch.tensor(data.targets)
    model = bare_network()
    seen = 0
    began = time.perf_counter()
    for t in range(TASKS):
        idx_t = torch.nonzero((targets == 2 * t) | (targets == 2 * t + 1)).squeeze(1).tolist()
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(data, idx_t), batch_size=BATCH, shuffle=True,
                                             num_workers=workers, persistent_workers=False)
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        for step, (x, y) in enumerate(loader):
            if step == steps:
                break
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            seen += len(y)
    return {"images": seen, "train": time.perf_counter() - began}


# ------------------------------------------------------------------------------------------ ours
def ours(workload: str, data_root: Path, steps: int, seed: int, workers: int,
         trainer_kwargs: dict | None = None) -> dict:
    """Our side through the task loop; ``trainer_kwargs`` replace the CPU Trainer's (``accelerator="gpu"``,
    ``precision``). ``train`` is the runner's training seconds (CUDA synchronized)."""
    from cl_lightning.methods import ContinualModule
    from cl_lightning.nets import ResNet18
    from cl_lightning.runner import ContinualRunner

    if workload == "cifar":
        from cl_lightning.datamodules import SeqCIFAR10

        dm = SeqCIFAR10(data_dir=str(data_root), download=False, batch_size=BATCH, scenario="class")
    else:
        from cl_lightning.datamodules import ImageFolder

        dm = ImageFolder(root=str(data_root), num_tasks=TASKS, image_size=FOLDER_SIZE, batch_size=BATCH,
                         scenario="class", num_workers=workers, persistent_workers=False, pin_memory=False)
    model = ContinualModule(ResNet18(), lr=LR, optimizer="sgd")
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = {"accelerator": "cpu", "devices": 1, "max_steps": steps, "enable_progress_bar": False,
                   "limit_val_batches": 0, **(trainer_kwargs or {})}
        metrics = ContinualRunner(model, dm, run_dir, seed=seed, trainer_kwargs=trainer).run()
    return {"images": metrics["optimizer_steps"] * BATCH, "train": metrics["train_seconds"], "acc": metrics["ACC"]}


# ------------------------------------------------------------------------------------------ driver
def side(args: argparse.Namespace, workload: str, label: str, data_root: Path) -> dict:
    cmd = [sys.executable, __file__, "--side", label, "--workloads", workload, "--steps", str(args.steps),
           "--threads", str(args.threads), "--workers", str(args.workers), "--seed", str(args.seed),
           "--data-root", str(data_root)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{label} {workload} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="training batches per task")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of the folder workload")
    parser.add_argument("--workloads", nargs="+", default=["cifar", "folder"], choices=["cifar", "folder"])
    parser.add_argument("--cifar-dir", type=Path, default=None, help="a data root holding real cifar-10-batches-py")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--side", choices=["bare", "ours"], help=argparse.SUPPRESS)  # the child process
    parser.add_argument("--data-root", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        torch.set_num_threads(args.threads)
        workload = args.workloads[0]
        if args.side == "ours":
            out = ours(workload, args.data_root, args.steps, args.seed, args.workers)
        elif workload == "cifar":
            out = bare_cifar(args.data_root, args.steps, args.seed)
        else:
            out = bare_folder(args.data_root, args.steps, args.seed, args.workers)
        print(json.dumps(out))
        return
    print(f"ResNet-18 (11.2M), batch {BATCH}, SGD {LR}, {TASKS} tasks x {args.steps} steps, {args.threads} threads, "
          f"torch {torch.__version__}; each side in its own process\n")
    print("| workload | ours (img/s) | bare loop (img/s) | ours / bare time | target |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for workload in args.workloads:
            if workload == "cifar":
                # every task holds at least --steps batches: both sides train the same number of images
                per_class = cifar_train_per_class(args.steps)
                root = args.cifar_dir or write_cifar10(Path(tmp) / "cifar", per_class, test_per_class=20)
            else:  # 1 in 5 images held out for testing
                root = write_image_folder(Path(tmp) / "folder", classes=10, per_class=args.steps * BATCH * 5 // 8 + 10)
            bare = side(args, workload, "bare", root)
            mine = side(args, workload, "ours", root)
            rate_bare, rate_ours = bare["images"] / bare["train"], mine["images"] / mine["train"]
            ratio = rate_bare / rate_ours
            print(f"| {workload} | {rate_ours:.1f} | {rate_bare:.1f} | {ratio:.2f} | "
                  f"{'met' if ratio <= 1.25 else 'missed'} (1.25x) |", flush=True)


if __name__ == "__main__":
    main()
