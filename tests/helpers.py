"""Shared test helpers: run an experiment module's --quick size, execute a notebook."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_experiment(module: str, workdir, *flags: str, timeout: int = 300) -> None:
    """Runs ``python -m experiments.<module> --quick --workdir=...`` and fails loudly on error."""
    cmd = [
        sys.executable,
        "-m",
        f"experiments.{module}",
        f"--workdir={workdir}",
        "--quick",
        "--noprogress",
        *flags,
    ]
    proc = subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=_env()
    )
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"


def run_notebook(name: str, timeout: int = 300) -> None:
    """Executes ``notebooks/<name>.ipynb`` top to bottom in a fresh kernel; any error fails."""
    import nbformat
    from nbclient import NotebookClient

    path = os.path.join(ROOT, "notebooks", f"{name}.ipynb")
    nb = nbformat.read(path, as_version=4)
    os.environ.update(_env())  # the kernel inherits this process's environment
    NotebookClient(
        nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": ROOT}}
    ).execute()


# Smoke runs are dominated by XLA compile time, not by running the code.
FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["XLA_FLAGS"] = FAST_COMPILE_FLAGS  # one CPU device: enough for a quick run
    env["MPLBACKEND"] = "Agg"
    return env
