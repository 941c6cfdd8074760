"""The seams plugins and methods are written against: a plugin's host contract is checked when the method
binds to a benchmark, required plugins follow one policy, every method's loss counts its errors, and class
paths from before the plugins and benchmarks moved under ``cl_lightning`` still load."""

from __future__ import annotations

import pytest
import torch
import yaml

from cl_lightning.callback import ContinualCallback, TaskLoss
from cl_lightning.callbacks import EWC, MaskBasisFreezing, OutputRegularizer
from cl_lightning.callbacks.ari_consolidation import ARIConsolidation
from cl_lightning.config import compose, import_class, instantiate, validate
from cl_lightning.datamodule import ContinualDataModule
from cl_lightning.datamodules import SplitMNIST
from cl_lightning.experiment import resolve_config
from cl_lightning.methods import HNET, ContinualModule, SupSup
from cl_lightning.nets import MLP
from cl_lightning.tasks import BenchmarkInfo, Scenario, Task


def info(scenario: Scenario = Scenario.TASK_IL) -> BenchmarkInfo:
    return BenchmarkInfo("toy", tuple(Task(i, f"t{i}") for i in range(2)), scenario, (4,), 2)


@pytest.mark.parametrize(("method", "plugin", "named"), [
    (lambda p: ContinualModule(backbone=MLP(hidden_sizes=(8,)), plugins=[p]), OutputRegularizer(),
     "HypernetworkHost (hypernetwork, embeddings, generate)"),
    (lambda p: SupSup(plugins=[p]), MaskBasisFreezing(), "MaskBasisHost (num_basis_tasks, basis_frozen, is_alpha_task"),
    (lambda p: ContinualModule(backbone=MLP(hidden_sizes=(8,)), plugins=[p]), ARIConsolidation(),
     "ARIHost (estimator, estimator_fitted, candidates"),
])
def test_a_plugin_on_a_method_without_its_host_contract_is_named_at_bind_time(method, plugin, named):
    model = method(plugin)
    with pytest.raises(ValueError, match="plugins:") as err:
        model.setup_tasks(info())
    assert named in str(err.value) and type(model).__name__ in str(err.value)


def test_the_host_contract_is_met_by_the_method_it_was_written_for():
    model = HNET(target=MLP(hidden_sizes=(8,)), plugins=[OutputRegularizer()])
    model.setup_tasks(info())  # no error
    assert OutputRegularizer.host is not None and not model.plugins[0].check_host(model)


def test_required_plugins_are_added_once_and_duplicates_named():
    from cl_lightning.methods import ImpressLearn

    assert [type(p) for p in ImpressLearn().plugins] == [MaskBasisFreezing]
    kept = MaskBasisFreezing(verify=False)
    assert ImpressLearn(plugins=[kept]).plugins == [kept]  # the configured one, not a second
    with pytest.raises(ValueError, match="takes one MaskBasisFreezing, got 2"):
        ImpressLearn(plugins=[MaskBasisFreezing(), MaskBasisFreezing()])


class _BareLoss(ContinualModule):
    def task_loss(self, batch):  # the old contract: a bare tensor, no logits to count errors from
        x, y, t = batch
        return self.criterion(self(x, t), y)


class _OwnLoss(ContinualModule):
    def task_loss(self, batch):
        x, y, t = batch
        out = self(x, t)
        return TaskLoss(torch.nn.functional.cross_entropy(out, y) * 2.0, out, y)


def test_every_method_loss_counts_its_errors_and_a_bare_tensor_is_refused():
    batch = (torch.randn(6, 4), torch.tensor([0, 1, 0, 1, 0, 1]), torch.zeros(6, dtype=torch.long))
    own = _OwnLoss(backbone=MLP(hidden_sizes=(8,)))
    own.setup_tasks(info())
    own.train()
    with torch.enable_grad():
        own.training_objective(batch)
    logits = own(batch[0], batch[2])
    assert own.step_samples == 6 and int(own.step_wrong) == int((logits.argmax(1) != batch[1]).sum())
    bare = _BareLoss(backbone=MLP(hidden_sizes=(8,)))
    bare.setup_tasks(info())
    with pytest.raises(TypeError, match="_BareLoss.task_loss must return a TaskLoss"):
        bare.training_objective(batch)


class _SeesTheStep(ContinualCallback):
    def __init__(self):
        super().__init__()
        self.seen: TaskLoss | None = None

    def penalty(self, module, batch, step=None):
        self.seen = step
        return None


def test_plugins_get_the_method_loss_of_the_step():
    spy = _SeesTheStep()
    model = ContinualModule(backbone=MLP(hidden_sizes=(8,)), plugins=[spy])
    model.setup_tasks(info())
    total, _ = model.training_objective((torch.randn(3, 4), torch.tensor([0, 1, 1]), torch.zeros(3, dtype=torch.long)))
    assert spy.seen is not None and spy.seen.value is total and spy.seen.logits.shape == (3, 2)


def _old_paths(tree):
    """The config as written before the move: ``callbacks.*`` and ``datamodules.*`` class paths."""
    text = yaml.safe_dump(tree, sort_keys=False)
    return yaml.safe_load(text.replace("cl_lightning.callbacks.", "callbacks.")
                          .replace("cl_lightning.datamodules.", "datamodules."))


def test_old_class_paths_still_build(tmp_path):
    cfg = _old_paths(compose(["method=ewc", "benchmark=split_mnist", f"data_dir={tmp_path}"]))
    assert cfg["benchmark"]["class_path"] == "datamodules.SplitMNIST"
    assert cfg["method"]["init_args"]["plugins"][0]["class_path"] == "callbacks.EWC"
    validate(cfg)
    assert isinstance(instantiate(cfg["benchmark"]), SplitMNIST)
    assert isinstance(instantiate(cfg["method"]).plugins[0], EWC)
    assert import_class("datamodules.base.ContinualDataModule", "x") is ContinualDataModule  # the moved contract


def test_a_run_folder_saved_with_old_class_paths_resumes(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    saved = _old_paths(compose(["method=ewc", "benchmark=split_mnist", "benchmark.num_tasks=5"]))
    (run_dir / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    cfg = resolve_config([f"resume={run_dir}", "logger=none"])
    validate(cfg)
    assert isinstance(instantiate(cfg["method"]).plugins[0], EWC)


def test_a_project_own_top_level_package_is_not_redirected(tmp_path, monkeypatch):
    """The alias only applies to modules the package has: a project's own ``callbacks.mine`` loads as written."""
    (tmp_path / "callbacks").mkdir()
    (tmp_path / "callbacks" / "__init__.py").write_text("")
    (tmp_path / "callbacks" / "mine.py").write_text("class Mine:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert import_class("callbacks.mine.Mine", "x").__module__ == "callbacks.mine"


def test_the_cli_imports_every_module_of_a_plugin_folder(tmp_path, monkeypatch):
    """A file dropped into a plugin folder is found by LightningCLI without an import added anywhere."""
    import sys

    from cl_lightning.cli import import_every_module

    folder = tmp_path / "dropin"
    folder.mkdir()
    (folder / "__init__.py").write_text("")
    (folder / "my_plugin.py").write_text(
        "from cl_lightning.callback import ContinualCallback\n\nclass MyPlugin(ContinualCallback):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import dropin

    import_every_module(dropin)
    assert "dropin.my_plugin" in sys.modules
    assert any(c.__name__ == "MyPlugin" for c in ContinualCallback.__subclasses__())


def test_a_required_plugin_the_config_must_give_is_named_with_its_settings():
    from cl_lightning.callbacks import RehearsalPlugin
    from cl_lightning.methods import GDumb, ICaRL

    with pytest.raises(ValueError, match="ICaRL needs exactly one ICaRLExemplars .the config gives none"):
        ICaRL(MLP(hidden_sizes=(8,)))
    with pytest.raises(ValueError, match="insertion: task_end and balance: class; RehearsalPlugin has insertion: "
                                         "reservoir"):
        GDumb(MLP(hidden_sizes=(8,)), plugins=[RehearsalPlugin(10, insertion="reservoir", balance="class")])
    memory = RehearsalPlugin(10, insertion="task_end", balance="class")
    model = GDumb(MLP(hidden_sizes=(8,)), plugins=[memory])
    assert model.plugins == [memory] and model.plugin_of(RehearsalPlugin) is memory


def test_no_module_of_the_package_imports_itself_back():
    """Module-level, function-level and TYPE_CHECKING imports alike: no cycle among cl_lightning's modules."""
    import ast
    from pathlib import Path

    import cl_lightning

    root = Path(cl_lightning.__file__).parent
    names = {".".join(p.relative_to(root.parent).with_suffix("").parts).removesuffix(".__init__"): p
             for p in root.rglob("*.py")}
    edges: dict[str, set[str]] = {}
    for name, path in names.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                found |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
        # a package's own submodules and its parents are Python's package mechanics, not a dependency
        edges[name] = {t for t in found if t in names and t != name and not name.startswith(t + ".")
                       and not t.startswith(name + ".")}

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for nxt in edges[start]:
            if nxt == goal or (nxt not in seen and (seen.add(nxt) or reaches(nxt, goal, seen))):
                return True
        return False

    cycles = sorted(f"{a} -> {b}" for a in edges for b in edges[a] if reaches(b, a, set()))
    assert not cycles, f"import cycles: {cycles}"
