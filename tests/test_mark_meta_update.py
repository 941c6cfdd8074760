"""MARK's KB meta-update on hand-made inputs: the formula for both signs, the live KB untouched by the inner
loop, a fresh head per mini-task, and the vectorised K mini-tasks equal to the sequential reference."""

from __future__ import annotations

import types

import pytest
import torch

from cl_lightning.callbacks.mark_meta_update import (
    InnerConfig,
    MARKMetaUpdate,
    MiniTasks,
    check_finite,
    inner_loop_sequential,
    inner_loop_vectorised,
    meta_gradient,
    seeded_generator,
)
from cl_lightning.nets.mark import KnowledgeBase, MaskFunctions

pytestmark = pytest.mark.usefixtures("one_thread")


def test_meta_gradient_is_the_accuracy_weighted_mean_update_for_both_signs():
    base = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor(0.5)}
    adapted = {"w": torch.tensor([[2.0, 2.0], [1.0, 0.0], [1.0, 5.0]]), "b": torch.tensor([1.5, 0.5, -0.5])}
    acc = torch.tensor([0.5, 0.25, 0.25])
    # weights acc / sum(acc) = (0.5, 0.25, 0.25), then / K=3
    w_expected = torch.tensor([(0.5 * 1 + 0.25 * 0 + 0.25 * 0) / 3, (0.5 * 0 + 0.25 * -2 + 0.25 * 3) / 3])
    b_expected = torch.tensor((0.5 * 1 + 0.25 * 0 + 0.25 * -1) / 3)
    official = meta_gradient(base, adapted, acc, "official")
    reptile = meta_gradient(base, adapted, acc, "reptile")
    torch.testing.assert_close(official["w"], w_expected)
    torch.testing.assert_close(official["b"], b_expected)
    torch.testing.assert_close(reptile["w"], -w_expected)
    # the outer SGD step (lr, weight decay): official moves the KB away from the weighted update, reptile toward it
    lr, wd = 0.1, 0.0
    for grads, direction in ((official, -1.0), (reptile, 1.0)):
        p = torch.nn.Parameter(base["w"].clone())
        opt = torch.optim.SGD([p], lr=lr, weight_decay=wd)
        p.grad = grads["w"].clone()
        opt.step()
        torch.testing.assert_close(p.detach(), base["w"] + direction * lr * w_expected)
    # weight decay as the authors' outer SGD (0.1): theta - lr (g + wd theta)
    p = torch.nn.Parameter(base["w"].clone())
    opt = torch.optim.SGD([p], lr=lr, weight_decay=0.1)
    p.grad = official["w"].clone()
    opt.step()
    torch.testing.assert_close(p.detach(), base["w"] - lr * (w_expected + 0.1 * base["w"]))
    # all accuracies 0: uniform weights instead of a division by zero
    zero = meta_gradient(base, adapted, torch.zeros(3))
    torch.testing.assert_close(zero["w"], (adapted["w"] - base["w"]).mean(0) / 3)
    with pytest.raises(ValueError, match="sign"):
        meta_gradient(base, adapted, acc, "sideways")


def _mini_tasks(kb: KnowledgeBase, k: int = 3, b: int = 16, steps: int = 6, masks: bool = True) -> MiniTasks:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(k, b, 1, 28, 28, generator=g)
    y = torch.randint(0, 3, (k, b), generator=g)
    m = None
    if masks:
        fn = MaskFunctions(10, kb.channels)
        m = [v.view(k, b, -1).detach() for v in fn(torch.randn(k * b, 10, generator=g))]
    keep = (torch.rand(steps, k, b, kb.latent_dim, generator=g) >= kb.dropout).float()
    head_w = torch.randn(k, 3, kb.latent_dim, generator=g) * 0.1
    return MiniTasks(x=x, y=y, masks=m, keep=keep, head_w=head_w, head_b=torch.zeros(k, 3))


@pytest.mark.parametrize("masks", [True, False])
def test_vectorised_inner_loop_equals_the_sequential_one_and_leaves_the_kb_alone(masks):
    torch.manual_seed(0)
    kb = KnowledgeBase(1, 28, (4, 8, 8), latent_dim=16, dropout=0.5)
    before = {n: p.detach().clone() for n, p in kb.named_parameters()}
    tasks = _mini_tasks(kb, masks=masks)
    heads_before = tasks.head_w.clone()
    cfg = InnerConfig(steps=6, lr=0.05, momentum=0.9, weight_decay=0.1, plateau=True, plateau_patience=1)
    vec, acc_v = inner_loop_vectorised(kb, tasks, cfg)
    seq, acc_s = inner_loop_sequential(kb, tasks, cfg)
    for n in before:
        assert torch.equal(dict(kb.named_parameters())[n], before[n]), f"the live KB changed: {n}"
        assert vec[n].shape == (3, *before[n].shape)
        torch.testing.assert_close(vec[n], seq[n], rtol=1e-4, atol=1e-5)
        assert not torch.allclose(vec[n][0], before[n]), "the mini-tasks did train"
    torch.testing.assert_close(acc_v, acc_s)
    assert torch.equal(tasks.head_w, heads_before), "the inner loop trains copies of the heads"


def test_a_diverged_outer_step_is_an_error_naming_task_and_step():
    """Huge masks and a large inner lr make the inner loops overflow; the KB gradient check names where."""
    torch.manual_seed(0)
    kb = KnowledgeBase(1, 28, (4, 8, 8), latent_dim=16, dropout=0.5)
    tasks = _mini_tasks(kb, masks=True)
    tasks.masks = [m * 1e4 for m in tasks.masks]
    plugin = MARKMetaUpdate(mini_tasks=3, inner_steps=6, inner_lr=10.0)
    grads, _ = plugin.kb_gradient(kb, tasks)
    flat = torch.cat([g.flatten() for g in grads.values()])
    assert not torch.isfinite(flat).all(), "the setting overflows"
    with pytest.raises(FloatingPointError, match="task 2, outer step 4"):
        check_finite(flat, task=2, step=4)
    check_finite(torch.cat([g.flatten() for g in plugin.kb_gradient(kb, _mini_tasks(kb, masks=True))[0].values()]),
                 task=0, step=0)  # an ordinary step passes


def test_the_plateau_rule_matches_torch_reduce_lr_on_plateau():
    """Patience 1 and a loss that stalls: the vectorised lr schedule follows torch's, else the copies differ."""
    torch.manual_seed(1)
    kb = KnowledgeBase(1, 28, (4, 8, 8), latent_dim=16, dropout=0.0)
    tasks = _mini_tasks(kb, steps=12)
    tasks.keep = None
    cfg = InnerConfig(steps=12, lr=0.5, momentum=0.9, weight_decay=0.0, plateau=True, plateau_patience=1,
                      plateau_threshold=0.2)
    vec, _ = inner_loop_vectorised(kb, tasks, cfg)
    seq, _ = inner_loop_sequential(kb, tasks, cfg)
    no_plateau, _ = inner_loop_vectorised(kb, tasks, InnerConfig(**{**cfg.__dict__, "plateau": False}))
    torch.testing.assert_close(vec["fc.weight"], seq["fc.weight"], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(vec["fc.weight"], no_plateau["fc.weight"]), "the rule did cut the lr here"


def test_each_mini_task_gets_a_fresh_head_and_its_own_batch():
    kb = KnowledgeBase(1, 28, (4, 8, 8), latent_dim=16, dropout=0.5)
    module = types.SimpleNamespace(kb=kb, device=torch.device("cpu"), info=types.SimpleNamespace(outputs_per_task=2),
                                   task_masks=lambda task, x: None)
    dataset = _Indexable(torch.randn(100, 1, 28, 28), torch.randint(0, 2, (100,)))
    plugin = MARKMetaUpdate(mini_tasks=4, inner_steps=3)
    a = plugin.sample(module, dataset, 0, seeded_generator(5, 0, 0), batch_size=20)
    b = plugin.sample(module, dataset, 0, seeded_generator(5, 0, 1), batch_size=20)
    bound = 1 / 16**0.5
    assert a.head_w.shape == (4, 2, 16) and a.head_w.abs().max() <= bound
    for i in range(4):
        for j in range(i + 1, 4):
            assert not torch.equal(a.head_w[i], a.head_w[j]), "one head per mini-task"
    assert not torch.equal(a.head_w, b.head_w), "new heads at every outer step"
    # the K batches are disjoint draws from the task's data (K * B = 80 <= 100 samples)
    rows = a.x.flatten(0, 1).flatten(1)
    assert len(torch.unique(rows, dim=0)) == 80
    assert a.keep.shape == (3, 4, 20, 16)
    again = plugin.sample(module, dataset, 0, seeded_generator(5, 0, 0), batch_size=20)
    assert torch.equal(again.x, a.x) and torch.equal(again.head_w, a.head_w), "seeded: same on every rank"


class _Indexable:
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, idx):
        return self.x[idx], self.y[idx], torch.zeros(len(idx), dtype=torch.long)


def test_bad_plugin_arguments_are_named():
    with pytest.raises(ValueError, match="sign"):
        MARKMetaUpdate(sign="away")
    with pytest.raises(ValueError, match="mini_tasks"):
        MARKMetaUpdate(mini_tasks=0)
    with pytest.raises(ValueError, match="inner_lr"):
        MARKMetaUpdate(inner_lr=0)
