"""``python train.py ARGS`` as a separate process, without paying for the interpreter's imports every time.

Importing torch, Lightning and torchmetrics takes 6-9 s of a 2-core machine, more than most test runs
themselves, and the suite starts dozens of such processes. ``train_process`` forks them instead from a server
that imported our package once (``multiprocessing``'s forkserver: the server has only imported, never computed,
so no thread pool is copied into the child); the suite took 539 s instead of 867 s so on 2 cores. The child is
still a process of its own running ``train.py`` as ``__main__``, with its own environment, working directory,
signals and exit status, so a SIGKILL or SIGTERM reaches it as it would reach ``python train.py``. Set
``CL_TEST_EXEC=1`` to run every such process with a fresh interpreter instead (what a user runs). Tests of the
interpreter's own start (``--help``, the terminal, W&B's exit hooks) keep calling ``python train.py`` directly.
"""

from __future__ import annotations

import multiprocessing
import os
import runpy
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

from cl_lightning.run_dir import child_run_environment

REPO = Path(__file__).resolve().parents[2]
#: what the forked server imports once; everything ``train.py`` imports before it runs
PRELOAD = ["cl_lightning.experiment", "cl_lightning.runner", "cl_lightning.methods", "cl_lightning.datamodules",
           "cl_lightning.callbacks", "tests.helpers.kill"]
#: read when a module is imported, so a child cannot take them from its own environment
IMPORT_TIME_ENV = ("CL_CONFIG_DIR", "PYTHONHASHSEED", "PYTHONPATH")

_context: multiprocessing.context.ForkServerContext | None = None


def _server() -> multiprocessing.context.ForkServerContext:
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)
    return _context


def _child(script: str, args: list[str], env: dict[str, str], cwd: str, out: str, err: str) -> None:
    """The forked process: the environment, files and start of ``python SCRIPT ARGS``."""
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    for fd, path in ((1, out), (2, err)):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(f, fd)
        os.close(f)
    import torch

    # torch read OMP_NUM_THREADS when the server imported it; apply the child's own (the default: every core)
    torch.set_num_threads(int(env.get("OMP_NUM_THREADS") or os.cpu_count() or 1))
    if "ignore" in env.get("PYTHONWARNINGS", "").split(","):
        warnings.simplefilter("ignore")
    sys.argv = [script, *args]
    sys.path.insert(0, str(Path(script).resolve().parent))  # as for a script: its folder first
    runpy.run_path(script, run_name="__main__")


def run_script(script: str | Path, args: list[str], env: dict[str, str] | None = None, cwd: Path = REPO,
               timeout: float = 600) -> subprocess.CompletedProcess:
    """Runs ``python SCRIPT ARGS`` in ``cwd`` to its end, its output captured; ``returncode`` is negative for a
    signal, as from ``subprocess.run``. The process is a run of its own: it never takes over this process's run
    folder or W&B service (:func:`~cl_lightning.run_dir.child_run_environment`), as a sweep's runs do not."""
    env = child_run_environment(os.environ if env is None else env)
    cmd = [str(script), *args]
    same_imports = all(env.get(k) == os.environ.get(k) for k in IMPORT_TIME_ENV)
    if os.environ.get("CL_TEST_EXEC") == "1" or not same_imports:
        return subprocess.run([sys.executable, *cmd], cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=timeout)
    with tempfile.TemporaryDirectory() as tmp:
        out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
        proc = _server().Process(target=_child, args=(str(script), args, env, str(cwd), str(out), str(err)))
        proc.start()
        proc.join(timeout)
        if proc.exitcode is None:
            proc.kill()
            proc.join()
            raise subprocess.TimeoutExpired(cmd, timeout, out.read_text(), err.read_text())
        return subprocess.CompletedProcess(cmd, proc.exitcode, out.read_text(), err.read_text())


def train_process(args: list[str], env: dict[str, str] | None = None, cwd: Path = REPO,
                  timeout: float = 600) -> subprocess.CompletedProcess:
    """``python train.py ARGS`` (this checkout's) in ``cwd``, as ``run_script``."""
    return run_script(REPO / "train.py", args, env, cwd, timeout)
