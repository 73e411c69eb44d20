"""Tests of wspace.averaging: SWA against the mean of the iterates, BatchNorm recalibration
against the closed form of the running average."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import wspace as ws
from wspace import averaging


def _mlp_setup():
    model = ws.models.MLP(features=(7,), num_classes=3)
    rng = np.random.default_rng(0)
    batch = {
        "x": rng.normal(size=(16, 12)).astype(np.float32),
        "y": rng.integers(0, 3, 16).astype(np.int32),
    }
    params = jax.jit(model.init)(jax.random.PRNGKey(0), batch["x"][:2])["params"]
    return model, params, batch


def test_swa_keeps_the_running_mean_of_iterates_also_injected():
    model, params, batch = _mlp_setup()
    loss = ws.training.classification_loss(model.apply)
    start, every, steps = 2, 2, 7
    for tx in (
        optax.chain(optax.sgd(0.1), averaging.swa(start=start, every=every)),
        optax.inject_hyperparams(
            lambda start, every: optax.chain(optax.sgd(0.1), averaging.swa(start, every))
        )(start=start, every=every),
    ):
        s = ws.training.TrainState(
            jnp.zeros((), jnp.int32), params, {}, tx.init(params), jax.random.PRNGKey(1)
        )
        step = ws.training.make_train_step(loss, tx, donate=False)
        iterates = []
        for t in range(1, steps + 1):
            s, _ = step(s, batch)
            if t >= start and (t - start) % every == 0:
                iterates.append(s.params)
        want = jax.tree.map(lambda *xs: jnp.mean(jnp.stack(xs), 0), *iterates)
        got = averaging.swa_params(s.opt_state)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="exactly one SWAState"):
        averaging.swa_params(optax.sgd(0.1).init(params))
    with pytest.raises(ValueError, match="swa needs params"):
        averaging.swa().update(params, averaging.swa().init(params))


def test_swa_count_saturates_instead_of_overflowing():
    tx = averaging.swa()
    p = {"w": jnp.ones(2)}
    state = tx.init(p)._replace(count=jnp.asarray(jnp.iinfo(jnp.int32).max, jnp.int32))
    _, new = tx.update(p, state, p)
    assert int(new.count) == jnp.iinfo(jnp.int32).max


class _DenseBN(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        x = nn.Dense(5, precision=jax.lax.Precision.HIGHEST)(x)
        return nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)


def test_recompute_batch_stats_follows_the_bn_running_average():
    model = _DenseBN()
    rng = np.random.default_rng(1)
    x = rng.normal(size=(24, 12)).astype(np.float32)
    variables = model.init(jax.random.PRNGKey(0), x[:2])
    params, ms = variables["params"], {"batch_stats": variables["batch_stats"]}
    loss = lambda p, s, b, k: (
        0.0,
        (model.apply({"params": p, **s}, b["x"], train=True, mutable=["batch_stats"])[1], {}),
    )
    new = averaging.recompute_batch_stats(loss, params, ms, [{"x": x}] * 3)
    h = np.asarray(x, np.float64) @ np.asarray(params["Dense_0"]["kernel"], np.float64)
    h = h + np.asarray(params["Dense_0"]["bias"])
    m = 0.9**3
    stats = new["batch_stats"]["BatchNorm_0"]
    np.testing.assert_allclose(stats["mean"], (1 - m) * h.mean(0), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(stats["var"], m + (1 - m) * h.var(0), rtol=1e-4, atol=1e-6)
    assert averaging.recompute_batch_stats(loss, params, {}, [{"x": x}]) == {}
