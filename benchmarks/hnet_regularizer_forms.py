"""Per-step cost of the HNET output regularizer against the number of past tasks: algebraic vs direct form.

    python benchmarks/hnet_regularizer_forms.py --past 0 1 2 3 4 --rounds 7 --steps 20 --threads 1

The Split-MNIST CL1 workload of ``benchmarks/hnet_vs_hypnettorch.py`` (target 784-400-400 and a 2-way
head, chunked hypernetwork 10-10, chunks of 42000, embeddings 96, Adam, batch 128, beta 0.01): one full
training step (task loss + regularizer, forward, backward, Adam), random inputs (the cost does not depend
on them). For each number of past tasks the two forms are timed in alternation, ``--rounds`` times
``--steps`` steps each, in one process, so that a shared machine's load falls on both alike; it prints
the median ms per step of each form, and checks once that both forms give the same penalty and gradient.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cl_lightning.callbacks.hnet_regularizer import OutputRegularizer  # noqa: E402
from cl_lightning.methods.hnet import HNET  # noqa: E402
from cl_lightning.nets import MLP  # noqa: E402
from cl_lightning.nets.hypernetwork import ChunkedHyperNetwork  # noqa: E402
from cl_lightning.tasks import BenchmarkInfo, Scenario, Task  # noqa: E402

FORMS = ("direct", "algebraic")


def build(num_tasks: int, current: int, seed: int, lookahead: bool) -> tuple[HNET, OutputRegularizer]:
    torch.manual_seed(seed)
    reg = OutputRegularizer(beta=0.01, lookahead=lookahead)
    model = HNET(target=MLP(hidden_sizes=(400, 400)),
                 hypernetwork=ChunkedHyperNetwork(hidden_sizes=(10, 10), embedding_dim=96, chunk_size=42000,
                                                  chunk_embedding_dim=96), plugins=[reg])
    info = BenchmarkInfo("split_mnist", tuple(Task(i, str(i)) for i in range(num_tasks)), Scenario.TASK_IL,
                         (1, 28, 28), 2)
    model.setup_tasks(info)
    model.current_task = current
    model.setup("fit")
    reg.on_task_start(None, model, current)  # targets (and the algebraic form's reference) of past tasks
    with torch.no_grad():  # move away from the targets, as during training
        for p in model.hypernetwork.parameters():
            p.add_(1e-3 * torch.randn_like(p))
    return model, reg


def step(model: HNET, opt: torch.optim.Optimizer, batch) -> torch.Tensor:
    loss, _ = model.training_objective(batch)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss


def check(model: HNET, reg: OutputRegularizer) -> str:
    """Relative difference of the two forms' penalty and hypernetwork gradient."""
    out = {}
    for form in FORMS:
        reg.form = form
        model.zero_grad()
        pen = reg.penalty(model, None)
        pen.backward()
        out[form] = pen.detach(), torch.cat([p.grad.flatten() for p in model.hypernetwork.parameters()])
    model.zero_grad()
    (pd, gd), (pa, ga) = out["direct"], out["algebraic"]
    return (f"penalty rel diff {abs(pa - pd).item() / pd.item():.1e}, "
            f"grad rel diff {(ga - gd).norm().item() / gd.norm().item():.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--past", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="numbers of past tasks")
    parser.add_argument("--rounds", type=int, default=7, help="alternations of the two forms")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per form and round")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--lookahead", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"Split-MNIST CL1 workload, batch 128, {args.threads} thread(s), lookahead={args.lookahead}; ms per "
          f"training step, median of {args.rounds} rounds of {args.steps} steps per form (alternating)")
    print(f"{'past tasks':>10} {'direct':>8} {'algebraic':>10} {'ratio':>6}  check")
    g = torch.Generator().manual_seed(args.seed)
    x, y = torch.rand(128, 1, 28, 28, generator=g), torch.randint(0, 2, (128,), generator=g)
    for past in args.past:
        model, reg = build(max(args.past) + 1, past, args.seed, args.lookahead)
        batch = (x, y, torch.full((128,), past))
        note = check(model, reg) if past else ""
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        times = {form: [] for form in FORMS}
        for r in range(args.rounds + 1):
            for form in (FORMS if r % 2 == 0 else FORMS[::-1]):
                reg.form = form
                step(model, opt, batch)  # warm-up of this form
                began = time.perf_counter()
                for _ in range(args.steps):
                    step(model, opt, batch)
                if r:  # round 0 warms up
                    times[form].append(1000 * (time.perf_counter() - began) / args.steps)
        d, a = (float(np.median(times[f])) for f in FORMS)
        print(f"{past:>10} {d:>8.2f} {a:>10.2f} {a / d:>6.2f}  {note}", flush=True)


if __name__ == "__main__":
    main()
