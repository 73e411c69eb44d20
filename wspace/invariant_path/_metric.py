"""The functionally invariant path step (metric-preconditioned) and its penalty form.

The method of `wspace.invariant_path` (see its docstring): `scale_by_invariant_metric`,
`invariant_path`, `metric_matvec`, and the official code's penalty formulation
(`output_distance`, `penalty_loss`).

Reference: Raghavan & Thomson 2022, arXiv 2205.00334.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from wspace import training
from wspace.invariant_path._checks import check_choice, check_number

PyTree = Any
METRICS = ("jacobian", "fisher")
DISTANCES = ("bhattacharyya", "kl")


# ----------------------------------------------------------------------------- metric step


class ScaleByInvariantMetricState(NamedTuple):
    """State of `scale_by_invariant_metric`.

    Attributes:
      count: number of updates (int32).
      residual: true relative residual ``|b - (g + lambda I) d| / |b|`` of the last solve.
      raw_norm: norm of the last solution ``d`` before the norm bound.
      num_unconverged: number of updates whose solve ended with ``residual > tol`` (int32).
    """

    count: jax.Array  # type: ignore[assignment]  # a NamedTuple field named like tuple.count (optax's convention)
    residual: jax.Array
    raw_norm: jax.Array
    num_unconverged: jax.Array


def metric_matvec(
    apply_fn: Callable,
    params: PyTree,
    anchors: jax.Array,
    *,
    metric: str = "fisher",
    precision: str | jax.lax.Precision | None = jax.lax.Precision.HIGHEST,
) -> Callable[[PyTree], PyTree]:
    """The matrix-free metric ``v -> g v`` at ``params`` on anchor inputs.

    ``fisher``: ``g v = J^T M (J v) / N`` with ``M = blockdiag(diag p_n - p_n p_n^T)``,
    ``p_n = softmax(f(params, x_n))``: the Fisher of the softmax outputs, which is 4x
    the Hessian of the mean Bhattacharyya distance the official code uses
    (``D_B(p, p + dp) = dz^T (diag p - p p^T) dz / 8 + O(dz^3)`` in the logits ``z``).
    ``jacobian``: ``g v = J^T (J v) / N``, the Euclidean metric on the raw outputs (the
    paper's stated ``J^T J``; a named variant). ``J`` is the Jacobian of the ``N``
    anchor outputs with respect to ``params``. The network is linearised once
    (`jax.linearize`); each product is one JVP and one transposed JVP.

    Args:
      apply_fn: ``apply_fn(params, x) -> outputs`` with outputs of shape ``(N, ...)``
        (logits ``(N, K)`` for ``fisher``).
      params: the point where the metric is taken.
      anchors: ``(N, ...)`` anchor inputs (the inputs whose outputs must not move).
      metric: ``"fisher"`` (default, the official method's metric up to the factor 4)
        or ``"jacobian"``.
      precision: matmul precision of the linearisation (default ``HIGHEST``, so the
        products are exact float32 also on GPUs/TPUs; None: the backend default).

    Returns:
      A function of a pytree like ``params`` returning ``g v`` (same structure).

    Reference: Raghavan & Thomson 2022, arXiv 2205.00334 (metric of section 3.2; the
    Bhattacharyya distance of the official code Guruprasad93/FlexibleMachineLearning).
    """
    check_choice("metric", metric, METRICS)
    anchors = jnp.asarray(anchors)
    with jax.default_matmul_precision(_precision_name(precision)):
        outputs, jvp_fn = _linearize(apply_fn, params, anchors)
        vjp_fn = jax.linear_transpose(jvp_fn, params)
    n = anchors.shape[0]
    if metric == "fisher":
        if outputs.ndim != 2:
            raise ValueError(
                f"metric='fisher' needs logits of shape (N, K), got outputs {outputs.shape}"
            )
        probs = jax.nn.softmax(outputs.astype(jnp.float32), axis=-1)

    def matvec(v):
        u = jvp_fn(v)
        if metric == "fisher":
            u = probs * u - probs * jnp.sum(probs * u, axis=-1, keepdims=True)
        (gv,) = vjp_fn(u)
        return jax.tree.map(lambda x: x / n, gv)

    return matvec


def scale_by_invariant_metric(
    apply_fn: Callable,
    *,
    metric: str = "fisher",
    damping: float = 1e-2,
    tol: float = 1e-2,
    maxiter: int = 100,
    max_norm: float | None = None,
    input_shape: tuple[int, ...] | None = None,
    warn: bool = True,
) -> optax.GradientTransformationExtraArgs:
    """Preconditions a secondary objective's gradient by the anchor outputs' metric.

    ``d = (g + lambda I)^{-1} grad`` by `conjugate_gradients` (relative tolerance
    ``tol``, at most ``maxiter`` iterations; correct under `jax.vmap`) with the matrix-free
    `metric_matvec` on the anchor inputs, then ``d *= min(1, max_norm / |d|)``. The
    output has the sign of a gradient; `invariant_path` chains it with the learning
    rate. With small ``lambda`` the step lies (nearly) in the null space of the metric:
    the anchor outputs do not move to first order; large ``lambda`` gives ``grad / lambda``.

    Convergence: the state records the true relative residual of every solve (one
    extra product) and counts the solves that ended above ``tol``; with ``warn`` a
    host callback (works under `jax.jit`) issues a `RuntimeWarning` for such a step.
    The defaults were chosen by measurement (``benchmarks/invariant_path.py
    --residuals``): with the Fisher metric and ``lambda = 1e-2`` CG reaches a relative
    residual below ``1e-2`` within 100 iterations on the experiment's problems (MLP
    128-128, digits and MNIST-1D, 100-128 anchors, largest metric eigenvalue 0.3-36).
    ``lambda = 1e-3`` needs up to ~300 iterations there, and the Euclidean
    ``jacobian`` metric (largest eigenvalue 250-650) needs ``lambda`` near 1 to
    converge in 100 iterations; at ``lambda = 1e-3`` and 10 iterations (the earlier
    default) its residual was 0.6-30, i.e. the step was not the metric step.

    In ``make_train_step``'s ``sharded`` and ``pmap`` modes the gradient is all-reduced
    first and every device solves the same system on the (replicated) anchors; with
    ``tol > 0`` rounding differences may stop CG an iteration apart from a ``jit`` run.

    Args:
      apply_fn: ``apply_fn(params, x) -> outputs`` (a closure; for BatchNorm models
        close over ``model_state`` in eval mode, see the module docstring).
      metric: ``"fisher"`` (softmax Fisher, the official code's Bhattacharyya metric
        up to a factor 4 absorbed by ``damping``) or ``"jacobian"`` (``J^T J / N``).
      damping: ``lambda >= 0`` (with 0 the system may be singular: use ``max_norm``).
      tol: relative residual ``|b - A d| / |b|`` at which CG stops, ``>= 0`` (0: always
        run ``maxiter`` iterations; every step then counts as unconverged, so pass
        ``warn=False``).
      maxiter: maximum CG iterations, ``>= 1``.
      max_norm: bound on the global norm of the step (None: no bound).
      input_shape: shape of one anchor input, checked when given.
      warn: warn (host callback, also under jit) at the first solve that ends above
        ``tol``; every such solve is counted in the state. In a loop of your own on CPU,
        read a result at least every 16 steps, as `wspace.training.fit` does: 32 calls
        in flight with a host callback can deadlock (jax-ml/jax#25861).

    Returns:
      An optax ``GradientTransformationExtraArgs`` whose ``update`` needs ``params``
      and the keyword ``anchors`` (``(N, *input_shape)`` array); state
      `ScaleByInvariantMetricState`. Numeric hyperparameters work under
      `optax.inject_hyperparams`; pass ``static_args=("apply_fn", "metric", "warn")``.

    Reference: Raghavan & Thomson 2022, arXiv 2205.00334.
    """
    check_choice("metric", metric, METRICS)
    check_number("damping", damping, lambda v: v >= 0, ">= 0")
    check_number("maxiter", maxiter, lambda v: v >= 1 and float(v) == int(v), "an integer >= 1")
    check_number("tol", tol, lambda v: v >= 0, ">= 0")
    if max_norm is not None:
        check_number("max_norm", max_norm, lambda v: v > 0, "> 0 or None")
    warner = _unconverged_warner()

    def init_fn(params):
        del params
        return ScaleByInvariantMetricState(
            count=jnp.zeros((), jnp.int32),
            residual=jnp.zeros((), jnp.float32),
            raw_norm=jnp.zeros((), jnp.float32),
            num_unconverged=jnp.zeros((), jnp.int32),
        )

    def update_fn(updates, state, params=None, *, anchors=None, **extra_args):
        del extra_args
        if params is None:
            raise ValueError(
                "scale_by_invariant_metric needs params: tx.update(grads, state, params, ...)"
            )
        anchors = _check_anchors(anchors, input_shape)
        gv = metric_matvec(apply_fn, params, anchors, metric=metric)
        b = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), updates)

        def damped(v):
            return jax.tree.map(lambda a, c: a + damping * c, gv(v), v)

        d = conjugate_gradients(damped, b, tol=tol, maxiter=maxiter)
        r = jax.tree.map(jnp.subtract, b, damped(d))
        b_norm = optax.tree.norm(b)
        residual = optax.tree.norm(r) / jnp.where(b_norm > 0, b_norm, 1.0)
        # CG stops on its recursive residual; allow float32 drift of the true one.
        unconverged = residual > 1.01 * tol + 1e-6
        if warn:
            jax.debug.callback(warner, residual, tol, state.count)
        raw_norm = optax.tree.norm(d)
        if max_norm is not None:
            scale = jnp.minimum(1.0, max_norm / jnp.maximum(raw_norm, 1e-30))
            d = jax.tree.map(lambda x: scale * x, d)
        d = jax.tree.map(lambda x, u: x.astype(jnp.asarray(u).dtype), d, updates)
        new_state = ScaleByInvariantMetricState(
            count=optax.safe_int32_increment(state.count),
            residual=residual.astype(jnp.float32),
            raw_norm=raw_norm.astype(jnp.float32),
            num_unconverged=state.num_unconverged + unconverged.astype(jnp.int32),
        )
        return d, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def invariant_path(
    learning_rate: optax.ScalarOrSchedule, apply_fn: Callable, **kwargs: Any
) -> optax.GradientTransformationExtraArgs:
    """Functionally invariant path steps: metric-preconditioned descent on a secondary loss.

    ``w <- w - learning_rate * (g + lambda I)^{-1} grad L2`` =
    ``optax.chain(scale_by_invariant_metric(apply_fn, **kwargs),
    optax.scale_by_learning_rate(learning_rate))``.

    Args:
      learning_rate: a float or an optax schedule.
      apply_fn: ``apply_fn(params, x) -> outputs`` closure (see
        `scale_by_invariant_metric`).
      **kwargs: `scale_by_invariant_metric` options (``metric``, ``damping``, ``tol``,
        ``maxiter``, ``max_norm``, ``input_shape``, ``warn``).

    Returns:
      An optax ``GradientTransformationExtraArgs``; ``update`` needs ``params`` and
      ``anchors=``. The preconditioner's state is ``opt_state[0]``.

    Reference: Raghavan & Thomson 2022, arXiv 2205.00334.
    """
    if not callable(apply_fn):
        raise ValueError(
            f"invariant_path(learning_rate, apply_fn, ...) needs a callable apply_fn, "
            f"got {apply_fn!r}"
        )
    training.check_learning_rate(learning_rate)
    return optax.chain(
        scale_by_invariant_metric(apply_fn, **kwargs),
        optax.scale_by_learning_rate(learning_rate),
    )


def conjugate_gradients(
    matvec: Callable[[PyTree], PyTree], b: PyTree, *, tol: float, maxiter: int
) -> PyTree:
    """Solves ``A x = b`` (``A`` symmetric positive definite) by conjugate gradients from ``x = 0``.

    Stops when the recursive residual ``|r| <= tol |b|`` or after ``maxiter`` iterations,
    as `jax.scipy.sparse.linalg.cg` does; unlike it, it stays correct under `jax.vmap`.
    A vmapped ``while_loop`` runs every copy until the last one stops, so each copy's
    update is gated by its own ``|r| > tol |b|``: a stopped copy is left exactly as it was
    (no ``0/0`` from an exhausted direction) and the batch gives every copy its unbatched
    solution. The first residual is ``b`` itself, not ``b - A 0``: vmapped over 9 or 12
    identical copies of a linearised network's system (XLA:CPU, jax 0.10),
    `jax.scipy.sparse.linalg.cg` returned NaN or norms of 1e9 for a true 1.2e3, and so
    did a plain CG loop that formed ``b - A 0`` (measured; 8 and 16 copies were right).
    A direction with ``p^T A p <= 0`` (``A`` singular or indefinite) ends the copy's solve.

    Args:
      matvec: ``v -> A v`` on pytrees like ``b``.
      b: the right-hand side (a pytree of float arrays).
      tol: relative residual at which to stop (0: run ``maxiter`` iterations).
      maxiter: maximum number of iterations.

    Returns:
      ``x`` (same structure as ``b``).

    Reference: Hestenes & Stiefel 1952, J. Res. Natl. Bur. Stand. 49(6).
    """

    def vdot(u, v):
        leaves = jax.tree.map(lambda x, y: jnp.vdot(x, y, precision="highest"), u, v)
        return sum(jax.tree.leaves(leaves))

    def axpy(a, x, y):  # a x + y
        return jax.tree.map(lambda xi, yi: a * xi + yi, x, y)

    target = tol**2 * vdot(b, b)

    def running(carry):
        *_, rr, k = carry
        return (rr > target) & (k < maxiter)

    def step(carry):
        x, r, p, rr, k = carry
        ap = matvec(p)
        pap = vdot(p, ap)
        live = running(carry)
        go = live & (pap > 0)
        alpha = jnp.where(go, rr / jnp.where(go, pap, 1.0), 0.0)
        x, r = axpy(alpha, p, x), axpy(-alpha, ap, r)
        # a stopped copy keeps its rr; a breakdown (p^T A p <= 0) sets it to 0: it stops
        rr_new = jnp.where(go, vdot(r, r), jnp.where(live, 0.0, rr))
        beta = rr_new / jnp.where(go, rr, 1.0)
        p = jax.tree.map(lambda pi, ri: jnp.where(go, ri + beta * pi, pi), p, r)
        return x, r, p, rr_new, k + go.astype(k.dtype)

    zero = jax.tree.map(jnp.zeros_like, b)
    carry = (zero, b, b, vdot(b, b), jnp.zeros((), jnp.int32))
    return jax.lax.while_loop(running, step, carry)[0]


# ----------------------------------------------------------------------------- penalty form


def output_distance(
    logits: jax.Array, anchor_logits: jax.Array, *, kind: str = "bhattacharyya"
) -> jax.Array:
    """Mean distance between the softmax outputs of two networks on the same inputs.

    With ``p = softmax(logits)`` and ``q = softmax(anchor_logits)`` per example:
    ``bhattacharyya``: ``-log sum_k sqrt(p_k q_k)``; ``kl``: ``KL(q || p) =
    sum_k q_k (log q_k - log p_k)``. Both are 0 iff ``p = q``.

    Args:
      logits: ``(..., K)`` logits of the moving network.
      anchor_logits: ``(..., K)`` logits of the anchor network (same shape).
      kind: ``"bhattacharyya"`` (the official code's choice) or ``"kl"``.

    Returns:
      The mean over all leading axes (a scalar).

    Reference: Raghavan & Thomson 2022, arXiv 2205.00334.
    """
    check_choice("kind", kind, DISTANCES)
    if jnp.shape(logits) != jnp.shape(anchor_logits):
        raise ValueError(
            f"logits {jnp.shape(logits)} and anchor_logits {jnp.shape(anchor_logits)} differ"
        )
    logp = jax.nn.log_softmax(logits, axis=-1)
    logq = jax.nn.log_softmax(anchor_logits, axis=-1)
    if kind == "bhattacharyya":
        dist = -jax.nn.logsumexp(0.5 * (logp + logq), axis=-1)
    else:
        dist = jnp.sum(jnp.exp(logq) * (logq - logp), axis=-1)
    return jnp.mean(dist)


def penalty_loss(
    loss_fn: Callable,
    apply_fn: Callable,
    anchor_params: PyTree | None,
    *,
    weight: float = 1.0,
    kind: str = "bhattacharyya",
    anchor_key: str = "anchors",
) -> Callable:
    """Adds the output distance to the anchor network to any loss (the penalty formulation).

    ``L(w) = loss_fn(w) + weight * D(f(w0; x_a), f(w; x_a))`` with ``x_a = batch[anchor_key]``,
    ``w0 = anchor_params`` (no gradient) and ``D`` = `output_distance`.

    Args:
      loss_fn: a loss in the library signature (``(params, model_state, batch, key) ->
        (loss, (model_state, metrics))``), e.g. the new task's cross-entropy.
      apply_fn: ``apply_fn(params, x) -> logits`` closure.
      anchor_params: the parameters of the network to stay close to; None: its logits come
        with each batch as ``batch["anchor_logits"]`` (e.g. one anchor network per seed
        when seeds are an axis).
      weight: penalty weight.
      kind: ``"bhattacharyya"`` or ``"kl"``.
      anchor_key: the batch entry holding the anchor inputs.

    Returns:
      A loss in the library signature; metrics gain ``"output_distance"``.

    Reference: Raghavan & Thomson 2022, arXiv 2205.00334 (official code
    Guruprasad93/FlexibleMachineLearning).
    """
    check_choice("kind", kind, DISTANCES)

    def loss(params, model_state, batch, key):
        if anchor_key not in batch:
            raise ValueError(f"penalty_loss needs batch[{anchor_key!r}]; batch has {list(batch)}")
        value, (model_state, metrics) = loss_fn(params, model_state, batch, key)
        x_a = batch[anchor_key]
        if anchor_params is None and "anchor_logits" not in batch:
            raise ValueError("penalty_loss(anchor_params=None) needs batch['anchor_logits']")
        anchor = batch["anchor_logits"] if anchor_params is None else apply_fn(anchor_params, x_a)
        target = jax.lax.stop_gradient(anchor)
        dist = output_distance(apply_fn(params, x_a), target, kind=kind)
        metrics = {**metrics, "output_distance": dist}
        return value + weight * dist, (model_state, metrics)

    return loss


# ----------------------------------------------------------------------------- helpers


def _linearize(apply_fn, params, anchors):
    """``jax.linearize`` of the network on the anchors, with a clear error on a bad shape."""
    try:
        outputs, jvp_fn = jax.linearize(lambda p: apply_fn(p, anchors), params)
    except Exception as e:  # flax/XLA raise assorted types on a shape mismatch
        raise ValueError(
            f"apply_fn cannot be applied to anchors of shape {anchors.shape} "
            f"(dtype {anchors.dtype}): {type(e).__name__}: {e}"
        ) from e
    if outputs.ndim < 1 or outputs.shape[0] != anchors.shape[0]:
        raise ValueError(
            f"apply_fn maps anchors of shape {anchors.shape} to outputs of shape "
            f"{outputs.shape}; expected a leading axis of {anchors.shape[0]} examples"
        )
    return outputs, jvp_fn


def _check_anchors(anchors, input_shape):
    if anchors is None:
        raise ValueError(
            "scale_by_invariant_metric needs anchor inputs: "
            "tx.update(grads, state, params, anchors=x) "
            "(with make_train_step: step(state, batch, tx_args={'anchors': x}))"
        )
    anchors = jnp.asarray(anchors)
    if anchors.ndim < 1 or anchors.shape[0] < 1:
        raise ValueError(f"anchors must be a non-empty batch (N, ...), got shape {anchors.shape}")
    if input_shape is not None and tuple(anchors.shape[1:]) != tuple(input_shape):
        raise ValueError(
            f"anchors of shape {anchors.shape} do not match input_shape {tuple(input_shape)}; "
            f"expected (N, {', '.join(map(str, input_shape))})"
        )
    return anchors


def _precision_name(precision) -> str | None:
    if precision is None or isinstance(precision, str):
        return precision
    return jax.lax.Precision(precision).name.lower()


def _unconverged_warner() -> Callable:
    """A host callback that warns on the first unconverged solve of one transformation."""
    warned: list[bool] = []

    def warn(residual, tol, count) -> None:
        residual, tol = float(np.max(residual)), float(np.max(tol))  # max: also under vmap
        if residual > 1.01 * tol + 1e-6 and not warned:
            warned.append(True)
            warnings.warn(
                f"scale_by_invariant_metric: step {int(np.max(count))} ended unconverged "
                f"(relative residual {residual:.3g} > tol {tol:.3g}); raise damping or maxiter. "
                "Later unconverged steps are counted in state.num_unconverged, not warned.",
                RuntimeWarning,
                stacklevel=2,
            )

    return warn
