"""benchmarks/authors_mark.py and its shim without the authors' checkout: overrides, command, parsing, table."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from cl_lightning.config import compose
from tests.helpers.scripts import load_script

am = load_script("authors_mark")
shim = load_script("authors_mark_shim")


def test_ours_overrides_compose_to_the_setting_and_their_network():
    s = am.SETTINGS["short"]
    cfg = compose(am.ours_overrides(s, 1))
    init, bench = cfg["method"]["init_args"], cfg["benchmark"]["init_args"]
    assert cfg["seed"] == 1
    assert (bench["train_samples_per_task"], bench["batch_size"], bench["scenario"]) == (1000, 64, "task")
    assert init["kb_channels"] == [64, 128, 256] and init["feature_channels"] == [32, 32]
    assert init["latent_dim"] == 64 and init["mask_activation"] == "relu"
    assert all(init[k] == 3 for k in ("feature_epochs", "pretrain_epochs", "mask_epochs", "final_epochs"))
    assert (init["meta_steps"], init["lr"], init["outer_lr"], init["outer_weight_decay"]) == (5, 0.1, 0.001, 0.1)
    (plugin,) = init["plugins"]
    p = plugin["init_args"]
    assert (p["mini_tasks"], p["inner_steps"], p["inner_lr"], p["sign"], p["vectorised"]) == (5, 20, 0.01,
                                                                                             "official", False)
    full = compose(am.ours_overrides(am.SETTINGS["authors"], 0))["method"]["init_args"]
    assert (full["latent_dim"], full["mask_epochs"], full["meta_steps"]) == (128, 50, 10)
    assert full["plugins"][0]["init_args"]["mini_tasks"] == 10 and full["plugins"][0]["init_args"]["inner_steps"] == 40


def test_authors_command_passes_the_same_budget():
    s = am.SETTINGS["short"]
    cmd = am.authors_command("/v/python", "/ext/mark", s, 2, Path("/d/x.pt"), Path("/r/run"))
    assert cmd[:2] == ["/v/python", str(am.SHIM)]
    flag = {cmd[i]: cmd[i + 1] for i in range(2, len(cmd) - 1, 2)}
    assert flag["--seed"] == "2" and flag["--batch-size"] == "64" and flag["--latent-dim"] == "64"
    assert (flag["--feats-epochs"], flag["--meta-epochs"], flag["--mini-tasks"], flag["--inner-loop"]) == (
        "3", "5", "5", "20")
    assert (flag["--use-relu"], flag["--lr-task"], flag["--lr-meta"]) == ("1", "0.1", "0.01")


def test_summarise_counts_unlearnt_tasks_and_gem_bwt():
    R = [[99.0, 0, 0], [98.0, 50.5, 0], [97.0, 50.5, 90.0]]
    s = am.summarise(R)
    assert s["after"] == [97.0, 50.5, 90.0] and s["acc"] == pytest.approx(79.1666, abs=1e-3)
    assert s["bwt"] == pytest.approx(-1.0)  # ((97 - 99) + (50.5 - 50.5)) / 2
    assert s["unlearnt"] == [1]
    with pytest.raises(ValueError, match="square"):
        am.summarise([[1.0, 2.0], [3.0]])


def test_authors_log_parsed_and_table_built_from_stored_records(tmp_path):
    raw = {"R": [[0.99, 0.0], [0.98, 0.5]], "acc": 0.74, "bwt": -0.01, "wall_seconds": 12.5}
    out = am.parse_authors_log("Mask Training: ...\nauthors-shim result " + json.dumps(raw) + "\n")
    assert [pytest.approx(r) for r in out["R"]] == [[99.0, 0.0], [98.0, 50.0]] and out["wall_s"] == 12.5
    with pytest.raises(ValueError, match="no 'authors-shim result'"):
        am.parse_authors_log("nothing\n")
    for seed, (a, b) in enumerate([(99.0, 50.0), (97.0, 95.0)]):
        for side in am.SIDES:
            rec = {"setting": "short", "seed": seed, "side": side, "R": [[a, 0.0], [a, b]], "wall_s": 10.0}
            (tmp_path / f"{am.run_name('short', seed, side)}.json").write_text(json.dumps(rec))
    text = am.table(am.load_all(tmp_path))
    assert "| authors | 0 | 99.00 | 50.00 | 74.50 | 0.00 | 1 | 10 |" in text
    assert "| **ours, mean ± sd** | 0,1 | 98.00 ± 1.41 | 72.50 ± 31.82 | **85.25 ± 15.20** |" in text
    assert "1 of 4" in text
    diverged = {"setting": "short", "seed": 2, "side": "ours", "R": None,
                "diverged": "MARK's meta-update diverged at task 0, outer step 4"}
    (tmp_path / f"{am.run_name('short', 2, 'ours')}.json").write_text(json.dumps(diverged))
    text = am.table(am.load_all(tmp_path))
    assert "| ours | 2 | - | - | - | - | all: MARK's meta-update diverged at task 0, outer step 4 | - |" in text
    assert "| **ours, mean ± sd** | 0,1 | 98.00 ± 1.41 | 72.50 ± 31.82 | **85.25 ± 15.20** |" in text
    assert "1 of 4; 1 of 3 runs diverged, not in the mean" in text


def test_shim_loader_has_their_shape_and_config_changes_only_the_named_keys(tmp_path):
    tasks = [{"name": f"t{t}", "train_x": torch.rand(5, 1, 28, 28), "train_y": torch.tensor([0, 1, 0, 1, 1]),
              "test_x": torch.rand(3, 1, 28, 28), "test_y": torch.tensor([1, 0, 1])} for t in range(2)]
    shim.DATA.clear()
    shim.DATA.update({"tasks": tasks, "classes_per_task": 2, "input_shape": [1, 28, 28]})
    gen = shim.SplitMNISTGen(SimpleNamespace(batch_size=4, ntasks=2))
    assert gen.taskcla == [[0, 2], [1, 2]] and gen.inputsize == [1, 28, 28]
    got = gen.get(1)
    assert set(got[1]) == {"train", "valid", "test", "name"} and got[1]["name"] == "t1"
    x, y, feats = next(iter(got[1]["valid"]))
    assert x.shape == (4, 1, 28, 28) and torch.equal(x, feats) and torch.equal(y, tasks[1]["train_y"][:4])
    assert len(got[1]["test"].dataset) == 3
    with pytest.raises(ValueError, match="ntasks"):
        shim.SplitMNISTGen(SimpleNamespace(batch_size=4, ntasks=5))

    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "config_cifar100.yml").write_text(
        'experiment: "cifar100"\nseed: 48\nnum_runs: 3\nntasks: 20\nbatch_size: 128\nlatent_dim: 128\n'
        "lr_task: 0.1\nlr_meta: 0.01\nuse_relu: True\nworkers: 4\n")
    opts = SimpleNamespace(seed=1, batch_size=64, latent_dim=64, lr_task=None, lr_meta=0.01)
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(shim.write_config(str(tmp_path), str(tmp_path), opts))
    assert (cfg.seed, cfg.num_runs, cfg.ntasks, cfg.batch_size, cfg.latent_dim, cfg.workers) == (1, 1, 2, 64, 64, 0)
    assert (cfg.experiment, cfg.lr_task, cfg.lr_meta, cfg.use_relu) == ("cifar100", 0.1, 0.01, True)


def test_kb_widths_reach_their_shared_and_private_only_when_changed():
    wide = am.authors_command("p", "c", am.SETTINGS["short"], 0, Path("/d"), Path("/r"))
    assert "--kb-channels" not in wide  # their Net's own 64/128/256
    narrow = am.authors_command("p", "c", am.SETTINGS["short_kb16"], 0, Path("/d"), Path("/r"))
    i = narrow.index("--kb-channels")
    assert narrow[i + 1: i + 4] == ["16", "32", "32"]
    assert compose(am.ours_overrides(am.SETTINGS["short_kb16"], 0))["method"]["init_args"]["kb_channels"] == [16, 32,
                                                                                                             32]
    seen = {}

    class Shared:
        def __init__(self, args, hiddens):
            seen["shared"] = hiddens

    class Private:
        def __init__(self, args, hiddens, layers):
            seen["private"] = (hiddens, layers)

    conv = SimpleNamespace(Shared=Shared, Private=Private)
    shim.set_kb_channels(conv, [16, 32, 32])
    Shared(None, [64, 128, 256, 512, 512])
    Private(None, [64, 128, 256, 512, 512], 3)
    assert seen == {"shared": [16, 32, 32, 512, 512], "private": ([16, 32, 32, 512, 512], 3)}


def test_a_diverged_run_of_ours_is_recorded_where_it_diverged(monkeypatch, tmp_path):
    import benchmarks.common

    def diverge(cfg):
        raise FloatingPointError("MARK's meta-update diverged at task 0, outer step 4: the inner loops gave inf")

    monkeypatch.setattr(benchmarks.common, "timed_run", diverge)
    out = am.run_ours(SimpleNamespace(cl_data_dir=tmp_path), am.SETTINGS["short_kb16"], 1)
    assert out["R"] is None and out["diverged"] == "MARK's meta-update diverged at task 0, outer step 4"
    assert "seed=1" in out["command"]
