"""A real ``train.py`` process SIGKILLed at each point of a run and resumed ends with the uninterrupted R.

Every method family is killed at the points where its own state is in flight: inside the last epoch of
a task (resumed from Lightning's epoch-end checkpoint, random states included) and after its plugins'
end-of-task work but before the task's boundary checkpoint. The method-independent points (the untrained
baseline's evaluation, the row evaluation, the boundary checkpoint's dump, after the last task) are
killed once, with EWC.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess

import numpy as np
import pytest

from tests.helpers.kill import with_killer
from tests.helpers.launch import train_process

SMALL = ["benchmark=permuted_mnist", "benchmark.train_samples_per_task=192", "benchmark.batch_size=64",
         "benchmark.eval_batch_size=500", "trainer.max_epochs=2"]
FAMILIES = {
    "ewc": (["method=ewc", "benchmark.num_tasks=3", "method.backbone.hidden_sizes=[32]",
             "method.plugins.EWC.fisher_samples=100"],
            ["baseline", "mid_epoch@1", "train_end@1", "row_eval@1", "checkpoint@1", "finish"]),
    "hnet_ent": (["method=hnet_ent", "benchmark.num_tasks=2", "method.target.hidden_sizes=[32]",
                  "method.hypernetwork.chunk_size=4000", "method.hypernetwork.embedding_dim=16",
                  "method.hypernetwork.chunk_embedding_dim=16"],
                 ["train_end@0", "mid_epoch@1"]),
    "supsup": (["method=supsup", "benchmark.num_tasks=2"], ["train_end@0", "mid_epoch@1"]),
    "impresslearn": (["method=impresslearn", "benchmark.num_tasks=3", "method.basis_size=2"],
                     ["train_end@1", "mid_epoch@2"]),
    "ari": (["method=ari", "benchmark.num_tasks=2", "method.base.hidden_sizes=[32]",
             "method.knowledge_base.hidden_sizes=[16]", "method.knowledge_base.chunk_size=2000",
             "method.max_candidates=3", "method.num_init_sets=2",
             "method.memory_per_task=20", "method.finetune_steps=3",
             "method.plugins.ARIConsolidation.estimator_steps=20",
             "method.plugins.ARIConsolidation.kb_steps=50"],
            ["train_end@0", "mid_epoch@1"]),
    "gradsign": (["method=gradsign", "benchmark.num_tasks=2", "method.backbone.hidden_sizes=[32]", "method.lr=0.05",
                  "method.plugins.GradientSignFilter.hidden_sizes=[16]",
                  "method.plugins.GradientSignFilter.predictor_steps=30",
                  "method.plugins.GradientSignFilter.distill_steps=30",
                  "method.plugins.GradientSignFilter.coords_per_step=64",
                  "method.plugins.GradientSignFilter.distill_points=2000"],
                 ["train_end@0", "mid_epoch@1"]),
}


def train(args: list[str], mnist_root) -> subprocess.CompletedProcess:
    env = {**os.environ, "CL_DATA_DIR": str(mnist_root), "PYTHONWARNINGS": "ignore"}
    return train_process(args, env, timeout=900)


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_killed_at_every_point_and_resumed_gives_the_uninterrupted_R(family, mnist_root, tmp_path):
    overrides, points = FAMILIES[family]
    method = overrides[0].split("=", 1)[1]
    common = ["logger=none", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false"]
    # the killer is in both runs, so both have the same plugins; in the reference it never fires
    ref_args = [with_killer(method, [], tmp_path / "never"), *overrides, *SMALL, *common]
    ref = train([*ref_args, f"output_dir={tmp_path / 'ref'}"], mnist_root)
    assert ref.returncode == 0, ref.stderr[-3000:]

    run_dir = tmp_path / "run"
    args = [with_killer(method, points, tmp_path / "markers"), *overrides, *SMALL, *common]
    proc = train([*args, f"output_dir={run_dir}"], mnist_root)
    kills = 0
    while proc.returncode == -signal.SIGKILL:
        kills += 1
        assert kills <= len(points), "killed more often than there are points"
        proc = train([f"resume={run_dir}", *common], mnist_root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "markers").iterdir()) == sorted(points)
    assert kills == len(points)

    expected = json.loads((tmp_path / "ref" / "metrics.json").read_text())
    got = json.loads((run_dir / "metrics.json").read_text())
    np.testing.assert_allclose(got["R"], expected["R"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(got["baseline"], expected["baseline"], rtol=0, atol=1e-6)
    assert got["optimizer_steps"] == expected["optimizer_steps"]
