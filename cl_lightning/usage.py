"""``python train.py --help``: the override syntax and every config group's choices; with a choice
(``python train.py method=hnet --help``), that choice's keys with their values and docs.

Everything shown is read from where it is defined, so it cannot drift: the choices are the YAML files
under ``configs/`` (summary: each file's first comment line), the keys are the constructor signatures of
the classes a config names (values: the composed config, so overrides and ``experiment=`` show their
effect), and the docs are the classes' docstrings (``Args:`` sections).

Not jsonargparse's help (a dependency already, behind ``cl-lightning --help``): that one is about ``--key value``
flags, not ``train.py``'s ``key=value`` words, and knows no config groups: ``python -m cl_lightning --help``
printed 504 lines, 97 of them ``--trainer.*`` flags, and none of the files under ``configs/`` (the choices of
``method=``, ``benchmark=``, ``experiment=``); its defaults are the signatures', not the values the chosen files
and overrides compose to. The docstring parsing is shared (``docstring_parser``, jsonargparse's own).
"""

from __future__ import annotations

import inspect
import os
import shutil
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from cl_lightning.config import CONFIG_DIR, ConfigError, available, compose, import_class, parse_overrides

HELP_FLAGS = ("-h", "--help")
#: The groups in the order a user meets them, and what each chooses.
GROUP_ROLES = {"method": "the continual-learning method (a LightningModule and its plugins)",
               "benchmark": "the task sequence (a ContinualDataModule)",
               "experiment": "a paper setting: picks groups and sets values (later overrides still win)",
               "trainer": "lightning.Trainer arguments for every task's fresh Trainer",
               "logger": "where metrics go besides the run folder"}

SYNTAX = """\
usage: python train.py [GROUP=CHOICE ...] [KEY=VALUE ...]
       python train.py -m KEY=V1,V2 ... [sweep.parallel=N]     (a sweep: one run per combination)
       python train.py resume=FOLDER                           (continue a run or a sweep)
       python train.py [GROUP=CHOICE ...] --help               (the keys of those choices)

Overrides (later words win):
  method=ewc                      pick a file of a config group (configs/method/ewc.yaml)
  method.lr=0.01                  set a value; the dotted path may skip `init_args`
  method.plugins.EWC.strength=50  a plugin (any list of objects) indexed by class name, or by position
  benchmark.class_order=[9,8,7,6,5,4,3,2,1,0]
                                  values are YAML: lists, {mappings}, null, true, 'quoted strings'
  method.backbone.class_path=cl_lightning.nets.ReducedResNet18
                                  another class (its old arguments are dropped)
  seed=1                          model initialisation and data order (tasks: benchmark.seed)
  data_dir=PATH  output_dir=PATH  name=W&B_RUN_NAME  resume=RUN_FOLDER
Sweeps (-m): a comma outside brackets, braces and quotes separates values; every combination is a run
  folder under one sweep folder (output_dir=), one after another or sweep.parallel=N at once
  (sweep.devices=[0,1]: one GPU each); resume=SWEEP_FOLDER continues a killed sweep.
Unknown keys fail before training with the nearest valid names. Reports: cl-lightning report FOLDER...
"""


def wants_help(args: Sequence[str]) -> bool:
    return any(word in HELP_FLAGS for word in args)


def summary_line(path: Path) -> str:
    """A YAML file's one-line summary: its first line, when that is a comment."""
    first = next((line for line in path.read_text().splitlines() if line.strip()), "")
    return first.lstrip("#").strip() if first.startswith("#") else "(no description)"


def _fit(line: str, width: int) -> str:
    return line if len(line) <= width else line[: width - 4].rstrip() + " ..."


def general_help(config_dir: Path = CONFIG_DIR) -> str:
    width = shutil.get_terminal_size((120, 24)).columns
    defaults = yaml.safe_load((config_dir / "train.yaml").read_text()).get("defaults", {})
    lines = [SYNTAX, "Config groups (configs/<group>/<choice>.yaml; default marked *):"]
    for group in GROUP_ROLES:
        lines.append(f"\n{group}: {GROUP_ROLES[group]}")
        names = available(group, config_dir)
        pad = max(map(len, names), default=0) + 2
        for name in names:
            mark = "*" if defaults.get(group) == name else " "
            text = summary_line(config_dir / group / f"{name}.yaml")
            head = f"  {mark} {name:<{pad}}"
            lines.append(_fit(head + text, max(width, 60)))
    lines.append("\nThe keys of a choice, with their values and docs: python train.py method=hnet --help")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- one choice
def parameter_docs(cls: type) -> dict[str, str]:
    """``name -> description`` from the ``Args:`` sections of ``cls`` and its bases (first one wins)."""
    try:
        from docstring_parser import parse
    except ImportError:  # a dependency of jsonargparse[signatures]; without it, keys are shown without docs
        return {}
    docs: dict[str, str] = {}
    for klass in cls.__mro__:
        for text in (klass.__doc__, vars(klass).get("__init__").__doc__ if "__init__" in vars(klass) else None):
            if not text:
                continue
            lines = text.strip().splitlines()
            if lines[0].strip() == "Args:":  # a docstring of arguments only: give the parser a summary line
                body = textwrap.indent(textwrap.dedent("\n".join(lines[1:])), "    ")
                text = "-\n\nArgs:\n" + body
            for param in parse(text).params:
                for name in param.arg_name.split(","):
                    docs.setdefault(name.strip(), " ".join((param.description or "").split()))
    return docs


def parameters(cls: type) -> list[inspect.Parameter]:
    """Constructor keywords of ``cls``, following ``**kwargs`` into its bases (as config validation does)."""
    found: dict[str, inspect.Parameter] = {}
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        params = list(inspect.signature(vars(klass)["__init__"]).parameters.values())
        for p in params:
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self":
                found.setdefault(p.name, p)
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return list(found.values())


def _inline(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()


def _type_name(annotation: Any) -> str:
    if annotation is inspect.Parameter.empty:
        return ""
    return annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))


def _first_line(cls: type) -> str:
    """The docstring's first paragraph (none if it begins with the arguments), at most 100 characters."""
    first = (inspect.getdoc(cls) or "").split("\n\n")[0]
    return "" if first.startswith("Args:") else _fit(" ".join(first.split()), 100)


def describe_node(node: dict[str, Any], key: str, out: list[str], indent: int = 2) -> None:
    """``key: class_path — summary`` and one entry per constructor keyword, nested objects below."""
    cls = import_class(node["class_path"], key)
    args = node.get("init_args") or {}
    pad = " " * indent
    summary = _first_line(cls)
    out.append(f"{pad}{key}: {node['class_path']}" + (f"  — {summary}" if summary else ""))
    docs = parameter_docs(cls)
    nested: list[tuple[str, Any]] = []
    for p in parameters(cls):
        value = args.get(p.name, None if p.default is inspect.Parameter.empty else p.default)
        if isinstance(value, dict) and "class_path" in value:
            nested.append((f"{key}.{p.name}", value))
            continue
        if isinstance(value, list) and value and all(isinstance(v, dict) and "class_path" in v for v in value):
            nested.extend((f"{key}.{p.name}.{v['class_path'].rsplit('.', 1)[-1]}", v) for v in value)
            continue
        shown = "(required)" if p.default is inspect.Parameter.empty and p.name not in args else _inline(value)
        out.append(f"{pad}  {key}.{p.name}={shown}" + (f"   [{_type_name(p.annotation)}]" if p.annotation
                                                          is not inspect.Parameter.empty else ""))
        if docs.get(p.name):
            out.extend(textwrap.wrap(docs[p.name], width=100, initial_indent=pad + "      ",
                                     subsequent_indent=pad + "      "))
    for child_key, child in nested:
        describe_node(child, child_key, out, indent + 2)


def describe_trainer(trainer: dict[str, Any], out: list[str]) -> None:
    import lightning as L

    from cl_lightning.runner import RUNNER_OWNED_TRAINER_KEYS

    docs = parameter_docs(L.Trainer)
    out.append("  trainer: lightning.Trainer arguments, used for every task's fresh Trainer "
               "(max_epochs / max_steps: the budget per task); set by this config:")
    out.extend(f"    trainer.{k}={_inline(v)}" for k, v in trainer.items())
    out.append("  other arguments (Lightning's defaults):")
    for p in parameters(L.Trainer):
        if p.name in trainer or p.name in RUNNER_OWNED_TRAINER_KEYS:
            continue
        out.append(f"    trainer.{p.name}={_inline(p.default)}")
        if docs.get(p.name):
            out.append("      " + textwrap.shorten(docs[p.name], width=100, placeholder=" ..."))


def choice_help(words: Sequence[str], config_dir: Path = CONFIG_DIR) -> str:
    """The keys of the groups chosen (or set) on the command line, with the values they take there."""
    from cl_lightning.sweep import MULTIRUN_FLAGS, split_values

    words = [w for w in words if w not in MULTIRUN_FLAGS and not w.startswith("sweep.")]
    words = [w.split("=", 1)[0] + "=" + split_values(w.split("=", 1)[1])[0] if "=" in w else w for w in words]
    selections, assignments = parse_overrides(words)
    named = set(selections) | {k.split(".")[0] for k, _ in assignments}
    shown = [g for g in ("method", "benchmark", "trainer", "logger") if g in named]
    if "experiment" in selections and not shown:
        shown = ["method", "benchmark"]
    cfg = compose(words, config_dir)
    out: list[str] = []
    for group in shown:
        choice = cfg.get(f"{group}_name") or selections.get(group) or ""
        path = config_dir / group / f"{choice}.yaml"
        out.append(f"{group}={choice}" + (f": {summary_line(path)}" if path.is_file() else ""))
        if group == "trainer":
            describe_trainer(cfg.get("trainer") or {}, out)
        elif cfg.get(group) is None:
            out.append(f"  {group}: none")
        else:
            describe_node(cfg[group], group, out)
        out.append("")
    if "experiment" in selections:
        path = config_dir / "experiment" / f"{selections['experiment']}.yaml"
        out.insert(0, f"experiment={selections['experiment']}: {summary_line(path)}\n")
    out.append("Values shown are those this command line would run with; change any with KEY=VALUE.")
    return "\n".join(out)


def main(args: Sequence[str]) -> int:
    words = [w for w in args if w not in HELP_FLAGS]
    try:
        print(choice_help(words) if words else general_help(), flush=True)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `--help | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0
