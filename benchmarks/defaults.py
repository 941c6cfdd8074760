"""Every ``method=`` default as a new user first runs it: ``python train.py method=<m> logger=none``.

Each method runs on Split-MNIST in its first supported scenario (the benchmark's own task-IL, else the
first the method can run); a method whose first scenario is domain-IL also runs on Permuted-MNIST. Each
run is its own ``train.py`` process, timed as a whole (imports, composing, training, evaluation, files),
and its ACC / BWT are read from the run folder's ``metrics.json``. Fine-tuning in the same scenario is the
floor each row is compared with. Prints a markdown table (``--out`` also writes it to a file).

    python benchmarks/defaults.py                       # every method (about 20 minutes on 2 CPU cores)
    python benchmarks/defaults.py --methods ewc si      # some of them
    python benchmarks/defaults.py --out benchmarks/defaults.md
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import data_dir  # noqa: E402

#: Method configs that need pretrained ViT-B/16 weights from the hub (no network on the machine that made the table).
NEEDS_PRETRAINED = ("l2p", "dualprompt", "coda_prompt", "simplecil")
#: Configs that are controls for another method, not methods.
CONTROLS = ("gradsign_random",)
#: Why a default may not beat fine-tuning here (printed beside a row that does not); the measured figures of
#: the alternatives tried are in benchmarks/defaults.md.
WHY = {
    "finetune": "the floor itself",
    "gradsign": "the paper's SGD lr 0.003 (its Fig. 1: Permuted-MNIST, 2,000 steps a task) learns little in one "
                "epoch a task; see defaults.md for Adam",
    "hnet_ent": "infers the task by entropy even where the id is given; its setting is domain-/class-IL "
                "(`benchmark.scenario=class`); `method=hnet` uses the id",
    "impresslearn": "tasks after the first `basis_size` learn only coefficients of the frozen basis masks: fewer "
                    "values per task, less accuracy than a mask per task (`supsup`)",
}


def method_names() -> list[str]:
    return sorted(p.stem for p in (REPO / "configs" / "method").glob("*.yaml") if p.stem not in CONTROLS)


def settings(method: str) -> list[tuple[str, str]]:
    """(benchmark, scenario) pairs a method's default runs on: Split-MNIST in the scenario the config picks,
    and Permuted-MNIST too when that scenario is domain-IL."""
    from cl_lightning.config import compose

    cfg = compose([f"method={method}", "logger=none"])
    scenario = str(cfg["benchmark"]["init_args"]["scenario"])
    runs = [("split_mnist", scenario)]
    if scenario == "domain":
        runs.append(("permuted_mnist", "domain"))
    return runs


def command(method: str, benchmark: str, run_dir: Path) -> list[str]:
    return [sys.executable, str(REPO / "train.py"), f"method={method}", f"benchmark={benchmark}", "logger=none",
            f"output_dir={run_dir}", "trainer.enable_progress_bar=false"]


def run_default(method: str, benchmark: str, scenario: str, timeout: float | None = None) -> dict[str, Any]:
    """One ``train.py`` process; its metrics, wall time and the command a user would type."""
    typed = f"python train.py method={method}" + ("" if benchmark == "split_mnist" else f" benchmark={benchmark}")
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        env = {**os.environ, "CL_DATA_DIR": data_dir(), "WANDB_SILENT": "true"}
        cmd = command(method, benchmark, run_dir)
        if benchmark != "split_mnist" or scenario != "task":
            cmd.append(f"benchmark.scenario={scenario}")
        began = time.perf_counter()
        try:
            done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"method": method, "benchmark": benchmark, "scenario": scenario, "command": typed,
                    "wall": time.perf_counter() - began, "error": f"did not finish in {timeout:.0f} s"}
        wall = time.perf_counter() - began
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["(no output)"]
            return {"method": method, "benchmark": benchmark, "scenario": scenario, "command": typed,
                    "wall": wall, "error": tail[0][:160]}
        metrics = json.loads((run_dir / "metrics.json").read_text())
    return {"method": method, "benchmark": benchmark, "scenario": scenario, "command": typed, "wall": wall,
            "acc": 100 * metrics["ACC"], "bwt": 100 * metrics["BWT"]}


def table(rows: list[dict[str, Any]], floors: dict[tuple[str, str], dict[str, Any]]) -> str:
    lines = ["| method | benchmark | scenario | command | ACC | BWT | fine-tuning ACC | wall (s) | note |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        floor = floors.get((r["benchmark"], r["scenario"]))
        floor_acc = f"{floor['acc']:.2f}" if floor and "acc" in floor else "-"
        if "error" in r:
            lines.append(f"| {r['method']} | {r['benchmark']} | {r['scenario']} | `{r['command']}` | "
                         f"failed: {r['error']} | | {floor_acc} | {r['wall']:.0f} | |")
        elif "skipped" in r:
            lines.append(f"| {r['method']} | {r['benchmark']} | {r['scenario']} | `{r['command']}` | "
                         f"{r['skipped']} | | {floor_acc} | | |")
        else:
            below = bool(floor) and "acc" in floor and r["acc"] <= floor["acc"]
            note = ("not above fine-tuning: " + WHY.get(r["method"], "no reason known")) if below else ""
            lines.append(f"| {r['method']} | {r['benchmark']} | {r['scenario']} | `{r['command']}` | "
                         f"{r['acc']:.2f} | {r['bwt']:.2f} | {floor_acc} | {r['wall']:.0f} | {note} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="*", default=None, help="method configs (default: all)")
    parser.add_argument("--out", type=Path, default=None, help="also write the table to this file")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds a run may take before it is stopped")
    args = parser.parse_args()
    methods = args.methods or method_names()
    rows: list[dict[str, Any]] = []
    floors: dict[tuple[str, str], dict[str, Any]] = {}
    for method in methods:
        for benchmark, scenario in settings(method):
            if method in NEEDS_PRETRAINED:
                rows.append({"method": method, "benchmark": benchmark, "scenario": scenario,
                             "command": f"python train.py method={method}",
                             "skipped": "not run: needs pretrained ViT-B/16 weights from the hub"})
                continue
            if (benchmark, scenario) not in floors:
                floors[(benchmark, scenario)] = run_default("finetune", benchmark, scenario)
            row = floors[(benchmark, scenario)] if method == "finetune" else \
                run_default(method, benchmark, scenario, timeout=args.timeout)
            rows.append(row)
            print(json.dumps(row), flush=True)
    text = table(rows, floors)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
