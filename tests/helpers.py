"""Shared test helpers: run an experiment at its quick size, execute a notebook."""

from __future__ import annotations

import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_experiment(name: str, workdir, **overrides) -> dict:
    """Runs ``experiments.<name>`` in-process at its quick size; returns its results.

    ``overrides`` replace config fields (``steps=10``).
    """
    import importlib

    config = importlib.import_module(f"experiments.configs.{name}").get_config("quick")
    config.update(overrides)
    return importlib.import_module(f"experiments.{name}").run(config, str(workdir))


def fresh_state(params, tx, key):
    """A step-0 `wspace.training.TrainState` of ``params`` (no model state) with ``tx.init``."""
    import jax.numpy as jnp

    import wspace as ws

    return ws.training.TrainState(
        step=jnp.zeros((), jnp.int32), params=params, model_state={}, opt_state=tx.init(params),
        key=key,
    )  # fmt: skip


def run_notebook(
    name: str, timeout: int = 300, save: bool = False, xla_flags: str | None = None
) -> None:
    """Executes ``notebooks/<name>.ipynb`` top to bottom in a fresh kernel; any error fails.

    ``xla_flags``: the kernel's XLA flags (default `FAST_COMPILE_FLAGS`; `FAST_RUN_FLAGS`
    for a notebook whose time goes into running steps rather than compiling them).

    The kernel starts in an empty temporary directory, so the notebook sees the
    installed ``wspace`` package and nothing else of the repository, as in Colab.
    With ``save``, the executed notebook (outputs included) is written back.
    """
    import tempfile

    import nbformat
    from nbclient import NotebookClient

    path = os.path.join(ROOT, "notebooks", f"{name}.ipynb")
    nb = nbformat.read(path, as_version=4)
    if save:
        _write_header(nb, name)
    saved = dict(os.environ)
    # the kernel inherits this process's environment...
    os.environ.update(_env(xla_flags or FAST_COMPILE_FLAGS))
    # ...but draws with the notebook backend, so that figures are stored as outputs
    os.environ["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
    try:
        with tempfile.TemporaryDirectory() as cwd:
            client = NotebookClient(
                nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": cwd}}
            )
            client.execute()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    if save:
        nbformat.write(nb, path)


def source_url() -> str:
    """The project's one source URL: ``[project.urls] Source`` in pyproject.toml."""
    import tomllib

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["project"]["urls"]["Source"]


def colab_badge(name: str) -> str:
    """The "Open in Colab" badge of ``notebooks/<name>.ipynb``, built from `source_url`."""
    url = source_url()
    if not url.startswith("https://github.com/"):
        raise ValueError(f"Colab opens notebooks from GitHub; the Source URL is {url!r}")
    notebook = f"{url.removeprefix('https://github.com/')}/blob/main/notebooks/{name}.ipynb"
    return (
        "[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
        f"(https://colab.research.google.com/github/{notebook})"
    )


def colab_cell() -> str:
    """The install cell: ``notebooks/_colab_cell.py`` without its leading comment lines."""
    with open(os.path.join(ROOT, "notebooks", "_colab_cell.py")) as f:
        lines = f.read().splitlines()
    while lines and lines[0].startswith("#"):
        lines.pop(0)
    return "\n".join(lines).strip()


def _write_header(nb, name: str) -> None:
    """Makes the notebook start with its Colab badge (a markdown cell), then the install cell."""
    import nbformat

    first = nb.cells[0] if nb.cells else None
    if first is not None and first.source.startswith("[![Open In Colab]"):
        first.source = colab_badge(name)  # e.g. after the Source URL changed
    else:
        nb.cells.insert(0, nbformat.v4.new_markdown_cell(colab_badge(name)))
    code = next(c for c in nb.cells if c.cell_type == "code")
    code.source = colab_cell()


def notebook_names() -> list[str]:
    """The notebooks in ``notebooks/``, by name."""
    folder = os.path.join(ROOT, "notebooks")
    return sorted(f[: -len(".ipynb")] for f in os.listdir(folder) if f.endswith(".ipynb"))


# Smoke runs are dominated by XLA compile time, not by running the code.
FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
# Runs that train a ConvNet for a while (the README's tour) are bound by running time
# instead: unoptimised XLA:CPU code ran its 4-seed step ~3x slower (74 s vs 26 s).
FAST_RUN_FLAGS = "--xla_llvm_disable_expensive_passes=true"


def _env(xla_flags: str = FAST_COMPILE_FLAGS) -> dict:
    """This process's environment for a child Python on one CPU device with ``xla_flags``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")  # this checkout's wspace
    env["XLA_FLAGS"] = xla_flags  # one CPU device: enough for a quick run
    env["MPLBACKEND"] = "Agg"
    env.update(_compilation_cache_env())
    return env


def _compilation_cache_env() -> dict:
    """JAX's persistent compilation cache settings of this process, as ``JAX_*`` variables.

    A child process (README blocks, notebook kernels, command lines) then loads the
    programs an earlier ``make test`` compiled instead of compiling them again; none when
    the cache is off here (``WSPACE_COMPILATION_CACHE=0``).
    """
    import jax

    path = jax.config.jax_compilation_cache_dir
    if not path:
        return {}
    return {
        "JAX_COMPILATION_CACHE_DIR": path,
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": str(
            jax.config.jax_persistent_cache_min_compile_time_secs
        ),
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": str(
            jax.config.jax_persistent_cache_min_entry_size_bytes
        ),
    }
