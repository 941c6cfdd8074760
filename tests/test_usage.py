"""``python train.py --help``: the override syntax, every group's choices with their summaries; with a choice,
its keys with the values this command line would use and their docs."""

from __future__ import annotations

import pytest

from cl_lightning.config import CONFIG_DIR, available
from cl_lightning.experiment import main
from cl_lightning.usage import summary_line


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CL_LIGHTNING_RUN_DIR", raising=False)
    monkeypatch.setenv("COLUMNS", "120")  # --help fits the terminal's width: the same width whatever runs the test


def help_of(*args, capsys) -> str:
    assert main([*args, "--help"]) == 0
    out = capsys.readouterr().out
    return out


def test_help_lists_the_syntax_and_every_choice_with_its_summary(capsys, tmp_path):
    out = help_of(capsys=capsys)
    for words in ("method.lr=0.01", "method.plugins.EWC.strength", "init_args", "-m KEY=V1,V2", "sweep.parallel",
                  "resume=SWEEP_FOLDER", "cl-lightning report"):
        assert words in out, words
    lines = out.splitlines()
    for group in ("method", "benchmark", "experiment", "trainer", "logger"):
        choices = available(group)
        assert choices, group
        for name in choices:
            line = next(x for x in lines if x.split()[:1] == [name] or x.split()[:2] == ["*", name])
            assert summary_line(CONFIG_DIR / group / f"{name}.yaml")[:40] in line, (group, name)
    assert any(x.split()[:2] == ["*", "hnet"] for x in lines)  # the default is marked
    assert summary_line(CONFIG_DIR / "method/ewc.yaml").startswith("EWC (Kirkpatrick")
    assert not any(tmp_path.iterdir())  # help trains nothing and writes nothing


def test_help_of_a_choice_shows_its_keys_values_and_docs(capsys):
    out = help_of("method=hnet", "method.lr=0.5", capsys=capsys)
    lines = out.splitlines()

    def doc_of(key_value):
        i = next(i for i, x in enumerate(lines) if x.strip().startswith(key_value))
        return lines[i + 1].strip()

    assert out.startswith("method=hnet: Task-conditioned hypernetwork")
    assert "cl_lightning.methods.hnet.HNET" in out
    assert "per-task optimizer" in doc_of("method.lr=0.5 ")  # the value this command line would run with
    assert "size of the task embeddings" in doc_of("method.hypernetwork.embedding_dim=96 ")
    assert "weight of the output regularizer" in doc_of("method.plugins.OutputRegularizer.beta=0.01 ")
    assert "method.target.hidden_sizes=[400, 400]" in out
    assert "benchmark.num_tasks" not in out  # only the group asked about

    out = help_of("experiment=hnet_split_mnist_cl1", capsys=capsys)
    assert out.startswith("experiment=hnet_split_mnist_cl1: von Oswald") and "benchmark.num_tasks=5" in out
    out = help_of("trainer=ddp", capsys=capsys)
    assert "trainer.strategy=ddp" in out and "trainer.max_steps=-1" in out and "trainer.callbacks" not in out


def test_help_of_an_unknown_choice_names_it(capsys):
    assert main(["method=hent", "--help"]) == 2
    assert "unknown method 'hent': did you mean 'hnet'" in capsys.readouterr().err
