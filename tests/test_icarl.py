"""iCaRL: herding picks what its definition picks, the memory is class-balanced within its budget, the
nearest-mean-of-exemplars classifier is what it says, and iCaRL beats fine-tuning in class-IL."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from cl_lightning.callbacks import ICaRLExemplars
from cl_lightning.callbacks.icarl import herding_order, normalized_features
from cl_lightning.datamodules import SplitMNIST
from cl_lightning.methods import ContinualModule, ICaRL
from cl_lightning.nets import MLP
from tests.helpers.run import run_tasks


def test_herding_on_a_hand_made_set():
    # mean 2.25; k=1: 2 is closest; k=2: (2+1)/2=1.5 beats (2+0)/2 and (2+6)/2; k=3: (3+6)/3=3 beats (3+0)/3=1
    x = torch.tensor([[0.0], [1.0], [2.0], [6.0]])
    assert herding_order(x, 4).tolist() == [2, 1, 3, 0]  # nearest-to-the-mean would give [2, 1, 0, 3]
    assert herding_order(x, 2).tolist() == [2, 1]


def test_herding_matches_the_definition_on_random_features():
    g = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(40, 5, generator=g), dim=1)
    mu, chosen = x.mean(0), []
    for k in range(1, 11):  # the definition, written out: argmin over unchosen i of |mu - (phi_i + S) / k|
        best = min((i for i in range(40) if i not in chosen),
                   key=lambda i: float((mu - (x[i] + sum((x[j] for j in chosen), torch.zeros(5))) / k).norm()))
        chosen.append(best)
    assert herding_order(x, 10).tolist() == chosen


def test_icarl_rejects_a_missing_exemplar_plugin():
    with pytest.raises(ValueError, match="ICaRLExemplars"):
        ICaRL(MLP(hidden_sizes=[8]))


def test_icarl_beats_finetune_in_class_il_with_a_balanced_memory(mnist_root, tmp_path):
    def dm():
        return SplitMNIST(data_dir=str(mnist_root), scenario="class", train_samples_per_task=2000, batch_size=32)

    L.seed_everything(0, verbose=False)
    ft = run_tasks(ContinualModule(MLP(hidden_sizes=[100, 100])), dm(), tmp_path / "ft")
    plugin = ICaRLExemplars(memory_size=205, batch_size=32)
    L.seed_everything(0, verbose=False)
    model = ICaRL(MLP(hidden_sizes=[100, 100]), plugins=[plugin])
    got = run_tasks(model, dm(), tmp_path / "icarl")
    assert got["ACC"] > ft["ACC"] + 0.4 and got["BWT"] > ft["BWT"] + 0.5
    counts = torch.bincount(plugin.memory.data["y"], minlength=10)
    assert int(counts.sum()) == 205 and counts.tolist() == [21] * 5 + [20] * 5  # the remainder to the first
    # the last task's exemplars of class 8 are the head of its herding order over that class's features
    data = dm()
    data.setup()
    split = data.split(4, "train")
    rows = (split.y == 8).nonzero().squeeze(1)
    feats = normalized_features(model, split[rows][0])
    expected = split[rows[herding_order(feats, 20)]][0]
    assert torch.equal(plugin.memory.data["x"][plugin.memory.data["y"] == 8], expected)
    # nearest mean of exemplars: the prediction is the class whose normalised mean feature is closest
    x = split[rows[:5]][0]
    with torch.no_grad():
        feats = F.normalize(model.backbone(x), dim=1)
        by_hand = torch.cdist(feats, plugin.means).argmin(1)
        assert torch.equal(model.predict_for_eval(x, torch.zeros(5, dtype=torch.long)).argmax(1), by_hand)
