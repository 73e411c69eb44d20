"""Train state, train/eval steps (jit | sharded | pmap) and the generic `fit` loop.

The two kinds of pure functions meet here (see DESIGN.md):

* A **loss function** has the signature
  ``loss_fn(params, model_state, batch, key) -> (loss, (new_model_state, metrics))``
  where ``model_state`` holds the non-parameter collections (``{"batch_stats": ...}``
  for BatchNorm models, ``{}`` otherwise). `classification_loss` builds one for
  any flax classifier.
* A **gradient estimator** has the shape of `jax.value_and_grad`:
  ``estimator(loss_fn, has_aux=True) -> fn(params, model_state, batch, key)
  -> ((loss, aux), grads)``. Backprop is `jax.value_and_grad` itself; the
  method modules provide others. `make_train_step` takes the estimator as an
  argument, so every method trains through the same step.

Modes: ``jit`` (one device), ``sharded`` (a `jax.sharding.Mesh` over all
devices, batch split along ``data``, params replicated; multi-host after
``jax.distributed.initialize()``), ``pmap`` (the legacy idiom: state
replicated with a leading device axis, gradients ``pmean``-ed). In ``pmap``
mode, BatchNorm normalises with per-device batch statistics (flax's default
without ``axis_name``; the running averages are then ``pmean``-ed) and random
keys are folded with the device index.

`fit` drives any train step over a `wspace.data.Dataset` or any iterable of batches,
evaluates with any ``eval_fn(state) -> dict`` (classification by default), writes
metrics through `wspace.io` writers, and checkpoints, verifies and resumes through
`wspace.io.Checkpointer` (all file handling lives in `wspace.io`).

Many hosts: start the same script once per host and call
``jax.distributed.initialize()`` before anything else (it reads Slurm's or a TPU pod's
environment; elsewhere pass ``coordinator_address``, ``num_processes``, ``process_id``),
then use ``mode="sharded"``: `fit` gives each process its slice of every global batch,
only process 0 writes the files written once, and orbax coordinates the checkpoints.
tests/test_multihost.py runs two such processes on one machine (gloo CPU collectives).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from jax.typing import ArrayLike

from wspace import data as data_lib
from wspace import io

MODES = ("jit", "sharded", "pmap")
PyTree = Any


class TrainState(flax.struct.PyTreeNode):
    """Everything a step changes: ``step``, ``params``, ``model_state``, ``opt_state``, ``key``.

    ``model_state`` is the dict of non-parameter flax collections (BatchNorm's
    ``batch_stats``); ``key`` is a raw ``uint32[2]`` PRNG key, split every step.
    """

    step: jax.Array
    params: PyTree
    model_state: PyTree
    opt_state: PyTree
    key: jax.Array

    @property
    def variables(self) -> dict:
        """``{"params": ..., **model_state}``, ready for ``model.apply``."""
        return {"params": self.params, **self.model_state}


def init_state(
    model: flax.linen.Module, tx: optax.GradientTransformation, sample_x: ArrayLike, key: jax.Array
) -> TrainState:
    """Initialises a model's variables and the optimizer state.

    Args:
      model: a flax.linen module called as ``model(x, train=...)``.
      tx: an optax transformation.
      sample_x: one batch (or one example with a leading axis) of inputs.
      key: PRNG key; split into the init key and the state's running key.
    """
    init_key, run_key = jax.random.split(key)
    # jit: one compile instead of dozens of small eager ones (same values on CPU)
    variables = jax.jit(lambda k, x: model.init(k, x, train=False))(init_key, jnp.asarray(sample_x))
    params = variables["params"]
    model_state = {k: v for k, v in dict(variables).items() if k != "params"}
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        model_state=model_state,
        opt_state=jax.jit(tx.init)(params),
        key=run_key,
    )


def classification_loss(apply_fn: Callable, *, per_example: bool = False) -> Callable:
    """Softmax cross-entropy loss of a flax classifier, in the library's loss signature.

    ``L = -1/B sum_b log softmax(f(x_b))[y_b]``, with the model in train mode
    (BatchNorm uses batch statistics and updates its running averages).

    Args:
      apply_fn: ``model.apply``.
      per_example: return the (B,) vector of losses instead of the mean
        (for estimators that weight each example's loss, e.g. likelihood ratios).

    Returns:
      ``loss_fn(params, model_state, batch, key) -> (loss, (model_state, metrics))``
      with ``metrics = {"loss", "accuracy"}``.
    """

    def loss_fn(params, model_state, batch, key):
        variables = {"params": params, **model_state}
        rngs = {"dropout": key} if key is not None else None
        if model_state:
            logits, new_state = apply_fn(
                variables, batch["x"], train=True, mutable=list(model_state), rngs=rngs
            )
        else:
            logits, new_state = apply_fn(variables, batch["x"], train=True, rngs=rngs), {}
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])
        metrics = {
            "loss": jnp.mean(losses),
            "accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["y"]),
        }
        return (losses if per_example else jnp.mean(losses)), (dict(new_state), metrics)

    return loss_fn


def default_mesh() -> jax.sharding.Mesh:
    """A 1-D mesh named ``data`` over all devices (of all processes)."""
    return jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def make_train_step(
    loss_fn: Callable,
    tx: optax.GradientTransformation,
    *,
    estimator: Callable = jax.value_and_grad,
    mode: str = "jit",
    mesh: jax.sharding.Mesh | None = None,
    donate: bool = True,
    seed_axis: bool = False,
    vectorize_seeds: bool = True,
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
      loss_fn: the library's loss signature (see module docstring).
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
      vectorize_seeds: with ``seed_axis``, ``vmap`` the seeds (True) or run them one after
        another inside the same compiled step (``lax.map``; False). On XLA:CPU a vmapped
        convolution with per-seed kernels becomes a grouped convolution that ran ~2.8x
        slower than the loop for the ConvNet (8 seeds); dense models and accelerators
        favour vmap. The state and results are the same either way (float tolerance).
      seed_tx_args: with ``seed_axis``, ``tx_args`` carry the seed axis too (each seed its
        own, e.g. FIP anchors from its batch: ``fit(tx_args=lambda b: {"anchors": b["x"]})``).
    """
    _check_mode(mode)
    if mode == "sharded":
        mesh = mesh or default_mesh()
    key = (loss_fn, tx, estimator, mode, mesh, donate, seed_axis, vectorize_seeds, seed_tx_args)
    try:
        return _cached_train_step(*key)
    except TypeError:  # an unhashable argument: build without the cache
        return _build_train_step(*key)


def _build_train_step(
    loss_fn, tx, estimator, mode, mesh, donate, seed_axis, vectorize_seeds, seed_tx_args
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

    return compile_step(
        step, mode, mesh, donate=donate, seed_axis=seed_axis, vectorize_seeds=vectorize_seeds,
        seed_tx_args=seed_tx_args,
    )  # fmt: skip


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
    gives bit-for-bit the state of ``T`` single calls on CPU. Attributes ``mode``, ``mesh``
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
        vectorize_seeds: bool = True,
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
        one = _over_seeds(body, vectorize_seeds, seed_tx_args) if seed_axis else body

        def many(state, batches, shared_args, step_args):
            def scan_body(s, xs):
                batch, args = xs
                return one(s, batch, shared_args if args is None else args)

            return jax.lax.scan(scan_body, state, (batches, step_args))

        if mode == "jit":
            self._one = jax.jit(one, donate_argnums=donate_argnums)
            self._many = jax.jit(many, donate_argnums=donate_argnums)
            return
        if seed_axis:  # the layout follows the inputs (`place_state`, `place_batch`)
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


def _over_seeds(body: Callable, vectorize: bool, seed_args: bool = False) -> Callable:
    """``body`` over a leading seed axis of state and batch (and of ``tx_args`` with
    ``seed_args``; else they are shared)."""
    if vectorize:
        return jax.vmap(body, in_axes=(0, 0, 0 if seed_args else None))
    if seed_args:
        return lambda state, batch, args: jax.lax.map(lambda sba: body(*sba), (state, batch, args))
    return lambda state, batch, args: jax.lax.map(lambda sb: body(*sb, args), (state, batch))


def compile_step(
    step: Callable,
    mode: str,
    mesh: jax.sharding.Mesh | None = None,
    *,
    donate: bool = True,
    seed_axis: bool = False,
    vectorize_seeds: bool = True,
    seed_tx_args: bool = False,
) -> TrainStep:
    """Compiles ``step(state, batch, tx_args, axis_name=None) -> (state, metrics)`` for ``mode``.

    ``jit``: one device; ``sharded``: ``tx_args`` replicated, and either the state
    replicated with the batch split along ``data`` of ``mesh`` (default `default_mesh`),
    or, with ``seed_axis``, state and batch split along their leading seed axis (seeds
    ``vmap``-ed, or looped with ``lax.map`` for ``vectorize_seeds=False``); ``pmap``:
    over local devices with ``axis_name="batch"`` (``step`` averages what it must).
    ``seed_tx_args``: as in `make_train_step`. Method modules with their own step body
    (e.g. `wspace.late_phase`) compile it here.

    Returns:
      a `TrainStep`.
    """
    _check_mode(mode)
    if mode == "sharded":
        mesh = mesh or default_mesh()
    return TrainStep(
        step, mode, mesh, donate=donate, seed_axis=seed_axis, vectorize_seeds=vectorize_seeds,
        seed_tx_args=seed_tx_args,
    )  # fmt: skip


def init_states(
    model: flax.linen.Module,
    tx: optax.GradientTransformation,
    sample_x: ArrayLike,
    seeds: Sequence[int],
) -> TrainState:
    """`init_state` for every seed at once: a `TrainState` with a leading seed axis.

    Slice ``i`` is ``init_state(model, tx, sample_x, jax.random.PRNGKey(seeds[i]))``
    (its own initialisation and PRNG stream), ready for a step built with ``seed_axis``.
    """
    seeds = _check_seeds(seeds)
    keys = jnp.stack([jax.random.PRNGKey(s) for s in seeds])
    return jax.vmap(lambda k: init_state(model, tx, sample_x, k))(keys)


def seed_slice(tree: PyTree, index: int) -> PyTree:
    """Slice ``index`` of a tree with a leading seed axis (a state, params, metrics)."""
    return jax.tree.map(lambda x: x[index], tree)


def place_state(
    state: TrainState,
    mode: str,
    mesh: jax.sharding.Mesh | None = None,
    *,
    seed_axis: bool = False,
) -> TrainState:
    """Puts a host state where a step of ``mode`` expects it.

    ``sharded``: replicated; with ``seed_axis``, split along the leading seed axis when
    the number of seeds divides by the number of devices (else replicated, and batches
    are split along their batch axis instead); ``pmap``: replicated with a leading device
    axis; ``jit``: unchanged.
    """
    _check_mode(mode)
    if mode == "sharded":
        mesh = mesh or default_mesh()
        sharding = _state_sharding(mode, mesh, seed_axis, state)
        return _global_array(state, sharding) if seed_axis else jax.device_put(state, sharding)
    if mode == "pmap":
        devices = jax.local_devices()
        sharding = NamedSharding(jax.sharding.Mesh(devices, ("batch",)), P("batch"))
        stacked = jax.tree.map(lambda x: np.broadcast_to(x, (len(devices),) + x.shape), state)
        return jax.device_put(stacked, sharding)
    return state


def _state_sharding(mode: str, mesh, seed_axis: bool, state: TrainState):
    """Where `place_state` puts ``state`` (None outside ``sharded`` mode)."""
    if mode != "sharded":
        return None
    split = seed_axis and len(state.step) % mesh.size == 0
    return NamedSharding(mesh, P("data") if split else P())


def unplace_state(state: TrainState, mode: str) -> TrainState:
    """The inverse of `place_state`: one copy of the state (the first device's under pmap)."""
    if mode == "pmap":
        return jax.tree.map(lambda x: x[0], state)
    return state


def place_batch(
    batch: dict,
    mode: str,
    mesh: jax.sharding.Mesh | None = None,
    *,
    seed_axis: bool = False,
    stacked: bool = False,
) -> dict:
    """Puts this process's batch where a step of ``mode`` expects it.

    ``sharded``: a global array split along ``data``: along the batch axis (each process
    passes its local slice, as `wspace.data.batches` yields with ``process_index``), or,
    with ``seed_axis``, along the seed axis as `place_state` splits the state (every
    process passes the whole batch of every seed); ``stacked``: batches for
    `TrainStep.scan`, with a leading step axis.
    ``pmap``: reshaped to ``(local_devices, B / local_devices, ...)``.
    """
    _check_mode(mode)
    if mode == "sharded":
        mesh = mesh or default_mesh()
        lead = (None,) if stacked else ()
        if not seed_axis:
            sharding = NamedSharding(mesh, P(*lead, "data"))
            return jax.tree.map(
                lambda x: jax.make_array_from_process_local_data(sharding, x), batch
            )
        num_seeds = np.shape(jax.tree.leaves(batch)[0])[len(lead)]
        spec = (*lead, "data") if num_seeds % mesh.size == 0 else (*lead, None, "data")
        return _global_array(batch, NamedSharding(mesh, P(*spec)))
    if mode == "pmap":
        n = jax.local_device_count()
        if len(batch["x"]) % n:
            raise ValueError(f"batch of {len(batch['x'])} does not split over {n} devices")
        return jax.tree.map(lambda x: x.reshape((n, -1) + x.shape[1:]), batch)
    return batch


def _addressable(tree: PyTree) -> PyTree:
    """``tree`` with arrays split over other hosts gathered, so every process can read them."""

    def gather(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return multihost_utils.process_allgather(x, tiled=True)
        return x

    return jax.tree.map(gather, tree)


def _global_array(tree: PyTree, sharding) -> PyTree:
    """A tree of global arrays from host values every process holds in full."""

    def put(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:  # already global
            return jax.device_put(x, sharding)
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(put, tree)


def evaluate(
    apply_fn: Callable,
    variables: dict,
    x: np.ndarray,
    y: np.ndarray,
    batch_size: int = 1000,
    *,
    mode: str = "jit",
    mesh: jax.sharding.Mesh | None = None,
    seed_axis: bool = False,
) -> dict:
    """Mean cross-entropy and accuracy of a classifier in eval mode over ``(x, y)``.

    ``loss = 1/N sum_n CE(f(x_n), y_n)``, ``accuracy = 1/N sum_n [argmax f(x_n) = y_n]``,
    summed on the device by one jitted function over padded chunks of ``batch_size``
    (padding rows carry weight 0), so the host fetches two scalars at the end. In
    ``sharded`` mode, ``variables`` are the replicated (global) state and each chunk is
    split along ``data`` over the mesh, every process passing its slice (multi-host);
    ``jit`` and ``pmap`` evaluate one host copy on one device. With ``seed_axis``,
    ``variables`` carry a leading seed axis (split over the mesh in ``sharded`` mode,
    as `place_state` puts them) and each value is a list, one per seed.

    Args:
      apply_fn: ``model.apply``.
      variables: ``{"params": ..., **model_state}``.
      x, y: inputs and integer labels (every process passes the whole set).
      batch_size: examples per chunk.
      mode: ``jit``, ``sharded`` or ``pmap`` (as the train step).
      mesh: the mesh for ``sharded`` mode (default: `default_mesh`).
      seed_axis: ``variables`` hold one network per seed.
    """
    _check_mode(mode)
    n = len(x)
    if n == 0 or len(y) != n:
        raise ValueError(
            f"evaluate needs a non-empty set with one label per row, got {n} and {len(y)}"
        )
    split = 1
    if mode == "sharded" and not seed_axis:
        mesh = mesh or default_mesh()
        split = math.lcm(mesh.size, jax.process_count())
    chunk = -(-min(batch_size, n) // split) * split
    pad = -n % chunk
    xp = np.concatenate([np.asarray(x), np.zeros((pad, *np.shape(x)[1:]), np.asarray(x).dtype)])
    yp = np.concatenate([np.asarray(y), np.zeros(pad, np.asarray(y).dtype)])
    wp = np.concatenate([np.ones(n, np.float32), np.zeros(pad, np.float32)])
    local = chunk // jax.process_count()
    lo = jax.process_index() * local
    if seed_axis:
        total = jnp.zeros((len(jax.tree.leaves(variables)[0]), 2), jnp.float32)
    else:
        total = np.zeros(2, np.float32)  # type: ignore[assignment]  # summed into below
    sums = _eval_sums_seeds if seed_axis else _eval_sums
    for start in range(0, n + pad, chunk):
        batch = {"x": xp[start : start + chunk], "y": yp[start : start + chunk]}
        batch["w"] = wp[start : start + chunk]
        if mode == "sharded" and not seed_axis:
            batch = place_batch({k: a[lo : lo + local] for k, a in batch.items()}, mode, mesh)
        total = sums(apply_fn, variables, batch, total)
    sums_host = np.asarray(jax.device_get(_addressable(total)), np.float64)
    if seed_axis:
        return {"loss": list(sums_host[:, 0] / n), "accuracy": list(sums_host[:, 1] / n)}
    return {"loss": float(sums_host[0]) / n, "accuracy": float(sums_host[1]) / n}


def _eval_sums_one(apply_fn, variables, batch, total):
    logits = apply_fn(variables, batch["x"], train=False)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])
    hits = (jnp.argmax(logits, -1) == batch["y"]).astype(jnp.float32)
    return total + jnp.stack([jnp.sum(losses * batch["w"]), jnp.sum(hits * batch["w"])])


_eval_sums = jax.jit(_eval_sums_one, static_argnums=0)


@functools.partial(jax.jit, static_argnums=0)
def _eval_sums_seeds(apply_fn, variables, batch, total):
    one = functools.partial(_eval_sums_one, apply_fn)
    return jax.vmap(one, in_axes=(0, None, 0))(variables, batch, total)


def correct_predictions(
    apply_fn: Callable,
    variables: dict,
    x: np.ndarray,
    y: np.ndarray,
    batch_size: int = 1000,
    *,
    seed_axis: bool = False,
) -> np.ndarray:
    """Whether a classifier (eval mode) gets each example right: ``argmax f(x_n) == y_n``.

    Returns a bool array of shape ``(N,)``, or ``(S, N)`` for ``variables`` with a leading
    seed axis: what paired comparisons over a test set need (examples two arms disagree
    on; intervals over test-set sampling). ``evaluate``'s accuracy is its mean.
    """
    if len(x) == 0 or len(y) != len(x):
        raise ValueError(f"need a non-empty set with one label per row, got {len(x)}, {len(y)}")
    predict = _predictions_seeds if seed_axis else _predictions
    chunks = [
        np.asarray(
            jax.device_get(_addressable(predict(apply_fn, variables, x[i : i + batch_size])))
        )
        for i in range(0, len(x), batch_size)
    ]
    return np.concatenate(chunks, axis=-1) == np.asarray(y)


@functools.partial(jax.jit, static_argnums=0)
def _predictions(apply_fn, variables, x):
    return jnp.argmax(apply_fn(variables, x, train=False), -1)


@functools.partial(jax.jit, static_argnums=0)
def _predictions_seeds(apply_fn, variables, x):
    return jax.vmap(lambda v: jnp.argmax(apply_fn(v, x, train=False), -1))(variables)


def classification_eval(
    apply_fn: Callable,
    dataset: data_lib.Dataset,
    *,
    train_eval_examples: int | None = 1000,
    mode: str = "jit",
    mesh: jax.sharding.Mesh | None = None,
    seed_axis: bool = False,
) -> Callable[[TrainState], dict]:
    """The default ``eval_fn`` of `fit`: `evaluate` on the test split and part of train.

    Returns ``eval_fn(state) -> {"train_loss", "train_accuracy", "test_loss",
    "test_accuracy"}`` over the first ``train_eval_examples`` training examples (all of
    them for None; no ``train_*`` entries for 0) and the whole test split; with
    ``seed_axis`` each value is a list, one per seed.
    """
    n_train = len(dataset.x_train) if train_eval_examples is None else train_eval_examples
    n_train = min(n_train, len(dataset.x_train))
    splits = [("test", dataset.x_test, dataset.y_test)]
    if n_train > 0:
        splits.insert(0, ("train", dataset.x_train[:n_train], dataset.y_train[:n_train]))

    def eval_fn(state):
        record = {}
        for split, x, y in splits:
            values = evaluate(
                apply_fn, state.variables, x, y, mode=mode, mesh=mesh, seed_axis=seed_axis
            )
            record.update({f"{split}_{k}": v for k, v in values.items()})
        return record

    return eval_fn


def fit(
    state: TrainState,
    train_step: Callable,
    data: data_lib.Dataset | Iterable[dict],
    *,
    num_steps: int,
    batch_size: int | None = None,
    eval_fn: Callable[[TrainState], dict] | None = None,
    apply_fn: Callable | None = None,
    eval_every: int = 100,
    seed: int | Sequence[int] = 0,
    mode: str = "jit",
    mesh: jax.sharding.Mesh | None = None,
    workdir: str | None = None,
    checkpoint_every: int | None = None,
    tx_args: dict | Callable[[dict], dict] | None = None,
    writer: io.MetricWriter | None = None,
    train_eval_examples: int | None = 1000,
    progress: bool = True,
    steps_per_call: int | None = None,
    identity: Any = None,
) -> tuple[TrainState, list[dict]]:
    """Trains from ``state.step`` to ``num_steps`` with periodic evaluation and checkpoints.

    Every ``eval_every`` steps (and at the end) a record ``{"step", "time", "batch_<m>"
    (mean of each train-step metric since the last record), **eval_fn(state)}`` is added
    to the history and sent to the metric writers.

    Seeds as an axis: with a step built with ``seed_axis=True`` and a state from
    `init_states`, ``seed`` is the list of S seeds; each seed draws its own data order,
    every record value is a list (one per seed), one checkpoint holds all seeds, and each
    seed's result equals that seed trained alone (to floating-point tolerance).

    Fused steps: the steps between two evaluations/checkpoints run as ``lax.scan`` calls
    of ``steps_per_call`` steps (`TrainStep.scan`; default: the largest divisor of the
    evaluation/checkpoint period whose stacked batches stay under 64 MiB; 1 for the
    per-step loop), bit-for-bit the same state on CPU. The progress bar advances per call
    and its rate starts after the first call, so its ETA does not count compilation.

    With a ``workdir``: the workdir is locked (`wspace.io.workdir_lock`); its ``fit.json``
    holds the run's identity (num_steps, seed(s), batch_size, parameter shapes/dtypes, the
    caller's ``identity``) and a rerun with another identity is refused with the
    difference; ``metrics.jsonl`` gets every record (a torn last line is written again);
    a verified orbax checkpoint (`wspace.io.Checkpointer`) is written every
    ``checkpoint_every`` steps and at the end, only of a state whose every parameter,
    model-state and optimizer leaf is finite. A rerun resumes from the newest valid
    checkpoint (a damaged one falls back with a warning), truncates ``metrics.jsonl`` to
    it and skips the batches already consumed: bit-identical to an uninterrupted run on
    CPU. A non-finite loss or state stops the run with `FloatingPointError` naming the
    step and how to start over (a finite checkpoint may already be diverging, so it is
    not offered as a restart point). In a multi-process run every process
    calls `fit`; only process 0 locks, writes ``fit.json``/``metrics.jsonl`` and calls
    ``writer`` (orbax coordinates the checkpoint writes itself).

    Args:
      state: a host `TrainState` (from `init_state`, or `init_states` for a seed axis).
      train_step: from `make_train_step` with the same ``mode``/``mesh`` (any
        ``step(state, batch, tx_args)`` callable also works, one call per step).
      data: a `wspace.data.Dataset` (batches of ``batch_size`` drawn by
        `wspace.data.batches` with ``seed``, this process's slice in multi-host runs), or
        any iterable of batch dicts (this process's slice; with a seed axis, batches of
        every seed stacked on axis 0); resuming at step k skips the first k batches.
      num_steps: total steps (counted from step 0, also when resuming).
      batch_size: global batch size (needed for a Dataset).
      eval_fn: ``eval_fn(state) -> dict`` on the unplaced state; default for a
        Dataset: `classification_eval` (needs ``apply_fn``); none for other data.
      apply_fn: ``model.apply``, for the default evaluation.
      eval_every: record period in steps.
      seed: data-order seed (a list of seeds for a step with a seed axis).
      mode, mesh: as `make_train_step`.
      workdir: where the lock, identity, metrics and checkpoints go (None: nothing written).
      checkpoint_every: checkpoint period in steps (default: ``eval_every``).
      tx_args: extra arguments for ``tx.update``: a dict, or ``tx_args(batch) -> dict``
        called with each host batch (in multi-host runs it must return the same values on
        every process); shared by all seeds.
      writer: a metric writer (`wspace.io`) that also gets every record (process 0 only;
        steps redone after a resume are written to it again; per-seed values as
        ``<name>/seed_<s>``).
      train_eval_examples: training examples the default evaluation uses (None: all).
      progress: show a tqdm progress bar.
      steps_per_call: steps per compiled call (None: automatic; 1: one call per step).
      identity: JSON-able, whatever else shapes the result (e.g. the experiment's config
        with its learning rate): part of ``fit.json``'s identity, so a rerun with another
        one never resumes these checkpoints.

    Returns:
      ``(final state, list of records)``; on resume the records of the earlier run(s)
      are read back from ``metrics.jsonl``.
    """
    _validate_fit(
        state, data, num_steps, batch_size, eval_every, checkpoint_every, train_eval_examples
    )
    _check_callables(train_step=train_step, eval_fn=eval_fn, apply_fn=apply_fn)
    if not (tx_args is None or isinstance(tx_args, dict) or callable(tx_args)):
        raise ValueError(f"tx_args must be a dict, a callable(batch) or None, got {tx_args!r}")
    if writer is not None and not callable(getattr(writer, "write_scalars", None)):
        raise ValueError(f"writer must have write_scalars(step, scalars), got {writer!r}")
    seed_axis = bool(getattr(train_step, "seed_axis", False))
    seed = _check_fit_seed(seed, seed_axis, state)
    if steps_per_call is not None and not (_is_int(steps_per_call) and steps_per_call >= 1):
        raise ValueError(f"steps_per_call must be an int >= 1 or None, got {steps_per_call!r}")
    _check_mode(mode)
    if mode == "sharded":
        mesh = mesh or default_mesh()
    is_dataset = isinstance(data, data_lib.Dataset)
    if eval_fn is None and is_dataset:
        if apply_fn is None:
            raise ValueError("fit on a Dataset needs apply_fn (default evaluation) or eval_fn")
        eval_fn = classification_eval(
            apply_fn, data, train_eval_examples=train_eval_examples, mode=mode, mesh=mesh,  # type: ignore[arg-type]
            seed_axis=seed_axis,
        )  # fmt: skip
    primary = jax.process_index() == 0
    period = math.gcd(eval_every, checkpoint_every or eval_every)
    with contextlib.ExitStack() as stack:
        if workdir and primary:
            stack.enter_context(io.workdir_lock(workdir))
        ckpt = last_good = meta = None
        # running sums of the step metrics since the last record (saved with it)
        sums: dict[str, tuple[Any, int]] = {}
        if workdir:
            _check_identity(workdir, state, num_steps, seed, batch_size, primary, identity)
            ckpt = io.Checkpointer(os.path.join(workdir, "checkpoints"))
            stack.callback(ckpt.close)
            if ckpt.all_steps():
                sharding = _state_sharding(mode, mesh, seed_axis, state)
                last_good, state, meta = ckpt.restore_with_step(state, sharding=sharding)
                sums = {
                    k: (np.asarray(s), c) for k, (s, c) in (meta or {}).get("window", {}).items()
                }
        start = int(np.ravel(jax.device_get(_addressable(state.step)))[0])
        history = _resume_metrics(workdir, start, primary, (meta or {}).get("record"))
        writers: list[io.MetricWriter] = (
            [io.JsonlWriter(os.path.join(workdir, "metrics.jsonl"))] if workdir else []
        )
        writers = writers + ([writer] if writer is not None else []) if primary else []
        stack.callback(lambda: [w.close() if w is not writer else w.flush() for w in writers])  # type: ignore[func-returns-value]
        stream = _batch_stream(data, batch_size, seed, seed_axis) if is_dataset else iter(data)  # type: ignore[arg-type]  # is_dataset narrows data
        stream = itertools.islice(stream, start, None)  # resume: skip the batches already seen
        bar = progress_bar(
            total=num_steps, initial=start, disable=not (progress and primary), desc="train"
        )
        stack.callback(bar.close)
        placed = place_state(jax.tree.map(jnp.copy, state), mode, mesh, seed_axis=seed_axis)
        pending = []  # step metrics not yet checked for finiteness
        t0 = time.time()
        first = next(stream, None)
        stream = itertools.chain([first] if first is not None else [], stream)
        chunk = steps_per_call or (_auto_chunk(first, period, train_step) if first else 1)
        step = start
        while step < num_steps:
            n = _chunk_len(step, num_steps, period, chunk)
            batches = list(itertools.islice(stream, n))
            if len(batches) < n:
                raise ValueError(
                    f"data ran out after {step + len(batches)} batches; num_steps={num_steps}"
                )
            placed, metrics = _run_steps(train_step, placed, batches, tx_args, mode, mesh)
            pending.append((step + 1, n, metrics))
            bar.update(n)
            if step == start:  # the first call compiled: the rate counts from now
                _restart_rate(bar)
            step += n
            is_eval = step % eval_every == 0 or step == num_steps
            is_ckpt = ckpt is not None and (step % (checkpoint_every or eval_every) == 0)
            is_ckpt = is_ckpt or (ckpt is not None and step == num_steps)
            if is_eval or is_ckpt or len(pending) >= 50:
                _check_finite(_host_metrics(pending), sums, last_good, ckpt, seed_axis)
                pending = []
            if is_ckpt and not bool(_all_finite(placed)):
                raise FloatingPointError(
                    f"non-finite parameters or optimizer state after step {step}; not "
                    f"checkpointed, stopped ({_last_good_text(last_good, ckpt)}). "
                    "Lower the learning rate or check the inputs."
                )
            if is_eval:
                record = {"step": step, "time": round(time.time() - t0, 3)}
                record.update({f"batch_{k}": _to_float(s / c) for k, (s, c) in sums.items()})
                sums = {}
                if eval_fn is not None:
                    evals = eval_fn(unplace_state(placed, mode))
                    record.update({k: _to_float(v) for k, v in evals.items()})
                history.append(record)
                for w in writers:
                    w.write_scalars(step, _writer_scalars(record, seed, w is writer))
                if "test_accuracy" in record:
                    bar.set_postfix(test_acc=_short(record["test_accuracy"]))
            if is_ckpt:
                window = {k: (np.asarray(s).tolist(), c) for k, (s, c) in sums.items()}
                meta = {"window": window, "record": history[-1] if history else None}
                ckpt.save(step, unplace_state(placed, mode), meta=meta)  # type: ignore[union-attr]  # is_ckpt: ckpt set  # record: if torn
                last_good = step
    return unplace_state(placed, mode), history


def progress_bar(**kwargs: Any) -> Any:
    """A tqdm bar: the notebook widget where ipywidgets is installed, else plain text
    (`tqdm.auto` without ipywidgets warns ``IProgress not found`` in notebooks)."""
    import importlib.util

    if importlib.util.find_spec("ipywidgets") is not None:
        from tqdm.auto import tqdm
    else:
        from tqdm import tqdm
    return tqdm(**kwargs)


def _is_int(v) -> bool:
    return isinstance(v, int | np.integer) and not isinstance(v, bool)


def _check_seeds(seeds) -> list[int]:
    """A non-empty sequence of distinct ints, as a list; ValueError otherwise."""
    if isinstance(seeds, str) or not isinstance(seeds, Sequence | np.ndarray):
        raise ValueError(f"seeds must be a sequence of ints, got {seeds!r}")
    seeds = list(seeds)
    if not seeds or not all(_is_int(s) for s in seeds) or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be a non-empty sequence of distinct ints, got {seeds!r}")
    return [int(s) for s in seeds]


def _check_fit_seed(seed, seed_axis: bool, state: TrainState):
    """``seed`` as fit uses it: an int, or (for a seed-axis step) the list of seeds."""
    if not seed_axis:
        if not _is_int(seed):
            raise ValueError(f"seed must be an int, got {seed!r} (a list needs seed_axis=True)")
        return int(seed)
    seeds = _check_seeds(seed)
    if np.ndim(state.step) != 1 or len(state.step) != len(seeds):
        raise ValueError(
            f"a seed-axis step needs a state with a leading axis of {len(seeds)} seeds "
            f"(from init_states), got step of shape {np.shape(state.step)}"
        )
    if len(set(np.asarray(state.step).tolist())) != 1:
        raise ValueError(f"the seeds' states are at different steps: {state.step}")
    return seeds


def _batch_stream(data: data_lib.Dataset, batch_size: int, seed, seed_axis: bool):
    """Batches of a Dataset: this process's slice, or with a seed axis every seed's batch."""
    if not seed_axis:
        return data_lib.batches(
            data.x_train, data.y_train, batch_size, seed=seed, epochs=None,
            process_index=jax.process_index(), process_count=jax.process_count(),
        )  # fmt: skip
    return data_lib.seed_batches(data.x_train, data.y_train, batch_size, seed)


def _chunk_len(step: int, num_steps: int, period: int, chunk: int) -> int:
    """Steps in the next call: ``chunk``, never past an evaluation/checkpoint boundary."""
    boundary = min(num_steps, (step // period + 1) * period)
    return min(chunk, boundary - step)


def _auto_chunk(batch: dict, period: int, train_step) -> int:
    """The largest divisor of ``period`` whose stacked batches stay under 64 MiB."""
    if not getattr(train_step, "can_scan", False):
        return 1
    nbytes = sum(np.asarray(x).nbytes for x in jax.tree.leaves(batch))
    cap = max(1, min(period, (64 << 20) // max(nbytes, 1)))
    return max(d for d in range(1, cap + 1) if period % d == 0)


def _run_steps(train_step, placed, batches: list, tx_args, mode: str, mesh):
    """Runs ``len(batches)`` steps: one `TrainStep.scan` call, or one call per step."""
    seed_axis = getattr(train_step, "seed_axis", False)
    per_step = callable(tx_args)
    args = [tx_args(b) for b in batches] if per_step else [tx_args] * len(batches)
    if len(batches) == 1 or not getattr(train_step, "can_scan", False):
        metrics = []
        for batch, a in zip(batches, args, strict=True):
            placed, m = train_step(placed, place_batch(batch, mode, mesh, seed_axis=seed_axis), a)
            metrics.append(m)
        return placed, metrics
    stacked = jax.tree.map(lambda *xs: np.stack(xs), *batches)
    stacked = place_batch(stacked, mode, mesh, seed_axis=seed_axis, stacked=True)
    if per_step:
        step_args = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *args)
        return train_step.scan(placed, stacked, step_args, per_step_args=True)
    return train_step.scan(placed, stacked, tx_args)


def _host_metrics(pending: list) -> list[tuple[int, dict]]:
    """``[(step, metrics on the host)]`` from calls of one step (a list) or many (stacked)."""
    host = jax.device_get(_addressable([m for _, _, m in pending]))
    out = []
    for (first, n, _), metrics in zip(pending, host, strict=True):
        if isinstance(metrics, list):
            out += [(first + i, m) for i, m in enumerate(metrics)]
        else:
            out += [(first + i, {k: v[i] for k, v in metrics.items()}) for i in range(n)]
    return out


def _restart_rate(bar) -> None:
    """Counts the bar's rate from now: its ETA leaves out the first call's compilation."""
    if not bar.disable:
        bar.start_t = bar.last_print_t = bar._time()
        bar.initial = bar.last_print_n = bar.n


def _writer_scalars(record: dict, seed, flatten: bool) -> dict:
    """A record without its step; per-seed lists become ``<name>/seed_<s>`` for ``flatten``."""
    out = {}
    for k, v in record.items():
        if k == "step":
            continue
        if flatten and isinstance(seed, list) and isinstance(v, list):
            out.update({f"{k}/seed_{s}": x for s, x in zip(seed, v, strict=True)})
        else:
            out[k] = v
    return out


def _short(v) -> str:
    return f"{np.mean(v):.3f}"


def _validate_fit(state, data, num_steps, batch_size, eval_every, ckpt_every, train_eval) -> None:
    """Bad arguments of `fit` -> ValueError before any work or file write."""
    for name, value, optional in (
        ("num_steps", num_steps, False),
        ("eval_every", eval_every, False),
        ("checkpoint_every", ckpt_every, True),
        ("batch_size", batch_size, True),
    ):
        if not (optional and value is None) and not (_is_int(value) and value >= 1):
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if train_eval is not None and not (_is_int(train_eval) and train_eval >= 0):
        raise ValueError(f"train_eval_examples must be an int >= 0 or None, got {train_eval!r}")
    if isinstance(data, data_lib.Dataset):
        if batch_size is None:
            raise ValueError("fit on a Dataset needs batch_size")
    elif not isinstance(data, Iterable):
        raise ValueError(
            f"data must be a wspace.data.Dataset or an iterable of batches, got {type(data)}"
        )
    at = int(np.max(state.step))
    if at > num_steps:
        raise ValueError(f"state is at step {at}, beyond num_steps={num_steps}")


def _check_callables(**fns) -> None:
    for name, fn in fns.items():
        if fn is not None and not callable(fn):
            raise ValueError(f"{name} must be callable, got {fn!r}")
    if fns["train_step"] is None:
        raise ValueError("train_step must be callable (from make_train_step), got None")


def _check_identity(workdir, state, num_steps, seed, batch_size, primary, identity=None) -> None:
    """Stores the run's identity in ``workdir/fit.json``, or refuses a different one.

    The identity is num_steps, seed, batch_size, the parameter signature and the caller's
    ``identity`` (e.g. its whole config: learning rate, model, ...) under ``"run"``. A
    workdir without checkpoints holds nothing to resume (e.g. a run that failed at its
    first step, or whose checkpoints were deleted to start over): its identity is replaced
    with a warning, so a fixed rerun just works.
    """
    path = os.path.join(workdir, "fit.json")
    current = {
        "num_steps": int(num_steps),
        "seed": seed,
        "batch_size": None if batch_size is None else int(batch_size),
        "params": io.tree_signature(state.params),
    }
    if identity is not None:
        try:  # stored as JSON, so compare as JSON (tuples become lists)
            current["run"] = json.loads(io.dumps(identity))
        except (TypeError, ValueError) as e:
            raise ValueError(f"fit identity must be JSON-able, got {identity!r}: {e}") from None
    ckpt_dir = os.path.join(workdir, "checkpoints")
    resumable = os.path.isdir(ckpt_dir) and any(n.isdigit() for n in os.listdir(ckpt_dir))
    if os.path.exists(path):
        recover = f"delete only {path} (the checkpoints stay valid) and rerun to resume"
        try:
            stored = io.read_json(path, recover=recover)
        except ValueError:
            if resumable:
                raise
            stored = {}
        if stored == current:
            return
        diffs = _dict_diff(stored, current)
        text = "; ".join(diffs[:4]) + (f" (+{len(diffs) - 4} more)" if len(diffs) > 4 else "")
        if resumable:
            raise ValueError(
                f"workdir {workdir} holds another run ({text}); use another workdir, or "
                "delete it to start over"
            )
        warnings.warn(
            f"workdir {workdir} held another run with no checkpoint ({text}); starting over",
            stacklevel=3,
        )
    if primary:
        io.write_json(path, current)


def _dict_diff(stored: dict, given: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(stored) | set(given), key=str):
        a, b = stored.get(k, "absent"), given.get(k, "absent")
        if isinstance(a, dict) and isinstance(b, dict):
            out += _dict_diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: stored {a}, given {b}")
    return out


def _resume_metrics(workdir, start: int, primary: bool, saved: dict | None = None) -> list[dict]:
    """Records up to the resumed step (one per step); process 0 rewrites the file so.

    ``saved`` is the newest record at the checkpoint's save (stored in its meta): a run
    killed while writing it leaves a torn last line, so it is written again from there.
    """
    if not workdir:
        return []
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        if start > 0:
            warnings.warn(
                f"{path} is missing; the history holds only steps after {start}", stacklevel=3
            )
        return []
    by_step = {}
    for r in io.read_jsonl(path, recover="delete it (the history then restarts) and rerun"):
        if not isinstance(r, dict) or "step" not in r:
            raise ValueError(f"{path} holds a record without 'step': {str(r)[:80]}")
        if r["step"] <= start:
            by_step[r["step"]] = r
    if saved is not None and saved.get("step", start + 1) <= start:
        by_step.setdefault(saved["step"], saved)
    kept = [by_step[s] for s in sorted(by_step)]
    if primary:
        io.write_jsonl(path, kept)
    return kept


def _check_finite(pending, sums: dict, last_good, ckpt, seed_axis: bool = False) -> None:
    """Raises on the first non-finite loss in ``pending`` (host ``[(step, metrics)]``).

    Adds the metrics to ``sums``: per seed with a seed axis, else averaged (pmap's
    per-device copies are equal).
    """
    for step, metrics in pending:
        loss = np.asarray(metrics["loss"], np.float64)
        if not np.isfinite(loss).all():
            raise FloatingPointError(
                f"non-finite loss {loss.ravel()[0]} at step {step}; stopped "
                f"({_last_good_text(last_good, ckpt)}). Lower the learning rate or check "
                "the inputs."
            )
        for k, v in metrics.items():
            s, c = sums.get(k, (0.0, 0))
            v = np.asarray(v, np.float64) if seed_axis else float(np.mean(v))
            sums[k] = (s + v, c + 1)


def _last_good_text(last_good, ckpt) -> str:
    """Where a stopped run can restart from.

    A checkpoint is only saved of a finite state, but finite is not healthy: one saved
    while the loss was already exploding (lr 1e6: params at 1e11) fails again when
    resumed, even with a lower learning rate. So the advice is to start over, which works
    for every cause (the workdir's identity is then replaced with a warning).
    """
    if ckpt is None:
        return "no workdir, so no checkpoints"
    if last_good is None:
        return "there is no good checkpoint"
    return (
        f"the newest checkpoint, step {last_good}, is finite but may already be diverging; "
        f"to start over, delete {ckpt.directory} or use a new workdir"
    )


@jax.jit
def _all_finite(state: TrainState) -> jax.Array:
    leaves = jax.tree.leaves((state.params, state.model_state, state.opt_state))
    checks = [jnp.all(jnp.isfinite(x)) for x in leaves if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(checks)) if checks else jnp.array(True)


def _to_float(v):
    return float(v) if np.ndim(v) == 0 else np.asarray(v).tolist()


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
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


def check_learning_rate(learning_rate: optax.ScalarOrSchedule, name: str = "learning_rate") -> None:
    """Raises ValueError for a numeric learning rate that is not finite and > 0.

    Where wspace builds an optimizer: a negative rate ascends the loss (it trained to
    7e17 and exited 0). Schedules (callables) are the caller's to check.
    """
    if callable(learning_rate):
        return
    try:
        value = float(learning_rate)  # Python, NumPy and concrete JAX scalars
    except jax.errors.ConcretizationTypeError:
        return  # traced (e.g. optax.inject_hyperparams under jit)
    except (TypeError, ValueError):
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be finite and > 0 (or a schedule), got {learning_rate!r}")


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; use one of {MODES}")


def num_params(params: PyTree) -> int:
    """Total number of scalars in a pytree."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(params))
