"""The rehearsal memory on hand-made streams: the budget, the reservoir's uniform inclusion, class and task
balance, seeded draws and the state that a checkpoint carries."""

from __future__ import annotations

import pytest
import torch

from cl_lightning.memory import RehearsalMemory


def stream(n: int, start: int = 0) -> dict[str, torch.Tensor]:
    ids = torch.arange(start, start + n)
    return {"x": ids.float().unsqueeze(1).repeat(1, 3), "y": ids % 4, "t": ids // 100}


def test_reservoir_holds_exactly_memory_size_and_fills_first():
    mem = RehearsalMemory(10, seed=0)
    mem.add_reservoir(stream(6))
    assert len(mem) == 6 and mem.data["x"][:, 0].tolist() == [0, 1, 2, 3, 4, 5]
    mem.add_reservoir(stream(94, start=6))
    assert len(mem) == 10 and mem.seen == 100
    assert mem.numel() == 10 * (3 + 1 + 1)
    ids = mem.data["x"][:, 0].long()
    assert len(ids.unique()) == 10  # distinct stream samples, consistent fields
    assert torch.equal(mem.data["y"], ids % 4)


def test_reservoir_does_not_depend_on_how_the_stream_is_batched():
    one, many = RehearsalMemory(8, seed=3), RehearsalMemory(8, seed=3)
    one.add_reservoir(stream(60))
    for start, n in ((0, 7), (7, 20), (27, 33)):
        many.add_reservoir(stream(n, start))
    assert torch.equal(one.data["x"], many.data["x"])


def test_reservoir_includes_every_stream_sample_with_probability_size_over_seen():
    size, n, trials = 5, 25, 2000
    counts = torch.zeros(n)
    for seed in range(trials):
        mem = RehearsalMemory(size, seed=seed)
        mem.add_reservoir(stream(9))
        mem.add_reservoir(stream(16, start=9))
        counts[mem.data["x"][:, 0].long()] += 1
    freq = counts / trials
    # binomial standard error sqrt(0.2 * 0.8 / 2000) = 0.009: 5 of them
    assert (freq - size / n).abs().max() < 0.045, freq


def test_balanced_groups_split_the_budget_and_keep_the_first_of_each_order():
    mem = RehearsalMemory(10, seed=0)
    first = {"x": torch.arange(20.0).unsqueeze(1), "y": torch.tensor([0, 1] * 10),
             "t": torch.zeros(20, dtype=torch.long)}
    mem.set_group("class", first)
    assert torch.bincount(mem.data["y"]).tolist() == [5, 5]
    assert mem.data["x"][mem.data["y"] == 0, 0].tolist() == [0, 2, 4, 6, 8]  # the first five of class 0
    second = {"x": 100 + torch.arange(9.0).unsqueeze(1), "y": torch.tensor([2] * 9),
              "t": torch.ones(9, dtype=torch.long)}
    mem.set_group("class", second)
    assert len(mem) == 10
    assert torch.bincount(mem.data["y"]).tolist() == [4, 3, 3]  # 10 // 3 each, the remainder to class 0
    assert mem.data["x"][mem.data["y"] == 0, 0].tolist() == [0, 2, 4, 6]  # shrinking keeps the order's head
    assert mem.data["x"][mem.data["y"] == 2, 0].tolist() == [100, 101, 102]
    by_task = RehearsalMemory(7, seed=0)
    by_task.set_group("task", first)
    by_task.set_group("task", second)
    assert torch.bincount(by_task.data["t"]).tolist() == [4, 3]
    with pytest.raises(ValueError, match="already in the memory"):
        by_task.set_group("task", second)


def test_class_groups_are_a_tasks_labels_so_task_il_tasks_reusing_labels_each_get_their_share():
    """Task-IL Split-MNIST labels every task 0/1: balancing by label alone would merge (or refuse) them."""
    mem = RehearsalMemory(8, seed=0)
    for task in range(2):
        mem.set_group("class", {"x": 10 * task + torch.arange(10.0).unsqueeze(1), "y": torch.tensor([0, 1] * 5),
                                "t": torch.full((10,), task)})
    pairs = torch.stack([mem.data["t"], mem.data["y"]], 1).tolist()
    assert sorted(map(tuple, pairs)) == [(0, 0)] * 2 + [(0, 1)] * 2 + [(1, 0)] * 2 + [(1, 1)] * 2
    assert mem.data["x"][(mem.data["t"] == 1) & (mem.data["y"] == 0), 0].tolist() == [10, 12]


def test_draws_are_seeded_and_the_state_round_trips():
    mem = RehearsalMemory(20, seed=5)
    mem.add_reservoir(stream(50))
    mem.draw(7)
    copy = RehearsalMemory(20, seed=0)
    copy.load_state_dict(mem.state_dict())
    assert torch.equal(copy.draw(7), mem.draw(7))  # the sampling generator continues where it was
    more = stream(30, start=50)
    mem.add_reservoir(more)
    copy.add_reservoir(more)
    assert torch.equal(copy.data["x"], mem.data["x"])  # and so does the insertion generator
    drawn = mem.draw(40)
    assert len(drawn) == 20 and len(drawn.unique()) == 20  # at most the memory, without repetition
    with pytest.raises(ValueError, match="memory_size=0"):
        RehearsalMemory(0)
    with pytest.raises(ValueError, match="memory_size=3 differs"):
        RehearsalMemory(3).load_state_dict(mem.state_dict())
