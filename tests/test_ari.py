"""The ARI lifelong learner: the ARI function, the estimator, vectorised candidates, the knowledge base,
the whole loop against fine-tuning, resume and DDP."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cl_lightning.callbacks import ARIConsolidation
from cl_lightning.methods import ARILearner, ContinualModule
from cl_lightning.metrics import adaptation_rate_integral
from cl_lightning.nets import MLP
from cl_lightning.nets.ari_estimator import pad_signature, task_signature
from tests.helpers.ari_learner import blobs, small_learner
from tests.helpers.crash import CrashAt
from tests.helpers.launch import run_script
from tests.helpers.run import run_tasks
from tests.helpers.supermask_data import PermutedBlobs


# ---------------------------------------------------------------------------- the ARI function
def test_ari_of_a_trajectory_by_hand():
    # T = 3 steps, errors at theta_0..theta_3; the area under the error curve (Eq. 3) by trapezoids:
    # (0.8 + 0.4) / 2 + (0.4 + 0.2) / 2 + (0.2 + 0.1) / 2 = 1.05, so ARI = 1 - 1.05 / 3 = 0.65
    assert adaptation_rate_integral([0.8, 0.4, 0.2, 0.1]) == pytest.approx(0.65)
    assert adaptation_rate_integral([0.3]) == pytest.approx(0.7)
    rows = adaptation_rate_integral(np.array([[0.8, 0.4, 0.2, 0.1], [0.0, 0.0, 0.0, 0.0]]))
    np.testing.assert_allclose(rows, [0.65, 1.0])
    # a trajectory that stays wrong scores 0 and one that is right throughout 1 (Eq. 4 taken literally: -1 and 1)
    assert adaptation_rate_integral([1.0, 1.0]) == pytest.approx(0.0)
    assert adaptation_rate_integral(torch.ones(3, 2)).tolist() == [0.0, 0.0, 0.0]
    # errors linear in the step: the trapezoid area is the exact integral of Eq. 3, 1 - mean(err) = 0.5
    assert adaptation_rate_integral(np.linspace(1.0, 0.0, 11)) == pytest.approx(0.5)
    # a faster-adapting trajectory has the higher ARI
    assert adaptation_rate_integral([0.9, 0.1, 0.1]) > adaptation_rate_integral([0.9, 0.5, 0.1])
    with pytest.raises(ValueError, match="at least one"):
        adaptation_rate_integral([])


def test_every_method_logs_the_ari_of_its_training_trajectory(tmp_path):
    """Fine-tuning's per-task ARI: in (0, 1], and higher on a task whose data it has already seen."""
    dm = blobs(num_tasks=2)
    original = dm._load  # task 1 repeats task 0's permutation, so adaptation there is immediate

    def load_same_permutation() -> None:
        original()
        dm.perms = [dm.perms[0]] * dm.num_tasks

    dm._load = load_same_permutation
    metrics = run_tasks(ContinualModule(backbone=MLP(hidden_sizes=(16,)), lr=0.01), dm, tmp_path)
    ari = metrics["ARI"]
    assert len(ari) == 2 and all(0 < a <= 1 for a in ari), ari
    assert ari[1] > ari[0] + 0.05, ari  # already adapted: the second trajectory starts at low error


# ---------------------------------------------------------------------------- vectorised candidates
def test_vectorised_candidates_equal_training_each_alone():
    dm = blobs()
    dm.setup()
    learner = small_learner(weight_decay=1e-3)
    learner.setup_tasks(dm.info)
    learner.train()
    batches = [dm.split(0, "train")[torch.arange(i * 16, (i + 1) * 16)] for i in range(8)]

    def train(sets: torch.Tensor) -> torch.Tensor:
        learner.candidates.data = sets.clone()
        learner.candidates.requires_grad_(True)
        opt = torch.optim.Adam([learner.candidates], lr=0.01, weight_decay=1e-3)
        for batch in batches:
            opt.zero_grad()
            learner.task_loss(batch).value.backward()
            opt.step()
        return learner.candidates.detach().clone()

    together = train(learner.init_sets)
    alone = torch.cat([train(learner.init_sets[k: k + 1]) for k in range(len(learner.init_sets))])
    assert not torch.allclose(together, learner.init_sets)  # they did train
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------- the estimator
def _true_aris(learner: ARILearner, sets: torch.Tensor, tasks: list, steps: int = 10) -> torch.Tensor:
    """``[sets, tasks]`` true ARI: every pair adapted for ``steps`` Adam steps, all pairs vectorised."""
    pairs = sets.repeat_interleave(len(tasks), 0).clone().requires_grad_(True)
    xs = torch.stack([x for x, _ in tasks]).repeat(len(sets), 1, 1, 1)  # [pairs, steps, b, d]
    ys = torch.stack([y for _, y in tasks]).repeat(len(sets), 1, 1)
    opt = torch.optim.Adam([pairs], lr=0.01)
    errors = []
    for s in range(steps + 1):
        out = learner.target.batched_inputs(pairs, xs[:, s])
        errors.append((out.argmax(-1) != ys[:, s]).float().mean(1).detach())
        if s < steps:
            opt.zero_grad()
            F.cross_entropy(out.flatten(0, 1), ys[:, s].flatten(), reduction="sum").backward()
            opt.step()
    return torch.as_tensor(adaptation_rate_integral(torch.stack(errors, 1))).view(len(sets), len(tasks))


def test_estimator_predicts_held_out_aris_and_beats_random_selection():
    torch.manual_seed(0)
    dm = PermutedBlobs(num_tasks=6, classes=4, dim=16, samples=400, spread=2.0, seed=3)
    dm.setup()
    learner = small_learner()
    learner.setup_tasks(dm.info)
    steps, b = 10, 32
    tasks = []
    for t in range(6):
        data = dm.split(t, "train")
        x, y, _ = data[torch.arange((steps + 1) * b)]
        tasks.append((x.view(steps + 1, b, -1), y.view(steps + 1, b)))
    # parameter sets: random initialisations and sets pre-trained on each task (fast adapters there)
    sets = [learner.init_sets]
    for t in range(6):
        for k in range(2):
            pre = learner.init_sets[k: k + 1].clone().requires_grad_(True)
            opt = torch.optim.Adam([pre], lr=0.02)
            data = dm.split(t, "train")
            for i in range(15):
                x, y, _ = data[torch.arange(i * 16, (i + 1) * 16) + 100]
                opt.zero_grad()
                F.cross_entropy(learner.target(pre[0], x), y).backward()
                opt.step()
            sets.append(pre.detach())
    sets = torch.cat(sets)
    true = _true_aris(learner, sets, tasks, steps)  # [S, T]
    task_sigs = torch.stack([pad_signature(task_signature(learner.feature_extractor, dm.split(t, "train").x[:200],
                                                          dm.split(t, "train").y[:200], 4).unsqueeze(0), 256)[0]
                             for t in range(6)])
    param_sigs = learner.param_signatures(sets)
    S, T = true.shape
    pi, ti = torch.meshgrid(torch.arange(S), torch.arange(T), indexing="ij")
    pi, ti, target = pi.flatten(), ti.flatten(), true.flatten().float()
    held = torch.randperm(len(target), generator=torch.Generator().manual_seed(0))[: len(target) // 4]
    train = torch.ones(len(target), dtype=torch.bool)
    train[held] = False
    q = learner.estimator
    q.fit(target[train], param_sigs[pi[train]], task_sigs[ti[train]], steps=1500, lr=1e-3)
    with torch.no_grad():
        pred = q(param_sigs[pi], task_sigs[ti])
    rank = lambda v: v.argsort().argsort().float()  # noqa: E731
    spearman = torch.corrcoef(torch.stack([rank(pred[held]), rank(target[held])]))[0, 1]
    assert spearman > 0.3, spearman
    # selection: per task, the set q ranks first against the average set (what random selection gets)
    chosen = pred.view(S, T).argmax(0)
    picked = true[chosen, torch.arange(T)].mean()
    assert picked > true.mean() + 0.05, (picked, true.mean())


# ---------------------------------------------------------------------------- the knowledge base
def learner_and_five_sets():
    """A built small learner, its consolidation plugin, five sets near its initial ones, and the generator."""
    learner = small_learner()
    learner.setup_tasks(blobs().info)
    g = torch.Generator().manual_seed(0)
    sets = learner.init_sets[torch.tensor([0, 1, 2, 0, 1])] + 0.05 * torch.randn(5, learner.target.num_params,
                                                                                   generator=g)
    return learner, learner.plugins[0], sets, g


def test_knowledge_base_regenerates_the_consolidated_sets_within_tolerance():
    learner, plugin, sets, _ = learner_and_five_sets()
    record = learner.reproduce(sets, learner.new_embeddings(5, 0), plugin.kb_steps, plugin.kb_lr, plugin.tolerance,
                               plugin.relative_tolerance)
    assert record["kb_steps"] < plugin.kb_steps  # stopped because it met the tolerance
    regenerated = learner.kb_sets()
    assert regenerated.shape == sets.shape and int(learner.kb_count) == 5
    relative = F.mse_loss(regenerated, sets) / sets.pow(2).mean()
    assert relative <= plugin.tolerance, relative
    assert record["kb_relative_mse"] == pytest.approx(float(relative), rel=1e-4)


def test_a_new_set_among_reproduced_ones_is_reproduced_too():
    """The tolerance bounds every set, not the mean: with five sets already reproduced, a bound on the mean is
    met while the new one is still several times the tolerance off."""
    learner, plugin, old, g = learner_and_five_sets()
    learner.reproduce(old, learner.new_embeddings(5, 0), plugin.kb_steps, plugin.kb_lr, plugin.tolerance, True)
    new = learner.init_sets[2:3] + 0.5 * torch.randn(1, learner.target.num_params, generator=g)
    sets = torch.cat([old, new])
    embeddings = torch.cat([learner.kb_embeddings[:5], learner.new_embeddings(1, 1)])
    before = (learner.knowledge_base(embeddings) - sets).pow(2).mean(1) / sets.pow(2).mean(1)
    assert before[:5].max() <= plugin.tolerance < before[5]
    record = learner.reproduce(sets, embeddings, plugin.kb_steps, plugin.kb_lr, plugin.tolerance, True)
    after = (learner.kb_sets() - sets).pow(2).mean(1) / sets.pow(2).mean(1)
    assert after.max() <= plugin.tolerance and record["kb_steps"] > 0, (after, record)
    assert record["kb_worst_set_error"] == pytest.approx(float(after.max()), rel=1e-4)


# ---------------------------------------------------------------------------- the whole loop
def test_ari_learner_keeps_old_tasks_where_fine_tuning_forgets(tmp_path):
    ari = run_tasks(small_learner(), blobs(), tmp_path / "ari")
    finetune = run_tasks(ContinualModule(backbone=MLP(hidden_sizes=(16,)), lr=0.01), blobs(), tmp_path / "ft")
    R, Rf = np.asarray(ari["R"]), np.asarray(finetune["R"])
    assert np.diag(R).min() > 0.8, R
    assert finetune["forgetting"] > 0.2, Rf  # permuted blobs: one shared head forgets
    assert ari["forgetting"] < 0.05 and ari["ACC"] > finetune["ACC"] + 0.15, (R, Rf)
    storage = ari["storage"]
    assert storage["base_model_parameters"] > 0 and storage["knowledge_base_embeddings"] > 0


def test_candidates_come_from_the_knowledge_base_after_the_first_task(tmp_path):
    learner = small_learner()
    run_tasks(learner, blobs(), tmp_path)
    history = learner.plugins[0].history
    assert [h["task"] for h in history] == [0, 1, 2]
    assert all(src == "init" for src, _ in history[0]["candidates"])  # an empty KB at first
    assert any(src == "kb" for src, _ in history[1]["candidates"])
    assert len(history[2]["candidates"]) == 4  # Q
    assert all(h["kb_relative_mse"] <= 1e-2 for h in history), history
    assert history[-1]["kb_size"] <= 6  # B
    plugin = learner.plugins[0]
    assert len(plugin.ari) == len(plugin.param_sigs) == len(plugin.task_sigs) > 0


def test_random_selection_is_a_different_run(tmp_path):
    estimator = small_learner()
    random = small_learner(selection="random")
    run_tasks(estimator, blobs(), tmp_path / "e")
    run_tasks(random, blobs(), tmp_path / "r")
    picks = lambda m: [h["candidates"] for h in m.plugins[0].history]  # noqa: E731
    assert picks(estimator) != picks(random)


def test_observed_pairs_teach_q_which_stored_set_solves_which_task(tmp_path):
    """Eq. 7 (``pair_observed``): q also sees every (stored set, observed task) pair, so the set it picks for a
    task is the KB's best on that task; without the pairs q only knows how fast starting points adapt. With
    ``finetune_steps=0`` the pick alone is evaluated (the paper's Fig. 2 protocol)."""
    paired = small_learner(finetune_steps=0, consolidation={"pair_observed": True})
    plain = small_learner(finetune_steps=0)
    with_pairs = run_tasks(paired, blobs(), tmp_path / "paired")
    without = run_tasks(plain, blobs(), tmp_path / "plain")
    kb = paired.kb_sets()
    errors = paired.memory_errors(kb, [0, 1, 2])
    picks = paired.best_set_per_task(kb, [0, 1, 2], salt=19)
    assert all(errors[t, picks[t]] <= errors[t].min() + 0.02 for t in range(3)), (picks, errors)
    assert with_pairs["ACC"] > without["ACC"] + 0.15, (with_pairs["R"], without["R"])
    assert min(np.diag(with_pairs["R"])) > 0.8, with_pairs["R"]  # learnt, not a better BWT by learning nothing
    ari, param_sigs, task_sigs = paired.plugins[0].pairs
    assert len(ari) == len(param_sigs) == len(task_sigs) > 0 and len(ari) % 3 == 0  # every set on all 3 tasks
    assert len(plain.plugins[0].pairs[0]) == 0


def test_covering_keeps_each_tasks_best_set_where_the_summed_rule_drops_it():
    """``cover_tasks``: the summed rule keeps the two sets good on task 0 and none of task 1's; covering keeps
    task 1's best set first, then fills by the sum."""
    learner = small_learner()
    learner.kb_capacity = 2
    predicted = torch.tensor([[0.9, 0.8, 0.1, 0.1],
                              [0.1, 0.1, 0.3, 0.2]])
    learner.predicted_ari = lambda sets, tasks: predicted[list(tasks)]
    learner.use_estimator = lambda: True
    sets = torch.zeros(4, 3)
    assert sorted(learner.rank_sets(sets, [0, 1], 2, salt=29).tolist()) == [0, 1]
    assert sorted(learner.covering_sets(sets, [0, 1]).tolist()) == [0, 2]
    learner.kb_capacity = 3  # the place left goes by the sum (1.0, 0.9, 0.4, 0.3)
    assert sorted(learner.covering_sets(sets, [0, 1]).tolist()) == [0, 1, 2]


def test_resume_after_a_crash_gives_the_same_matrix(tmp_path):
    full = run_tasks(small_learner(), blobs(), tmp_path / "full")
    crash = CrashAt(task=2, step=3, marker=str(tmp_path / "marker"), hard=False)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_tasks(small_learner(extra_plugins=[crash]), blobs(), tmp_path / "crashed")
    resumed = run_tasks(small_learner(extra_plugins=[crash]), blobs(), tmp_path / "crashed", resume=True)
    np.testing.assert_allclose(resumed["R"], full["R"], atol=1e-6)


def test_bad_configuration_names_the_value():
    with pytest.raises(ValueError, match="selection='best'"):
        small_learner(selection="best")
    # a required plugin: added with its defaults when missing, named when given twice
    assert [type(p) for p in ARILearner(plugins=[]).plugins] == [ARIConsolidation]
    with pytest.raises(ValueError, match="ARIConsolidation"):
        ARILearner(plugins=[ARIConsolidation(), ARIConsolidation()])


# ---------------------------------------------------------------------------- DDP
def test_ddp_two_processes_end_with_identical_buffer_and_knowledge_base(tmp_path):
    for devices in (1, 2):
        proc = run_script("tests/helpers/ari_ddp.py", [str(tmp_path / f"d{devices}"), str(devices)])
        assert proc.returncode == 0, proc.stderr[-3000:]
    last = 2
    r0 = torch.load(tmp_path / "d2" / f"rank0_task{last}.pt")
    r1 = torch.load(tmp_path / "d2" / f"rank1_task{last}.pt")
    one = torch.load(tmp_path / "d1" / f"rank0_task{last}.pt")
    assert r0.keys() == r1.keys() and "S_ari" in r0
    for key in r0:
        assert torch.equal(r0[key], r1[key]), key  # bit for bit on both ranks
    # and the same run as one process (same global batches; float summation order may differ slightly, so
    # candidates the estimator scores as near-ties can be explored in another order)
    torch.testing.assert_close(r0["S_ari"].sort().values, one["S_ari"].sort().values, atol=0.05, rtol=0)
    assert int(r0["kb_count"]) == int(one["kb_count"])
