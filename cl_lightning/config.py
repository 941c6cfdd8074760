"""Config composition, validation and instantiation for ``train.py``.

One format for both front doors: YAML whose objects are ``class_path`` / ``init_args`` nodes
(LightningCLI's own format). ``train.py`` composes ``configs/train.yaml`` with the chosen group files
(``benchmark=``, ``method=``, ``trainer=``, ``logger=``, ``experiment=``) and OmegaConf dotlist
overrides, then checks every key against the signatures of the classes it names, so a typo fails
before any training with the nearest valid names.

An experiment file may build on another (``defaults: {experiment: <name>}``): the other's groups and values
first, then its own, so a benchmark row that differs from another in a few keys is a few lines.

Override paths may skip ``init_args``: ``method.lr=0.01`` means ``method.init_args.lr=0.01``, and a list
of objects can be indexed by class name: ``method.plugins.EWC.strength=100``.

Why these checks are ours and not jsonargparse's (a dependency already: LightningCLI, ``cl-lightning``). The same
bad inputs were given to both front doors (jsonargparse 4.53, ``python -m cl_lightning --model
configs/method/ewc.yaml --data configs/benchmark/split_mnist.yaml ...`` against ``python train.py method=ewc ...``):

- wrong key: jsonargparse printed its 60-line usage, then ``Parser key "data": Does not validate against any of
  the Union subtypes ... Problem with given class_path 'cl_lightning.datamodules.SplitMNIST': Option 'batch_sise'
  is not accepted``: the key, but neither the nearest names nor the valid ones. Ours: ``unknown key
  benchmark.batch_sise for SplitMNIST: did you mean 'batch_size', 'eval_batch_size'? Valid: ...``. A misspelt
  plugin key in a method file came two Union blocks deep with the whole method node printed back.
- a misspelt Trainer key (``--trainer.max_epoch 2``) was taken as ``max_epochs`` (argparse's prefix matching) and
  the run trained; ours: ``unknown key trainer.max_epoch for lightning.Trainer: did you mean 'max_epochs', ...``.
- wrong type: ``Parser key "lr": Expected a <class 'float'>. Got value: abc`` (inside the same Union block):
  the key, value and type, as ours (``method.lr='abc' must be float``). But its checker also converts where
  ours refuses: of 10 annotations x 10 values, 8 pairs differ (``'1'`` for ``int`` becomes 1, ``'true'`` for
  ``bool`` True, ``'1e-3'`` for ``float | str`` 0.001, ``[1, 2]`` for ``tuple[int, int]`` a tuple, ``1`` for
  ``float`` 1.0), so using it would change what a config may say and the values a run gets.
- missing file: ``--model configs/method/ewcc.yaml`` gave ``Expected a path but configs/method/ewcc.yaml either
  not accessible or invalid`` and ``Unexpected import path format``; ours: ``unknown method 'ewcc': did you mean
  'ewc'? Valid: ...``. (``--config missing.yaml``: ``File does not exist: '<path>'``, as clear; but our groups
  are names of files under ``configs/``, and jsonargparse knows no such groups nor ``experiment=`` chains.)
"""

from __future__ import annotations

import collections.abc
import contextlib
import difflib
import importlib
import importlib.util
import inspect
import json
import logging
import os
import types
import typing
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal, Union, cast

import yaml
from omegaconf import OmegaConf

from cl_lightning.tasks import Scenario

CONFIG_DIR = Path(os.environ.get("CL_CONFIG_DIR", Path(__file__).resolve().parents[1] / "configs"))
GROUPS = ("benchmark", "method", "trainer", "logger")
TOP_LEVEL_KEYS = (*GROUPS, "experiment", "seed", "data_dir", "output_dir", "resume", "name", "checkpoints")
#: Trainer arguments the runner sets itself; configuring them is an error.
RUNNER_OWNED_TRAINER_KEYS = ("callbacks", "logger", "default_root_dir", "use_distributed_sampler",
                             "enable_checkpointing", "num_sanity_val_steps")


class ConfigError(ValueError):
    """A config problem, with a message that names the bad key, value or file."""


def nearest(word: str, options: Iterable[str]) -> str:
    options = sorted(set(options))
    close = difflib.get_close_matches(word, options, n=3, cutoff=0.5)
    if close:
        return f"did you mean {', '.join(repr(c) for c in close)}? Valid: {', '.join(options)}"
    return f"valid: {', '.join(options)}"


# ---------------------------------------------------------------------------------------- files
def available(group: str, config_dir: Path = CONFIG_DIR) -> list[str]:
    return sorted(p.stem for p in (config_dir / group).glob("*.yaml"))


def load_group_file(group: str, name: str, config_dir: Path = CONFIG_DIR) -> Any:
    path = config_dir / group / f"{name}.yaml"
    if not path.exists():
        raise ConfigError(f"unknown {group} {name!r}: {nearest(name, available(group, config_dir))}")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None


def override_word(key: str, value: str) -> str:
    """``key=value`` with ``value`` quoted when YAML would not read it back as the same string."""
    try:
        same = yaml.safe_load(value) == value
    except yaml.YAMLError:
        same = False
    return f"{key}={value if same else json.dumps(value)}"


def parse_overrides(overrides: Sequence[str]) -> tuple[dict[str, str], list[tuple[str, Any]]]:
    """Splits ``key=value`` words into group selections and dotted-path assignments."""
    selections: dict[str, str] = {}
    assignments: list[tuple[str, Any]] = []
    for word in overrides:
        if "=" not in word:
            raise ConfigError(f"override {word!r} is not of the form key=value")
        key, raw = word.split("=", 1)
        key = key.strip().lstrip("+")
        if not key:
            raise ConfigError(f"override {word!r} has an empty key")
        value = yaml.safe_load(raw) if raw.strip() else None
        head = key.split(".", 1)[0]
        if head not in TOP_LEVEL_KEYS:
            raise ConfigError(f"unknown config key {head!r}: {nearest(head, TOP_LEVEL_KEYS)}")
        if "." not in key and key in (*GROUPS, "experiment") and (value is None or isinstance(value, str)):
            selections[key] = "none" if value is None else value
        else:
            assignments.append((key, value))
    return selections, assignments


def flatten(tree: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Leaves of a nested mapping as (dotted path, value); lists and class nodes' class_path are leaves,
    and a class_path comes before its init_args so that switching class resets the arguments."""
    if not isinstance(tree, dict) or not tree:
        return [(prefix, tree)]
    items = sorted(tree.items(), key=lambda kv: kv[0] != "class_path")
    out: list[tuple[str, Any]] = []
    for key, value in items:
        path = f"{prefix}.{key}" if prefix else str(key)
        out.extend(flatten(value, path) if isinstance(value, dict) else [(path, value)])
    return out


def set_path(cfg: dict[str, Any], path: str, value: Any) -> None:
    """Assigns ``value`` at a dotted path, skipping ``init_args`` and indexing lists by class name."""
    keys = path.split(".")
    node: Any = cfg
    walked: list[str] = []
    for i, key in enumerate(keys):
        last = i == len(keys) - 1
        if isinstance(node, dict) and "class_path" in node and key not in ("class_path", "init_args"):
            if node.get("init_args") is None:
                node["init_args"] = {}
            node = node["init_args"]
        if isinstance(node, list):
            index = _list_index(node, key, ".".join(walked))
            if last:
                node[index] = value
                return
            node = node[index]
        elif isinstance(node, dict):
            if last:
                if key == "class_path" and node.get("class_path") not in (None, value):
                    node["init_args"] = {}  # another class: its old arguments no longer apply
                node[key] = value
                return
            if not isinstance(node.get(key), (dict, list)):
                node[key] = {}
            node = node[key]
        else:
            raise ConfigError(f"cannot set {path!r}: {'.'.join(walked)!r} is a value, not a section")
        walked.append(key)


def _list_index(items: list[Any], key: str, where: str) -> int:
    if key.lstrip("-").isdigit():
        index = int(key)
        if not -len(items) <= index < len(items):
            raise ConfigError(f"{where}.{key}: index out of range (the list has {len(items)} entries)")
        return index
    names = [str(it.get("class_path", "")).rsplit(".", 1)[-1] if isinstance(it, dict) else "" for it in items]
    matches = [i for i, n in enumerate(names) if n.lower() == key.lower()]
    if len(matches) != 1:
        raise ConfigError(f"{where}.{key}: no single entry of class {key!r} ({nearest(key, [n for n in names if n])})")
    return matches[0]


# ---------------------------------------------------------------------------------------- compose
def compose(overrides: Sequence[str] = (), config_dir: Path = CONFIG_DIR,
            base: dict[str, Any] | None = None) -> dict[str, Any]:
    """The resolved config for ``train.py``: defaults, group files, experiment, then overrides.

    ``base`` replaces ``train.yaml`` (used to resume from a run's saved config); groups are then only
    reloaded when selected again.
    """
    selections, assignments = parse_overrides(overrides)
    if base is None:
        root = yaml.safe_load((config_dir / "train.yaml").read_text())
        defaults = dict(root.pop("defaults", {}))
        cfg = root
    else:
        cfg, defaults = base, {}
    experiment_values: list[tuple[str, Any]] = []
    if base is None and (selections.keys() & {"method", "benchmark"} or selections.get("experiment") == "none"):
        cfg["experiment"] = None  # train.yaml's experiment is the argument-less run's; a chosen group drops it
    exp_name = selections.pop("experiment", None) or cfg.get("experiment")
    if exp_name and exp_name != "none" and base is None:
        exp_defaults, experiment_values = load_experiment(exp_name, config_dir)
        defaults.update(exp_defaults)
        cfg["experiment"] = exp_name
    defaults.update(selections)
    for group, name in defaults.items():
        if group not in GROUPS:
            raise ConfigError(f"unknown config group {group!r}: {nearest(group, GROUPS)}")
        cfg[group] = None if name in (None, "none") else load_group_file(group, name, config_dir)
        if group in ("method", "benchmark") and cfg[group] is not None:
            cfg[f"{group}_name"] = name
    for path, value in experiment_values + assignments:
        set_path(cfg, path, value)
    link_data_dir(cfg)
    if base is None:
        given = {p.replace(".init_args.", ".") for p, _ in experiment_values + assignments}
        fit_scenario(cfg, chosen="benchmark.scenario" in given)
    unknown = [k for k in cfg if k not in TOP_LEVEL_KEYS and not k.endswith("_name")]
    if unknown:
        raise ConfigError(f"unknown config key {unknown[0]!r}: {nearest(unknown[0], TOP_LEVEL_KEYS)}")
    try:
        resolved = cast(dict[str, Any], OmegaConf.to_container(OmegaConf.create(cfg), resolve=True))  # a dict's
    except Exception as err:  # interpolation errors name the key themselves
        raise ConfigError(f"cannot resolve the config: {err}") from None
    validate(resolved)
    return resolved


def load_experiment(name: str, config_dir: Path = CONFIG_DIR,
                    chain: tuple[str, ...] = ()) -> tuple[dict[str, str], list[tuple[str, Any]]]:
    """An experiment file's group choices and values (dotted path, value), those of the experiment it names in
    ``defaults: {experiment: ...}`` first: a row that differs from another in a few keys says only those
    (``mammoth_split_mnist_er_200`` is ``mammoth_split_mnist`` with ER's plugin and learning rate)."""
    if name in chain:
        raise ConfigError(f"experiment {name!r} includes itself: {' -> '.join((*chain, name))}")
    exp = load_group_file("experiment", name, config_dir) or {}
    if not isinstance(exp, dict):
        raise ConfigError(f"experiment {name!r}: the file must be a mapping of config keys (got {exp!r})")
    own = dict(exp.pop("defaults", None) or {})
    parent = own.pop("experiment", None)
    if parent is not None and str(parent) not in available("experiment", config_dir):
        raise ConfigError(f"experiment {name!r}: defaults.experiment={parent!r} is unknown: "
                          f"{nearest(str(parent), available('experiment', config_dir))}")
    defaults, values = ({}, []) if parent is None else load_experiment(str(parent), config_dir, (*chain, name))
    for group, group_name in own.items():
        if group not in GROUPS:
            raise ConfigError(f"experiment {name!r}: defaults key {group!r}: {nearest(group, (*GROUPS, 'experiment'))}")
        defaults[group] = group_name
    return defaults, values + (flatten(exp) if exp else [])


def link_data_dir(cfg: dict[str, Any]) -> None:
    """The top-level ``data_dir`` feeds the benchmark's ``data_dir`` unless that is set on its own.

    A link rather than an interpolation, so that the benchmark files stay usable by LightningCLI."""
    node = cfg.get("benchmark")
    if not isinstance(node, dict) or "class_path" not in node or cfg.get("data_dir") is None:
        return
    args = node.get("init_args") or {}
    if "data_dir" not in signature_keys(import_class(node["class_path"], "benchmark"))[0]:
        return
    if args.get("data_dir") is None:
        node["init_args"] = {**args, "data_dir": cfg["data_dir"]}


#: The order in which a method's first supported scenario is picked.
SCENARIO_ORDER = ("task", "domain", "class")


def fit_scenario(cfg: dict[str, Any], chosen: bool) -> None:
    """When nobody chose ``benchmark.scenario`` and the benchmark file's own default is one the method cannot run,
    the method's first supported scenario (task, domain, class-IL): ``python train.py method=icarl`` runs
    class-IL Split-MNIST instead of failing. A scenario given on the command line or by an experiment is kept
    (and refused with the supported ones named, when the method cannot run it)."""
    method, benchmark = cfg.get("method"), cfg.get("benchmark")
    if chosen or not isinstance(method, dict) or not isinstance(benchmark, dict) or "class_path" not in method:
        return
    args = benchmark.get("init_args") or {}
    if "scenario" not in args:
        return
    try:
        supported = getattr(import_class(method["class_path"], "method"), "supported_scenarios", None)
    except ConfigError:
        return  # named by validate
    if not supported:
        return
    names = {getattr(s, "value", s) for s in supported}
    try:
        current = Scenario.parse(args["scenario"]).value
    except ValueError:
        return  # named when the benchmark is built
    if current not in names:
        args["scenario"] = next(s for s in SCENARIO_ORDER if s in names)
        benchmark["init_args"] = args


# ---------------------------------------------------------------------------------------- validate
#: Module paths before the plugins and benchmarks moved under ``cl_lightning`` (old configs and run folders
#: name them); the first matching prefix is rewritten.
LEGACY_MODULES = (("datamodules.base", "cl_lightning.datamodule"), ("datamodules", "cl_lightning.datamodules"),
                  ("callbacks", "cl_lightning.callbacks"))


def current_module(module_name: str) -> str:
    """Where an old module path lives now (unchanged when it is not one, or when it is a project's own
    top-level ``callbacks``/``datamodules`` module that the package never had)."""
    for old, new in LEGACY_MODULES:
        if module_name == old or module_name.startswith(old + "."):
            moved = new + module_name[len(old):]
            try:
                if importlib.util.find_spec(moved) is not None:
                    return moved
            except ImportError:
                pass
            return module_name
    return module_name


def import_class(class_path: str, where: str) -> type:
    module_name, _, name = str(class_path).rpartition(".")
    if not module_name:
        raise ConfigError(f"{where}.class_path={class_path!r} must be a dotted path like package.module.Class")
    module_name = current_module(module_name)
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(f"{where}.class_path={class_path!r}: cannot import {module_name!r} ({err})") from None
    if not hasattr(module, name):
        names = [n for n, v in vars(module).items() if inspect.isclass(v)]
        raise ConfigError(f"{where}.class_path={class_path!r}: {module_name} has no {name!r}; {nearest(name, names)}")
    return getattr(module, name)


def signature_keys(cls: type) -> tuple[set[str], bool]:
    """Accepted keyword names of ``cls.__init__`` (through ``**kwargs`` to its bases)."""
    keys: set[str] = set()
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        params = inspect.signature(vars(klass)["__init__"]).parameters.values()
        keys |= {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self"}
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            return keys, False
    return keys, True


def validate_node(node: Any, where: str) -> None:
    """Checks every class node below ``node``: importable class, known argument names."""
    if isinstance(node, list):
        for i, item in enumerate(node):
            validate_node(item, f"{where}.{i}")
        return
    if not isinstance(node, dict):
        return
    if "class_path" not in node:
        for key, value in node.items():
            validate_node(value, f"{where}.{key}")
        return
    extra = set(node) - {"class_path", "init_args"}
    if extra:
        raise ConfigError(f"{where}: unexpected key {sorted(extra)[0]!r} next to class_path (use init_args)")
    cls = import_class(node["class_path"], where)
    keys, open_ended = signature_keys(cls)
    hints = init_type_hints(cls)
    args = node.get("init_args") or {}
    for key, value in args.items():
        if key not in keys and not open_ended:
            raise ConfigError(f"unknown key {where}.{key} for {cls.__name__}: {nearest(key, keys)}")
        if key in hints:
            args[key] = check_type(value, hints[key], f"{where}.{key}")
        validate_node(value, f"{where}.{key}")


def init_type_hints(cls: type) -> dict[str, Any]:
    """The annotated types of ``cls.__init__``'s arguments, through its bases (unresolvable ones left out)."""
    hints: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        if "__init__" in vars(klass) and klass is not object:
            with contextlib.suppress(Exception):
                hints.update(typing.get_type_hints(vars(klass)["__init__"]))
    hints.pop("return", None)
    return hints


def type_name(hint: Any) -> str:
    if typing.get_origin(hint) in (Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "null"
    if typing.get_origin(hint) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def matches(value: Any, hint: Any) -> bool:
    """Whether a config value fits an annotation; lenient where the annotation says little."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any or hint is inspect.Parameter.empty or isinstance(hint, (str, typing.TypeVar)):
        return True
    if origin in (Union, types.UnionType):
        return any(matches(value, a) for a in args)
    if hint is type(None):
        return value is None
    if origin is Literal:
        return value in args
    if isinstance(value, dict) and "class_path" in value:
        return True  # an object node: validated as a node of its own
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (list, tuple, set, collections.abc.Sequence, collections.abc.Iterable):
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(matches(v, a) for v, a in zip(value, args, strict=True))
        return not args or all(matches(v, args[0]) for v in value)
    if origin in (dict, collections.abc.Mapping):
        return isinstance(value, dict)
    if origin is None and isinstance(hint, type) and hint.__module__ != "builtins":
        return isinstance(value, hint)  # e.g. an nn.Module argument given a plain value
    return True


def check_type(value: Any, hint: Any, where: str) -> Any:
    """``value`` if it fits ``hint`` (a number YAML read as text, like ``1e-3``, becomes a float); else a
    ConfigError naming the key, the value and the expected type."""
    if isinstance(value, str) and matches(1.0, hint) and not matches(value, hint):
        with contextlib.suppress(ValueError):
            return float(value)
    if not matches(value, hint):
        raise ConfigError(f"{where}={value!r} must be {type_name(hint)}")
    return value


@contextlib.contextmanager
def quiet_lightning():
    """Silences Lightning's info lines (GPU/TPU available, ...) while a trainer is only being checked."""
    logger = logging.getLogger("lightning.pytorch")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def validate_trainer(trainer: dict[str, Any]) -> None:
    """Names, types and values of the Trainer arguments, checked by building a Trainer with them (nothing
    runs): a bad device count or a missing accelerator fails here, before the run folder exists."""
    import lightning as L

    keys, _ = signature_keys(L.Trainer)
    hints = init_type_hints(L.Trainer)
    for key, value in trainer.items():
        if key in RUNNER_OWNED_TRAINER_KEYS:
            raise ConfigError(f"trainer.{key} is set by the runner and cannot be configured "
                              "(loggers: logger=wandb|csv|none; plugins: the method's plugins)")
        if key not in keys:
            raise ConfigError(f"unknown key trainer.{key} for lightning.Trainer: {nearest(key, keys)}")
        if key in hints:
            trainer[key] = check_type(value, hints[key], f"trainer.{key}")
    try:
        with quiet_lightning():
            L.Trainer(**{"enable_progress_bar": False, "enable_model_summary": False, **trainer}, logger=False,
                      enable_checkpointing=False)
    except Exception as err:  # Lightning's own message names the bad value
        raise ConfigError(f"trainer: {' '.join(str(err).split())}") from None


def validate(cfg: dict[str, Any]) -> None:
    for group in ("benchmark", "method"):
        if not isinstance(cfg.get(group), dict) or "class_path" not in cfg[group]:
            raise ConfigError(f"{group} must be a class_path/init_args node (got {cfg.get(group)!r})")
        validate_node(cfg[group], group)
    if cfg.get("logger") is not None:
        validate_node(cfg["logger"], "logger")
    trainer = cfg.get("trainer") or {}
    if not isinstance(trainer, dict):
        raise ConfigError(f"trainer must be a mapping of Trainer arguments (got {trainer!r})")
    validate_trainer(trainer)
    seed = cfg.get("seed")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ConfigError(f"seed={seed!r} must be a non-negative integer")
    keep = (cfg.get("checkpoints") or {}).get("keep", "all")
    if keep not in ("all", "last"):
        raise ConfigError(f"checkpoints.keep={keep!r} must be 'all' or 'last'")
    output_dir = cfg.get("output_dir")
    if output_dir is not None and Path(str(output_dir)).exists() and not Path(str(output_dir)).is_dir():
        raise ConfigError(f"output_dir={output_dir} is a file, not a folder")


# ---------------------------------------------------------------------------------------- instantiate
def instantiate(node: Any, where: str = "config") -> Any:
    """Builds the objects of a validated node; a constructor's ValueError becomes a ConfigError naming
    the node."""
    if isinstance(node, list):
        return [instantiate(item, f"{where}.{i}") for i, item in enumerate(node)]
    if not isinstance(node, dict):
        return node
    if "class_path" not in node:
        return {k: instantiate(v, f"{where}.{k}") for k, v in node.items()}
    cls = import_class(node["class_path"], where)
    args = {k: instantiate(v, f"{where}.{k}") for k, v in (node.get("init_args") or {}).items()}
    try:
        return cls(**args)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"invalid value in {where} ({cls.__name__}): {err}") from None
