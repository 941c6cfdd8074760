"""benchmarks/authors_supsup.py and its shim without the authors' checkout: commands, overrides, parsing, scores."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cl_lightning.config import compose
from tests.helpers.scripts import load_script

aus = load_script("authors_supsup")
shim = load_script("authors_supsup_shim")


def test_authors_command_sets_only_seed_budget_and_angles():
    cmd = aus.authors_command("/v/python", "/ext/supsup", 3, 10, 18.0, 469, 1, Path("/data"), Path("/logs/x"))
    assert cmd[:2] == ["/v/python", str(aus.SHIM)]
    flag = {cmd[i]: cmd[i + 1] for i in range(2, len(cmd) - 1) if cmd[i].startswith("--")}
    assert flag["--seed"] == "3" and flag["--num-tasks"] == "10" and flag["--angle-step"] == "18"
    assert flag["--iter-lim"] == "469" and flag["--epochs"] == "1" and flag["--checkout"] == "/ext/supsup"
    assert cmd[-1] == "--eval-ckpts"  # no intermediate GN tests: only after the last task
    with pytest.raises(ValueError, match="whole degrees"):
        aus.authors_command("p", "c", 0, 10, 17.5, 469, 1, Path("/d"), Path("/l"))


def test_ours_overrides_compose_to_the_same_tasks_angles_and_steps():
    default = compose(aus.ours_overrides("default", 0, 10, 18.0, 469))
    assert default["benchmark"]["init_args"]["angles"] == [0, 18, 36, 54, 72, 90, 108, 126, 144, 162]
    assert default["trainer"]["max_steps"] == 469 and default["trainer"]["max_epochs"] == -1
    assert default["method"]["init_args"]["optimizer"] == "adam"  # as configured
    theirs = compose(aus.ours_overrides("authors", 0, 10, 18.0, 469))
    init = theirs["method"]["init_args"]
    assert init["backbone"]["init_args"]["hidden_sizes"] == [1024, 1024]
    assert (init["output_neurons"], init["task_inference"], init["optimizer"], init["lr"]) == (200, "binary",
                                                                                                "rmsprop", 1e-4)
    assert theirs["benchmark"]["init_args"]["pixels"] == "standard"
    assert theirs["benchmark"]["init_args"]["angles"] == default["benchmark"]["init_args"]["angles"]
    assert theirs["trainer"]["max_steps"] == 469 and theirs["trainer"]["max_epochs"] == -1
    # the experiment file alone is the same run: its evenly spaced angles and one epoch are 10 x 18 degrees, 469 steps
    shipped = compose(["experiment=supsup_rotated_mnist_gn", "logger=none"])
    assert shipped["method"] == theirs["method"]
    assert shipped["benchmark"]["init_args"]["angles"] is None and shipped["trainer"]["max_epochs"] == 1
    with pytest.raises(ValueError, match="setting"):
        aus.ours_overrides("paper", 0, 10, 18.0, 469)


def test_authors_log_parsed_to_percentages():
    raw = {"num_tasks": 2, "gg": [0.9, 0.8], "gn": {}, "wall_seconds": 12.5, "acc": [0.9, 0.4],
           "acc_unshared": [0.9, 0.1], "task_inference": [1.0, 0.25]}
    log = "Train Epoch: 1\nauthors-shim gn {}\nauthors-shim result " + json.dumps(raw) + "\n"
    out = aus.parse_authors_log(log)
    assert out["acc"] == pytest.approx(65.0) and out["acc_unshared"] == pytest.approx(50.0)
    assert out["task_inference"] == pytest.approx([100.0, 25.0]) and out["gg"] == pytest.approx([90.0, 80.0])
    assert out["wall_s"] == 12.5
    with pytest.raises(ValueError, match="no 'authors-shim result'"):
        aus.parse_authors_log("Train Epoch: 1\n")
    no_gn = {"num_tasks": 2, "gg": [0.9, 0.8], "gn": {}, "wall_seconds": 1.0}
    with pytest.raises(ValueError, match="no GN evaluation"):
        aus.parse_authors_log("authors-shim result " + json.dumps(no_gn))


def test_gn_scores_count_wrong_tasks_both_ways():
    # task 1, three batches: inferred 1, 0, 1; predictions right on 2/2, 1/2, 0/2 of the labels
    targets = [torch.tensor([3, 4]), torch.tensor([5, 6]), torch.tensor([7, 8])]
    records = [(1, torch.tensor([3, 4])), (0, torch.tensor([5, 0])), (1, torch.tensor([0, 0]))]
    s = shim.gn_scores(1, targets, records, dataset_size=6)
    assert s["task_inference"] == pytest.approx(2 / 3)
    assert s["acc"] == pytest.approx(3 / 6)  # every batch with the mask it inferred (as ours)
    assert s["acc_unshared"] == pytest.approx(2 / 6)  # their unshared_labels: the wrong-task batch counts 0
    assert s["inferred"] == [1, 0, 1]
    with pytest.raises(RuntimeError, match="classified batches"):
        shim.gn_scores(1, targets, records[:2], dataset_size=6)


def test_recording_loader_keeps_labels_and_the_dataset():
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(5, 1), torch.arange(5)),
                                         batch_size=2)
    kept: list[torch.Tensor] = []
    wrapped = shim._RecordingLoader(loader, kept)
    assert len(wrapped) == 3 and wrapped.dataset is loader.dataset
    assert [y.tolist() for _, y in wrapped] == [[0, 1], [2, 3], [4]]
    assert [y.tolist() for y in kept] == [[0, 1], [2, 3], [4]]


def test_table_one_line_per_side():
    recs = [{"seed": 0, "tasks": 10, "angle_step": 18.0, "iters": 469, "side": side, "acc": acc,
             "acc_unshared": un, "task_inference": ti, "wall_s": 100.0}
            for side, acc, un, ti in [("ours-default", 73.0, None, [100.0, 50.0]),
                                      ("authors", 80.0, 75.0, [90.0, 70.0])]]
    out = aus.table(recs).splitlines()
    assert out[2] == "| 10 x 18° | 469 | 0 | authors | 80.00 | 75.00 | 80.0; 70.0 | 100 |"
    assert out[3] == "| 10 x 18° | 469 | 0 | ours-default | 73.00 | — | 75.0; 50.0 | 100 |"
