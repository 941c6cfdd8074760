"""Every ``configs/method/*.yaml`` runs as ``python train.py method=<m>`` composes it, for two steps a task on a
tiny MNIST in the real IDX format: a default that stops building, composing or training fails here first. The
figures of the defaults are ``benchmarks/defaults.py``'s (``benchmarks/defaults.md``); this only keeps them
runnable. Only budgets are cut (steps, epochs of a method's own phases); every other value is the file's."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from cl_lightning.config import CONFIG_DIR, available, compose

pytestmark = pytest.mark.usefixtures("one_thread")

#: The budgets a method runs on its own, beside the trainer's steps.
BUDGETS = {
    "ari": ["method.plugins.ARIConsolidation.estimator_steps=2", "method.plugins.ARIConsolidation.kb_steps=2",
            "method.finetune_steps=2", "method.max_candidates=2"],
    "gdumb": ["method.epochs=1"],
    "gradsign": ["method.plugins.GradientSignFilter.predictor_steps=2",
                 "method.plugins.GradientSignFilter.distill_steps=2"],
    "mark": ["method.feature_epochs=1", "method.pretrain_epochs=1", "method.mask_epochs=1", "method.final_epochs=1",
             "method.meta_steps=1", "method.plugins.MARKMetaUpdate.mini_tasks=2",
             "method.plugins.MARKMetaUpdate.inner_steps=2"],
}
#: The pretrained ViT-B/16 is not on this machine: the prompt methods run on a tiny randomly initialised ViT.
TINY_VIT = ["method.backbone.name=vit_tiny_patch16_224", "method.backbone.pretrained=false",
            "method.backbone.model_kwargs={img_size: 16, patch_size: 8, depth: 5, embed_dim: 32, num_heads: 2}"]


def write_idx(path: Path, array: np.ndarray) -> None:
    """An IDX file (big-endian dims after a magic naming the type, uint8 here), as MNIST ships them."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


@pytest.fixture(scope="module")
def tiny_mnist(tmp_path_factory) -> Path:
    """MNIST's four raw files with 8 training and 4 test images of each digit (a digit: a bright block of its own)."""
    root = tmp_path_factory.mktemp("mnist")
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, per in (("train", 8), ("t10k", 4)):
        labels = np.repeat(np.arange(10), per)
        images = rng.integers(0, 40, (len(labels), 28, 28))
        for i, d in enumerate(labels):
            images[i, 2 * d: 2 * d + 6, 4:24] = 250
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    return root


def overrides(method: str, data_dir: Path) -> list[str]:
    cut = BUDGETS.get(method, [])
    vit = TINY_VIT if "PromptedViT" in str(compose([f"method={method}"])["method"]) else []
    return [f"method={method}", "logger=none", f"data_dir={data_dir}", "benchmark.batch_size=8",
            "trainer.max_steps=2", "trainer.enable_progress_bar=false", *cut, *vit]


@pytest.mark.parametrize("method", available("method", CONFIG_DIR))
def test_every_method_default_runs(method, tiny_mnist, tmp_path):
    from benchmarks.common import timed_run

    cfg = compose(overrides(method, tiny_mnist))
    metrics, _ = timed_run(cfg)
    R = np.asarray(metrics["R"])
    assert R.shape == (5, 5) and np.isfinite(R).all(), metrics["R"]
    assert math.isfinite(metrics["ACC"])


def test_the_defaults_table_runs_each_method_where_a_user_first_would():
    """benchmarks/defaults.py: Split-MNIST in the method's first scenario, Permuted-MNIST too for domain-IL ones;
    every method config but the controls is in the table."""
    from benchmarks.defaults import CONTROLS, method_names, settings

    assert settings("ewc") == [("split_mnist", "task")] and settings("icarl") == [("split_mnist", "class")]
    assert settings("hnet_tir") == [("split_mnist", "domain"), ("permuted_mnist", "domain")]
    assert set(method_names()) | set(CONTROLS) == set(available("method", CONFIG_DIR))
