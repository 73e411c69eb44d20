"""Pruning masks as pytrees: magnitude and random pruning, schedules, the mask-keeping transform.

A **mask** is a boolean pytree shaped like the params: ``True`` keeps a
weight, ``False`` prunes it. Leaves are named by their path (`wspace.paths`), e.g.
``"Dense_0/kernel"`` or ``"head/bias"``; a leaf is *prunable* unless the
``exclude`` predicate says otherwise (default `default_exclude`: leaves with
``ndim < 2``, i.e. biases and normalisation scales/offsets, are never pruned).

* `magnitude_masks` / `random_masks`: remove a fraction of the *surviving*
  prunable weights, globally or layer by layer, with per-layer rates (the
  lottery-ticket recipe prunes 20% per round and 10% for the output layer:
  ``layer_sparsity={"head": 0.1}``). `shuffle_masks` draws a random mask with
  exactly the per-layer counts of a given one.
* `apply_masks`, `sparsity`, `check_masks`.
* `mask_gradients` and `keep_masked`: optax transformations for training a
  pruned network. `mask_gradients` (first in a chain) zeroes the pruned
  entries of the gradient, so no transformation after it (global-norm
  clipping, Adam's moments) ever sees them; `keep_masked` (last) keeps pruned
  weights exactly zero by emitting ``m * u - (1 - m) * params``::

      optax.chain(mask_gradients(), optax.clip_by_global_norm(1.0),
                  optax.sgd(0.1, momentum=0.9), keep_masked())

  updates the surviving weights exactly as the same chain updates them from a
  gradient whose pruned entries are zero. Both take the masks at
  construction or as the extra argument ``masks=`` of ``update`` (which
  ``optax.chain`` hands to every member); `set_masks` puts masks into their
  states (one per seed for a state with a seed axis).
* `gradual_pruning`: the polynomial schedule of Zhu & Gupta (2017, arXiv
  1710.01878) as a transformation whose mask lives in its state and is
  updated inside jit.

Design reference: google-research/jaxpruner (Lee et al. 2023, arXiv 2304.14082).
"""

from __future__ import annotations

import functools
import numbers
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.typing import ArrayLike

from wspace import paths

PyTree = Any
Exclude = Callable[[str, Any], bool]
LayerSparsity = Mapping[str, float] | Callable[[str, Any], float | None] | None
SCOPES = ("global", "layerwise")


# --------------------------------------------------------------------------------------
# naming and validation


def default_exclude(name: str, leaf: ArrayLike) -> bool:
    """Never prune leaves with ``ndim < 2`` (biases, BatchNorm/LayerNorm scales and offsets)."""
    del name
    return jnp.ndim(leaf) < 2


def _check_fraction(value, what: str = "sparsity") -> None:
    if isinstance(value, numbers.Number) or (
        isinstance(value, np.ndarray | jax.Array) and not isinstance(value, jax.core.Tracer)
    ):
        v = float(np.asarray(value))
        if not 0.0 <= v < 1.0:
            raise ValueError(f"{what} must be in [0, 1), got {value!r}")


def _check_scope(scope: str) -> None:
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")


def check_masks(params: PyTree, masks: PyTree) -> None:
    """Raises ValueError unless ``masks`` has the tree structure and leaf shapes of ``params``.

    Args:
      params: the parameter pytree.
      masks: a pytree of boolean arrays (any dtype is accepted; it is cast to bool).
    """
    p_names, p_leaves, p_def = paths.named_leaves(params)
    m_names, m_leaves, m_def = paths.named_leaves(masks)
    if p_def != m_def:
        raise ValueError(
            f"mask tree does not match params: masks have leaves {m_names}, params have {p_names}"
        )
    for name, p, m in zip(p_names, p_leaves, m_leaves, strict=True):
        if jnp.shape(p) != jnp.shape(m):
            raise ValueError(
                f"mask for {name!r} has shape {jnp.shape(m)}; params have {jnp.shape(p)}"
            )


def _rates(names, leaves, excluded, layer_sparsity) -> list:
    """Per-leaf override of the pruning rate; None: excluded, or the default group rate."""
    out = []
    for name, leaf, skip in zip(names, leaves, excluded, strict=True):
        rate = None if skip else _override(name, leaf, layer_sparsity)
        if rate is not None:
            _check_fraction(rate, f"layer_sparsity[{name!r}]")
        out.append(rate)
    return out


def _override(name, leaf, layer_sparsity):
    if layer_sparsity is None:
        return None
    if callable(layer_sparsity):
        return layer_sparsity(name, leaf)
    return paths.by_prefix(layer_sparsity, name)  # the longest matching prefix wins


# --------------------------------------------------------------------------------------
# the ranking core (works in and out of jit)


def _keep_top(scores, alive, n_remove):
    """Keeps all but the ``n_remove`` lowest-scoring entries; dead entries rank lowest.

    ``n_remove`` counts the dead ones too, so asking for at least the number of
    dead entries never revives a pruned weight. Ties break by position.
    """
    s = jnp.where(alive, scores.astype(jnp.float32), -jnp.inf)
    order = jnp.argsort(s, stable=True)
    ranks = jnp.zeros(s.shape, jnp.int32).at[order].set(jnp.arange(s.size, dtype=jnp.int32))
    return ranks >= n_remove


def _round(x):
    return jnp.floor(x + 0.5).astype(jnp.int32)


def _prune(scores, masks, sparsity, *, scope, exclude, layer_sparsity, relative):
    """Masks that remove the lowest-scoring prunable weights.

    ``relative=True``: remove ``round(rate * alive)`` of the surviving weights of
    each group; ``relative=False``: prune until ``round(rate * size)`` of the
    group is pruned (never reviving a pruned weight). The grouping is decided
    here in Python; the ranking runs in one compiled function (`_prune_groups`).
    """
    names, s_leaves, treedef = paths.named_leaves(scores)
    m_leaves = [jnp.asarray(m, bool) for m in jax.tree.leaves(masks)]
    excluded = jax.tree.leaves(paths.select(scores, exclude))
    rates = _rates(names, s_leaves, excluded, layer_sparsity)
    groups, group_rates = [], []
    default = [i for i, r in enumerate(rates) if r is None and not excluded[i]]
    if scope == "global" and default:
        groups.append(tuple(default))
        group_rates.append(sparsity)
    else:
        groups += [(i,) for i in default]
        group_rates += [sparsity] * len(default)
    for i, r in enumerate(rates):
        if r is not None:
            groups.append((i,))
            group_rates.append(r)
    if not groups:
        return jax.tree.unflatten(treedef, m_leaves)
    rate_arr = jnp.stack([jnp.asarray(r, jnp.float32) for r in group_rates])
    out = _prune_groups(s_leaves, m_leaves, rate_arr, groups=tuple(groups), relative=relative)
    return jax.tree.unflatten(treedef, out)


@functools.partial(jax.jit, static_argnames=("groups", "relative"))
def _prune_groups(s_leaves, m_leaves, rates, *, groups, relative):
    out = list(m_leaves)
    for g, idx in enumerate(groups):
        rate = rates[g]
        flat_s = jnp.concatenate([jnp.ravel(s_leaves[i]) for i in idx])
        flat_m = jnp.concatenate([jnp.ravel(out[i]) for i in idx])
        n_alive = jnp.sum(flat_m, dtype=jnp.int32)
        n_dead = flat_m.size - n_alive
        if relative:
            n_remove = n_dead + _round(rate * n_alive)
        else:
            n_remove = jnp.maximum(_round(rate * flat_m.size), n_dead)
        keep = _keep_top(flat_s, flat_m, n_remove)
        offset = 0
        for i in idx:
            size = int(np.prod(jnp.shape(s_leaves[i])))
            out[i] = keep[offset : offset + size].reshape(jnp.shape(s_leaves[i]))
            offset += size
    return out


def _prune_surviving(params, sparsity, score, *, scope, masks, exclude, layer_sparsity):
    """Validates, then removes ``sparsity`` of the surviving weights ranked by ``score(params)``."""
    _check_fraction(sparsity)
    _check_scope(scope)
    if masks is None:
        masks = jax.tree.map(lambda p: jnp.ones(jnp.shape(p), bool), params)
    else:
        check_masks(params, masks)
    return _prune(
        score(params),
        masks,
        sparsity,
        scope=scope,
        exclude=exclude or default_exclude,
        layer_sparsity=layer_sparsity,
        relative=True,
    )


# --------------------------------------------------------------------------------------
# public mask constructors


def magnitude_masks(
    params: PyTree,
    sparsity: float,
    *,
    scope: str = "global",
    masks: PyTree | None = None,
    exclude: Exclude | None = None,
    layer_sparsity: LayerSparsity = None,
) -> PyTree:
    """Masks that prune the smallest-magnitude surviving weights.

    Keeps ``|w|`` above the cut: with ``n`` surviving prunable weights in a
    group, the ``round(sparsity * n)`` smallest ``|w|`` are removed (exactly that
    many; ties broken by position). With ``masks`` given, only surviving weights
    are candidates and already-pruned ones stay pruned, so ``sparsity`` is the
    fraction **of the surviving prunable weights** to remove: two rounds at 0.2
    leave ``0.8**2 = 64%``. This is one round of iterative magnitude pruning
    (Frankle & Carbin 2019, arXiv 1803.03635; Han et al. 2015, arXiv 1506.02626).

    Args:
      params: parameter pytree.
      sparsity: fraction in ``[0, 1)`` of the surviving prunable weights to remove.
      scope: ``"global"`` ranks all prunable leaves (without an override) together;
        ``"layerwise"`` prunes each leaf at the rate separately.
      masks: current masks (default: all weights alive).
      exclude: ``exclude(name, leaf) -> bool``, leaves never pruned (their mask
        passes through unchanged); default `default_exclude` (``ndim < 2``).
      layer_sparsity: per-layer rates that override ``sparsity`` for matching
        leaves, each pruned on its own: a dict whose keys are leaf names or
        name prefixes (``{"head": 0.1}`` matches ``head/kernel``; the longest
        match wins), or ``fn(name, leaf) -> rate or None``.

    Returns:
      A boolean pytree shaped like ``params``.

    Raises:
      ValueError: sparsity outside ``[0, 1)``, unknown scope, mismatched masks.
    """
    return _prune_surviving(
        params,
        sparsity,
        lambda p: jax.tree.map(jnp.abs, p),
        scope=scope,
        masks=masks,
        exclude=exclude,
        layer_sparsity=layer_sparsity,
    )


def random_masks(
    params: PyTree,
    sparsity: float,
    *,
    key: jax.Array,
    scope: str = "global",
    masks: PyTree | None = None,
    exclude: Exclude | None = None,
    layer_sparsity: LayerSparsity = None,
) -> PyTree:
    """Masks that prune a uniformly random subset of the surviving prunable weights.

    Same counting as `magnitude_masks` (``round(sparsity * n)`` of the ``n``
    survivors of each group) with i.i.d. uniform scores instead of ``|w|``:
    the random-pruning control of Frankle & Carbin (2019, arXiv 1803.03635).
    With ``scope="global"`` the per-layer counts are random (hypergeometric);
    use ``scope="layerwise"`` or `shuffle_masks` for fixed per-layer counts.

    Args:
      params: parameter pytree (only shapes are used).
      sparsity: fraction in ``[0, 1)`` of surviving prunable weights to remove.
      key: PRNG key.
      scope, masks, exclude, layer_sparsity: as in `magnitude_masks`.

    Returns:
      A boolean pytree shaped like ``params``.
    """

    def uniform_scores(p):
        leaves, treedef = jax.tree.flatten(p)
        keys = jax.random.split(key, max(len(leaves), 1))
        uniform = [jax.random.uniform(k, jnp.shape(x)) for k, x in zip(keys, leaves, strict=False)]
        return jax.tree.unflatten(treedef, uniform)

    return _prune_surviving(
        params,
        sparsity,
        uniform_scores,
        scope=scope,
        masks=masks,
        exclude=exclude,
        layer_sparsity=layer_sparsity,
    )


def shuffle_masks(masks: PyTree, *, key: jax.Array, exclude: Exclude | None = None) -> PyTree:
    """A random mask with exactly the per-leaf number of pruned weights of ``masks``.

    Each prunable leaf's mask is permuted uniformly at random (excluded leaves
    pass through): random pruning at the same layerwise sparsity as a ticket.

    Args:
      masks: boolean pytree.
      key: PRNG key.
      exclude: as in `magnitude_masks`.
    """
    leaves, treedef = jax.tree.flatten(masks)
    excluded = jax.tree.leaves(paths.select(masks, exclude or default_exclude))
    keys = jax.random.split(key, max(len(leaves), 1))
    out = []
    for m, skip, k in zip(leaves, excluded, keys, strict=False):
        m = jnp.asarray(m, bool)
        if skip:
            out.append(m)
        else:
            out.append(jax.random.permutation(k, m.ravel()).reshape(m.shape))
    return jax.tree.unflatten(treedef, out)


def apply_masks(params: PyTree, masks: PyTree) -> PyTree:
    """``where(mask, params, 0)`` leaf by leaf: pruned weights become exactly zero.

    Raises:
      ValueError: if the mask tree does not match ``params``.
    """
    check_masks(params, masks)
    return jax.tree.map(lambda p, m: jnp.where(m, p, jnp.zeros_like(p)), params, masks)


def sparsity(masks: PyTree, *, exclude: Exclude | None = None) -> dict:
    """Fractions of pruned weights, overall and per prunable leaf.

    ``overall = #pruned / #prunable`` over the leaves that ``exclude`` does not
    exclude (default: leaves with ``ndim >= 2``, so biases do not dilute it).

    Returns:
      ``{"overall": float, "density": 1 - overall, "pruned": int, "prunable": int,
      "total": int (all leaves), "layers": {name: fraction pruned}}``.
    """
    names, leaves, _ = paths.named_leaves(masks)
    excluded = jax.tree.leaves(paths.select(masks, exclude or default_exclude))
    layers, pruned, prunable, total = {}, 0, 0, 0
    for name, m, skip in zip(names, leaves, excluded, strict=True):
        m = np.asarray(m, bool)
        total += m.size
        if skip:
            continue
        n_pruned = int(m.size - m.sum())
        layers[name] = n_pruned / max(m.size, 1)
        pruned += n_pruned
        prunable += m.size
    overall = pruned / prunable if prunable else 0.0
    return {
        "overall": overall,
        "density": 1.0 - overall,
        "pruned": pruned,
        "prunable": prunable,
        "total": total,
        "layers": layers,
    }


# --------------------------------------------------------------------------------------
# optax transformations


class KeepMaskedState(NamedTuple):
    """State of `keep_masked`: step ``count`` and the construction-time ``masks`` (or None)."""

    count: jax.Array  # type: ignore[assignment]  # a NamedTuple field named like tuple.count (optax's convention)
    masks: PyTree


class MaskGradientsState(NamedTuple):
    """State of `mask_gradients`: step ``count`` and the construction-time ``masks`` (or None)."""

    count: jax.Array  # type: ignore[assignment]  # a NamedTuple field named like tuple.count (optax's convention)
    masks: PyTree


def _init_masks(params, masks):
    if masks is None:
        return None
    check_masks(params, masks)
    # a copy: train steps donate their state, which must not free the caller's masks
    return jax.tree.map(lambda x: jnp.array(x, bool, copy=True), masks)


def _current_masks(updates, state_masks, masks, who: str):
    """The call's ``masks=`` (checked against ``updates``) or else the state's."""
    if masks is None:
        if state_masks is None:
            raise ValueError(f"{who}() was built without masks: pass update(..., masks=)")
        return state_masks
    check_masks(updates, masks)
    return jax.tree.map(lambda x: jnp.asarray(x, bool), masks)


def _masked_updates(updates, params, masks):
    if params is None:
        raise ValueError("keep_masked/gradual_pruning need params: call tx.update(g, s, params)")
    return jax.tree.map(lambda u, p, m: jnp.where(m, u, -p).astype(u.dtype), updates, params, masks)


def mask_gradients(masks: PyTree | None = None) -> optax.GradientTransformationExtraArgs:
    """Zeroes the pruned entries of the incoming gradient: ``g' = m * g``.

    Put it **first** in the chain: every later transformation then sees the
    gradient of the pruned network, ``where(m, g, 0)``, and nothing else, so
    global-norm clipping measures only surviving entries and Adam/momentum keep
    zero moments for pruned ones. With `keep_masked` last, the surviving weights
    get exactly (bit for bit: the chain runs the same operations on the same
    inputs) the update that the chain without this transformation gives the
    zeroed gradient. Without it, ``clip_by_global_norm`` would scale the
    surviving entries by the norm of the pruned ones too. ``m * g`` is the
    gradient of ``w -> L(m * w)``, the loss of the pruned network.

    Masks given here live in the state; the extra argument ``masks=`` of
    ``update`` overrides them for that call (``optax.chain`` passes it to every
    member, so one ``masks=`` serves `mask_gradients` and `keep_masked`).

    Args:
      masks: boolean pytree shaped like the params, or None (then pass ``masks=``
        to every ``update``).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with state `MaskGradientsState`;
      ``update(updates, state, params=None, *, masks=None, **extra_args)``.

    Raises:
      ValueError: no masks at all, or masks not shaped like the updates.

    Reference: Frankle & Carbin 2019, arXiv 1803.03635 (training a pruned network).
    """

    def init_fn(params):
        return MaskGradientsState(count=jnp.zeros((), jnp.int32), masks=_init_masks(params, masks))

    def update_fn(updates, state, params=None, *, masks=None, **extra_args):
        del params, extra_args
        m = _current_masks(updates, state.masks, masks, "mask_gradients")
        new = jax.tree.map(lambda u, k: jnp.where(k, u, jnp.zeros_like(u)), updates, m)
        return new, state._replace(count=optax.safe_int32_increment(state.count))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def keep_masked(masks: PyTree | None = None) -> optax.GradientTransformationExtraArgs:
    """Keeps pruned weights exactly zero: ``u' = m * u - (1 - m) * params``.

    After ``params + u'`` a pruned weight is ``p - p = 0`` exactly, whatever the
    earlier transformations did (momentum, weight decay, Adam); surviving
    weights get the inner update unchanged. Put it **last** in the chain, after
    the learning rate, and `mask_gradients` first if any transformation in
    between mixes entries (global-norm clipping). Masks given here live in the
    state (arrays, not compile-time constants); the extra argument ``masks=`` of
    ``update`` overrides them for that call, so masks can change between calls
    (e.g. IMP levels) without recompiling. Without construction-time masks the
    state holds ``masks=None`` and every ``update`` needs ``masks=``.

    Args:
      masks: boolean pytree shaped like the params, or None (then pass ``masks=``
        to every ``update``).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with state `KeepMaskedState`;
      ``update(updates, state, params, *, masks=None, **extra_args)``.

    Raises:
      ValueError: no params, no masks at all, or masks not shaped like the updates.
    """

    def init_fn(params):
        return KeepMaskedState(count=jnp.zeros((), jnp.int32), masks=_init_masks(params, masks))

    def update_fn(updates, state, params=None, *, masks=None, **extra_args):
        del extra_args
        m = _current_masks(updates, state.masks, masks, "keep_masked")
        new = _masked_updates(updates, params, m)
        return new, state._replace(count=optax.safe_int32_increment(state.count))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def set_masks(opt_state: PyTree, masks: PyTree | None) -> PyTree:
    """``opt_state`` with ``masks`` in the state of every `mask_gradients` and `keep_masked`.

    The masks then travel with the train state: ``update`` needs no ``masks=``, and a
    state with a leading seed axis holds one mask per seed (a train step's ``tx_args``
    are shared by all seeds). ``masks=None`` takes them out again, giving back the
    state of a chain built without masks.

    Raises:
      ValueError: ``opt_state`` holds neither transformation's state.
    """
    kinds = (MaskGradientsState, KeepMaskedState)
    found = []

    def put(s):
        if not isinstance(s, kinds):
            return s
        found.append(s)
        return s._replace(masks=masks)

    out = jax.tree.map(put, opt_state, is_leaf=lambda s: isinstance(s, kinds))
    if not found:
        raise ValueError("the optimizer state has no mask_gradients()/keep_masked() state")
    return out


def polynomial_sparsity(
    step: ArrayLike,
    *,
    final_sparsity: float,
    begin_step: int,
    end_step: int,
    frequency: int = 100,
    initial_sparsity: float = 0.0,
    power: float = 3.0,
) -> jax.Array:
    """The sparsity target at ``step`` of the gradual pruning schedule (Zhu & Gupta 2017).

    ``s_t = s_f + (s_i - s_f) (1 - (t - t_0) / (t_1 - t_0))**power`` evaluated
    at the last pruning step ``t <= step`` (pruning steps are ``t_0 + j *
    frequency`` and ``t_1``); 0 before ``t_0`` and ``s_f`` from ``t_1`` on.
    Works on traced values (``jnp``).

    Reference: Zhu & Gupta 2017, "To prune, or not to prune", arXiv 1710.01878.
    """
    step = jnp.asarray(step, jnp.float32)
    begin = jnp.asarray(begin_step, jnp.float32)
    end = jnp.asarray(end_step, jnp.float32)
    freq = jnp.maximum(jnp.asarray(frequency, jnp.float32), 1.0)
    t = jnp.clip(step, begin, end)
    t = jnp.where(t >= end, end, begin + jnp.floor((t - begin) / freq) * freq)
    frac = (t - begin) / jnp.maximum(end - begin, 1.0)
    s = final_sparsity + (initial_sparsity - final_sparsity) * (1.0 - frac) ** power
    return jnp.where(step < begin, 0.0, s)


class GradualPruningState(NamedTuple):
    """State of `gradual_pruning`: step ``count`` and the current ``masks``."""

    count: jax.Array  # type: ignore[assignment]  # a NamedTuple field named like tuple.count (optax's convention)
    masks: PyTree


def gradual_pruning(
    final_sparsity: float,
    *,
    begin_step: int,
    end_step: int,
    frequency: int = 100,
    initial_sparsity: float = 0.0,
    power: float = 3.0,
    scope: str = "global",
    exclude: Exclude | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Gradual magnitude pruning on the polynomial schedule, with the mask in the state.

    At each pruning step ``t`` (see `polynomial_sparsity`) the smallest-magnitude
    weights of the current params are pruned until a fraction ``s_t`` of the
    prunable weights is pruned (pruned weights never come back); every step
    emits ``m * u - (1 - m) * params`` like `keep_masked`. Put it last in the
    chain. Numeric hyperparameters may be injected with
    ``optax.inject_hyperparams`` (``scope`` and ``exclude`` are structural).

    Args:
      final_sparsity: ``s_f`` in ``[0, 1)``.
      begin_step, end_step: ``t_0 <= t_1``, steps (the transformation's count)
        between which the sparsity rises.
      frequency: steps between pruning events, ``Delta t >= 1``.
      initial_sparsity: ``s_i`` in ``[0, s_f]``, the sparsity at ``t_0``.
      power: exponent of the schedule (3 in the paper).
      scope: ``"global"`` or ``"layerwise"`` ranking.
      exclude: leaves never pruned (default `default_exclude`).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with state `GradualPruningState`.

    Reference: Zhu & Gupta 2017, arXiv 1710.01878.
    """
    _check_fraction(final_sparsity, "final_sparsity")
    _check_fraction(initial_sparsity, "initial_sparsity")
    _check_scope(scope)
    concrete = [isinstance(v, numbers.Number) for v in (begin_step, end_step, frequency)]
    if all(concrete):
        if not 0 <= begin_step <= end_step:
            raise ValueError(f"need 0 <= begin_step <= end_step, got {begin_step}, {end_step}")
        if frequency < 1:
            raise ValueError(f"frequency must be >= 1, got {frequency}")
    if (
        isinstance(initial_sparsity, numbers.Number)
        and isinstance(final_sparsity, numbers.Number)
        and initial_sparsity > final_sparsity
    ):
        raise ValueError(
            f"initial_sparsity {initial_sparsity} exceeds final_sparsity {final_sparsity}"
        )
    exclude = exclude or default_exclude

    def init_fn(params):
        m = jax.tree.map(lambda p: jnp.ones(jnp.shape(p), bool), params)
        return GradualPruningState(count=jnp.zeros((), jnp.int32), masks=m)

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        if params is None:
            raise ValueError("gradual_pruning needs params: call tx.update(g, state, params)")
        t = state.count
        offset = t - begin_step
        is_prune = (
            (t >= begin_step)
            & (t <= end_step)
            & ((jnp.mod(offset, jnp.maximum(frequency, 1)) == 0) | (t == end_step))
        )
        target = polynomial_sparsity(
            t,
            final_sparsity=final_sparsity,
            begin_step=begin_step,
            end_step=end_step,
            frequency=frequency,
            initial_sparsity=initial_sparsity,
            power=power,
        )

        def prune(masks):
            scores = jax.tree.map(jnp.abs, params)
            return _prune(
                scores,
                masks,
                target,
                scope=scope,
                exclude=exclude,
                layer_sparsity=None,
                relative=False,
            )

        masks = jax.lax.cond(is_prune, prune, lambda m: m, state.masks)
        new = _masked_updates(updates, params, masks)
        return new, GradualPruningState(count=optax.safe_int32_increment(t), masks=masks)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
