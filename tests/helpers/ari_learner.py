"""A small ARI learner on a small generated benchmark (shared by the ARI tests and their DDP script)."""

from __future__ import annotations

from cl_lightning.callbacks import ARIConsolidation
from cl_lightning.methods import ARILearner
from cl_lightning.nets import MLP, ChunkedHyperNetwork
from cl_lightning.nets.ari_estimator import ARIEstimator, RandomFeatures
from tests.helpers.supermask_data import PermutedBlobs


def blobs(num_tasks: int = 3, **kw) -> PermutedBlobs:
    return PermutedBlobs(num_tasks=num_tasks, classes=4, dim=16, samples=320, test_samples=256, spread=2.0,
                         batch_size=16, **kw)


def small_learner(extra_plugins=(), selection: str = "estimator", kb_steps: int = 3000, consolidation=None,
                  **kw) -> ARILearner:
    kw = {"finetune_steps": 30, **kw}
    return ARILearner(
        base=MLP(hidden_sizes=(16,)),
        knowledge_base=ChunkedHyperNetwork(hidden_sizes=(32,), embedding_dim=8, chunk_size=64, chunk_embedding_dim=8),
        estimator=ARIEstimator(signature_width=256, projection=16, hidden_sizes=(32, 32)),
        feature_extractor=RandomFeatures(features=16), num_init_sets=3, max_candidates=4, kb_capacity=6,
        selection=selection, noise_inputs=8, samples_per_class=4, memory_per_task=64,
        finetune_batch_size=16, lr=0.01,
        plugins=[ARIConsolidation(estimator_steps=200, kb_steps=kb_steps, kb_lr=3e-3, tolerance=1e-2,
                                  **(consolidation or {})), *extra_plugins],
        **kw)
