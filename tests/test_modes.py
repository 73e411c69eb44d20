"""Each method's step in ``mode="sharded"`` on simulated CPU devices matches ``mode="jit"``.

`wspace.training.make_train_step` with the ULR estimator, a straight-through `BinaryMLP`
(stochastic binary weights and activations) and the FIP transform (`invariant_path`, the
anchors as ``tx_args``): a few steps on a mesh over ``jax.devices("cpu")`` (8 simulated
devices, tests/conftest.py) give the params of the same steps under ``jax.jit`` on one CPU
device. The batch is split over the mesh's ``data`` axis; the noise comes from the same
key stream in both modes, so the two runs compute the same function and differ only in
the order of floating-point reductions. (late_phase and lottery test their own sharded
steps.)
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import wspace as ws
from wspace import invariant_path as ip
from wspace import likelihood_ratio as lr
from wspace import straight_through as st

STEPS = 3
# Float32 sums in another order: relative differences of a few ulp per step, amplified by
# the steps (and, for FIP, by the CG solve); a changed algorithm differs by O(1).
# Measured on CPU: largest absolute difference <= 2e-7 for all three.
RTOL, ATOL = 1e-4, 1e-6


def _mesh() -> jax.sharding.Mesh:
    devices = jax.devices("cpu")
    if len(devices) < 2:
        pytest.skip(
            f"needs >= 2 CPU devices, found {len(devices)}: run under tests/conftest.py, which "
            "sets XLA_FLAGS=--xla_force_host_platform_device_count=8 before JAX starts"
        )
    return jax.sharding.Mesh(np.array(devices), ("data",))


def _data(mesh, d=6, classes=3, per_device=4, seed=0):
    n = per_device * mesh.devices.size
    kx, kw = jax.random.split(jax.random.PRNGKey(seed))
    x = jax.random.normal(kx, (n, d))
    y = jnp.argmax(x @ jax.random.normal(kw, (d, classes)), -1).astype(jnp.int32)
    return {"x": np.asarray(x), "y": np.asarray(y)}


def _run_both(model, loss_fn, tx, batch, mesh, *, estimator=jax.value_and_grad, tx_args=None):
    """Params after STEPS steps in jit mode (one CPU device) and in sharded mode (the mesh)."""
    cpu = jax.devices("cpu")[0]
    state = ws.training.init_state(model, tx, batch["x"][:2], jax.random.PRNGKey(1))
    out = {}
    for mode in ("jit", "sharded"):
        step = ws.training.make_train_step(
            loss_fn, tx, estimator=estimator, mode=mode, mesh=mesh, donate=False
        )
        if mode == "jit":
            s, b, a = jax.device_put((state, batch, tx_args), cpu)
        else:
            s = ws.training.place_state(state, mode, mesh)
            b = ws.training.place_batch(batch, mode, mesh)
            a = tx_args
        for _ in range(STEPS):
            s, metrics = step(s, b, a)
        out[mode] = (np.asarray(ravel_pytree(s.params)[0]), float(metrics["loss"]))
    start = np.asarray(ravel_pytree(state.params)[0])
    assert np.max(np.abs(out["jit"][0] - start)) > 1e-3  # the steps did move the params
    return out


def test_ulr_sharded_matches_jit():
    mesh = _mesh()
    model = ws.models.MLP(features=(16,), num_classes=3, activation=nn.tanh)
    batch = _data(mesh)
    loss = ws.training.classification_loss(model.apply, per_example=True)
    est = lr.ulr(num_copies=8, sigma=0.1, antithetic=True, baseline="mean")
    out = _run_both(model, loss, optax.sgd(0.5), batch, mesh, estimator=est)
    np.testing.assert_allclose(out["sharded"][0], out["jit"][0], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(out["sharded"][1], out["jit"][1], rtol=1e-5)


def test_straight_through_binary_mlp_sharded_matches_jit():
    mesh = _mesh()
    model = st.BinaryMLP((8, 8), num_classes=3, activation="st", binary_weights=True)
    batch = _data(mesh)
    loss = ws.training.classification_loss(model.apply)  # its key feeds the binary units
    tx = optax.multi_transform(
        {"latent": optax.sgd(30.0), "real": optax.adam(1e-2)}, st.latent_labels
    )
    out = _run_both(model, loss, tx, batch, mesh)
    np.testing.assert_allclose(out["sharded"][0], out["jit"][0], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(out["sharded"][1], out["jit"][1], rtol=1e-5)


def test_invariant_path_sharded_matches_jit():
    mesh = _mesh()
    model = ws.models.MLP(features=(16,), num_classes=3, activation=nn.tanh)
    batch = _data(mesh)
    anchors = _data(mesh, seed=1)["x"][:12]
    f = lambda p, x: model.apply({"params": p}, x)
    # tol=0, fixed maxiter: both runs take the same CG iterations
    tx = ip.invariant_path(0.1, f, damping=0.1, tol=0.0, maxiter=20, max_norm=1.0, warn=False)
    loss = ws.training.classification_loss(model.apply)
    out = _run_both(model, loss, tx, batch, mesh, tx_args={"anchors": anchors})
    np.testing.assert_allclose(out["sharded"][0], out["jit"][0], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(out["sharded"][1], out["jit"][1], rtol=1e-5)
