"""The command line of every experiment: ``python -m experiments.<name> --workdir=DIR
--config=experiments/configs/<name>.py:SIZE --config.FIELD=VALUE``.

Each experiment module ends with ``cli.main(run, "<name>")``. Flags override config
fields; unknown fields are one-line errors naming the closest known one; ``--help``
lists every field. Exit codes: 0 done, 1 error, 2 bad command line, 130 interrupted.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence

from experiments import common
from experiments.configs.base import SIZES
from experiments.report import claims_markdown
from wspace.io import CheckpointError, WorkdirLockedError

HELP_FLAGS = ("--help", "-h", "--helpfull", "--helpshort", "-?")
EXIT_USAGE, EXIT_ERROR, EXIT_INTERRUPTED = 2, 1, 130


def main(run_fn: Callable, name: str) -> None:
    """The absl-style entry point of ``experiments/<name>.py``: `cli`, then exit with its code.

    A failed run exits at once (``os._exit``) after its one-line error, so background
    threads (orbax's event loops) that fail at interpreter shutdown cannot bury it.
    """
    code = cli(run_fn, name, sys.argv)
    sys.stdout.flush()
    sys.stderr.flush()
    if code:
        common.release_locks()
        os._exit(code)


def cli(run_fn: Callable, name: str, argv: Sequence[str]) -> int:
    """Parses ``argv``, runs ``run_fn(config, workdir)`` and prints the claims; returns the
    exit code (0 done, 1 error, 2 bad command line, 130 interrupted).

    Flags: ``--workdir`` (default ``runs/<name>``) and ``--config`` (default
    ``experiments/configs/<name>.py:small``) with ``--config.field=value`` overrides
    (list fields as ``--config.hidden=64,32`` or ``(64,32)``). A field the experiment
    does not have, on the command line or added in a copied config file, is refused naming
    it (with the closest known field). ``--help`` lists every field with its value.
    ``--distributed`` calls `jax.distributed.initialize()` first (one process per host
    under Slurm, on a TPU pod slice, or with the ``JAX_COORDINATOR_ADDRESS``,
    ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` variables); use it with
    ``--config.mode=sharded`` so each process feeds its slice of every batch. Errors are
    one line on stderr, the last one printed; Ctrl-C prints how to resume.
    """
    from absl import flags as absl_flags

    if not absl_flags.FLAGS.is_parsed():  # absl logging (orbax's) expects parsed flags
        absl_flags.FLAGS.mark_as_parsed()
    args = list(argv[1:])
    if any(a in HELP_FLAGS for a in args):
        print(_help_text(name, [a for a in args if a not in HELP_FLAGS]))
        return 0
    try:
        flags, cfg = _parse(name, args)
    except _UsageError as e:
        return _fail(f"{name}: {e} (see --help)", EXIT_USAGE)
    workdir = flags.workdir
    try:
        if flags.distributed:
            _initialize_distributed()
        from wspace.training import enable_compilation_cache

        enable_compilation_cache()  # WSPACE_COMPILATION_CACHE=0 turns it off
        results = run_fn(cfg, workdir)
    except KeyboardInterrupt:
        msg = f"interrupted; rerun the same command to resume from the last checkpoint in {workdir}"
        return _fail(msg, EXIT_INTERRUPTED)
    except Exception as e:
        if not isinstance(e, _USER_ERRORS):  # a bug: its traceback helps, the line ends it
            import traceback

            traceback.print_exc()
        return _fail(f"{name}: error: {_one_line(e)}", EXIT_ERROR)
    print(f"\n{name} ({cfg.size} size, {len(results['seeds'])} seeds)")
    if results["smoke"]:
        print(f"[{common.SMOKE_STAMP}]")
    if results["claims"]:
        print(claims_markdown(results))
    print(f"results: {os.path.join(workdir, 'results.json')}")
    return 0


class _UsageError(Exception):
    """A bad command line: printed as one line, exit code 2."""


# errors a user can act on from their message alone: printed without a traceback
_USER_ERRORS = (ValueError, FloatingPointError, OSError, CheckpointError, WorkdirLockedError)


def _fail(message: str, code: int) -> int:
    sys.stdout.flush()
    print(message, file=sys.stderr, flush=True)
    return code


def _one_line(e: BaseException) -> str:
    """An error as one line: its first line, and its last where they differ (a config
    file's traceback ends with the real error)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()] or [type(e).__name__]
    text = lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"
    return text.strip("\"'") if isinstance(e, KeyError | AttributeError) else text


def _split_overrides(args: list[str]) -> tuple[list[str], list[tuple[str, str | None, list]]]:
    """``args`` without ``--config.field[=value]`` overrides, and those overrides as
    ``(field, value, the args they came from)`` (``--config.f value`` takes the next arg)."""
    rest, overrides, i = [], [], 0
    while i < len(args):
        arg = args[i]
        body = arg.lstrip("-")
        if arg.startswith("-") and body.startswith("config."):
            field, eq, value = body[len("config.") :].partition("=")
            taken = [arg]
            if not eq and i + 1 < len(args):
                value, taken = args[i + 1], [arg, args[i + 1]]
                i += 1
            overrides.append((field, value, taken))
        else:
            rest.append(arg)
        i += 1
    return rest, overrides


def _parse(name: str, args: list[str]):
    """``(flag values, config)`` from the command line, or `_UsageError` naming the problem.

    The config file is loaded twice: once plain, to know its fields (unknown ones are
    refused, list-typed ones parsed here since ml_collections overrides only tuples),
    then with the other overrides applied by ml_collections (types checked there).
    """
    rest, overrides = _split_overrides(args)
    base = _load_flags(name, rest).config
    known = _experiment_fields(name, base)
    added = sorted(set(base) - known)
    if added:
        raise _UsageError(
            "the config file adds fields this experiment does not have: "
            + ", ".join(_with_suggestion(f, known) for f in added)
        )
    lists, others = [], []
    for field, value, taken in overrides:
        top = field.split(".")[0]
        if top not in base:
            raise _UsageError(f"unknown config field {_with_suggestion(top, known)}")
        if value is None or (value == "" and not isinstance(base[top], str)):
            raise _UsageError(f"--config.{field} needs a value (--config.{field}=VALUE)")
        is_list = "." not in field and isinstance(base[field], list)
        (lists if is_list else others).append((field, value) if is_list else taken)
    flags = _load_flags(name, rest + [a for taken in others for a in taken])
    cfg = flags.config
    for field, value in lists:
        cfg[field] = _parse_list(field, value, base[field])
    return flags, cfg


def _load_flags(name: str, args: list[str]):
    """Parses ``args`` into fresh absl flag values (``workdir``, ``distributed``, ``config``)."""
    from absl import flags
    from ml_collections import config_flags

    fv = flags.FlagValues()
    argv = [name, *args]
    try:
        flags.DEFINE_string("workdir", f"runs/{name}", "Output directory.", flag_values=fv)
        flags.DEFINE_bool("distributed", False, "Multi-host run.", flag_values=fv)
        config_flags.DEFINE_config_file(
            "config",
            os.path.join(os.path.dirname(__file__), "configs", f"{name}.py:small"),
            "Config file, with :quick | :small | :paper for the size.",
            flag_values=fv,
            sys_argv=argv,
        )
        rest = fv(argv)
    except Exception as e:  # absl's, ml_collections' and the config file's own errors
        raise _UsageError(_one_line(e)) from None
    if len(rest) > 1:
        raise _UsageError(f"unexpected arguments {rest[1:]}")
    return fv


def _experiment_fields(name: str, config) -> set[str]:
    """The fields of the experiment's own ``get_config`` at the config's size."""
    import importlib

    module = importlib.import_module(f"experiments.configs.{name}")
    size = config.get("size", "small")
    return set(module.get_config(size if size in SIZES else "small"))


def _with_suggestion(field: str, known) -> str:
    import difflib

    def initials(name):  # learning_rate -> lr
        return "".join(w[:1] for w in name.split("_"))

    close = difflib.get_close_matches(field, sorted(known), n=1, cutoff=0.5)
    hint = close or [k for k in sorted(known) if initials(field) == k or initials(k) == field]
    return f"{field!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "")


def _parse_list(field: str, text: str, like: list) -> list:
    """``64,32``, ``(64,32)`` or ``[a, b]`` as a list whose items have the type of
    ``like``'s (strings when it is empty)."""
    items = [t.strip().strip("\"'") for t in text.strip().strip("()[]").split(",")]
    items = [t for t in items if t]
    kind = type(like[0]) if like else str
    try:
        return [kind(t) if kind is not bool else t.lower() in ("1", "true") for t in items]
    except ValueError:
        raise _UsageError(
            f"--config.{field}={text!r}: items must be {kind.__name__}s (e.g. "
            f"--config.{field}={','.join(str(x) for x in like) or 'a,b'})"
        ) from None


def _help_text(name: str, args: list[str]) -> str:
    """Usage, flags, and every config field with its value (after the given overrides)."""
    lines = [
        f"usage: python -m experiments.{name} [--workdir=DIR] "
        f"[--config=experiments/configs/{name}.py:quick|small|paper] [--config.FIELD=VALUE ...]",
        "",
        f"  --workdir      output directory, resumed when rerun (default runs/{name})",
        "  --config       config file and size (default :small)",
        "  --distributed  call jax.distributed.initialize() first (multi-host)",
        "",
    ]
    try:
        _, cfg = _parse(name, args)
    except _UsageError as e:
        return "\n".join([*lines, f"(config not loaded: {e})"])
    lines.append(f"config fields (--config.FIELD=VALUE; size {cfg.size}):")
    for k in sorted(cfg):
        lines.append(f"  {k:<22} {cfg[k]!r}")
    return "\n".join(lines)


def _initialize_distributed() -> None:
    """`jax.distributed.initialize`, from the cluster (Slurm, TPU pod) or the environment.

    Outside a cluster JAX detects, set ``JAX_COORDINATOR_ADDRESS`` (read by JAX),
    ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` (read here) for every process.
    """
    import jax

    names = {"num_processes": "JAX_NUM_PROCESSES", "process_id": "JAX_PROCESS_ID"}
    jax.distributed.initialize(
        **{k: int(os.environ[v]) for k, v in names.items() if v in os.environ}
    )
