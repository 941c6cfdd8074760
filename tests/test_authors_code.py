"""benchmarks/authors_code.py without the authors' checkout: their summary parsed, commands built, the table."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from tests.helpers.scripts import load_script

ac = load_script("authors_code")

# The head of a real performance_overview.txt (HNET+ENT S-CL3, seed 0, 500 steps, this machine).
SUMMARY = """acc_after_list tensor(88.2270) tensor(47.7963) tensor(89.0075) tensor(67.9758) tensor(39.9395)
acc_during_list tensor(99.9054) tensor(89.4711) tensor(92.1558) tensor(72.2558) tensor(39.9395)
acc_after_mean 66.589203
acc_during_mean 78.745529
overall_task_infer_accuracy_list tensor([69.1000]) tensor([62.8000], device='cuda:0') tensor(1.5e+01)
acc_task_infer_mean 66.589203
num_train_iter 500
"""
LOG = "Overall mean acc:  tensor(66.5892)\nProgram finished successfully.\nauthors-shim wall_seconds 353.9\n"


def test_summary_parsed_from_tensor_prints():
    result = ac.authors_result(SUMMARY, LOG)
    assert result["acc"] == pytest.approx(66.589203)
    assert result["after"] == pytest.approx([88.2270, 47.7963, 89.0075, 67.9758, 39.9395])
    assert result["during"][0] == pytest.approx(99.9054) and len(result["during"]) == 5
    # "cuda:0" in a device string must not become a number
    assert result["task_inference"] == pytest.approx([69.1, 62.8, 15.0])
    assert result["wall_s"] == pytest.approx(353.9)
    assert ac.parse_wall("no such line") is None


def test_summary_without_accuracies_is_refused():
    with pytest.raises(ValueError, match="acc_after_list"):
        ac.parse_summary("acc_during_list tensor(1.0)\nacc_after_mean 1.0\n")


def test_commands_for_each_row():
    cmd = ac.authors_command("/venv/bin/python", "/ext/hypercl", "hnet_ent_cl3", 2, 500, Path("/d"), Path("/o"))
    assert cmd[:2] == ["/venv/bin/python", str(ac.SHIM)]
    rest = cmd[cmd.index("--") + 1:]
    assert rest == ["--cl_scenario", "3", "--infer_task_id", "--infer_with_entropy", "--random_seed", "2",
                    "--out_dir", "/o"]
    assert cmd[cmd.index("--steps") + 1] == "500" and cmd[cmd.index("--checkout") + 1] == "/ext/hypercl"
    r = ac.authors_command("py", "c", "hnet_r_cl3", 0, 500, Path("/d"), Path("/o"))
    assert "--infer_task_id" not in r and r[r.index("--") + 1:r.index("--") + 3] == ["--cl_scenario", "3"]
    tir = ac.authors_command("py", "c", "hnet_tir_cl3", 0, 500, Path("/d"), Path("/o"))
    assert "--infer_task_id" in tir and "--infer_with_entropy" not in tir
    assert ac.ours_overrides("hnet_tir_cl3", 1, 500) == [
        "experiment=hnet_tir_split_mnist_cl3", "seed=1", "trainer.max_steps=500", "logger=none"]
    for row in ac.ROWS.values():  # each named experiment config exists
        assert (ac.REPO / "configs" / "experiment" / f"{row.experiment}.yaml").exists()


def test_data_gzipped_in_their_layout(tmp_path):
    raw = tmp_path / "cl" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ac.MNIST_FILES:
        (raw / name).write_bytes(name.encode())
    dest = ac.prepare_data(tmp_path / "cl", tmp_path / "out")
    for name in ac.MNIST_FILES:
        assert gzip.decompress((dest / "MNIST" / f"{name}.gz").read_bytes()) == name.encode()
    with pytest.raises(SystemExit, match="missing"):
        ac.prepare_data(tmp_path / "nothing", tmp_path / "out2")


def test_table_pairs_sides_by_seed():
    recs = [{"row": "hnet_r_cl3", "steps": 500, "seed": s, "side": side, "acc": acc, "wall_s": 10.0}
            for s, side, acc in [(0, "authors", 92.0), (0, "ours", 87.0), (1, "authors", 94.0), (1, "ours", 89.0)]]
    out = ac.table(recs)
    assert "| HNET+R S-CL3 | 500 | 0 | 95.30 ± 0.13 | 92.00 | 87.00 | 10 / 10 |" in out
    assert "| 93.00 ± 1.41 | 88.00 ± 1.41 |" in out
