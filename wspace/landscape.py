"""Loss-landscape geometry: curvature, interpolation barriers, distances and flatness.

Every tool takes a plain closure ``f(params) -> scalar`` (or ``g(params) -> scalar |
dict of scalars`` for paths), so it works with any model: flax, Equinox or
hand-written. `classification_objective` builds such a closure for a flax
classifier. Models with BatchNorm should close over their ``model_state`` and run
in eval mode (``train=False``, running statistics), so that ``f`` is a fixed
function of the parameters; `classification_objective` does exactly that.

* Curvature: `hvp` (forward-over-reverse Hessian-vector product),
  `top_hessian_eigenvalues` (Lanczos with full reorthogonalisation, or power
  iteration with deflation), `hessian_trace` (Hutchinson with Rademacher probes).
* Paths: `linear_path`, `barrier_height`, `linear_barrier`, `instability`
  (Frankle et al. 2020, arXiv 1912.05671).
* Distances: `l2_distance`, `cosine_similarity` (optionally restricted by a mask),
  `mask_overlap` (Jaccard index of two boolean masks).
* Flatness: `filter_normalized_direction` (Li et al. 2018, arXiv 1712.09913) and
  `flatness`, the distance along random filter-normalised directions before the
  loss rises by a threshold.

Practical notes. The iterative tools compile ``f`` inside a loop; the compiled program
is cached per ``f`` object (identity), so reuse one closure for repeated calls at the
same shapes, and treat ``f`` as pure. Data closed over by ``f`` becomes a constant of
the program: estimate curvature on a subset (a few thousand examples) rather than a
whole large training set. Lanczos keeps ``num_iters + 1`` vectors of the size of the
parameters; `flatness` keeps ``num_directions``. When interpolating BatchNorm
networks, ``f`` uses the running statistics it closes over (one endpoint's, say);
Frankle et al. do the same at evaluation time.

This is infrastructure: it imports no method module.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree
from jax.typing import ArrayLike

PyTree = Any
EIGEN_METHODS = ("lanczos", "power")
PATH_MODES = ("auto", "map", "vmap", "loop")
METRICS = ("loss", "error", "all")
_HIGHEST = jax.lax.Precision.HIGHEST  # ground truths stay exact under TF32 defaults


# ----------------------------------------------------------------------------- objectives


def classification_objective(
    apply_fn: Callable,
    variables_without_params: dict | None,
    x: ArrayLike,
    y: ArrayLike,
    *,
    metric: str = "loss",
    batch_size: int | None = None,
) -> Callable:
    """Builds ``f(params)``: a classifier's mean cross-entropy or error rate, in eval mode.

    ``loss(θ) = -1/N Σ_n log softmax(h_θ(x_n))[y_n]``, ``error(θ) = 1/N Σ_n
    [argmax h_θ(x_n) ≠ y_n]``, with ``h_θ = apply_fn({"params": θ, **variables}, ·,
    train=False)``: BatchNorm uses its running statistics, so ``f`` is a fixed,
    twice-differentiable (for ``"loss"``) function of the parameters.

    Args:
      apply_fn: ``model.apply``, called as ``apply_fn(variables, x, train=False)``.
      variables_without_params: the other flax collections (``{"batch_stats": ...}``,
        i.e. a `TrainState`'s ``model_state``), or ``{}``/``None``.
      x, y: inputs and integer labels, evaluated as one full batch.
      metric: ``"loss"`` (mean cross-entropy), ``"error"`` (error rate, for paths and
        barriers; not differentiable) or ``"all"`` (``{"loss": ..., "error": ...}``).
      batch_size: evaluate in chunks of this size with `jax.lax.map` (saves memory on
        large sets; the last chunk is padded and masked). ``None``: one batch.

    Returns:
      ``f(params) -> scalar`` (a dict of two scalars for ``metric="all"``).
    """
    if metric not in METRICS:
        raise ValueError(f"metric={metric!r}; use one of {METRICS}")
    other = dict(variables_without_params or {})
    if "params" in other:
        raise ValueError(
            "variables_without_params contains 'params'; pass only the other collections "
            "(e.g. {'batch_stats': ...}) and give params to f"
        )
    x, y = jnp.asarray(x), jnp.asarray(y)
    n = len(x)
    if n == 0 or len(y) != n:
        raise ValueError(f"need as many labels as inputs and at least one; got {n} and {len(y)}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size={batch_size}; use a positive int or None")

    def sums(params, xb, yb, wb):
        logits = apply_fn({"params": params, **other}, xb, train=False)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, yb)
        wrong = (jnp.argmax(logits, -1) != yb).astype(losses.dtype)
        return jnp.sum(wb * losses), jnp.sum(wb * wrong)

    if batch_size is None or batch_size >= n:
        chunks = None
    else:
        num = -(-n // batch_size)
        pad = num * batch_size - n
        xp = jnp.concatenate([x, jnp.repeat(x[:1], pad, axis=0)])
        yp = jnp.concatenate([y, jnp.repeat(y[:1], pad, axis=0)])
        wp = jnp.concatenate([jnp.ones(n), jnp.zeros(pad)])
        chunks = (
            xp.reshape((num, batch_size) + x.shape[1:]),
            yp.reshape((num, batch_size) + y.shape[1:]),
            wp.reshape(num, batch_size),
        )

    def f(params):
        if chunks is None:
            loss_sum, err_sum = sums(params, x, y, jnp.ones(n))
        else:
            per = jax.lax.map(lambda c: sums(params, *c), chunks)
            loss_sum, err_sum = jnp.sum(per[0]), jnp.sum(per[1])
        out = {"loss": loss_sum / n, "error": err_sum / n}
        return out if metric == "all" else out[metric]

    return f


# ----------------------------------------------------------------------------- curvature


def hvp(f: Callable, params: PyTree, v: PyTree) -> PyTree:
    """Hessian-vector product ``H v`` with ``H = ∇²f(params)``, forward-over-reverse.

    ``H v = d/dε ∇f(params + ε v)|_{ε=0}``, computed as ``jax.jvp(jax.grad(f), (params,),
    (v,))``: one gradient's cost times a small constant, never forming ``H``
    (Pearlmutter 1994, "Fast exact multiplication by the Hessian"). Traced at matmul
    precision ``"highest"``: a ground truth must not change with a backend's TF32 default.

    Args:
      f: ``f(params) -> scalar``, twice differentiable.
      params: the point (a pytree).
      v: the direction, a pytree of the same structure and shapes.

    Returns:
      ``H v``, a pytree shaped like ``params``. Not compiled here: for repeated use,
      ``jax.jit(lambda p, v: hvp(f, p, v))``.
    """
    _check_same_tree(params, v, "params", "v")
    with jax.default_matmul_precision("highest"):
        return jax.jvp(jax.grad(f), (params,), (v,))[1]


def top_hessian_eigenvalues(
    f: Callable,
    params: PyTree,
    *,
    k: int = 1,
    num_iters: int = 20,
    key: jax.Array,
    method: str = "lanczos",
    return_vectors: bool = False,
) -> jax.Array | tuple[jax.Array, list[PyTree]]:
    """The ``k`` largest (algebraic) eigenvalues of ``H = ∇²f(params)``, matrix-free.

    ``lanczos``: ``m = min(num_iters, dim)`` Lanczos steps from a random start on the
    flattened parameters with full reorthogonalisation (each new vector is
    Gram-Schmidt-ed twice against all previous ones), then the top ``k`` Ritz values of
    the ``m x m`` tridiagonal matrix (Lanczos 1950; as used for neural-network
    Hessians by Ghorbani et al. 2019, arXiv 1901.10159). The Ritz values interlace the
    spectrum, so with ``m < dim`` the ``i``-th estimate is a lower bound on ``λ_i``
    (the extremes converge first); with ``m = dim`` the result is exact up to
    rounding. After a breakdown (an invariant subspace found) it restarts with a
    vector orthogonal to the basis. ``power``: power iteration, ``num_iters``
    Hessian-vector products per eigenvalue; if the dominant eigenvalue ``λ`` is
    negative it reruns on ``H - λI`` so the answer is the algebraic maximum; for
    ``k > 1`` each further eigenpair iterates in the orthogonal complement of the ones
    found (deflation by projection). Power iteration converges at rate ``|λ₂/λ₁|`` per
    step: give it more iterations than Lanczos.

    Args:
      f: ``f(params) -> scalar`` (e.g. `classification_objective`).
      params: the point.
      k: how many eigenvalues, ``1 <= k <= dim``.
      num_iters: Lanczos steps (``>= k``), or power steps per eigenvalue.
      key: PRNG key for the random start vectors.
      method: ``"lanczos"`` or ``"power"``.
      return_vectors: also return the eigenvectors.

    Returns:
      ``(k,)`` array of eigenvalues in descending order; with ``return_vectors``,
      ``(eigenvalues, vectors)`` where ``vectors`` is a list of ``k`` unit-norm pytrees
      shaped like ``params``.
    """
    if method not in EIGEN_METHODS:
        raise ValueError(f"method={method!r}; use one of {EIGEN_METHODS}")
    _check_int(k, "k", 1)
    _check_int(num_iters, "num_iters", 1)
    if num_iters < k:
        raise ValueError(f"num_iters={num_iters} < k={k}; need at least k iterations")
    flat, unravel = ravel_pytree(params)
    dim = flat.size
    if k > dim:
        raise ValueError(f"k={k} exceeds the number of parameters ({dim})")
    # Random starts are drawn outside the compiled loop (keeps the program small).
    starts = jax.random.normal(key, (1 if method == "lanczos" else k, dim), flat.dtype)
    if method == "lanczos":
        evals, vecs = _lanczos_top(_ById(f), params, starts[0], k=k, m=min(num_iters, dim))
    else:
        evals, vecs = _power_top(_ById(f), params, starts, num_iters=num_iters)
    if return_vectors:
        return evals, [unravel(v) for v in vecs]
    return evals


def hessian_trace(
    f: Callable,
    params: PyTree,
    *,
    num_samples: int = 100,
    key: jax.Array,
    return_stderr: bool = False,
    mask: PyTree | None = None,
    per_weight: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Hutchinson's estimate of ``tr ∇²f(params)`` with Rademacher probes.

    ``tr H ≈ 1/S Σ_s z_sᵀ H z_s`` with ``z_s`` i.i.d. uniform on ``{-1, +1}^dim``
    (unbiased; its variance is ``2 Σ_{i≠j} H_ij²``, so it is exact for diagonal ``H``)
    (Hutchinson 1989; Avron & Toledo 2011; PyHessian, Yao et al. 2020, arXiv 1912.07145).
    With a ``mask`` the probes are ``m ⊙ z`` and the estimate is ``Σ_{i: m_i} H_ii``,
    the trace over the surviving weights of a pruned network; ``per_weight`` divides
    by their number ``n = Σ m_i`` (the mean Hessian diagonal, comparable across
    sparsities: a sum over 26× fewer weights is not 26× flatter).

    Args:
      f: ``f(params) -> scalar``.
      params: the point.
      num_samples: number of probes ``S`` (``>= 1``; ``>= 2`` for a standard error).
      key: PRNG key for the probes.
      return_stderr: also return the standard error ``std(z_sᵀ H z_s) / sqrt(S)``.
      mask: optional boolean pytree shaped like ``params``; ``None``: all coordinates.
      per_weight: return ``trace / n`` (and its standard error ``/ n``).

    Returns:
      the estimate (a scalar array), or ``(estimate, stderr)``.
    """
    _check_int(num_samples, "num_samples", 2 if return_stderr else 1)
    keep = ravel_pytree(_check_mask(mask, params))[0]
    samples = _hutchinson_samples(_ById(f), params, key, keep, num_samples=num_samples)
    if per_weight:
        samples = samples / jnp.maximum(jnp.sum(keep), 1)
    mean = jnp.mean(samples)
    if return_stderr:
        return mean, jnp.std(samples, ddof=1) / np.sqrt(num_samples)
    return mean


class _ById:
    """Wraps a callable as a static jit argument hashed by identity: the compiled program is
    reused when the same ``f`` object is passed again with the same shapes (``f`` is assumed
    pure: state it reads from outside its arguments is frozen at the first call)."""

    __slots__ = ("fn",)

    def __init__(self, fn: Callable):
        if not callable(fn):
            raise ValueError(f"expected a callable f(params); got {type(fn).__name__}")
        self.fn = fn

    def __call__(self, *args):
        return self.fn(*args)

    def __hash__(self) -> int:
        return id(self.fn)

    def __eq__(self, other) -> bool:
        return isinstance(other, _ById) and other.fn is self.fn


@functools.partial(jax.jit, static_argnames=("f", "k", "m"))
def _lanczos_top(f, params, start, *, k: int, m: int):
    flat, unravel = ravel_pytree(params)
    matvec = _flat_hvp(f, unravel)
    alphas, betas, basis = _lanczos(lambda v: matvec(flat, v), start, m)
    tri = jnp.diag(alphas) + jnp.diag(betas[:-1], 1) + jnp.diag(betas[:-1], -1)
    evals, evecs = jnp.linalg.eigh(tri)
    evals, evecs = evals[::-1][:k], evecs[:, ::-1][:, :k]
    return evals, jnp.matmul(basis.T, evecs, precision=_HIGHEST).T


@functools.partial(jax.jit, static_argnames=("f", "num_iters"))
def _power_top(f, params, starts, *, num_iters: int):
    flat, unravel = ravel_pytree(params)
    matvec = _flat_hvp(f, unravel)
    return _power(lambda v: matvec(flat, v), starts, num_iters)


@functools.partial(jax.jit, static_argnames=("f", "num_samples"))
def _hutchinson_samples(f, params, key, keep, *, num_samples: int):
    flat, unravel = ravel_pytree(params)
    matvec = _flat_hvp(f, unravel)

    def one(k):
        z = jnp.where(keep, jax.random.rademacher(k, flat.shape, flat.dtype), 0)
        return jnp.vdot(z, matvec(flat, z), precision=_HIGHEST)

    return jax.lax.map(one, jax.random.split(key, num_samples))


def _flat_hvp(f: Callable, unravel: Callable) -> Callable:
    """``matvec(flat_params, flat_v) -> flat(H v)`` on the raveled parameters."""

    def matvec(flat, v):
        p, t = unravel(flat), unravel(v.astype(flat.dtype))
        with jax.default_matmul_precision("highest"):
            return ravel_pytree(jax.jvp(jax.grad(f), (p,), (t,))[1])[0]

    return matvec


def _orthogonalise(w, basis):
    """Removes the span of ``basis``'s rows from ``w`` (classical Gram-Schmidt, twice)."""
    for _ in range(2):
        w = w - jnp.matmul(basis.T, jnp.matmul(basis, w, precision=_HIGHEST), precision=_HIGHEST)
    return w


def _lanczos(matvec: Callable, v0, m: int):
    """``m`` Lanczos steps from ``v0`` with full reorthogonalisation: diagonals, off-diagonals,
    basis."""
    dim, dtype = v0.size, v0.dtype
    tiny = jnp.finfo(dtype).tiny
    tol = 100 * jnp.finfo(dtype).eps
    basis = jnp.zeros((m + 1, dim), dtype).at[0].set(v0 / jnp.linalg.norm(v0))

    def body(j, carry):
        basis, alphas, betas = carry
        v = basis[j]
        w = matvec(v)
        scale = jnp.linalg.norm(w)
        alpha = jnp.vdot(v, w, precision=_HIGHEST)
        w = _orthogonalise(w, basis)  # rows > j are still zero
        beta = jnp.linalg.norm(w)
        broke = beta <= tol * scale + tiny
        # Restart after a breakdown with the unit vector of the coordinate least covered by
        # the basis (its squared column norms sum to j + 1 < dim, so one is below 1).
        e = jax.nn.one_hot(jnp.argmin(jnp.sum(basis * basis, axis=0)), dim, dtype=dtype)
        r = _orthogonalise(e, basis)
        nxt = jnp.where(
            broke, r / jnp.maximum(jnp.linalg.norm(r), tiny), w / jnp.maximum(beta, tiny)
        )
        basis = basis.at[j + 1].set(nxt)
        return basis, alphas.at[j].set(alpha), betas.at[j].set(jnp.where(broke, 0.0, beta))

    init = (basis, jnp.zeros(m, dtype), jnp.zeros(m, dtype))
    basis, alphas, betas = jax.lax.fori_loop(0, m, body, init)
    return alphas, betas, basis[:m]


def _power(matvec: Callable, starts, num_iters: int):
    """Top-``k`` algebraic eigenpairs by power iteration with deflation by projection.

    Eigenpair ``i`` iterates on ``P H P`` with ``P`` the projector onto the orthogonal
    complement of the pairs found so far (rows of ``found`` not yet set are zero, so
    they project nothing). If its dominant eigenvalue ``λ`` is negative, a second
    phase iterates on ``P (H - λI) P``, whose dominant eigenvalue is ``λ_max - λ``.
    """
    (k, dim), dtype = starts.shape, starts.dtype
    tiny = jnp.finfo(dtype).tiny

    def pair(i, carry):
        found, evals = carry
        op = lambda v: _orthogonalise(matvec(_orthogonalise(v, found)), found)
        v0 = _orthogonalise(starts[i], found)
        v0 = v0 / jnp.maximum(jnp.linalg.norm(v0), tiny)

        def phase(state):  # num_iters steps on op - shift·I, then the Rayleigh quotient of op
            stage, _, _, shift = state

            def step(_, v):
                w = op(v) - shift * v
                return w / jnp.maximum(jnp.linalg.norm(w), tiny)

            v = jax.lax.fori_loop(0, num_iters, step, v0)
            lam = jnp.vdot(v, op(v), precision=_HIGHEST)
            negative = (stage == 0) & (lam < 0)
            return jnp.where(negative, 1, 2), v, lam, jnp.where(negative, lam, shift)

        zero = jnp.zeros((), dtype)
        init = (jnp.zeros((), jnp.int32), v0, zero, zero)
        _, v, lam, _ = jax.lax.while_loop(lambda s: s[0] < 2, phase, init)
        return found.at[i].set(v), evals.at[i].set(lam)

    init = (jnp.zeros((k, dim), dtype), jnp.zeros(k, dtype))
    found, evals = jax.lax.fori_loop(0, k, pair, init)
    return evals, found


# ----------------------------------------------------------------------------- paths


def linear_path(
    g: Callable,
    params_a: PyTree,
    params_b: PyTree,
    *,
    num_points: int = 11,
    mode: str = "auto",
) -> tuple[jax.Array, jax.Array | dict[str, jax.Array]]:
    """Evaluates ``g`` along the straight line from ``params_a`` to ``params_b``.

    ``θ(α) = (1 - α) θ_a + α θ_b`` for ``α`` in ``linspace(0, 1, num_points)``
    (linear interpolation, Goodfellow et al. 2015, arXiv 1412.6544; Frankle et al.
    2020, arXiv 1912.05671).

    Args:
      g: ``g(params) -> scalar`` or a dict of scalars (e.g. `classification_objective`
        with ``metric="all"``).
      params_a, params_b: the endpoints, pytrees of the same structure and shapes.
      num_points: number of points including both endpoints (``>= 2``).
      mode: ``"map"`` (`jax.lax.map`, one point at a time, jitted), ``"vmap"`` (all
        points at once: fastest, most memory), ``"loop"`` (a Python loop: for ``g``
        that cannot be traced, e.g. one calling ``float``), or ``"auto"`` (``"map"``,
        falling back to ``"loop"`` when ``g`` cannot be traced).

    Returns:
      ``(alphas, values)``: ``(num_points,)`` arrays, or ``values`` a dict of such
      arrays when ``g`` returns a dict.
    """
    _check_int(num_points, "num_points", 2)
    if mode not in PATH_MODES:
        raise ValueError(f"mode={mode!r}; use one of {PATH_MODES}")
    _check_same_tree(params_a, params_b, "params_a", "params_b")
    alphas = jnp.linspace(0.0, 1.0, num_points)
    if mode in ("auto", "map"):
        try:
            values = _path_values(_ById(g), params_a, params_b, alphas, vectorize=False)
        except jax.errors.JAXTypeError:
            if mode == "map":
                raise
            mode = "loop"
    if mode == "vmap":
        values = _path_values(_ById(g), params_a, params_b, alphas, vectorize=True)
    if mode == "loop":
        outs = [_point(g, params_a, params_b, float(al)) for al in np.asarray(alphas)]
        values = jax.tree.map(lambda *xs: jnp.asarray(np.array(xs)), *outs)
    return alphas, values


def _point(g: Callable, params_a, params_b, alpha):
    """``g`` at ``(1 - α) a + α b``; exact at both ends, and everywhere when ``a == b``."""
    return g(jax.tree.map(lambda a, b: _lerp(a, b, alpha), params_a, params_b))


@functools.partial(jax.jit, static_argnames=("g", "vectorize"))
def _path_values(g: Callable, params_a, params_b, alphas, *, vectorize: bool):
    at = functools.partial(_point, g, params_a, params_b)
    return jax.vmap(at)(alphas) if vectorize else jax.lax.map(at, alphas)


def barrier_height(values: ArrayLike | Mapping[str, ArrayLike]) -> jax.Array | dict[str, jax.Array]:
    """Loss (or error) barrier along a path: ``max_α v(α) - (v(0) + v(1)) / 2``.

    Frankle et al. 2020, arXiv 1912.05671 (their "instability" when the endpoints are
    two copies trained from one point). Zero or negative: linearly mode-connected.

    Args:
      values: ``(num_points,)`` values along a path (endpoints first and last, at
        least two), or a dict of such arrays.

    Returns:
      a scalar array, or a dict of them.
    """
    if isinstance(values, dict):
        return {name: cast(jax.Array, barrier_height(v)) for name, v in values.items()}
    values = jnp.asarray(values)
    if values.ndim != 1 or values.shape[0] < 2:
        raise ValueError(f"values must be 1-D with at least 2 points; got shape {values.shape}")
    return jnp.max(values) - 0.5 * (values[0] + values[-1])


def linear_barrier(
    g: Callable, params_a: PyTree, params_b: PyTree, *, num_points: int = 11, mode: str = "auto"
) -> dict:
    """`linear_path` plus its `barrier_height` (Frankle et al. 2020, arXiv 1912.05671).

    Args:
      g: ``g(params) -> scalar`` or dict of scalars.
      params_a, params_b: the endpoints.
      num_points: points on the line including the endpoints (``>= 2``); use an odd
        number so that the midpoint is on the grid.
      mode: see `linear_path`.

    Returns:
      ``{"alphas", "values", "barrier"}`` (``values``/``barrier`` dicts when ``g``
      returns a dict).
    """
    alphas, values = linear_path(g, params_a, params_b, num_points=num_points, mode=mode)
    return {"alphas": alphas, "values": values, "barrier": barrier_height(values)}


def instability(
    train_fn: Callable,
    eval_fn: Callable,
    params: PyTree,
    *,
    keys: jax.Array | Sequence[jax.Array],
    num_points: int = 11,
    mode: str = "auto",
) -> dict:
    """Instability to SGD noise: the barrier between copies trained from one point.

    Trains ``n >= 2`` copies ``θ_i = train_fn(params, key_i)`` (same start, different
    data order / noise) and measures ``barrier_height`` of ``eval_fn`` on the line
    between every pair; the instability is the mean over pairs (Frankle et al. 2020,
    arXiv 1912.05671, who use two copies and the test error).

    Args:
      train_fn: ``train_fn(params, key) -> params``, e.g. a closure over
        `wspace.training.fit` that seeds the data order with ``key``.
      eval_fn: ``g(params) -> scalar`` or dict of scalars (e.g.
        `classification_objective` with ``metric="all"``).
      params: the common starting point.
      keys: a sequence (or stacked array) of at least two PRNG keys, one per copy.
      num_points: points on each line (``>= 2``).
      mode: see `linear_path`.

    Returns:
      ``{"barrier"``: mean barrier over pairs (a dict when ``eval_fn`` returns one),
      ``"pair_barriers"``: ``{(i, j): barrier}``, ``"alphas"``, ``"values"``: the path
      between copies 0 and 1, ``"params"``: the list of trained copies``}``.
    """
    keys = _split_keys(keys)
    _check_int(num_points, "num_points", 2)
    finals = [train_fn(params, k) for k in keys]
    for i, p in enumerate(finals):
        _check_same_tree(params, p, "params", f"train_fn(params, keys[{i}])")
    pair_barriers: dict[tuple[int, int], Any] = {}
    first: dict = {}  # the path between copies 0 and 1
    for i, j in itertools.combinations(range(len(finals)), 2):
        res = linear_barrier(eval_fn, finals[i], finals[j], num_points=num_points, mode=mode)
        pair_barriers[(i, j)] = res["barrier"]
        first = first or res
    barrier = jax.tree.map(lambda *b: jnp.mean(jnp.stack(b)), *pair_barriers.values())
    return {
        "barrier": barrier,
        "pair_barriers": pair_barriers,
        "alphas": first["alphas"],
        "values": first["values"],
        "params": finals,
    }


# ----------------------------------------------------------------------------- distances


def l2_distance(a: PyTree, b: PyTree, mask: PyTree | None = None) -> jax.Array:
    """Euclidean distance ``||a - b||₂`` of two pytrees flattened to vectors.

    Args:
      a, b: pytrees of the same structure and shapes.
      mask: optional boolean pytree of the same structure; only entries where it is
        ``True`` count (e.g. the surviving weights of a pruning mask).

    Returns:
      a scalar array.
    """
    _check_same_tree(a, b, "a", "b")
    mask = _check_mask(mask, a)
    sq = [_masked_sum((x - y) ** 2, m) for x, y, m in _zip_leaves(a, b, mask)]
    return jnp.sqrt(sum(sq, jnp.zeros((), jnp.float32)))


def cosine_similarity(a: PyTree, b: PyTree, mask: PyTree | None = None) -> jax.Array:
    """Cosine of the angle between two pytrees flattened to vectors, ``<a, b> / (|a| |b|)``.

    Args:
      a, b: pytrees of the same structure and shapes.
      mask: optional boolean pytree; only entries where it is ``True`` count.

    Returns:
      a scalar array in ``[-1, 1]``; ``nan`` when either vector is zero.
    """
    _check_same_tree(a, b, "a", "b")
    mask = _check_mask(mask, a)
    zero = jnp.zeros((), jnp.float32)
    leaves = list(_zip_leaves(a, b, mask))
    dot = sum((_masked_sum(x * y, m) for x, y, m in leaves), zero)
    na = sum((_masked_sum(x * x, m) for x, _, m in leaves), zero)
    nb = sum((_masked_sum(y * y, m) for _, y, m in leaves), zero)
    denom = jnp.sqrt(na) * jnp.sqrt(nb)
    return jnp.where(denom > 0, dot / jnp.where(denom > 0, denom, 1.0), jnp.nan)


def mask_overlap(mask_a: PyTree, mask_b: PyTree) -> jax.Array:
    """Jaccard index of two boolean masks: ``|A ∩ B| / |A ∪ B|``.

    1 for identical masks (also when both are empty), 0 for disjoint ones; the
    mask-similarity measure of lottery-ticket studies (e.g. Frankle et al. 2020,
    arXiv 1912.05671).

    Args:
      mask_a, mask_b: boolean pytrees of the same structure and shapes.

    Returns:
      a scalar float array.
    """
    _check_same_tree(mask_a, mask_b, "mask_a", "mask_b")
    for name, m in (("mask_a", mask_a), ("mask_b", mask_b)):
        bad = [jnp.asarray(x).dtype for x in jax.tree.leaves(m) if jnp.asarray(x).dtype != bool]
        if bad:
            raise ValueError(f"{name} must be a boolean pytree; got leaves of dtype {bad[0]}")
    pairs = list(_zip_leaves(mask_a, mask_b))
    inter = sum((jnp.sum(x & y) for x, y in pairs), jnp.zeros((), jnp.int32))
    union = sum((jnp.sum(x | y) for x, y in pairs), jnp.zeros((), jnp.int32))
    return jnp.where(union > 0, inter / jnp.maximum(union, 1), 1.0).astype(jnp.float32)


# ----------------------------------------------------------------------------- flatness


def filter_normalized_direction(params: PyTree, key: jax.Array) -> PyTree:
    """A random Gaussian direction with each filter rescaled to the norm of the params' filter.

    ``d_{l,i} ← d_{l,i} / ||d_{l,i}|| · ||θ_{l,i}||`` for every filter ``i`` of every
    kernel ``l``, where a filter is a slice along the **last** axis (flax layout:
    Dense ``(in, out)`` -> a column per output unit; Conv ``(..., in, out)`` -> one
    filter per output channel). Leaves with ``ndim <= 1`` (biases, normalisation
    scales and offsets) get a zero direction (Li et al. 2018, arXiv 1712.09913).

    Args:
      params: the parameter pytree.
      key: PRNG key.

    Returns:
      a pytree shaped like ``params``.
    """
    flat, unravel = ravel_pytree(params)
    return _filter_normalize(params, unravel(jax.random.normal(key, flat.shape, flat.dtype)))


@jax.jit
def _filter_normalize(params: PyTree, noise: PyTree) -> PyTree:
    """Rescales each last-axis slice of ``noise`` to the norm of ``params``'; 1-D leaves -> 0."""

    def leaf(p, d):
        if p.ndim <= 1:
            return jnp.zeros_like(p)
        axes = tuple(range(p.ndim - 1))
        dn = jnp.sqrt(jnp.sum(d * d, axis=axes, keepdims=True))
        pn = jnp.sqrt(jnp.sum(p * p, axis=axes, keepdims=True))
        return d * pn / jnp.maximum(dn, jnp.finfo(d.dtype).tiny)

    return jax.tree.map(leaf, params, noise)


def flatness(
    f: Callable,
    params: PyTree,
    *,
    key: jax.Array,
    threshold: float = 0.1,
    num_directions: int = 10,
    max_distance: float = 1.0,
    num_steps: int = 20,
    refine_steps: int = 20,
    return_distances: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Mean distance along random filter-normalised directions before ``f`` rises by ``threshold``.

    For each of ``num_directions`` directions ``d`` (`filter_normalized_direction`),
    ``t*(d) = min {t > 0 : f(θ + t d) - f(θ) > threshold}`` found by a grid of
    ``num_steps`` equal steps on ``(0, max_distance]`` (the first grid point above the
    threshold) followed by ``refine_steps`` bisection steps inside the bracketing grid
    interval. A direction that never exceeds the threshold within ``max_distance``
    counts as ``max_distance`` (censored). Larger means flatter. ``t`` is in units of
    the weights' own (per-filter) norms, so the measure is invariant to the rescaling
    of ReLU layers (Li et al. 2018, arXiv 1712.09913; the flatness of IMP solutions in
    Saleem et al. 2024, arXiv 2403.15022).

    Args:
      f: ``f(params) -> scalar`` (e.g. the train loss, `classification_objective`).
      params: the point.
      key: PRNG key for the directions.
      threshold: the rise in ``f`` (``> 0``).
      num_directions: number of random directions (``>= 1``).
      max_distance: the largest ``t`` searched (``> 0``).
      num_steps: grid points on ``(0, max_distance]`` (``>= 1``).
      refine_steps: bisection steps (``>= 0``); the error is
        ``max_distance / num_steps / 2**refine_steps``.
      return_distances: also return the ``(num_directions,)`` per-direction distances.

    Returns:
      the mean distance (a scalar array), or ``(mean, distances)``.
    """
    if not threshold > 0:
        raise ValueError(f"threshold={threshold}; must be > 0")
    if not max_distance > 0:
        raise ValueError(f"max_distance={max_distance}; must be > 0")
    _check_int(num_directions, "num_directions", 1)
    _check_int(num_steps, "num_steps", 1)
    _check_int(refine_steps, "refine_steps", 0)
    flat, unravel = ravel_pytree(params)
    noise = jax.random.normal(key, (num_directions, flat.size), flat.dtype)
    distances = _flatness_distances(
        _ById(f),
        params,
        jax.vmap(unravel)(noise),
        jnp.asarray(threshold, flat.dtype),
        jnp.asarray(max_distance, flat.dtype),
        num_steps=num_steps,
        refine_steps=refine_steps,
    )
    mean = jnp.mean(distances)
    return (mean, distances) if return_distances else mean


@functools.partial(jax.jit, static_argnames=("f", "num_steps", "refine_steps"))
def _flatness_distances(f, params, noise, threshold, max_distance, *, num_steps, refine_steps):
    """Per-direction first-crossing distances; ``noise`` has a leading direction axis."""
    grid = max_distance * jnp.arange(1, num_steps + 1, dtype=threshold.dtype) / num_steps
    base = f(params)

    def one(z):
        d = _filter_normalize(params, z)
        rise = lambda t: f(jax.tree.map(lambda p, di: p + t * di, params, d)) - base
        above = jax.lax.map(rise, grid) > threshold
        first = jnp.argmax(above)
        lo = jnp.where(first > 0, grid[jnp.maximum(first - 1, 0)], 0.0)

        def bisect(_, bracket):
            lo, hi = bracket
            mid = 0.5 * (lo + hi)
            up = rise(mid) > threshold
            return jnp.where(up, lo, mid), jnp.where(up, mid, hi)

        lo, hi = jax.lax.fori_loop(0, refine_steps, bisect, (lo, grid[first]))
        return jnp.where(jnp.any(above), 0.5 * (lo + hi), max_distance)

    return jax.lax.map(one, noise)


# ----------------------------------------------------------------------------- helpers


def _lerp(a, b, alpha):
    """``(1 - α) a + α b`` as ``a + α (b - a)`` for ``α <= 1/2``, ``b - (1 - α)(b - a)`` above."""
    a, b = jnp.asarray(a), jnp.asarray(b)
    return jnp.where(alpha <= 0.5, a + alpha * (b - a), b - (1 - alpha) * (b - a))


def _check_int(value, name: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"{name}={value!r}; must be an int >= {minimum}")


def _check_same_tree(a: PyTree, b: PyTree, name_a: str, name_b: str) -> None:
    """ValueError unless ``a`` and ``b`` have the same tree structure and leaf shapes."""
    ta, tb = jax.tree.structure(a), jax.tree.structure(b)
    if ta != tb:  # type: ignore[operator]  # jaxlib's PyTreeDef stub
        raise ValueError(f"{name_a} and {name_b} have different tree structures: {ta} vs {tb}")
    for pa, la, lb in zip(
        jax.tree_util.tree_flatten_with_path(a)[0],
        jax.tree.leaves(a),
        jax.tree.leaves(b),
        strict=True,
    ):
        if jnp.shape(la) != jnp.shape(lb):
            raise ValueError(
                f"{name_a} and {name_b} differ at {jax.tree_util.keystr(pa[0])}: "
                f"shape {jnp.shape(la)} vs {jnp.shape(lb)}"
            )


def _check_mask(mask: PyTree | None, like: PyTree) -> PyTree:
    """An all-True mask for ``None``; else check that ``mask`` is boolean and matches ``like``."""
    if mask is None:
        return jax.tree.map(lambda x: jnp.ones(jnp.shape(x), bool), like)
    _check_same_tree(like, mask, "params", "mask")
    for leaf in jax.tree.leaves(mask):
        if jnp.asarray(leaf).dtype != bool:
            raise ValueError(f"mask must be a boolean pytree; got a leaf of dtype {leaf.dtype}")
    return mask


def _zip_leaves(*trees: PyTree):
    return zip(*(jax.tree.leaves(t) for t in trees), strict=True)


def _masked_sum(x, m):
    x = jnp.asarray(x)
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    return jnp.sum(jnp.where(m, x, 0))


def _split_keys(keys) -> list:
    """A list of PRNG keys from a sequence or a stacked key array; at least two."""
    if isinstance(keys, jax.Array | np.ndarray):
        typed = jnp.issubdtype(keys.dtype, jax.dtypes.prng_key)
        if keys.ndim != (1 if typed else 2):
            raise ValueError(
                f"keys must hold one key per copy (a stacked key array); got shape {keys.shape}"
            )
        keys = list(keys)
    elif isinstance(keys, Sequence):
        keys = list(keys)
    else:
        raise ValueError(f"keys must be a sequence or stacked array of keys; got {type(keys)}")
    if len(keys) < 2:
        raise ValueError(f"instability needs at least 2 keys (copies); got {len(keys)}")
    return keys
