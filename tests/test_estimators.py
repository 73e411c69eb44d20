"""Tests of wspace.estimators against closed forms."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from wspace import estimators

D = 2000  # coordinates: the cosine of exact + isotropic noise concentrates at 1/sqrt(1 + s^2 D / m)
SIGMA = np.sqrt(3.0 / D)  # per-coordinate noise: s^2 D = 3 = 3 ||G||^2
G = {"a": jnp.zeros(D // 2).at[0].set(0.6), "b": jnp.zeros(D // 2).at[1].set(0.8)}  # ||G|| = 1


def _loss(params, model_state, batch, key):
    """Linear loss <G, params>: its exact gradient is G at every point."""
    del batch, key
    return optax.tree.vdot(G, params), (model_state, {"m": jnp.float32(1.0)})


def _noisy(bias=0.0):
    """An estimator = exact gradient + bias (on every coordinate) + N(0, SIGMA^2) noise."""

    def estimator(loss_fn, has_aux=True):
        vg = jax.value_and_grad(loss_fn, has_aux=has_aux)

        def fn(params, model_state, batch, key):
            out, grads = vg(params, model_state, batch, key)
            noise = optax.tree.random_like(key, grads, jax.random.normal)
            return out, jax.tree.map(lambda g, z: g + bias + SIGMA * z, grads, noise)

        return fn

    return estimator


PARAMS = jax.tree.map(jnp.zeros_like, G)


def test_unbiased_noise_closed_forms():
    curve = estimators.metrics_vs_samples(
        _noisy(),
        _loss,
        PARAMS,
        {},
        {},
        G,
        jax.random.PRNGKey(0),
        num_samples=(1, 4),
        repeats=64,
        evaluations_per_sample=2,
    )
    assert curve["num_samples"] == [1, 4] and curve["forward_evaluations"] == [2, 8]
    np.testing.assert_allclose(curve["norm"], 1.0, rtol=1e-6)
    for i, m in enumerate((1, 4)):
        var = SIGMA**2 * D / m  # trace of the covariance of the m-sample mean
        # sample variance of R=64 repeats of a D-dim Gaussian: relative sd sqrt(2 / (D ))
        np.testing.assert_allclose(curve["variance"][i], var, rtol=5 * np.sqrt(2 / (D * 63)))
        np.testing.assert_allclose(curve["mse"][i], var, rtol=5 * np.sqrt(2 / (D * 64)))
        # unbiased: the debiased squared bias is 0 within a few of its standard errors
        assert abs(curve["bias_squared"][i]) < 5 * var / 64 * np.sqrt(2 / D) + 1e-12
        assert curve["bias"][i] == pytest.approx(np.sqrt(var / 64), rel=0.1)
        np.testing.assert_allclose(curve["cosine"][i], 1 / np.sqrt(1 + var), atol=0.01)


def test_known_bias_and_family_mode():
    b = 0.01  # bias vector b * ones: ||bias||^2 = b^2 D = 0.2
    est = estimators.sample_gradients(
        _noisy(b), _loss, PARAMS, {}, {}, jax.random.PRNGKey(1), repeats=200
    )
    met = estimators.gradient_metrics(est, G)
    se = 2 * np.sqrt(b**2 * D * SIGMA**2 * D / 200)  # sd of 2 <bias, noise mean>
    np.testing.assert_allclose(met["bias_squared"], b**2 * D, atol=5 * se)
    np.testing.assert_allclose(met["mse"], b**2 * D + SIGMA**2 * D, rtol=0.02)
    # the family form with average_estimator gives the same statistics as grouping
    fam = estimators.metrics_vs_samples(
        lambda m: estimators.average_estimator(_noisy(), m),
        _loss,
        PARAMS,
        {},
        {},
        G,
        jax.random.PRNGKey(2),
        num_samples=(4,),
        repeats=64,
        family=True,
    )
    np.testing.assert_allclose(fam["variance"][0], SIGMA**2 * D / 4, rtol=5 * np.sqrt(2 / (D * 63)))


def test_exact_estimator_and_average_aux():
    curve = estimators.metrics_vs_samples(
        jax.value_and_grad, _loss, PARAMS, {}, {}, G, jax.random.PRNGKey(0), num_samples=(1, 2)
    )
    np.testing.assert_allclose(curve["bias"], [0.0, 0.0], atol=1e-7)
    np.testing.assert_allclose(curve["variance"], [0.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(curve["cosine"], [1.0, 1.0], rtol=1e-6)
    (loss, (_, metrics)), grads = estimators.average_estimator(_noisy(), 3)(_loss)(
        PARAMS, {}, {}, jax.random.PRNGKey(3)
    )
    assert float(loss) == 0.0 and float(metrics["m"]) == 1.0
    assert jax.tree.structure(grads) == jax.tree.structure(G)


def test_bad_inputs():
    with pytest.raises(ValueError, match="repeats"):
        estimators.gradient_metrics({"a": jnp.ones((1, 3))}, {"a": jnp.ones(3)})
    with pytest.raises(ValueError, match="entries"):
        estimators.gradient_metrics({"a": jnp.ones((4, 2))}, {"a": jnp.ones(3)})
    with pytest.raises(ValueError, match="num_samples"):
        estimators.average_estimator(_noisy(), 0)
    with pytest.raises(ValueError, match="repeats"):
        estimators.metrics_vs_samples(
            _noisy(), _loss, PARAMS, {}, {}, G, jax.random.PRNGKey(0), repeats=1
        )
    with pytest.raises(ValueError, match="repeats"):
        estimators.sample_gradients(
            _noisy(), _loss, PARAMS, {}, {}, jax.random.PRNGKey(0), repeats=0
        )


def _quadratic(params, model_state, batch, key):
    """``||params||^2 / 2``: its gradient is the params, so each seed's estimates differ."""
    del batch, key
    return 0.5 * optax.tree.norm(params, squared=True), (model_state, {})


@pytest.mark.parametrize("family", [False, True])
def test_seed_axis_matches_one_call_per_seed(family):
    seeds = 3
    params = jax.tree.map(lambda g: g + 0.05 * jnp.arange(1, seeds + 1)[:, None], G)
    keys = jax.vmap(jax.random.PRNGKey)(jnp.arange(seeds) + 7)
    averaged = {m: estimators.average_estimator(_noisy(0.01), m) for m in (1, 3)}
    est = averaged.get if family else _noisy(0.01)
    kw = dict(num_samples=(1, 3), repeats=4, family=family, evaluations_per_sample=2)
    both = estimators.metrics_vs_samples(
        est, _quadratic, params, {}, {}, params, keys, seed_axis=True, **kw
    )
    assert isinstance(both, list) and len(both) == seeds
    for s in range(seeds):
        p = jax.tree.map(lambda v, s=s: v[s], params)
        one = estimators.metrics_vs_samples(est, _quadratic, p, {}, {}, p, keys[s], **kw)
        assert both[s].keys() == one.keys() and both[s]["forward_evaluations"] == [2, 6]
        for k in estimators.METRICS:
            np.testing.assert_allclose(both[s][k], one[k], rtol=1e-5, atol=1e-7, err_msg=k)
    assert both[0]["cosine"] != both[1]["cosine"]  # the seeds' draws and params differ
