"""The compiled train step: `make_train_step`, `compile_step` and `TrainStep`.

`make_train_step` builds the one step every method trains through (a loss function and
a gradient estimator, see `wspace.training`) and caches it on its arguments;
`compile_step` compiles any step body for a mode (jit | sharded | pmap, optionally
over a leading seed axis); ``TrainStep.scan`` runs many steps as one ``lax.scan``.
`enable_compilation_cache` keeps compiled steps on disk across processes.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from wspace import data as data_lib
from wspace.training._placement import _check_mode, default_mesh
from wspace.training._state import TrainState

SEED_LOOPS = ("vmap", "map", "unroll")  # how a step with a seed axis covers the seeds


def make_train_step(
    loss_fn: Callable,
    tx: optax.GradientTransformation,
    *,
    estimator: Callable = jax.value_and_grad,
    mode: str = "jit",
    mesh: jax.sharding.Mesh | None = None,
    donate: bool = True,
    seed_axis: bool = False,
    seed_loop: str = "vmap",
    seed_tx_args: bool = False,
) -> TrainStep:
    """Builds a compiled train step ``step(state, batch, tx_args=None) -> (state, metrics)``.

    One step: split the key, ``(loss, (model_state, metrics)), g =
    estimator(loss_fn, has_aux=True)(params, model_state, batch, key)``,
    ``u, opt_state = tx.update(g, opt_state, params, **tx_args)``, ``params += u``.

    Compiled once: a step built again from the same ``loss_fn``, ``tx`` and ``estimator``
    objects (and options) is the same `TrainStep`, so it does not trace or compile again
    (as flax's ``TrainState`` keeps ``apply_fn``/``tx`` static). ``step.scan`` runs many
    steps as one ``lax.scan`` call (what `fit` uses between evaluations).

    Args:
      loss_fn: the library's loss signature (see `wspace.training`).
      tx: any optax transformation; ``tx_args`` (a dict of arrays, e.g. anchor
        inputs) is passed to ``tx.update`` as extra keyword arguments.
      estimator: gradient estimator with the shape of `jax.value_and_grad`.
      mode: ``jit``, ``sharded`` or ``pmap``. In ``sharded`` mode, place the
        state with `place_state` and batches with `place_batch`; in ``pmap``
        mode the same functions replicate the state and split the batch.
      mesh: the mesh for ``sharded`` mode (default: `default_mesh`).
      donate: donate the input state's buffers to the output.
      seed_axis: train S seeds as one program: the state (from `init_states`) and each
        batch carry a leading seed axis, the step is ``vmap``-ed over it, ``tx_args`` are
        shared by all seeds and metrics are per seed. In ``sharded`` mode the seed axis is
        split over the mesh (seeds on different devices and hosts) when S divides by the
        number of devices, else each batch is (see `place_state`); not in ``pmap`` mode.
      seed_loop: with ``seed_axis``, how the one compiled step covers the seeds (`SEED_LOOPS`):
        ``"vmap"`` (default: batched, the fastest for dense nets and on accelerators),
        ``"map"`` (``lax.map``, one seed after another: memory of one seed's activations)
        or ``"unroll"`` (S copies of the one-seed step in the program, no batching: for
        convolutions on XLA:CPU, where ``vmap`` turns them into slow grouped convolutions;
        compilation grows with S). The state and results are the same every way (float
        tolerance). Measured on CPU, a step of 8 ResNet-20 seeds (batch 32): vmap 5.9 s and
        map 20 s against 0.15 s for one seed; in another run unroll 0.78 s against 0.11 s
        for one seed (0.91x eight single steps), compiled in 17 s against 2 s (README, Speed).
      seed_tx_args: with ``seed_axis``, ``tx_args`` carry the seed axis too (each seed its
        own, e.g. FIP anchors from its batch: ``fit(tx_args=lambda b: {"anchors": b["x"]})``).
    """
    _check_mode(mode)
    if mode == "sharded":
        mesh = mesh or default_mesh()
    key = (loss_fn, tx, estimator, mode, mesh, donate, seed_axis, seed_loop, seed_tx_args)
    try:
        return _cached_train_step(*key)
    except TypeError:  # an unhashable argument: build without the cache
        return _build_train_step(*key)


def _build_train_step(
    loss_fn, tx, estimator, mode, mesh, donate, seed_axis, seed_loop, seed_tx_args
) -> TrainStep:
    def step(state: TrainState, batch, tx_args, axis_name=None):
        key, sub = jax.random.split(state.key)
        if axis_name is not None:  # different noise per device, same key stream
            sub = jax.random.fold_in(sub, jax.lax.axis_index(axis_name))
        grad_fn = estimator(loss_fn, has_aux=True)
        (loss, (model_state, metrics)), grads = grad_fn(state.params, state.model_state, batch, sub)
        metrics = {**metrics, "loss": jnp.mean(loss)}
        if axis_name is not None:
            grads, model_state, metrics = jax.lax.pmean((grads, model_state, metrics), axis_name)
        _check_opt_state(tx, state)
        updates, opt_state = tx.update(grads, state.opt_state, state.params, **(tx_args or {}))
        params = optax.apply_updates(state.params, updates)
        new_state = state.replace(
            step=state.step + 1,
            params=params,
            model_state=model_state,
            opt_state=opt_state,
            key=key,
        )
        return new_state, metrics

    seeds = dict(seed_axis=seed_axis, seed_loop=seed_loop, seed_tx_args=seed_tx_args)
    return compile_step(step, mode, mesh, donate=donate, **seeds)


_cached_train_step = functools.lru_cache(maxsize=128)(_build_train_step)


def _check_opt_state(tx: optax.GradientTransformation, state: TrainState) -> None:
    """At trace time: ``state.opt_state`` must be of the kinds ``tx.init`` builds (not
    another optimizer's state, which fails later with a cryptic error in ``tx.update``)."""
    have, want = _state_kinds(state.opt_state), _state_kinds(jax.eval_shape(tx.init, state.params))
    if have != want:
        raise ValueError(
            f"state.opt_state ({have}) does not match tx (whose init builds {want}); build "
            "the state with this tx, or state.replace(opt_state=tx.init(state.params))"
        )


def _state_kinds(opt_state) -> list[str] | str:
    """The type names of an optimizer state's parts (a chain's state is a tuple of parts)."""
    if type(opt_state) is tuple:
        return [type(part).__name__ for part in opt_state]
    return type(opt_state).__name__


class TrainStep:
    """A compiled train step: ``step(state, batch, tx_args=None) -> (state, metrics)``.

    ``step.scan(state, batches, tx_args=None)`` runs ``T`` steps as one ``lax.scan`` over
    ``batches`` stacked on a leading step axis (and ``tx_args`` either shared, or stacked
    per step with ``per_step_args=True``); it returns the metrics stacked the same way and
    the state of ``T`` single calls (bit for bit for dense nets on CPU; a convolution
    compiled inside the loop may differ in the last bits). Attributes ``mode``, ``mesh``
    and ``seed_axis`` tell `fit` how to feed it.
    """

    def __init__(
        self,
        body: Callable,
        mode: str,
        mesh,
        *,
        donate: bool,
        seed_axis: bool,
        seed_loop: str = "vmap",
        seed_tx_args: bool = False,
    ):
        self.mode, self.mesh, self.seed_axis = mode, mesh, seed_axis
        donate_argnums = (0,) if donate else ()
        if mode == "pmap":
            if seed_axis:
                raise ValueError("seed_axis needs mode 'jit' or 'sharded' (pmap is per device)")
            self._one = jax.pmap(
                lambda s, b, a: body(s, b, a, axis_name="batch"),
                axis_name="batch",
                in_axes=(0, 0, None),
                donate_argnums=donate_argnums,
            )
            self._many = None
            return
        one = _over_seeds(body, seed_loop, seed_tx_args) if seed_axis else body

        def many(state, batches, shared_args, step_args):
            def scan_body(s, xs):
                batch, args = xs
                return one(s, batch, shared_args if args is None else args)

            return jax.lax.scan(scan_body, state, (batches, step_args))

        # sharded with a seed axis: the layout follows the inputs (`place_state`, `place_batch`)
        if mode == "jit" or seed_axis:
            self._one = jax.jit(one, donate_argnums=donate_argnums)
            self._many = jax.jit(many, donate_argnums=donate_argnums)
            return
        repl = NamedSharding(mesh, P())
        self._one = jax.jit(
            one,
            in_shardings=(repl, NamedSharding(mesh, P("data")), repl),
            out_shardings=(repl, repl),
            donate_argnums=donate_argnums,
        )
        self._many = jax.jit(
            many,
            in_shardings=(repl, NamedSharding(mesh, P(None, "data")), repl, repl),
            out_shardings=(repl, repl),
            donate_argnums=donate_argnums,
        )

    @property
    def can_scan(self) -> bool:
        """Whether `scan` is available (every mode but ``pmap``)."""
        return self._many is not None

    def __call__(self, state, batch, tx_args=None):
        return self._one(state, batch, tx_args)

    def scan(
        self,
        state: TrainState,
        batches: dict,
        tx_args: dict | None = None,
        *,
        per_step_args: bool = False,
    ) -> tuple[TrainState, dict]:
        """``T`` steps in one call; ``batches`` (and per-step ``tx_args``) stacked on axis 0."""
        if self._many is None:
            raise ValueError("scan needs mode 'jit' or 'sharded'; call the step per batch")
        if per_step_args:
            return self._many(state, batches, None, tx_args)
        return self._many(state, batches, tx_args, None)


def _over_seeds(body: Callable, seed_loop: str, seed_args: bool = False) -> Callable:
    """``body`` over a leading seed axis of state and batch (and of ``tx_args`` with
    ``seed_args``; else they are shared), by ``seed_loop`` (see `make_train_step`)."""
    if seed_loop == "vmap":
        return jax.vmap(body, in_axes=(0, 0, 0 if seed_args else None))
    if seed_loop == "map":
        if seed_args:
            return lambda state, batch, args: jax.lax.map(lambda x: body(*x), (state, batch, args))
        return lambda state, batch, args: jax.lax.map(lambda x: body(*x, args), (state, batch))

    def unrolled(state, batch, args):
        def seed(i):
            pick = lambda tree: jax.tree.map(lambda x: x[i], tree)  # noqa: E731
            return body(pick(state), pick(batch), pick(args) if seed_args else args)

        outs = [seed(i) for i in range(state.step.shape[0])]  # the seed count is static
        return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)

    return unrolled


def _check_seed_loop(seed_loop: str, seed_axis: bool) -> None:
    if seed_loop not in SEED_LOOPS:
        raise ValueError(f"unknown seed_loop {seed_loop!r}; use one of {SEED_LOOPS}")
    if seed_loop != "vmap" and not seed_axis:
        raise ValueError(f"seed_loop={seed_loop!r} needs seed_axis=True (a leading seed axis)")


def compile_step(
    step: Callable,
    mode: str,
    mesh: jax.sharding.Mesh | None = None,
    *,
    donate: bool = True,
    seed_axis: bool = False,
    seed_loop: str = "vmap",
    seed_tx_args: bool = False,
) -> TrainStep:
    """Compiles ``step(state, batch, tx_args, axis_name=None) -> (state, metrics)`` for ``mode``.

    ``jit``: one device; ``sharded``: ``tx_args`` replicated, and either the state
    replicated with the batch split along ``data`` of ``mesh`` (default `default_mesh`),
    or, with ``seed_axis``, state and batch split along their leading seed axis (seeds
    covered as ``seed_loop`` says: ``vmap``, ``map`` or ``unroll``); ``pmap``:
    over local devices with ``axis_name="batch"`` (``step`` averages what it must).
    ``seed_tx_args``: as in `make_train_step`. Method modules with their own step body
    (e.g. `wspace.late_phase`) compile it here.

    Returns:
      a `TrainStep`.
    """
    _check_mode(mode)
    if seed_tx_args and not seed_axis:
        raise ValueError("seed_tx_args=True needs seed_axis=True (tx_args per seed)")
    _check_seed_loop(seed_loop, seed_axis)
    if mode == "sharded":
        mesh = mesh or default_mesh()
    return TrainStep(step, mode, mesh, donate=donate, seed_axis=seed_axis, seed_loop=seed_loop,
                     seed_tx_args=seed_tx_args)  # fmt: skip


def enable_compilation_cache(path: str | None = None) -> str | None:
    """Turns on JAX's persistent compilation cache; returns its folder (None: turned off).

    A second process that compiles the same step loads it from disk instead of compiling
    again. The folder is ``path``, else ``$WSPACE_COMPILATION_CACHE``, else ``jax`` under
    the library's cache folder (``$WSPACE_CACHE/wspace`` or ``~/.cache/wspace``, where
    the embedded data is cached too). ``WSPACE_COMPILATION_CACHE=0`` turns it off.
    Experiments and the tests call it at start.
    """
    path = path or os.environ.get("WSPACE_COMPILATION_CACHE")
    if path == "0":
        return None
    path = path or os.path.join(data_lib.cache_root(), "jax")
    jax.config.update("jax_compilation_cache_dir", path)
    # every program, however fast to compile: eager ops and small steps add up (a notebook
    # ran in 13 s instead of 28 s with them cached; the warm test suite in 258 s, not 377 s)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path
