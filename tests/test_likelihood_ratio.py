"""Tests of wspace.likelihood_ratio against jax.grad (ULR and the ES baseline)."""

from __future__ import annotations

import functools
import json
import math
import os

import flax.linen as nn
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.stats

import wspace as ws
from tests.helpers import run_experiment, run_notebook
from wspace import likelihood_ratio as lr
from wspace.likelihood_ratio import _copies  # noqa: F401  (lr._copies in a test)
from wspace.likelihood_ratio._noise import _noise_key

_SMOOTH = ws.models.MLP(features=(12, 12), num_classes=3, activation=nn.tanh)


class _TinyConv(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        x = nn.tanh(nn.Conv(3, (3,))(x[..., None]))
        return nn.Dense(3, name="head")(x.reshape((x.shape[0], -1)))


class _NoLayers(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        w = self.param("w", nn.initializers.ones, (x.shape[-1], 3))
        return x @ w


def _heaviside(x):
    return (x > 0).astype(x.dtype)


def _problem(model, n=8, d=6, seed=0):
    x = jax.random.normal(jax.random.PRNGKey(seed + 1), (n, d))
    y = jnp.arange(n) % 3
    params = model.init(jax.random.PRNGKey(seed), x)["params"]
    return params, {"x": x, "y": y}


class _BatchNormNet(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        x = nn.Dense(12)(x)
        x = nn.tanh(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))
        return nn.Dense(3, name="head")(x)


_HIGHEST = functools.partial(jax.default_matmul_precision, "highest")


def _flat(tree):
    return jax.flatten_util.ravel_pytree(tree)[0]


def _estimates(est, params, batch, num, seed=1):
    """``num`` flattened gradient estimates from independent keys (one compile)."""
    keys = jax.random.split(jax.random.PRNGKey(seed), num)
    with _HIGHEST():
        return np.asarray(jax.jit(jax.vmap(lambda k: _flat(est(params, {}, batch, k)[1])))(keys))


def _exact(model, params, batch):
    """Ground truth: jax.grad of the mean loss at HIGHEST matmul precision (no TF32)."""
    loss = ws.training.classification_loss(model.apply)
    with _HIGHEST():
        return np.asarray(_flat(jax.grad(lambda p: loss(p, {}, batch, None)[0])(params)))


def _unbiased(samples, exact, z=4.5, slack=0.02):
    """Mean within ``z`` standard errors (+ a small smoothing-bias allowance) of ``exact``.

    Checked per coordinate and on the projection onto the exact gradient's
    direction (which has the power to see a scaling bias).
    """
    se = lambda s: s.std(0, ddof=1) / np.sqrt(len(s))
    per_coord = np.abs(samples.mean(0) - exact) <= z * se(samples) + slack * np.abs(exact).max()
    unit = exact / np.linalg.norm(exact)
    proj = samples @ unit
    along = abs(proj.mean() - np.linalg.norm(exact)) <= z * se(proj) + slack * np.linalg.norm(exact)
    return np.append(per_coord, along)


def _mean_cosine(samples, exact):
    return float(np.mean(samples @ exact / np.linalg.norm(samples, axis=1) / np.linalg.norm(exact)))


# ----------------------------------------------------------------------------- unbiasedness


@pytest.mark.parametrize(
    "model,per_example,options",
    [
        (_SMOOTH, True, dict(baseline="clean")),
        (_SMOOTH, False, dict(noise="logistic", qmc=True, antithetic=True, layerwise=True)),
        (_TinyConv(), True, dict(noise="laplace", baseline="mean")),
    ],
    ids=["gauss-clean", "logistic-qmc-antithetic-layerwise-scalarloss", "conv-laplace-mean"],
)
def test_ulr_mean_matches_jax_grad(model, per_example, options):
    params, batch = _problem(model)
    loss = ws.training.classification_loss(model.apply, per_example=per_example)
    est = lr.ulr(num_copies=16, sigma=0.02, **options)(loss)
    samples = _estimates(est, params, batch, 400)
    exact = _exact(model, params, batch)
    assert np.all(np.isfinite(samples))
    ok = _unbiased(samples, exact)
    assert ok.all(), f"{(~ok).sum()} of {ok.size} coordinates off"
    # The criterion has power: a 50% bias is rejected.
    assert not _unbiased(1.5 * samples, exact).all()


def test_es_mean_matches_jax_grad():
    params, batch = _problem(_SMOOTH)
    loss = ws.training.classification_loss(_SMOOTH.apply)
    samples = _estimates(lr.es(num_copies=16, sigma=0.01)(loss), params, batch, 400)
    exact = _exact(_SMOOTH, params, batch)
    assert _unbiased(samples, exact).all()
    assert not _unbiased(1.5 * samples, exact).all()


# ----------------------------------------------------------------------------- variance


def test_cosine_rises_with_copies_and_variance_reduction():
    params, batch = _problem(_SMOOTH)
    loss = ws.training.classification_loss(_SMOOTH.apply, per_example=True)
    exact = _exact(_SMOOTH, params, batch)

    def cosine(num_copies, **options):
        est = lr.ulr(num_copies=num_copies, sigma=0.3, **options)(loss)
        return _mean_cosine(_estimates(est, params, batch, 32, seed=7), exact)

    plain4, plain64 = cosine(4), cosine(64)
    assert plain64 > 2 * plain4 > 0, (plain4, plain64)
    for options in (dict(antithetic=True), dict(baseline="clean"), dict(qmc=True)):
        better = cosine(64, **options)
        assert better > 1.3 * plain64, (options, better, plain64)


# ----------------------------------------------------------------------------- training


def _train(est_fn, loss_fn, params, batch, steps, lr_=0.05):
    tx = optax.adam(lr_)

    @jax.jit
    def step(p, o, key):
        (loss, _), g = est_fn(loss_fn)(p, {}, batch, key)
        u, o = tx.update(g, o, p)
        return optax.apply_updates(p, u), o, loss

    opt = tx.init(params)
    losses = []
    for i in range(steps):
        params, opt, loss = step(params, opt, jax.random.PRNGKey(i))
        losses.append(float(loss))
    return params, losses


def _digits_batch(n=256):
    ds = ws.data.standardize(ws.data.load("digits"))
    return {"x": jnp.asarray(ds.x_train[:n]), "y": jnp.asarray(ds.y_train[:n])}


def test_trains_step_function_network_where_backprop_is_blind():
    model = ws.models.MLP(features=(32,), num_classes=10, activation=_heaviside)
    batch = _digits_batch()
    params = model.init(jax.random.PRNGKey(0), batch["x"][:1])["params"]
    loss = ws.training.classification_loss(model.apply, per_example=True)
    backprop = jax.grad(lambda p: jnp.mean(loss(p, {}, batch, None)[0]))(params)
    assert float(jnp.abs(backprop["Dense_0"]["kernel"]).max()) == 0.0  # zero gradients
    est = lr.ulr(num_copies=16, sigma=0.5, antithetic=True)
    trained, losses = _train(est, loss, params, batch, steps=60)
    acc = lambda p: float(
        jnp.mean(jnp.argmax(model.apply({"params": p}, batch["x"]), -1) == batch["y"])
    )
    assert np.mean(losses[-10:]) < np.mean(losses[:10]) - 0.3, losses
    assert acc(trained) > acc(params) + 0.3
    assert float(jnp.abs(trained["Dense_0"]["kernel"] - params["Dense_0"]["kernel"]).max()) > 0


def test_non_differentiable_zero_one_loss_decreases():
    model = ws.models.MLP(features=(32,), num_classes=10)
    batch = _digits_batch()
    params = model.init(jax.random.PRNGKey(1), batch["x"][:1])["params"]

    def zero_one(p, model_state, b, key):
        wrong = (jnp.argmax(model.apply({"params": p}, b["x"]), -1) != b["y"]).astype(jnp.float32)
        return wrong, (model_state, {})

    est = lr.ulr(num_copies=16, sigma=0.5, antithetic=True)
    trained, losses = _train(est, zero_one, params, batch, steps=60)
    err = lambda p: float(jnp.mean(zero_one(p, {}, batch, None)[0]))
    assert err(trained) < err(params) - 0.2, (err(params), err(trained))


# ----------------------------------------------------------------------------- contracts


def test_score_functions_match_log_density_gradients():
    e = jnp.linspace(-3.0, 3.0, 12)  # avoids 0, where sign and |z|' differ
    sigma = 0.7
    logpdf = {
        "gaussian": jax.scipy.stats.norm.logpdf,
        "laplace": jax.scipy.stats.laplace.logpdf,
        "logistic": jax.scipy.stats.logistic.logpdf,
    }
    for noise, f in logpdf.items():
        expected = -jax.vmap(jax.grad(lambda z, f=f: f(z / sigma) - jnp.log(sigma)))(sigma * e)
        np.testing.assert_allclose(lr.score(noise, e, sigma), expected, rtol=1e-5, atol=1e-6)


def test_same_key_same_gradient_signature_and_recompute():
    params, batch = _problem(_SMOOTH)
    loss = ws.training.classification_loss(_SMOOTH.apply, per_example=True)
    est = jax.jit(lr.ulr(num_copies=4, baseline="mean")(loss))
    with _HIGHEST():
        (l1, (state, metrics)), g1 = est(params, {}, batch, jax.random.PRNGKey(3))
        (l2, _), g2 = est(params, {}, batch, jax.random.PRNGKey(3))
        (_, _), g3 = est(params, {}, batch, jax.random.key(3))  # typed keys work too
        (_, _), g4 = est(params, {}, batch, jax.random.PRNGKey(4))
        no_aux = lambda p, s, b, k: loss(p, s, b, k)[0]
        rec = lr.ulr(num_copies=4, baseline="mean", recompute=True)
        l5, g5 = jax.jit(rec(no_aux, has_aux=False))(params, {}, batch, jax.random.PRNGKey(3))
    assert jax.tree.structure(g1) == jax.tree.structure(params)
    assert l1.shape == () and state == {} and set(metrics) == {"loss", "accuracy"}
    np.testing.assert_array_equal(_flat(g1), _flat(g2))
    np.testing.assert_array_equal(_flat(g1), _flat(g3))  # same key bits, same noise
    assert not np.allclose(_flat(g1), _flat(g4))
    # low-memory two-pass mode: the same gradient (same noise)
    np.testing.assert_allclose(_flat(g5), _flat(g1), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(l5, l1, rtol=1e-6)
    assert [name for name, _ in lr.perturbed_layers(loss, params, {}, batch)] == [
        "Dense_0",
        "Dense_1",
        "head",
    ]


def test_recompute_with_batchnorm_equals_one_pass():
    """BatchNorm normalises each copy over its own examples in both passes."""
    model = _BatchNormNet()
    x = jax.random.normal(jax.random.PRNGKey(1), (8, 6))
    batch = {"x": x, "y": jnp.arange(8) % 3}
    variables = model.init(jax.random.PRNGKey(0), x)
    params, model_state = variables["params"], {"batch_stats": variables["batch_stats"]}
    loss = ws.training.classification_loss(model.apply, per_example=True)
    key = jax.random.PRNGKey(5)
    with _HIGHEST():
        grads = {
            recompute: jax.jit(
                lr.ulr(num_copies=4, sigma=0.3, baseline="mean", recompute=recompute)(loss)
            )(params, model_state, batch, key)[1]
            for recompute in (False, True)
        }
    one_pass, two_pass = _flat(grads[False]), _flat(grads[True])
    assert np.abs(one_pass).max() > 0
    np.testing.assert_allclose(two_pass, one_pass, rtol=1e-5, atol=1e-6 * np.abs(one_pass).max())


def _eqns(jaxpr):
    """All equations of a jaxpr, sub-jaxprs (pjit, custom_jvp, vmap bodies) included."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, list | tuple) else [value]:
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    yield from _eqns(sub)


def _trace(est, params, batch):
    loss = ws.training.classification_loss(_SMOOTH.apply, per_example=True)
    return jax.make_jaxpr(lambda p, k: est(loss)(p, {}, batch, k))(
        params, jax.random.PRNGKey(0)
    ).jaxpr


def test_forward_evaluations_counted_exactly():
    """Rows through the second layer's matmul / B == est.forward_evaluations.

    (The first layer's ``x @ W`` does not depend on the noise and runs once.)
    """
    params, batch = _problem(_SMOOTH, n=8)

    def rows(est):
        total = 0
        for eqn in _eqns(_trace(est, params, batch)):
            if eqn.primitive.name == "dot_general" and eqn.invars[1].aval.shape == (12, 12):
                total += math.prod(eqn.outvars[0].aval.shape[:-1])
        return total // 8

    for options, expected in [
        (dict(num_copies=4), 4),
        (dict(num_copies=4, baseline="clean"), 5),
        (dict(num_copies=4, baseline="mean"), 4),
        (dict(num_copies=4, recompute=True), 8),
        (dict(num_copies=4, recompute=True, baseline="clean"), 9),
    ]:
        est = lr.ulr(**options)
        assert est.forward_evaluations == expected == rows(est), options
    assert lr.es(num_copies=6, baseline="clean").forward_evaluations == 7


def test_after_barrier_only_with_recompute():
    """`_after` (``x != x`` on one element) schedules the recompute passes only.

    The one-pass estimator draws every site's noise first (it keeps it for
    the cotangents anyway), so nothing there needs ordering.
    """
    params, batch = _problem(_SMOOTH)

    def barriers(**options):
        jaxpr = _trace(lr.ulr(num_copies=2, **options), params, batch)
        return sum(e.primitive.name == "ne" and e.invars[0] is e.invars[1] for e in _eqns(jaxpr))

    assert barriers() == 0
    assert barriers(recompute=True) > 0


@pytest.mark.parametrize(
    "model,per_example,options",
    [
        (_TinyConv(), True, dict(antithetic=True, baseline="mean")),
        (_SMOOTH, False, dict(antithetic=True, layerwise=True, baseline="clean")),
        (_SMOOTH, True, dict(noise="laplace")),
    ],
    ids=["conv-antithetic-mean", "scalarloss-layerwise-clean", "laplace-plain"],
)
def test_folded_vjp_equals_per_copy_vjp(monkeypatch, model, per_example, options):
    """Dense/Conv gradients folded over antithetic pairs == the per-copy VJP (same noise),
    and the folded kernel product runs over P = N/2 draws of the batch, not N copies."""
    from wspace.likelihood_ratio import _ulr

    params, batch = _problem(model)
    loss = ws.training.classification_loss(model.apply, per_example=per_example)
    key = jax.random.PRNGKey(4)
    shape = params["head"]["kernel"].shape
    lhs_dims = lambda numbers: numbers[0][0] + numbers[1][0]  # contracting + batch axes

    def gradient_and_rows():  # a new estimator each time: no cached trace
        est = lr.ulr(num_copies=8, sigma=0.1, **options)(loss)
        with _HIGHEST():
            grad = _flat(jax.jit(est)(params, {}, batch, key)[1])
        rows = max(  # rows the head kernel's gradient contracts (its largest product)
            math.prod(e.invars[0].aval.shape[d] for d in lhs_dims(e.params["dimension_numbers"]))
            for e in _eqns(jax.make_jaxpr(est)(params, {}, batch, key).jaxpr)
            if e.primitive.name == "dot_general" and e.outvars[0].aval.shape in (shape, shape[::-1])
        )
        return grad, rows

    folded, folded_rows = gradient_and_rows()
    monkeypatch.setattr(_ulr, "_foldable", lambda *args: False)
    per_copy, per_copy_rows = gradient_and_rows()
    assert np.abs(per_copy).max() > 0
    np.testing.assert_allclose(folded, per_copy, rtol=1e-5, atol=1e-6 * np.abs(per_copy).max())
    pairs = 4 if options.get("antithetic") else 8
    assert folded_rows == pairs * 8 and per_copy_rows == 8 * 8


def test_noise_distribution_independence_and_antithetic_pairs():
    key = _noise_key(jax.random.PRNGKey(0))
    n = 20_000
    cdf = {"gaussian": "norm", "laplace": "laplace", "logistic": "logistic"}
    draw = jax.jit(
        lambda site, copy, noise, qmc: lr.unit_noise(
            key, site, copy, (n,), noise=noise, num_copies=4, antithetic=True, qmc=qmc
        ),
        static_argnums=(2, 3),
    )
    for noise, name in cdf.items():
        for qmc in (False, True):
            e = np.asarray(draw(0, 1, noise, qmc))
            assert scipy.stats.kstest(e, name).pvalue > 1e-4, (noise, qmc)
            # the test has power: the wrong family is rejected
            wrong = "laplace" if name == "norm" else "norm"
            assert scipy.stats.kstest(e / e.std(), wrong).pvalue < 1e-4, (noise, qmc)
            np.testing.assert_array_equal(draw(0, 3, noise, qmc), -e)  # antithetic partner
    a, b, c = (np.asarray(draw(s, k, "gaussian", False)) for s, k in [(0, 0), (0, 1), (1, 0)])
    bound = 4.5 / np.sqrt(n)  # independent streams: correlation within 4.5 standard errors
    assert abs(np.corrcoef(a, b)[0, 1]) < bound and abs(np.corrcoef(a, c)[0, 1]) < bound


def test_ulr_trains_a_pruned_network_and_keeps_masks():
    """Sparse training by forward passes only: masked weights stay exactly zero, loss falls."""
    model = ws.models.MLP(features=(32,), num_classes=10)
    batch = _digits_batch()
    state = ws.training.init_state(model, optax.sgd(0.0), batch["x"][:1], jax.random.PRNGKey(0))
    masks = ws.pruning.magnitude_masks(state.params, 0.7)
    params = ws.pruning.apply_masks(state.params, masks)
    keep = ws.pruning.keep_masked(masks)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(0.03), keep)
    state = state.replace(params=params, opt_state=tx.init(params))
    loss = ws.training.classification_loss(model.apply, per_example=True)
    est = lr.ulr(num_copies=16, sigma=0.5, antithetic=True, baseline="mean")
    step = ws.training.make_train_step(loss, tx, estimator=est, donate=False)
    losses = []
    for _ in range(40):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
        pruned = jax.tree.map(lambda p, m: jnp.where(m, 0.0, p), state.params, masks)
        assert max(float(jnp.abs(a).max()) for a in jax.tree.leaves(pruned)) == 0.0
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.3, losses
    moved = jax.tree.map(lambda a, b, m: jnp.abs(a - b) * m, state.params, params, masks)
    assert float(moved["Dense_0"]["kernel"].max()) > 0  # surviving weights trained


def test_noisy_loss_is_ulrs_noisy_pass():
    """The noise-injection control sees exactly the noise of ULR's copy 0 (same key)."""
    params, batch = _problem(_SMOOTH)
    loss = ws.training.classification_loss(_SMOOTH.apply, per_example=True)
    key = jax.random.PRNGKey(7)
    clean = jnp.mean(loss(params, {}, batch, key)[0])
    for noise, sigma in [("gaussian", 0.1), ("laplace", 1.0)]:
        noisy = lr.noisy_loss(loss, sigma=sigma, noise=noise)
        est = lr.ulr(num_copies=1, sigma=sigma, noise=noise)(loss)
        value, ulr_value = jax.jit(
            lambda p, k, noisy=noisy, est=est: (
                jnp.mean(noisy(p, {}, batch, k)[0]),
                est(p, {}, batch, k)[0][0],
            )
        )(params, key)
        np.testing.assert_allclose(value, ulr_value, rtol=1e-6)
        assert abs(float(value - clean)) > 1e-4  # the noise is there
    with pytest.raises(ValueError, match="sigma"):
        lr.noisy_loss(loss, sigma=0.0)


def test_bad_input_raises_value_error():
    params, batch = _problem(_SMOOTH)
    loss = ws.training.classification_loss(_SMOOTH.apply, per_example=True)
    key = jax.random.PRNGKey(0)
    for kwargs, match in [
        (dict(num_copies=0), "num_copies"),
        (dict(num_copies=2.0), "num_copies"),
        (dict(sigma=0.0), "sigma.*0.0"),
        (dict(sigma=-1.0), "sigma.*-1.0"),
        (dict(sigma=float("nan")), "sigma.*nan"),
        (dict(sigma=float("inf")), "sigma.*inf"),
        (dict(sigma="big"), "sigma.*big"),
        (dict(sigma={"Dense_0": 0.0}), "sigma.*0.0"),
        (dict(num_copies=5, antithetic=True), "even"),
        (dict(noise="uniform"), "noise"),
        (dict(baseline="median"), "baseline"),
        (dict(num_copies=1, baseline="mean"), "leave-one-out"),
        (dict(qmc=True, baseline="mean"), "qmc"),
    ]:
        with pytest.raises(ValueError, match=match):
            lr.ulr(**kwargs)
    with pytest.raises(ValueError, match="even"):
        lr.es(num_copies=3, antithetic=True)
    for sigma in (0.0, float("nan")):
        with pytest.raises(ValueError, match="sigma"):
            lr.es(sigma=sigma)
    with pytest.raises(TypeError, match="positional"):  # options are keyword-only
        lr.ulr(16)
    bare = _NoLayers()
    bare_params = bare.init(key, batch["x"])["params"]
    bare_loss = ws.training.classification_loss(bare.apply, per_example=True)
    with pytest.raises(ValueError, match="no layer of type"):
        lr.ulr()(bare_loss)(bare_params, {}, batch, key)
    with pytest.raises(ValueError, match="one pair per perturbed layer"):
        lr.ulr(num_copies=4, antithetic=True, layerwise=True)(loss)(params, {}, batch, key)
    with pytest.raises(ValueError, match="lacks the perturbed layers"):
        lr.ulr(sigma={"Dense_0": 0.1})(loss)(params, {}, batch, key)
    with pytest.raises(ValueError, match="PRNG key"):
        lr.ulr()(loss)(params, {}, batch, None)


# ----------------------------------------------------------------------------- experiment


def test_experiment_quick(tmp_path):

    results = run_experiment("likelihood_ratio", tmp_path, steps=10, eval_every=5)
    for name in ("config.json", "results.json", *results["figures"]):
        assert os.path.exists(tmp_path / name), name
    assert {"gradient_quality.png", "training.png", "robustness.png"} <= set(results["figures"])
    arms = {"backprop", "es", "ulr_laplace1", "noisy_bp_laplace1"}
    assert arms == {p.name for p in (tmp_path / "arms").iterdir() if p.is_dir()}
    assert results["smoke"] and len(results["claims"]) == 6
    for claim in results["claims"]:
        assert claim["verdict"] in ("holds", "does not hold", "inconclusive")
        assert claim["n"] == 2 and claim["ci95"][0] <= claim["diff_mean"] <= claim["ci95"][1]
        assert claim["p_value"] >= claim["p_bootstrap"]  # seeds x test examples resampled too
    seed0 = json.loads((tmp_path / "arms" / "ulr_laplace1" / "seed_0.json").read_text())
    assert seed0["forward_evaluations"] == 4 and set(seed0["whitebox"]) == {"0.3"}
    assert 0.0 <= seed0["transfer"]["0.3"] <= 1.0
    correct = ws.stats.unpack_correct(seed0["test_correct"])  # per test example, this seed
    assert abs(correct.mean() - seed0["test_accuracy"]) < 1e-6
    white = ws.stats.unpack_correct(seed0["whitebox_correct_0.3"])
    assert len(white) == len(correct) and abs(white.mean() - seed0["whitebox"]["0.3"]) < 1e-6
    with pytest.raises(ValueError, match="noise_settings"):
        run_experiment("likelihood_ratio", tmp_path / "bad", noise_settings=("uniform:1",))
    assert not os.path.exists(tmp_path / "bad")  # rejected before any file write


def test_notebook_runs():
    run_notebook("likelihood_ratio")


# ----------------------------------------------------------------------------- speed vs noise


def test_unrolled_threefry_is_jax_threefry_bit_for_bit():
    """The noise key's unrolled hash draws exactly JAX's threefry2x32 bits (any family, vmapped)."""
    from wspace.likelihood_ratio import _noise

    raw = jax.random.fold_in(jax.random.key(11), _noise._NOISE_STREAM)
    fast = _noise._noise_key(jax.random.key(11))
    assert jax.random.key_impl(fast) != jax.random.key_impl(raw)  # the unrolled path is in use
    for draw in (jax.random.normal, jax.random.laplace, jax.random.logistic, jax.random.bits):
        for shape in [(7,), (3, 64, 5)]:
            a, b = (
                jax.jit(lambda k, d=draw, s=shape: d(k, s))(raw),
                jax.jit(lambda k, d=draw, s=shape: d(k, s))(fast),
            )
            np.testing.assert_array_equal(a, b)
    per_copy = jax.jit(
        jax.vmap(lambda k, c: jax.random.normal(jax.random.fold_in(k, c), (4, 9)), (None, 0))
    )
    np.testing.assert_array_equal(per_copy(raw, jnp.arange(6)), per_copy(fast, jnp.arange(6)))


def test_ulr_equals_reference_formula_with_documented_noise():
    """g_W = sum_n w_n x_n^T psi(e_n) / N per Dense layer, noise from `unit_noise` (same key)."""
    model = ws.models.MLP(features=(12, 12), num_classes=3, activation=nn.tanh)
    params, batch = _problem(model)
    loss = ws.training.classification_loss(model.apply, per_example=True)
    key = jax.random.PRNGKey(9)
    names = ["Dense_0", "Dense_1", "head"]
    for options in [dict(antithetic=True, baseline="mean"), dict(baseline="none")]:
        cfg = lr.ulr(num_copies=8, sigma=0.1, **options)
        with _HIGHEST():
            grads = jax.jit(cfg(loss))(params, {}, batch, key)[1]
            kn = _noise_key(key)
            xs, es, losses = [], [], []
            for c in range(8):  # copy by copy, by hand
                h, xc, ec = batch["x"], [], []
                for i, name in enumerate(names):
                    e = lr.unit_noise(
                        kn,
                        i,
                        c,
                        (8, params[name]["bias"].size),
                        num_copies=8,
                        antithetic=cfg.antithetic,
                    )
                    xc.append(h)
                    ec.append(e)
                    o = h @ params[name]["kernel"] + params[name]["bias"] + 0.1 * e
                    h = jnp.tanh(o) if name != "head" else o
                xs.append(xc)
                es.append(ec)
                losses.append(optax.softmax_cross_entropy_with_integer_labels(h, batch["y"]))
            w = lr._copies.weights(jnp.stack(losses), None, cfg)
            for i, name in enumerate(names):
                ref = sum((xs[c][i] * w[c][:, None]).T @ (es[c][i] / 0.1) for c in range(8)) / 8
                np.testing.assert_allclose(grads[name]["kernel"], ref, rtol=2e-4, atol=1e-6)


class _Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.tanh(nn.Dense(7)(x))
        return nn.tanh(nn.Dense(5)(x))


class _Nested(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        return nn.Dense(3, name="head")(_Block(name="Block_0")(x))


def test_per_layer_sigma_is_the_longest_path_prefix_value():
    """sigma={"Block_0": a, "Block_0/Dense_1": b, "head": c}: o_l + sigma_l e_l by hand."""
    model = _Nested()
    params, batch = _problem(model)
    loss = ws.training.classification_loss(model.apply, per_example=True)
    key = jax.random.PRNGKey(3)
    sigma = {"Block_0": 0.2, "Block_0/Dense_1": 0.05, "head": 0.3}
    layers = [("Block_0/Dense_0", 0.2), ("Block_0/Dense_1", 0.05), ("head", 0.3)]
    assert [n for n, _ in lr.perturbed_layers(loss, params, {}, batch, key)] == [
        n for n, _ in layers
    ]
    with _HIGHEST():
        got = jax.jit(lr.noisy_loss(loss, sigma=sigma))(params, {}, batch, key)[0]
        h = batch["x"]
        for i, (name, s) in enumerate(layers):  # noise of copy 0 at site i, by hand
            p = params["Block_0"][name.split("/")[1]] if "/" in name else params[name]
            o = h @ p["kernel"] + p["bias"]
            o = o + s * lr.unit_noise(_noise_key(key), i, 0, o.shape)
            h = o if name == "head" else jnp.tanh(o)
        want = optax.softmax_cross_entropy_with_integer_labels(h, batch["y"])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # ULR resolves the same way: the prefix mapping is the mapping of every layer's path
    est = lambda s: jax.jit(lr.ulr(num_copies=4, sigma=s)(loss))(params, {}, batch, key)[1]
    jax.tree.map(np.testing.assert_array_equal, est(sigma), est(dict(layers)))
    with pytest.raises(ValueError, match=r"lacks the perturbed layers \['head'\]"):
        est({"Block_0": 0.1})
    with pytest.raises(ValueError, match=r"lacks the perturbed layers \['head'\]"):
        lr.noisy_loss(loss, sigma={"Block_0": 0.1})(params, {}, batch, key)
