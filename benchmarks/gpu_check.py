"""GPU check: every method family a few steps on CUDA under bf16 (and compile), then Permuted-MNIST speed.

Prints one table headed with the GPU's name (prints, never asserts):
1. each method family (its shipped config, Split-MNIST 2 tasks) for ``--steps`` optimizer steps per task under
   ``trainer.precision=bf16-mixed`` (and ``16-mixed`` with ``--fp16``), and with ``method.compile=true`` where
   the method config has a ``compile`` key (skipped, and said so, where it has none);
2. the Permuted-MNIST workload of ``benchmarks/speed_permuted_mnist.py`` (MLP 784-100-100-10, batch 128,
   Adam 1e-3, one epoch per task) through the task loop on the GPU against a bare GPU loop with the data resident
   on the device.

Without CUDA it says so and exits 0. ``--cpu-smoke`` runs the family loop on CPU for a few steps (no speed
part), so CI keeps the script from rotting.

    python benchmarks/gpu_check.py [--steps 5] [--fp16] [--speed-tasks 10] [--cpu-smoke]
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

from speed_permuted_mnist import permutations, read_idx  # noqa: E402

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


def bare_gpu_loop(tasks: int, root: str, device: str, precision: str) -> dict:
    """The bare loop of speed_permuted_mnist.py (fine-tuning) with the whole data resident on ``device``."""
    torch.manual_seed(0)
    raw = Path(root) / "MNIST" / "raw"
    x_train = read_idx(raw / "train-images-idx3-ubyte").to(device).flatten(1).float().div(255.0)
    y_train = read_idx(raw / "train-labels-idx1-ubyte").long().to(device)
    x_test = read_idx(raw / "t10k-images-idx3-ubyte").to(device).flatten(1).float().div(255.0)
    y_test = read_idx(raw / "t10k-labels-idx1-ubyte").long().to(device)
    perms = [p.to(device) for p in permutations(tasks)]
    model = nn.Sequential(nn.Linear(784, 100), nn.ReLU(), nn.Linear(100, 100), nn.ReLU(), nn.Linear(100, 10))
    model = model.to(device)
    dtype = torch.bfloat16 if precision.startswith("bf16") else torch.float16
    amp = precision != "32-true"

    def evaluate() -> list[float]:
        with torch.no_grad(), torch.autocast(device_type=device, dtype=dtype, enabled=amp):
            return [float((model(x_test[:, perms[j]]).argmax(1) == y_test).float().mean()) for j in range(tasks)]

    began = time.perf_counter()
    accs = evaluate()
    for t in range(tasks):
        opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
        order = torch.randperm(len(y_train), device=device)
        for idx in order.split(128):
            with torch.autocast(device_type=device, dtype=dtype, enabled=amp):
                loss = F.cross_entropy(model(x_train[idx][:, perms[t]]), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        accs = evaluate()
    if device == "cuda":
        torch.cuda.synchronize()
    return {"acc": sum(accs) / len(accs), "wall": time.perf_counter() - began}


def ours_gpu(tasks: int, root: str, precision: str) -> dict:
    import lightning as L

    from cl_lightning.datamodules import PermutedMNIST
    from cl_lightning.methods import ContinualModule
    from cl_lightning.nets import MLP
    from cl_lightning.runner import ContinualRunner

    L.seed_everything(0, verbose=False)
    model = ContinualModule(MLP(hidden_sizes=[100, 100]), lr=1e-3)
    dm = PermutedMNIST(num_tasks=tasks, data_dir=root, batch_size=128)
    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as run_dir:
        kwargs = {"accelerator": "gpu", "devices": 1, "max_epochs": 1, "enable_progress_bar": False,
                  "precision": precision}
        metrics = ContinualRunner(model, dm, run_dir, seed=0, trainer_kwargs=kwargs).run()
    return {"acc": metrics["ACC"], "wall": time.perf_counter() - began}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps per task for each family")
    parser.add_argument("--fp16", action="store_true", help="also run every family under 16-mixed")
    parser.add_argument("--speed-tasks", type=int, default=10, help="Permuted-MNIST tasks (0: no speed part)")
    parser.add_argument("--cpu-smoke", action="store_true", help="the family loop on CPU (bf16), no speed part")
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
    speed: list[str] = []
    if accelerator == "gpu" and args.speed_tasks > 0:
        root = data_dir()
        for precision in ("32-true", "bf16-mixed"):
            mine, bare = ours_gpu(args.speed_tasks, root, precision), bare_gpu_loop(args.speed_tasks, root, "cuda",
                                                                                    precision)
            speed.append(f"| Permuted-MNIST-{args.speed_tasks} fine-tuning | {precision} | {mine['wall']:.1f} | "
                         f"{bare['wall']:.1f} | {mine['wall'] / bare['wall']:.2f} | {mine['acc']:.3f} | "
                         f"{bare['acc']:.3f} |")
    print(f"\ngpu_check on {device_name} · torch {torch.__version__} · {args.steps} steps per task, "
          "Split-MNIST 2 tasks\n")
    print("| family | precision | mode | status | ACC | s |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))
    if speed:
        print("\n| workload | precision | ours (s) | bare GPU loop (s) | ratio | ACC ours | ACC bare |")
        print("|---|---|---|---|---|---|---|")
        print("\n".join(speed))
    failed = sum("FAILED" in r for r in rows)
    print(f"\n{len(rows) - failed} of {len(rows)} family runs ok")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
