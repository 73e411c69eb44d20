"""Tests of wspace.likelihood_ratio against jax.grad (ULR and the ES baseline)."""

from __future__ import annotations

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import wspace as ws
from tests.helpers import run_experiment, run_notebook
from wspace import likelihood_ratio as lr

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


def _flat(tree):
    return jnp.concatenate([a.ravel() for a in jax.tree.leaves(tree)])


def _estimates(est, params, batch, num, seed=1):
    """``num`` flattened gradient estimates from independent keys (one compile)."""
    keys = jax.random.split(jax.random.PRNGKey(seed), num)
    return np.asarray(jax.jit(jax.vmap(lambda k: _flat(est(params, {}, batch, k)[1])))(keys))


def _exact(model, params, batch):
    loss = ws.training.classification_loss(model.apply)
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
    est = lr.ulr(loss, num_copies=16, sigma=0.02, **options)
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
    samples = _estimates(lr.es(loss, num_copies=16, sigma=0.01), params, batch, 400)
    exact = _exact(_SMOOTH, params, batch)
    assert _unbiased(samples, exact).all()
    assert not _unbiased(1.5 * samples, exact).all()


# ----------------------------------------------------------------------------- variance


def test_cosine_rises_with_copies_and_variance_reduction():
    params, batch = _problem(_SMOOTH)
    loss = ws.training.classification_loss(_SMOOTH.apply, per_example=True)
    exact = _exact(_SMOOTH, params, batch)

    def cosine(num_copies, **options):
        est = lr.ulr(loss, num_copies=num_copies, sigma=0.3, **options)
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
    est = lr.likelihood_ratio(num_copies=16, sigma=0.5, antithetic=True)
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

    est = lr.likelihood_ratio(num_copies=16, sigma=0.5, antithetic=True)
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
    est = jax.jit(lr.ulr(loss, num_copies=4, baseline="mean"))
    (l1, (state, metrics)), g1 = est(params, {}, batch, jax.random.PRNGKey(3))
    (l2, _), g2 = est(params, {}, batch, jax.random.PRNGKey(3))
    (_, _), g3 = est(params, {}, batch, jax.random.PRNGKey(4))
    assert jax.tree.structure(g1) == jax.tree.structure(params)
    assert l1.shape == () and state == {} and set(metrics) == {"loss", "accuracy"}
    np.testing.assert_array_equal(_flat(g1), _flat(g2))
    assert not np.allclose(_flat(g1), _flat(g3))
    no_aux = lambda p, s, b, k: loss(p, s, b, k)[0]
    l4, g4 = jax.jit(lr.ulr(no_aux, has_aux=False, num_copies=4, baseline="mean", recompute=True))(
        params, {}, batch, jax.random.PRNGKey(3)
    )  # low-memory two-pass mode: same gradient
    np.testing.assert_allclose(_flat(g4), _flat(g1), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(l4, l1, rtol=1e-6)
    assert [name for name, _ in lr.perturbed_layers(loss, params, {}, batch)] == [
        "Dense_0",
        "Dense_1",
        "head",
    ]


def test_bad_input_raises_value_error():
    params, batch = _problem(_SMOOTH)
    loss = ws.training.classification_loss(_SMOOTH.apply, per_example=True)
    key = jax.random.PRNGKey(0)
    for kwargs, match in [
        (dict(num_copies=0), "num_copies"),
        (dict(sigma=0.0), "sigma"),
        (dict(sigma=-1.0), "sigma"),
        (dict(num_copies=5, antithetic=True), "even"),
        (dict(noise="uniform"), "noise"),
        (dict(baseline="median"), "baseline"),
        (dict(num_copies=1, baseline="mean"), "leave-one-out"),
        (dict(qmc=True, baseline="mean"), "qmc"),
    ]:
        with pytest.raises(ValueError, match=match):
            lr.likelihood_ratio(**kwargs)
        with pytest.raises(ValueError, match=match):
            lr.ulr(loss, **kwargs)
    with pytest.raises(ValueError, match="even"):
        lr.evolution_strategies(num_copies=3, antithetic=True)
    with pytest.raises(ValueError, match="sigma"):
        lr.es(loss, sigma=0.0)
    bare = _NoLayers()
    bare_params = bare.init(key, batch["x"])["params"]
    bare_loss = ws.training.classification_loss(bare.apply, per_example=True)
    with pytest.raises(ValueError, match="no layer of type"):
        lr.ulr(bare_loss)(bare_params, {}, batch, key)
    with pytest.raises(ValueError, match="one pair per perturbed layer"):
        lr.ulr(loss, num_copies=4, antithetic=True, layerwise=True)(params, {}, batch, key)
    with pytest.raises(ValueError, match="lacks the perturbed layers"):
        lr.ulr(loss, sigma={"Dense_0": 0.1})(params, {}, batch, key)


# ----------------------------------------------------------------------------- experiment


def test_experiment_quick(tmp_path):
    run_experiment("likelihood_ratio", tmp_path)
    for name in ("config.json", "results.json", "gradient_quality.png", "training.png"):
        assert os.path.exists(tmp_path / name), name
    import json

    results = json.loads((tmp_path / "results.json").read_text())
    assert {"gradient_quality", "training", "robustness"} <= set(results)


def test_notebook_runs():
    run_notebook("likelihood_ratio")
