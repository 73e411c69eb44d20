"""Tests of wspace.landscape against closed forms, numpy and jax.hessian."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import wspace as ws
from wspace import landscape as L

KEY = jax.random.PRNGKey(0)
EIGS = np.array([5.0, 3.0, 2.0, 1.0, -0.5, -1.5])


def _sym(eigs, seed=0):
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(len(eigs), len(eigs))))
    return ((q * eigs) @ q.T).astype(np.float32)


def _quadratic(a, b=None):
    """f(w) = 0.5 wᵀAw + bᵀw on params {"u": (2,), "v": (2, 2)} raveled to 6 numbers."""
    a = jnp.asarray(a)
    b = jnp.zeros(len(a)) if b is None else jnp.asarray(b, jnp.float32)

    def f(p):
        w, _ = ravel_pytree(p)
        return 0.5 * w @ a @ w + b @ w

    return f


PARAMS = {"u": jnp.array([0.3, -1.0]), "v": jnp.array([[0.5, 2.0], [-0.7, 0.1]])}


def test_hvp_of_quadratic_is_a_times_v():
    a = _sym(EIGS)
    f = _quadratic(a, np.arange(6.0))
    v = {"u": jnp.array([1.0, -2.0]), "v": jnp.array([[0.5, 0.0], [3.0, -1.0]])}
    hv = L.hvp(f, PARAMS, v)
    assert jax.tree.structure(hv) == jax.tree.structure(PARAMS)
    np.testing.assert_allclose(ravel_pytree(hv)[0], a @ ravel_pytree(v)[0], rtol=1e-5, atol=1e-5)


def _mlp_problem():
    model = ws.models.MLP(features=(4,), num_classes=3)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(16, 3)).astype(np.float32)
    y = rng.integers(0, 3, size=16)
    params = jax.jit(model.init)(KEY, x)["params"]
    return model, params, x, y


def test_hvp_on_flax_mlp_matches_jax_hessian():
    model, params, x, y = _mlp_problem()
    f = L.classification_objective(model.apply, {}, x, y)
    flat, unravel = ravel_pytree(params)
    hess = jax.jit(jax.hessian(lambda w: f(unravel(w))))(flat)
    v = jax.random.normal(jax.random.PRNGKey(3), flat.shape)
    np.testing.assert_allclose(
        ravel_pytree(jax.jit(lambda p, t: L.hvp(f, p, t))(params, unravel(v)))[0],
        hess @ v,
        rtol=1e-4,
        atol=1e-5,
    )
    # Lanczos with as many steps as parameters recovers the exact top of the spectrum.
    top = L.top_hessian_eigenvalues(f, params, k=3, num_iters=flat.size, key=KEY)
    np.testing.assert_allclose(top, np.linalg.eigvalsh(np.asarray(hess))[::-1][:3], atol=1e-4)


@pytest.mark.parametrize("method,num_iters", [("lanczos", 6), ("lanczos", 40), ("power", 300)])
def test_top_eigenvalues_match_eigvalsh(method, num_iters):
    a = _sym(EIGS)
    f = _quadratic(a, np.ones(6))
    evals, vecs = L.top_hessian_eigenvalues(
        f, PARAMS, k=3, num_iters=num_iters, key=KEY, method=method, return_vectors=True
    )
    expected = np.linalg.eigvalsh(a)[::-1][:3]
    assert evals.shape == (3,)
    again = L.top_hessian_eigenvalues(f, PARAMS, k=3, num_iters=num_iters, key=KEY, method=method)
    np.testing.assert_array_equal(evals, again)  # deterministic given the key
    np.testing.assert_allclose(evals, expected, rtol=1e-4, atol=1e-4)
    for lam, vec in zip(evals, vecs, strict=True):
        u = ravel_pytree(vec)[0]
        np.testing.assert_allclose(np.linalg.norm(u), 1.0, rtol=1e-4)
        np.testing.assert_allclose(a @ u, lam * u, atol=1e-3)  # an eigenvector


def test_power_returns_algebraic_maximum_when_dominant_eigenvalue_is_negative():
    a = _sym(np.array([1.0, 0.5, 0.2, -0.3, -1.0, -4.0]), seed=2)
    f = _quadratic(a)
    for method in ("power", "lanczos"):
        top = L.top_hessian_eigenvalues(f, PARAMS, k=2, num_iters=300, key=KEY, method=method)
        np.testing.assert_allclose(top, [1.0, 0.5], atol=1e-3)


def test_repeated_eigenvalues_need_restart_or_deflation():
    # A has two distinct eigenvalues: a Krylov space has dimension 2, so plain Lanczos
    # would find 3 only once; after the breakdown it must restart.
    a = _sym(np.array([3.0, 3.0, 3.0, 1.0, 1.0, 1.0]), seed=3)
    f = _Unhashable(_quadratic(a))  # also: f need not be hashable
    for method in ("lanczos", "power"):
        top = L.top_hessian_eigenvalues(f, PARAMS, k=4, num_iters=50, key=KEY, method=method)
        np.testing.assert_allclose(top, [3.0, 3.0, 3.0, 1.0], atol=1e-4)


class _Unhashable:
    __hash__ = None

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, p):
        return self.fn(p)

    def __eq__(self, other):
        return False


def test_lanczos_on_a_larger_spectrum_finds_the_top():
    n = 60
    eigs = np.concatenate([[10.0, 8.0], np.linspace(-1.0, 2.0, n - 2)])
    a = _sym(eigs, seed=4)
    params = {"w": jnp.zeros(n)}
    f = lambda p: 0.5 * p["w"] @ jnp.asarray(a) @ p["w"]
    top = L.top_hessian_eigenvalues(f, params, k=2, num_iters=30, key=KEY)
    np.testing.assert_allclose(top, [10.0, 8.0], rtol=1e-4)


def test_hutchinson_trace_within_standard_errors():
    a = _sym(EIGS)
    est, se = L.hessian_trace(_quadratic(a), PARAMS, num_samples=400, key=KEY, return_stderr=True)
    assert 0 < se < 1.0
    assert abs(float(est) - np.trace(a)) < 4 * float(se)
    # Rademacher variance is 2 Σ_{i≠j} A_ij²: the standard error should match it.
    off = np.sum(a**2) - np.sum(np.diag(a) ** 2)
    np.testing.assert_allclose(float(se), np.sqrt(2 * off / 400), rtol=0.25)


def test_hutchinson_exact_for_diagonal_hessian():
    d = np.array([3.0, -1.0, 0.5, 2.0, 7.0, -4.0], np.float32)
    est, se = L.hessian_trace(
        _quadratic(np.diag(d)), PARAMS, num_samples=5, key=KEY, return_stderr=True
    )
    np.testing.assert_allclose(est, d.sum(), rtol=1e-6)
    assert float(se) < 1e-5


def test_hutchinson_masked_and_per_weight():
    """Masked probes m ⊙ z estimate Σ_{m_i} H_ii (exact for diagonal H); per_weight divides
    by the number of surviving coordinates; an all-True mask changes nothing."""
    d = np.array([3.0, -1.0, 0.5, 2.0, 7.0, -4.0], np.float32)
    mask = {"u": jnp.array([True, False]), "v": jnp.array([[True, True], [False, True]])}
    keep = ravel_pytree(mask)[0]
    f = _quadratic(np.diag(d))
    est = L.hessian_trace(f, PARAMS, num_samples=3, key=KEY, mask=mask)
    np.testing.assert_allclose(est, d[keep].sum(), rtol=1e-6)
    per = L.hessian_trace(f, PARAMS, num_samples=3, key=KEY, mask=mask, per_weight=True)
    np.testing.assert_allclose(per, d[keep].sum() / 4, rtol=1e-6)
    a = _sym(EIGS, seed=3)
    g = _quadratic(a)
    everything = jax.tree.map(lambda x: jnp.ones(x.shape, bool), PARAMS)
    assert float(L.hessian_trace(g, PARAMS, num_samples=4, key=KEY, mask=everything)) == float(
        L.hessian_trace(g, PARAMS, num_samples=4, key=KEY)
    )
    est, se = L.hessian_trace(
        g, PARAMS, num_samples=400, key=KEY, mask=mask, return_stderr=True, per_weight=True
    )
    sub = a[np.ix_(keep, keep)]
    assert abs(float(est) - np.trace(sub) / 4) < 4 * float(se)
    off = np.sum(sub**2) - np.sum(np.diag(sub) ** 2)
    np.testing.assert_allclose(float(se), np.sqrt(2 * off / 400) / 4, rtol=0.25)


def _well(p):
    return (p["w"] ** 2 - 1) ** 2


def test_barrier_of_double_well_is_one():
    a, b = {"w": jnp.array(-1.0)}, {"w": jnp.array(1.0)}
    res = L.linear_barrier(_well, a, b, num_points=11)
    np.testing.assert_allclose(res["barrier"], 1.0, rtol=1e-6)
    np.testing.assert_allclose(res["alphas"], np.linspace(0, 1, 11), atol=1e-7)
    # An even number of points misses the midpoint: the barrier is lower.
    assert float(L.linear_barrier(_well, a, b, num_points=4)["barrier"]) < 0.9


def test_zero_barrier_between_identical_endpoints():
    f = _quadratic(_sym(EIGS), np.ones(6))
    res = L.linear_barrier(f, PARAMS, PARAMS, num_points=7)
    assert float(res["barrier"]) == 0.0
    np.testing.assert_allclose(res["values"], np.full(7, f(PARAMS)), rtol=1e-6)


def test_barrier_height_formula_and_dicts():
    v = jnp.array([1.0, 3.0, 0.5, 2.0])
    np.testing.assert_allclose(L.barrier_height(v), 3.0 - 1.5)
    out = L.barrier_height({"a": v, "b": -v})
    np.testing.assert_allclose(out["b"], -0.5 - (-1.5))
    with pytest.raises(ValueError, match="at least 2"):
        L.barrier_height(jnp.array([1.0]))


def test_linear_path_endpoints_modes_and_dict_values():
    a = {"w": jnp.array([1.0, -2.0])}
    b = {"w": jnp.array([0.0, 4.0])}
    g = lambda p: {"s": jnp.sum(p["w"]), "q": jnp.sum(p["w"] ** 2)}
    results = {}
    for mode in ("map", "vmap", "loop", "auto"):
        alphas, values = L.linear_path(g, a, b, num_points=5, mode=mode)
        np.testing.assert_allclose(values["s"][0], g(a)["s"])
        np.testing.assert_allclose(values["q"][-1], g(b)["q"])
        results[mode] = values
    for mode in ("vmap", "loop", "auto"):
        np.testing.assert_allclose(results[mode]["q"], results["map"]["q"], rtol=1e-6)
    expected = [np.sum(((1 - t) * a["w"] + t * b["w"]) ** 2) for t in np.linspace(0, 1, 5)]
    np.testing.assert_allclose(results["map"]["q"], expected, rtol=1e-6)


def test_linear_path_auto_falls_back_for_untraceable_g():
    g = lambda p: float(np.sum(np.asarray(p["w"])))  # cannot be traced
    alphas, values = L.linear_path(g, {"w": jnp.zeros(3)}, {"w": jnp.ones(3)}, num_points=3)
    np.testing.assert_allclose(values, [0.0, 1.5, 3.0])
    with pytest.raises(jax.errors.JAXTypeError):
        L.linear_path(g, {"w": jnp.zeros(3)}, {"w": jnp.ones(3)}, mode="map")


def test_instability_zero_for_deterministic_training():
    train = lambda p, key: jax.tree.map(lambda x: 0.5 * x + 1.0, p)  # ignores the key
    f = _quadratic(_sym(EIGS))
    res = L.instability(train, f, PARAMS, keys=jax.random.split(KEY, 3), num_points=5)
    assert float(res["barrier"]) == 0.0
    assert set(res["pair_barriers"]) == {(0, 1), (0, 2), (1, 2)}
    assert len(res["params"]) == 3


def test_instability_of_a_two_basin_problem():
    # The key's sign picks the well: copies 0 and 1 land in different basins.
    def train(p, key):
        side = jnp.where(jax.random.bits(key)[()] % 2 == 0, -1.0, 1.0)
        return {"w": side * jnp.ones_like(p["w"])}

    keys = [jax.random.PRNGKey(i) for i in range(8)]
    sides = [float(train({"w": jnp.array(0.0)}, k)["w"]) for k in keys]
    i, j = sides.index(-1.0), sides.index(1.0)
    res = L.instability(
        train, lambda p: {"loss": _well(p)}, {"w": jnp.array(0.0)}, keys=[keys[i], keys[j]]
    )
    np.testing.assert_allclose(res["barrier"]["loss"], 1.0, rtol=1e-6)
    np.testing.assert_allclose(res["values"]["loss"][5], 1.0, rtol=1e-6)


def test_l2_and_cosine_against_numpy_with_and_without_mask():
    rng = np.random.default_rng(5)
    a = {"x": rng.normal(size=(3, 4)), "y": rng.normal(size=5)}
    b = {"x": rng.normal(size=(3, 4)), "y": rng.normal(size=5)}
    a, b = jax.tree.map(jnp.float32, a), jax.tree.map(jnp.float32, b)
    fa, fb = np.asarray(ravel_pytree(a)[0]), np.asarray(ravel_pytree(b)[0])
    np.testing.assert_allclose(L.l2_distance(a, b), np.linalg.norm(fa - fb), rtol=1e-5)
    cos = fa @ fb / np.linalg.norm(fa) / np.linalg.norm(fb)
    np.testing.assert_allclose(L.cosine_similarity(a, b), cos, rtol=1e-5)
    np.testing.assert_allclose(L.cosine_similarity(a, a), 1.0, rtol=1e-6)
    mask = {"x": jnp.asarray(rng.random((3, 4)) < 0.5), "y": jnp.zeros(5, bool)}
    m = np.asarray(ravel_pytree(jax.tree.map(lambda z: z.astype(jnp.float32), mask))[0]) > 0
    np.testing.assert_allclose(L.l2_distance(a, b, mask), np.linalg.norm(fa[m] - fb[m]), rtol=1e-5)
    cos_m = fa[m] @ fb[m] / np.linalg.norm(fa[m]) / np.linalg.norm(fb[m])
    np.testing.assert_allclose(L.cosine_similarity(a, b, mask), cos_m, rtol=1e-5)
    assert np.isnan(L.cosine_similarity(a, jax.tree.map(jnp.zeros_like, b)))
    with pytest.raises(ValueError, match="boolean"):
        L.l2_distance(a, b, jax.tree.map(lambda z: z.astype(jnp.float32), mask))


def test_mask_overlap_jaccard_by_hand():
    ma = {
        "x": jnp.array([True, True, False, False]),
        "y": jnp.array([[True, False], [False, False]]),
    }
    mb = {
        "x": jnp.array([True, False, True, False]),
        "y": jnp.array([[True, True], [False, False]]),
    }
    # intersection: x 1 + y 1 = 2; union: x 3 + y 2 = 5
    np.testing.assert_allclose(L.mask_overlap(ma, mb), 0.4)
    np.testing.assert_allclose(L.mask_overlap(ma, ma), 1.0)
    empty = jax.tree.map(jnp.zeros_like, ma)
    np.testing.assert_allclose(L.mask_overlap(empty, empty), 1.0)
    np.testing.assert_allclose(L.mask_overlap(ma, jax.tree.map(jnp.logical_not, ma)), 0.0)
    with pytest.raises(ValueError, match="structure"):
        L.mask_overlap(ma, {"x": ma["x"]})
    with pytest.raises(ValueError, match="shape"):
        L.mask_overlap(ma, {"x": ma["x"][:3], "y": ma["y"]})
    with pytest.raises(ValueError, match="boolean"):
        L.mask_overlap(ma, jax.tree.map(lambda z: z.astype(jnp.int32), mb))


def _layer_params():
    rng = np.random.default_rng(7)
    return {
        "conv": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 2, 5)), jnp.float32)},
        "dense": {
            "kernel": jnp.asarray(rng.normal(size=(4, 6)), jnp.float32),
            "bias": jnp.asarray(rng.normal(size=6), jnp.float32),
        },
        "bn": {"scale": jnp.ones(5)},
    }


def test_filter_normalized_direction_matches_filter_norms():
    params = _layer_params()
    d = L.filter_normalized_direction(params, KEY)
    assert jax.tree.structure(d) == jax.tree.structure(params)
    for k, axes in (("conv", (0, 1, 2)), ("dense", (0,))):
        np.testing.assert_allclose(
            jnp.linalg.norm(d[k]["kernel"].reshape(-1, d[k]["kernel"].shape[-1]), axis=0),
            jnp.sqrt(jnp.sum(params[k]["kernel"] ** 2, axis=axes)),
            rtol=1e-5,
        )
    assert not np.allclose(d["dense"]["kernel"], params["dense"]["kernel"])  # random, not θ
    assert float(jnp.abs(d["dense"]["bias"]).sum()) == 0.0
    assert float(jnp.abs(d["bn"]["scale"]).sum()) == 0.0
    d2 = L.filter_normalized_direction(params, jax.random.PRNGKey(1))
    assert not np.allclose(d["conv"]["kernel"], d2["conv"]["kernel"])


def test_flatness_of_a_quadratic_matches_closed_form():
    # f(θ) = c/2 |θ - θ0|², at θ = θ0 along d: rise(t) = c t² |d|² / 2 with
    # |d|² = Σ kernels |θ0|² (filter-normalised, 1-D leaves zero), so
    # t* = sqrt(2 threshold / (c |d|²)) for every direction.
    params = _layer_params()
    c, thr = 3.0, 0.5
    sq = sum(float(jnp.sum(params[k]["kernel"] ** 2)) for k in ("conv", "dense"))
    f = lambda p: (
        0.5
        * c
        * sum(
            jnp.sum((x - y) ** 2)
            for x, y in zip(jax.tree.leaves(p), jax.tree.leaves(params), strict=True)
        )
    )
    expected = np.sqrt(2 * thr / (c * sq))
    mean, dists = L.flatness(
        f,
        params,
        key=KEY,
        threshold=thr,
        num_directions=4,
        max_distance=4 * expected,
        num_steps=10,
        return_distances=True,
    )
    np.testing.assert_allclose(dists, np.full(4, expected), rtol=1e-4)
    np.testing.assert_allclose(mean, expected, rtol=1e-4)
    # t* grows as sqrt(threshold) (same f and shapes: the compiled search is reused), and a
    # rise never reached within max_distance is censored at max_distance.
    kw = dict(key=KEY, num_directions=4, num_steps=10)
    quad = L.flatness(f, params, threshold=4 * thr, max_distance=4 * expected, **kw)
    np.testing.assert_allclose(quad, 2 * expected, rtol=1e-4)
    censored = L.flatness(f, params, threshold=1e6, max_distance=2.0, **kw)
    np.testing.assert_allclose(censored, 2.0)


def test_flatness_finds_the_first_crossing():
    # f(θ) = 2 sin²(π |θ - θ0|) at θ0 = ones((2, 2)): |d| = |θ0| = 2, so rise(t) = 2 sin²(2πt),
    # above 1 on (1/8, 3/8), below on (3/8, 5/8), ...: the first crossing is t = 1/8.
    params = {"k": jnp.ones((2, 2))}
    f = lambda p: 2 * jnp.sin(jnp.pi * jnp.sqrt(jnp.sum((p["k"] - 1) ** 2))) ** 2
    t = L.flatness(f, params, key=KEY, threshold=1.0, num_directions=2, max_distance=1.0)
    np.testing.assert_allclose(t, 0.125, rtol=1e-4)


def test_classification_objective_matches_evaluate_with_batchnorm():
    model = ws.models.ConvNet(channels=(3,), num_classes=4)
    rng = np.random.default_rng(2)
    x = rng.normal(size=(10, 8)).astype(np.float32)
    y = rng.integers(0, 4, size=10)
    variables = jax.jit(model.init, static_argnames="train")(KEY, x, train=False)
    params = variables["params"]
    stats = {"batch_stats": jax.tree.map(lambda s: s + 0.3, variables["batch_stats"])}
    ref = ws.training.evaluate(model.apply, {"params": params, **stats}, x, y)
    f = L.classification_objective(model.apply, stats, x, y, metric="all")
    out = jax.jit(f)(params)
    np.testing.assert_allclose(out["loss"], ref["loss"], rtol=1e-5)
    np.testing.assert_allclose(out["error"], 1 - ref["accuracy"], atol=1e-6)
    chunked = L.classification_objective(model.apply, stats, x, y, metric="loss", batch_size=4)
    np.testing.assert_allclose(jax.jit(chunked)(params), ref["loss"], rtol=1e-5)
    err = L.classification_objective(model.apply, stats, x, y, metric="error", batch_size=3)
    np.testing.assert_allclose(jax.jit(err)(params), 1 - ref["accuracy"], atol=1e-6)
    with pytest.raises(ValueError, match="params"):
        L.classification_objective(model.apply, variables, x, y)
    with pytest.raises(ValueError, match="metric"):
        L.classification_objective(model.apply, stats, x, y, metric="accuracy")


def test_bad_input_raises_value_error():
    f = _quadratic(_sym(EIGS))
    with pytest.raises(ValueError, match="k=0"):
        L.top_hessian_eigenvalues(f, PARAMS, k=0, key=KEY)
    with pytest.raises(ValueError, match="num_iters=2 < k=3"):
        L.top_hessian_eigenvalues(f, PARAMS, k=3, num_iters=2, key=KEY)
    with pytest.raises(ValueError, match="exceeds"):
        L.top_hessian_eigenvalues(f, PARAMS, k=7, num_iters=10, key=KEY)
    with pytest.raises(ValueError, match="method"):
        L.top_hessian_eigenvalues(f, PARAMS, key=KEY, method="arnoldi")
    with pytest.raises(ValueError, match="num_samples"):
        L.hessian_trace(f, PARAMS, num_samples=1, key=KEY, return_stderr=True)
    with pytest.raises(ValueError, match="num_points"):
        L.linear_path(f, PARAMS, PARAMS, num_points=1)
    with pytest.raises(ValueError, match="mode"):
        L.linear_path(f, PARAMS, PARAMS, mode="pmap")
    with pytest.raises(ValueError, match="structure"):
        L.linear_path(f, PARAMS, {"u": PARAMS["u"]})
    with pytest.raises(ValueError, match="shape"):
        L.hvp(f, PARAMS, {"u": PARAMS["u"], "v": jnp.ones(4)})
    with pytest.raises(ValueError, match="structure"):
        L.l2_distance(PARAMS, [PARAMS["u"], PARAMS["v"]])
    with pytest.raises(ValueError, match="threshold"):
        L.flatness(f, PARAMS, key=KEY, threshold=0.0)
    with pytest.raises(ValueError, match="max_distance"):
        L.flatness(f, PARAMS, key=KEY, max_distance=-1.0)
    train = lambda p, key: p
    with pytest.raises(ValueError, match="at least 2"):
        L.instability(train, f, PARAMS, keys=[KEY])
    with pytest.raises(ValueError, match="shape"):
        L.instability(train, f, PARAMS, keys=KEY)  # one raw key, not a stack
    with pytest.raises(ValueError, match="train_fn"):
        L.instability(lambda p, key: {"u": p["u"]}, f, PARAMS, keys=[KEY, KEY])
