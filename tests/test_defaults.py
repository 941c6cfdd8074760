"""``python train.py method=<m>`` on the default benchmark runs in the method's first supported scenario when the
benchmark's own default is one it cannot run; a scenario the user or an experiment chose is kept."""

from __future__ import annotations

import pytest

from cl_lightning.config import compose


@pytest.mark.parametrize(("method", "scenario"), [("icarl", "class"), ("er_ace", "class"), ("hnet_tir", "domain"),
                                                  ("mark", "task"), ("finetune", "task")])
def test_the_scenario_follows_the_method_unless_one_is_chosen(method, scenario):
    assert compose([f"method={method}"])["benchmark"]["init_args"]["scenario"] == scenario
    assert compose([f"method={method}", "benchmark.scenario=domain"])["benchmark"]["init_args"]["scenario"] == "domain"
