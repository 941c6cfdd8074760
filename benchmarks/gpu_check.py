"""GPU check: every method family a few steps on CUDA under bf16 (and compile), then the speed workloads.

Prints its tables under one heading with the GPU's name (prints, never asserts):
1. each method family (its shipped config, Split-MNIST 2 tasks) for ``--steps`` optimizer steps per task under
   ``trainer.precision=bf16-mixed`` (and ``16-mixed`` with ``--fp16``), and with ``method.compile=true`` where
   the method config has a ``compile`` key (skipped, and said so, where it has none);
2. the speed workloads, each through the task loop on the GPU against a bare GPU loop with the data resident on
   the device, in fp32 and bf16-mixed:
   - Permuted-MNIST (``benchmarks/speed_permuted_mnist.py``'s: MLP 784-100-100-10, batch 128, Adam 1e-3, one
     epoch per task, ``--speed-tasks`` tasks): the whole loop's seconds, evaluation of every task included;
   - Seq-CIFAR-10 (``benchmarks/speed_images.py``'s: the full ResNet-18, batch 32, SGD 0.03, 5 class-IL tasks
     of ``--cifar-steps`` steps, random crop (padding 4) and flip on the batch's device): training images per
     second, on generated CIFAR-10 files (``--cifar-dir``: a real ``cifar-10-batches-py`` root instead).
   Clocks start and stop with CUDA synchronized.

Without CUDA it says so and exits 0. ``--cpu-smoke`` runs the same code on CPU for a few steps (every part; the
speed workloads in fp32 for ``--speed-steps`` steps per task, default 1, Seq-CIFAR-10 with 2 test images per
class), so CI keeps the script from rotting; its figures say nothing about a GPU.

    python benchmarks/gpu_check.py [--steps 5] [--fp16] [--speed-tasks 10] [--cifar-steps 30] [--cpu-smoke]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from speed_images import (  # noqa: E402
    bare_cifar_loop,
    bare_network,
    cifar_train_per_class,
    load_cifar_train,
    write_cifar10,
)
from speed_images import ours as ours_images  # noqa: E402
from speed_permuted_mnist import permutations, read_idx  # noqa: E402

#: The precisions of the speed workloads on a GPU. The CPU smoke run takes fp32 only: ResNet-18's bf16 convolutions
#: on a CPU without bf16 instructions took 20x fp32's time per step here (80 s against 4 s, batch 32, 1 thread).
SPEED_PRECISIONS = ("32-true", "bf16-mixed")

#: (family, method config, extra overrides): one config per family of issue 32.
FAMILIES: list[tuple[str, str, list[str]]] = [
    ("EWC", "ewc", []),
    ("SI", "si", []),
    ("HNET", "hnet", []),
    ("HNET+TIR", "hnet_tir", []),
    ("SupSup", "supsup", []),
    ("ImpressLearn", "impresslearn", []),
    ("ARI", "ari", []),
    ("MARK", "mark", []),
    ("ER", "er", []),
    ("DER++", "derpp", []),
    ("GEM", "gem", []),
    ("A-GEM", "agem", []),
    ("iCaRL", "icarl", ["benchmark.scenario=class"]),
    ("LwF", "lwf", []),
    ("gradient sign", "gradsign", []),
    ("DGR", "dgr", []),
    ("HNET+R", "hnet_r", []),
]


def data_dir() -> str:
    for candidate in (os.environ.get("CL_DATA_DIR"), str(REPO.parent / "shared" / "data"), str(REPO / "data")):
        if candidate and (Path(candidate) / "MNIST" / "raw" / "train-images-idx3-ubyte").exists():
            return candidate
    raise SystemExit("gpu_check: MNIST not found; set CL_DATA_DIR to a folder holding MNIST/raw")


def has_compile_key(method: str) -> bool:
    """Whether the method takes ``method.compile`` (every ContinualModule does since the compile option)."""
    from cl_lightning.config import compose, import_class, signature_keys

    node = compose([f"method={method}"])["method"]
    return "compile" in signature_keys(import_class(node["class_path"], "method"))[0]


def family_run(method: str, extra: list[str], accelerator: str, precision: str, steps: int,
               compile_: bool = False) -> tuple[str, float | None, float]:
    """One short run: (status, ACC or None, seconds)."""
    from cl_lightning.config import compose
    from cl_lightning.experiment import build
    from cl_lightning.runner import ContinualRunner

    overrides = [f"method={method}", "benchmark=split_mnist", "benchmark.num_tasks=2",
                 "benchmark.train_samples_per_task=512", "benchmark.batch_size=64", "logger=none",
                 f"data_dir={data_dir()}", *extra]
    if compile_:
        overrides.append("method.compile=true")
    began = time.perf_counter()
    try:
        cfg = compose(overrides)
        try:
            model, dm = build(cfg)
        except Exception:  # a class-IL-only method on the task-IL default
            model, dm = build(compose([*overrides, "benchmark.scenario=class"]))
        kwargs = {"accelerator": accelerator, "devices": 1, "max_epochs": 1, "max_steps": steps,
                  "enable_progress_bar": False, "precision": precision}
        with tempfile.TemporaryDirectory() as run_dir:
            metrics = ContinualRunner(model, dm, run_dir, trainer_kwargs=kwargs, seed=0).run()
        return "ok", float(metrics["ACC"]), time.perf_counter() - began
    except Exception as err:  # the table says what broke; the traceback goes to stderr
        traceback.print_exc(file=sys.stderr)
        return f"FAILED: {type(err).__name__}: {str(err).splitlines()[0][:80] if str(err) else ''}", None, \
            time.perf_counter() - began


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a Lightning precision flag (``None``: full precision, no autocast)."""
    return {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def bare_gpu_loop(tasks: int, root: str, device: str, precision: str, steps: int | None = None) -> dict:
    """The bare loop of speed_permuted_mnist.py (fine-tuning) with the whole data resident on ``device``; ``steps``:
    batches per task (``None``: one epoch)."""
    torch.manual_seed(0)
    raw = Path(root) / "MNIST" / "raw"
    x_train = read_idx(raw / "train-images-idx3-ubyte").to(device).flatten(1).float().div(255.0)
    y_train = read_idx(raw / "train-labels-idx1-ubyte").long().to(device)
    x_test = read_idx(raw / "t10k-images-idx3-ubyte").to(device).flatten(1).float().div(255.0)
    y_test = read_idx(raw / "t10k-labels-idx1-ubyte").long().to(device)
    perms = [p.to(device) for p in permutations(tasks)]
    model = nn.Sequential(nn.Linear(784, 100), nn.ReLU(), nn.Linear(100, 100), nn.ReLU(), nn.Linear(100, 10))
    model = model.to(device)
    dtype = autocast_dtype(precision) or torch.bfloat16
    amp = autocast_dtype(precision) is not None

    def evaluate() -> list[float]:
        with torch.no_grad(), torch.autocast(device_type=device, dtype=dtype, enabled=amp):
            return [float((model(x_test[:, perms[j]]).argmax(1) == y_test).float().mean()) for j in range(tasks)]

    synchronize(device)
    began = time.perf_counter()
    accs = evaluate()
    for t in range(tasks):
        opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
        order = torch.randperm(len(y_train), device=device)
        for idx in order.split(128)[:steps]:
            with torch.autocast(device_type=device, dtype=dtype, enabled=amp):
                loss = F.cross_entropy(model(x_train[idx][:, perms[t]]), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        accs = evaluate()
    synchronize(device)
    return {"acc": sum(accs) / len(accs), "wall": time.perf_counter() - began}


def ours_gpu(tasks: int, root: str, precision: str, accelerator: str = "gpu", steps: int | None = None) -> dict:
    """Permuted-MNIST fine-tuning through the task loop: the wall of ``ContinualRunner.run`` (CUDA synchronized)."""
    import lightning as L

    from cl_lightning.datamodules import PermutedMNIST
    from cl_lightning.methods import ContinualModule
    from cl_lightning.nets import MLP
    from cl_lightning.runner import ContinualRunner

    L.seed_everything(0, verbose=False)
    model = ContinualModule(MLP(hidden_sizes=[100, 100]), lr=1e-3)
    dm = PermutedMNIST(num_tasks=tasks, data_dir=root, batch_size=128)
    device = "cuda" if accelerator == "gpu" else "cpu"
    kwargs = {"accelerator": accelerator, "devices": 1, "max_epochs": 1, "enable_progress_bar": False,
              "precision": precision, **({"max_steps": steps} if steps else {})}
    with tempfile.TemporaryDirectory() as run_dir:
        synchronize(device)
        began = time.perf_counter()
        metrics = ContinualRunner(model, dm, run_dir, seed=0, trainer_kwargs=kwargs).run()
        synchronize(device)
        wall = time.perf_counter() - began
    return {"acc": metrics["ACC"], "wall": wall}


def cifar_speed(accelerator: str, precision: str, steps: int, cifar_dir: Path | None,
                test_per_class: int = 20) -> tuple[dict, dict]:
    """Seq-CIFAR-10 training images/s, ours (``SeqCIFAR10`` + ResNet-18 through the task loop, augmentation on the
    batch's device) and the bare loop of speed_images.py on the same files with the data resident on the device."""
    device = "cuda" if accelerator == "gpu" else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        root = cifar_dir or write_cifar10(Path(tmp) / "cifar", cifar_train_per_class(steps), test_per_class)
        mine = ours_images("cifar", root, steps, seed=0, workers=0,
                           trainer_kwargs={"accelerator": accelerator, "precision": precision})
        torch.manual_seed(0)
        x, y, fill = load_cifar_train(root, device)
        bare = bare_cifar_loop(x, y, fill, steps, autocast_dtype(precision))
    return mine, bare


def warm_up(device: str) -> None:
    """CUDA's context, the cuBLAS and cuDNN handles and the lazily loaded kernels of both networks, in every speed
    precision, before any clock starts: otherwise the side timed first pays them."""
    if device != "cuda":
        return
    mlp = nn.Sequential(nn.Linear(784, 100), nn.ReLU(), nn.Linear(100, 10)).to(device)
    for net, x in ((bare_network().to(device), torch.randn(32, 3, 32, 32, device=device)),
                   (mlp, torch.randn(128, 784, device=device))):
        opt = torch.optim.SGD(net.parameters(), lr=0.0)
        for precision in SPEED_PRECISIONS:
            with torch.autocast(device_type=device, dtype=autocast_dtype(precision) or torch.bfloat16,
                                enabled=autocast_dtype(precision) is not None):
                loss = F.cross_entropy(net(x), torch.zeros(len(x), dtype=torch.long, device=device))
            opt.zero_grad()
            loss.backward()
            opt.step()
    synchronize(device)


def speed_rows(args: argparse.Namespace, accelerator: str) -> list[str]:
    """The speed table's rows: each workload and precision, ours against the bare loop on the same device."""
    smoke = accelerator == "cpu"
    warm_up("cpu" if smoke else "cuda")
    steps = args.speed_steps or (1 if smoke else None)
    precisions = SPEED_PRECISIONS[:1] if smoke else SPEED_PRECISIONS
    rows = []
    if args.speed_tasks > 0:
        root = data_dir()
        for precision in precisions:
            mine = ours_gpu(args.speed_tasks, root, precision, accelerator, steps)
            bare = bare_gpu_loop(args.speed_tasks, root, "cuda" if accelerator == "gpu" else "cpu", precision, steps)
            rows.append(f"| Permuted-MNIST-{args.speed_tasks} fine-tuning | {precision} | s, whole loop | "
                        f"{mine['wall']:.1f} | {bare['wall']:.1f} | {mine['wall'] / bare['wall']:.2f} | "
                        f"{mine['acc']:.3f} | {bare['acc']:.3f} |")
            print(rows[-1], file=sys.stderr, flush=True)
    cifar_steps = steps or args.cifar_steps
    for precision in precisions:
        mine, bare = cifar_speed(accelerator, precision, cifar_steps, args.cifar_dir, 2 if smoke else 20)
        rate_ours, rate_bare = mine["images"] / mine["train"], bare["images"] / bare["train"]
        rows.append(f"| Seq-CIFAR-10 ResNet-18, crop + flip, {cifar_steps} steps/task | {precision} | "
                    f"train img/s | {rate_ours:.1f} | {rate_bare:.1f} | {rate_bare / rate_ours:.2f} | | |")
        print(rows[-1], file=sys.stderr, flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps per task for each family")
    parser.add_argument("--fp16", action="store_true", help="also run every family under 16-mixed")
    parser.add_argument("--speed-tasks", type=int, default=10, help="Permuted-MNIST tasks (0: no Permuted-MNIST)")
    parser.add_argument("--cifar-steps", type=int, default=30, help="Seq-CIFAR-10 training steps per task")
    parser.add_argument("--cifar-dir", type=Path, default=None, help="a data root holding real cifar-10-batches-py")
    parser.add_argument("--speed-steps", type=int, default=None,
                        help="steps per task of both speed workloads (default: Permuted-MNIST one epoch, "
                             "Seq-CIFAR-10 --cifar-steps; --cpu-smoke: 1)")
    parser.add_argument("--no-speed", action="store_true", help="the family loop only")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="everything on CPU for a few steps (bf16), so that the script keeps working")
    parser.add_argument("--only", nargs="*", help="method configs to run (default: every family)")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    if args.cpu_smoke:
        accelerator, device_name = "cpu", "CPU (smoke run, not a GPU result)"
    elif torch.cuda.is_available():
        accelerator, device_name = "gpu", torch.cuda.get_device_name(0)
    else:
        print("gpu_check: no CUDA device here; nothing to check (run with --cpu-smoke for the CPU path)")
        return 0
    families = [f for f in FAMILIES if not args.only or f[1] in args.only]
    precisions = ["bf16-mixed"] + (["16-mixed"] if args.fp16 and accelerator == "gpu" else [])
    rows: list[str] = []
    for family, method, extra in families:
        for precision in precisions:
            status, acc, secs = family_run(method, extra, accelerator, precision, args.steps)
            rows.append(f"| {family} | {precision} | eager | {status} | "
                        f"{'' if acc is None else f'{acc:.3f}'} | {secs:.1f} |")
            print(rows[-1], file=sys.stderr, flush=True)
        if has_compile_key(method):
            status, acc, secs = family_run(method, extra, accelerator, "bf16-mixed", args.steps, compile_=True)
            rows.append(f"| {family} | bf16-mixed | compile | {status} | "
                        f"{'' if acc is None else f'{acc:.3f}'} | {secs:.1f} |")
        else:
            rows.append(f"| {family} | bf16-mixed | compile | skipped: no method.compile key | | |")
    speed = [] if args.no_speed else speed_rows(args, accelerator)
    print(f"\ngpu_check on {device_name} · torch {torch.__version__} · {args.steps} steps per task, "
          "Split-MNIST 2 tasks\n")
    print("| family | precision | mode | status | ACC | s |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))
    if speed:
        where = "bare GPU loop" if accelerator == "gpu" else "bare loop (CPU)"
        print(f"\nSpeed on {device_name}: ours against a {where} with the data resident on the device\n")
        print(f"| workload | precision | measure | ours | {where} | ours / bare time | ACC ours | ACC bare |")
        print("|---|---|---|---|---|---|---|---|")
        print("\n".join(speed))
    failed = sum("FAILED" in r for r in rows)
    print(f"\n{len(rows) - failed} of {len(rows)} family runs ok")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
