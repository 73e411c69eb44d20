"""Functionally invariant paths: move weights towards a second goal without changing the function.

Raghavan & Thomson (2022/2024), "Engineering flexible machine learning systems
by traversing functionally invariant paths in weight space", arXiv 2205.00334.
Weight space is given the metric ``g(w) = J(w)^T J(w)`` pulled back from the
network's outputs on anchor inputs (the old task's inputs): a move ``dw``
changes those outputs by ``|J dw|^2 = <dw, g dw>`` to first order. Each path
step minimises ``<dw, g dw> - beta <grad L2, dw>`` over a bounded step, i.e.

    dw  proportional to  -(g + lambda I)^{-1} grad L2,

which follows a secondary objective ``L2`` (a new task, sparsity, adversarial
robustness) through the directions the anchor outputs are blind to.

This module gives both formulations:

* `scale_by_invariant_metric` -- the metric step as an optax preconditioner, and
  the alias `invariant_path(learning_rate, apply_fn, ...)` = that plus
  ``optax.scale_by_learning_rate``. It solves ``(g + lambda I) d = grad`` by
  `jax.scipy.sparse.linalg.cg` to a stated tolerance with matrix-free products
  (`metric_matvec`: one `jax.linearize` per step at ``Precision.HIGHEST``, reused
  by every CG iteration, and its transpose), records the residual in its state
  and warns when a solve ends unconverged. The default metric is the softmax
  Fisher ``J^T (diag p - p p^T) J / N`` (8x the Hessian of the Bhattacharyya
  distance the official code uses); ``metric="jacobian"`` is the Euclidean
  ``J^T J / N`` on the logits. The anchor inputs come as the keyword extra
  argument ``anchors=``.
* `penalty_loss` -- the official code's formulation
  (Guruprasad93/FlexibleMachineLearning): add ``weight * D(f(w0; x_a), f(w; x_a))``
  (Bhattacharyya or KL between softmax outputs, `output_distance`) to any loss.
  This is what the official code runs for continual learning (replay of stored
  inputs with a Bhattacharyya distillation term, plain SGD); the metric step is
  the paper's stated algorithm, which that code does not run.

Secondary objectives: the new task's loss (`wspace.training.classification_loss`
on new-task batches), `sparsity_loss` (distance to the magnitude projection of
the weights, from `wspace.pruning`) and `adversarial_loss` (the loss on `fgsm`
or `pgd` inputs). For the continual-learning baseline the module also has the
EWC penalty of Kirkpatrick et al. (2017), arXiv 1612.00796: `diagonal_fisher`,
`ewc_loss`.

The network is always given as a closure ``apply_fn(params, x) -> outputs``.
For a flax model without state: ``lambda p, x: model.apply({"params": p}, x)``.
For a BatchNorm model close over the statistics in eval mode:
``lambda p, x: model.apply({"params": p, **model_state}, x, train=False)``
(the metric then treats the running statistics as constants).
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

PyTree = Any
METRICS = ("jacobian", "fisher")
DISTANCES = ("bhattacharyya", "kl")
ATTACKS = ("fgsm", "pgd")


# ----------------------------------------------------------------------------- metric step


class ScaleByInvariantMetricState(NamedTuple):
    """State of `scale_by_invariant_metric`.

    Attributes:
      count: number of updates (int32).
      residual: true relative residual ``|b - (g + lambda I) d| / |b|`` of the last solve.
      raw_norm: norm of the last solution ``d`` before the norm bound.
      num_unconverged: number of updates whose solve ended with ``residual > tol`` (int32).
    """

    count: jax.Array
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
    ``p_n = softmax(f(params, x_n))``: the Fisher of the softmax outputs, which is 8x
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
      metric: ``"fisher"`` (default, the official method's metric up to the factor 8)
        or ``"jacobian"``.
      precision: matmul precision of the linearisation (default ``HIGHEST``, so the
        products are exact float32 also on GPUs/TPUs; None: the backend default).

    Returns:
      A function of a pytree like ``params`` returning ``g v`` (same structure).

    Reference: Raghavan & Thomson 2022, arXiv 2205.00334 (metric of section 3.2; the
    Bhattacharyya distance of the official code Guruprasad93/FlexibleMachineLearning).
    """
    _check_choice("metric", metric, METRICS)
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

    ``d = (g + lambda I)^{-1} grad`` by conjugate gradients (`jax.scipy.sparse.linalg.cg`,
    relative tolerance ``tol``, at most ``maxiter`` iterations) with the matrix-free
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
        up to a factor 8 absorbed by ``damping``) or ``"jacobian"`` (``J^T J / N``).
      damping: ``lambda >= 0`` (with 0 the system may be singular: use ``max_norm``).
      tol: relative residual ``|b - A d| / |b|`` at which CG stops, ``>= 0`` (0: always
        run ``maxiter`` iterations; every step then counts as unconverged, so pass
        ``warn=False``).
      maxiter: maximum CG iterations, ``>= 1``.
      max_norm: bound on the global norm of the step (None: no bound).
      input_shape: shape of one anchor input, checked when given.
      warn: warn (host callback, also under jit) at the first solve that ends above
        ``tol``; every such solve is counted in the state.

    Returns:
      An optax ``GradientTransformationExtraArgs`` whose ``update`` needs ``params``
      and the keyword ``anchors`` (``(N, *input_shape)`` array); state
      `ScaleByInvariantMetricState`. Numeric hyperparameters work under
      `optax.inject_hyperparams`; pass ``static_args=("apply_fn", "metric", "warn")``.

    Reference: Raghavan & Thomson 2022, arXiv 2205.00334.
    """
    _check_choice("metric", metric, METRICS)
    _check_number("damping", damping, lambda v: v >= 0, ">= 0")
    _check_number("maxiter", maxiter, lambda v: v >= 1 and float(v) == int(v), "an integer >= 1")
    _check_number("tol", tol, lambda v: v >= 0, ">= 0")
    if max_norm is not None:
        _check_number("max_norm", max_norm, lambda v: v > 0, "> 0 or None")
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

        d, _ = jax.scipy.sparse.linalg.cg(damped, b, tol=tol, maxiter=maxiter)
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
    learning_rate: optax.ScalarOrSchedule, apply_fn: Callable | None = None, **kwargs
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

    The spelling of earlier releases, ``invariant_path(apply_fn, damping=, cg_iters=, ...)``
    (the preconditioner alone), still works for one release with a `DeprecationWarning`.

    Reference: Raghavan & Thomson 2022, arXiv 2205.00334.
    """
    if callable(learning_rate) and apply_fn is None:  # the deprecated spelling
        warnings.warn(
            "invariant_path(apply_fn, ...) as the preconditioner is deprecated: use "
            "scale_by_invariant_metric(apply_fn, ...) (cg_iters= is now maxiter=), or "
            "invariant_path(learning_rate, apply_fn, ...) for the whole step. The defaults "
            "changed to metric='fisher', damping=1e-2, tol=1e-2, maxiter=100 (the old ones, "
            "'jacobian', 1e-3, 10 iterations, did not converge).",
            DeprecationWarning,
            stacklevel=2,
        )
        if "cg_iters" in kwargs:
            kwargs["maxiter"] = kwargs.pop("cg_iters")
        return scale_by_invariant_metric(learning_rate, **kwargs)
    if apply_fn is None or not callable(apply_fn):
        raise ValueError(
            f"invariant_path(learning_rate, apply_fn, ...) needs a callable apply_fn, "
            f"got {apply_fn!r}"
        )
    training.check_learning_rate(learning_rate)
    return optax.chain(
        scale_by_invariant_metric(apply_fn, **kwargs),
        optax.scale_by_learning_rate(learning_rate),
    )


# ----------------------------------------------------------------------------- penalty form


def output_distance(logits: jax.Array, anchor_logits: jax.Array, *, kind: str = "bhattacharyya"):
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
    _check_choice("kind", kind, DISTANCES)
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
    anchor_params: PyTree,
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
      anchor_params: the parameters of the network to stay close to.
      weight: penalty weight.
      kind: ``"bhattacharyya"`` or ``"kl"``.
      anchor_key: the batch entry holding the anchor inputs.

    Returns:
      A loss in the library signature; metrics gain ``"output_distance"``.

    Reference: Raghavan & Thomson 2022, arXiv 2205.00334 (official code
    Guruprasad93/FlexibleMachineLearning).
    """
    _check_choice("kind", kind, DISTANCES)

    def loss(params, model_state, batch, key):
        if anchor_key not in batch:
            raise ValueError(f"penalty_loss needs batch[{anchor_key!r}]; batch has {list(batch)}")
        value, (model_state, metrics) = loss_fn(params, model_state, batch, key)
        x_a = batch[anchor_key]
        target = jax.lax.stop_gradient(apply_fn(anchor_params, x_a))
        dist = output_distance(apply_fn(params, x_a), target, kind=kind)
        metrics = {**metrics, "output_distance": dist}
        return value + weight * dist, (model_state, metrics)

    return loss


# ----------------------------------------------------------------------------- objectives


def projection_distance(params: PyTree, sparsity: float, **mask_kwargs) -> jax.Array:
    """Half the squared distance from the weights to their magnitude projection.

    ``0.5 |w - m(w) * w|^2`` with ``m(w)`` = `wspace.pruning.magnitude_masks` at
    ``sparsity`` (held constant: the gradient is ``(1 - m) * w``).

    Args:
      params: the weights.
      sparsity: fraction of prunable weights to remove, in ``[0, 1)``.
      **mask_kwargs: passed to `wspace.pruning.magnitude_masks` (e.g. ``scope``).

    Returns:
      A scalar.

    Reference: Raghavan & Thomson 2022, arXiv 2205.00334.
    """
    from wspace import pruning

    masks = jax.lax.stop_gradient(pruning.magnitude_masks(params, sparsity, **mask_kwargs))
    pruned = pruning.apply_masks(params, masks)
    diffs = jax.tree.map(lambda w, p: jnp.sum(jnp.square(w - p)), params, pruned)
    return 0.5 * sum(jax.tree.leaves(diffs))


def sparsity_loss(sparsity: float, **mask_kwargs) -> Callable:
    """The sparsity objective as a loss: `projection_distance` in the library signature.

    Args:
      sparsity: target sparsity in ``[0, 1)`` (may be traced, e.g. read from the batch).
      **mask_kwargs: passed to `wspace.pruning.magnitude_masks`.

    Returns:
      ``loss_fn(params, model_state, batch, key) -> (loss, (model_state, {"distance"}))``
      (the batch is not used).

    Reference: Raghavan & Thomson 2022, arXiv 2205.00334.
    """
    _check_number("sparsity", sparsity, lambda v: 0.0 <= v < 1.0, "in [0, 1)")

    def loss(params, model_state, batch, key):
        del batch, key
        dist = projection_distance(params, sparsity, **mask_kwargs)
        return dist, (model_state, {"distance": dist})

    return loss


def fgsm(loss_of_x: Callable, x: jax.Array, *, eps: float, clip=None) -> jax.Array:
    """Fast gradient sign method: ``x + eps * sign(d loss / d x)``.

    Args:
      loss_of_x: ``x -> scalar loss``.
      x: clean inputs.
      eps: L-infinity radius.
      clip: optional ``(low, high)`` input range.

    Returns:
      Adversarial inputs (no gradient flows through them).

    Reference: Goodfellow, Shlens & Szegedy 2014, arXiv 1412.6572.
    """
    _check_number("eps", eps, lambda v: v >= 0, ">= 0")
    x_adv = x + eps * jnp.sign(jax.grad(loss_of_x)(x))
    if clip is not None:
        x_adv = jnp.clip(x_adv, *clip)
    return jax.lax.stop_gradient(x_adv)


def pgd(
    loss_of_x: Callable,
    x: jax.Array,
    key: jax.Array | None,
    *,
    eps: float,
    steps: int = 10,
    step_size: float | None = None,
    clip=None,
) -> jax.Array:
    """Projected gradient descent attack in an L-infinity ball (ascent on the loss).

    ``x_{t+1} = P(x_t + a sign(grad_x loss(x_t)))`` with ``P`` the projection onto
    ``|x' - x|_inf <= eps`` (and ``clip``), from a uniform random start in the ball
    (or from ``x`` when ``key`` is None).

    Args:
      loss_of_x: ``x -> scalar loss``.
      x: clean inputs.
      key: PRNG key for the random start, or None.
      eps: L-infinity radius.
      steps: number of ascent steps (>= 1).
      step_size: ``a`` (default ``2.5 * eps / steps``).
      clip: optional ``(low, high)`` input range.

    Returns:
      Adversarial inputs (no gradient flows through them).

    Reference: Madry et al. 2017, arXiv 1706.06083.
    """
    _check_number("eps", eps, lambda v: v >= 0, ">= 0")
    _check_number("steps", steps, lambda v: v >= 1 and float(v) == int(v), "an integer >= 1")
    step_size = 2.5 * eps / steps if step_size is None else step_size
    x = jax.lax.stop_gradient(x)

    def project(z):
        z = jnp.clip(z, x - eps, x + eps)
        return jnp.clip(z, *clip) if clip is not None else z

    start = x if key is None else x + jax.random.uniform(key, x.shape, x.dtype, -eps, eps)
    grad = jax.grad(loss_of_x)

    def body(_, z):
        return project(z + step_size * jnp.sign(grad(z)))

    return jax.lax.stop_gradient(jax.lax.fori_loop(0, steps, body, project(start)))


def adversarial_loss(
    loss_fn: Callable,
    *,
    eps: float,
    method: str = "pgd",
    steps: int = 10,
    step_size: float | None = None,
    clip=None,
) -> Callable:
    """The adversarial-robustness objective: a loss evaluated on attacked inputs.

    ``L_adv(w) = loss_fn(w; x*)`` with ``x* = fgsm/pgd`` attack of ``loss_fn`` at ``w``
    on ``batch["x"]`` (the attack treats ``w`` as a constant).

    Args:
      loss_fn: a loss in the library signature.
      eps: L-infinity radius of the attack.
      method: ``"fgsm"`` or ``"pgd"``.
      steps, step_size: PGD settings (see `pgd`).
      clip: optional ``(low, high)`` input range.

    Returns:
      A loss in the library signature (the PGD random start uses the loss's key).

    Reference: Madry et al. 2017, arXiv 1706.06083; Raghavan & Thomson 2022,
    arXiv 2205.00334.
    """
    _check_choice("method", method, ATTACKS)
    _check_number("eps", eps, lambda v: v >= 0, ">= 0")

    def loss(params, model_state, batch, key):
        fixed = jax.lax.stop_gradient(params)

        def loss_of_x(x):
            return loss_fn(fixed, model_state, {**batch, "x": x}, key)[0]

        if method == "fgsm":
            x_adv = fgsm(loss_of_x, batch["x"], eps=eps, clip=clip)
        else:
            start_key = None if key is None else jax.random.fold_in(key, 1)
            x_adv = pgd(
                loss_of_x,
                batch["x"],
                start_key,
                eps=eps,
                steps=steps,
                step_size=step_size,
                clip=clip,
            )
        return loss_fn(params, model_state, {**batch, "x": x_adv}, key)

    return loss


# ----------------------------------------------------------------------------- EWC baseline


def diagonal_fisher(
    apply_fn: Callable, params: PyTree, x: jax.Array, *, batch_size: int = 32
) -> PyTree:
    """Exact diagonal of the softmax Fisher, averaged over inputs.

    ``F_i = 1/N sum_n sum_k p_k(x_n) (d log p_k(x_n) / d w_i)^2`` (the expectation over
    the model's own labels is summed exactly over the ``K`` classes).

    Args:
      apply_fn: ``apply_fn(params, x) -> logits (N, K)``.
      params: where the Fisher is taken.
      x: ``(N, ...)`` inputs.
      batch_size: examples per vectorised chunk (memory ``batch_size * K * |w|``).

    Returns:
      A pytree like ``params``.

    Reference: Kirkpatrick et al. 2017, arXiv 1612.00796.
    """
    x = jnp.asarray(x)

    def one(xi):
        def logp(p):
            return jax.nn.log_softmax(apply_fn(p, xi[None])[0])

        jac = jax.jacrev(logp)(params)
        probs = jnp.exp(logp(params))
        return jax.tree.map(lambda j: jnp.tensordot(probs, jnp.square(j), axes=1), jac)

    per_example = jax.lax.map(one, x, batch_size=min(batch_size, x.shape[0]))
    return jax.tree.map(lambda f: jnp.mean(f, axis=0), per_example)


def ewc_loss(
    loss_fn: Callable, anchor_params: PyTree, fisher: PyTree, *, weight: float = 1.0
) -> Callable:
    """Elastic weight consolidation: ``loss_fn + weight/2 * sum_i F_i (w_i - w0_i)^2``.

    Args:
      loss_fn: a loss in the library signature (the new task's).
      anchor_params: ``w0``, the old task's solution.
      fisher: the diagonal Fisher at ``w0`` (`diagonal_fisher`).
      weight: the EWC strength ``lambda``.

    Returns:
      A loss in the library signature; metrics gain ``"ewc"`` (the unweighted quadratic).

    Reference: Kirkpatrick et al. 2017, arXiv 1612.00796.
    """

    def loss(params, model_state, batch, key):
        value, (model_state, metrics) = loss_fn(params, model_state, batch, key)
        quad = jax.tree.map(
            lambda f, w, w0: jnp.sum(f * jnp.square(w - w0)), fisher, params, anchor_params
        )
        penalty = 0.5 * sum(jax.tree.leaves(quad))
        return value + weight * penalty, (model_state, {**metrics, "ewc": penalty})

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
    warned = []

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


_DEPRECATED = {"InvariantPathState": ("ScaleByInvariantMetricState", ScaleByInvariantMetricState)}


def __getattr__(name):
    if name in _DEPRECATED:
        new_name, value = _DEPRECATED[name]
        warnings.warn(
            f"wspace.invariant_path.{name} is deprecated: use {new_name}",
            DeprecationWarning,
            stacklevel=2,
        )
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _check_choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def _check_number(name: str, value, ok: Callable, allowed: str) -> None:
    """Validates a hyperparameter when it is concrete (skipped for traced values)."""
    if isinstance(value, jax.core.Tracer):
        return
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number {allowed}, got {value!r}") from None
    if not (v == v and ok(v)):
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
