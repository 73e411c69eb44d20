"""The methods compose: each test checks the invariant of a combination against ground truth.

* late-phase x pruning: a magnitude-pruned network expanded to K members and trained through
  the lottery chain (`mask_gradients` first, clipping and Adam, `keep_masked` last, masks as
  the step's extra argument): pruned weights are exactly zero in every member, in the rank-1
  members' effective kernels and after averaging; with K = 1 the late-phase run is the
  plain masked run.
* ULR x pruning: ULR's estimate through `mask_gradients` is unbiased for the gradient of the
  pruned network (z-test against `jax.grad`), and forward-only training keeps the masks.
* FIP x pruning: the sparsity path moves the to-be-pruned weights towards zero while the
  anchor outputs barely move; pruning after the path changes the outputs less than one-shot.
* FIP x late-phase: the metric step on late-phase params, with the metric of the *averaged*
  network, moves the members while the averaged network's anchor outputs stay put.

Also: the experiment at quick size (`experiments/compose.py`) and the notebook execute.

ULR x stochastic binary networks (ULR on a `BinaryMLP(activation="sign")` is unbiased for
the SBN's exact gradient by enumeration) is tested in
``tests/test_straight_through.py::test_ulr_on_binary_mlp_unbiased_for_sbn``.
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
from tests.helpers import fresh_state, run_experiment, run_notebook
from wspace import invariant_path as ip
from wspace import likelihood_ratio as lr
from wspace.late_phase import LatePhase

HIGHEST = jax.lax.Precision.HIGHEST


def _problem(features=(16,), classes=3, n=32, d=6, seed=0, activation=nn.tanh):
    model = ws.models.MLP(features=features, num_classes=classes, activation=activation)
    kx, kw, kp = jax.random.split(jax.random.PRNGKey(seed), 3)
    x = jax.random.normal(kx, (n, d))
    teacher = jax.random.normal(kw, (d, classes))
    y = jnp.argmax(x @ teacher, -1)
    params = model.init(kp, x)["params"]
    return model, params, {"x": x, "y": y}


def _pruned_zero(params, masks) -> bool:
    pairs = zip(jax.tree.leaves(params), jax.tree.leaves(masks), strict=True)
    return all(np.all(np.asarray(p)[~np.asarray(m)] == 0) for p, m in pairs)


def _lottery_chain():
    """The lottery recipe: masks first and last, a mixing transform and Adam in between."""
    return optax.chain(
        ws.pruning.mask_gradients(),
        optax.clip_by_global_norm(0.5),
        optax.adam(3e-2),
        ws.pruning.keep_masked(),
    )


# ----------------------------------------------------------------------------- late-phase x pruning


@pytest.mark.parametrize(
    "select,schedule", [("head", "parallel"), ("rank1", "cycle")], ids=["head-parallel", "rank1"]
)
def test_late_phase_members_keep_pruned_weights_zero_through_training_and_averaging(
    select, schedule
):
    model, params, batch = _problem(features=(16, 16))
    masks = ws.pruning.magnitude_masks(params, 0.6)
    params = ws.pruning.apply_masks(params, masks)
    tx = _lottery_chain()
    loss = ws.training.classification_loss(model.apply)
    state = fresh_state(params, tx, jax.random.PRNGKey(1))
    k = 4
    late = LatePhase(k, select=select, schedule=schedule, noise=0.2)
    s = late.expand_state(state, tx, key=jax.random.PRNGKey(2), masks=masks)  # no noise on zeros
    late_masks = late.expand_masks(masks)
    ws.pruning.check_masks(s.params, late_masks)
    assert _pruned_zero(s.params, late_masks)
    step = late.make_train_step(loss, tx, donate=False)
    start = s.params
    for _ in range(2 * k):
        s, _ = step(s, batch, {"masks": late_masks})
        assert _pruned_zero(s.params, late_masks)
    for i in range(k):  # every member as a plain network: its effective kernels keep the zeros
        member, _ = late.member(s.params, s.model_state, i)
        assert _pruned_zero(member, masks)
    moved = [
        np.max(np.abs(np.asarray(a) - np.asarray(b)))
        for a, b in zip(jax.tree.leaves(s.params), jax.tree.leaves(start), strict=True)
    ]
    assert min(moved) > 0  # every leaf trained (surviving weights, factors, members)
    avg, _ = late.average(s.params, s.model_state)
    assert _pruned_zero(avg, masks)
    alive = np.concatenate(  # surviving kernel entries (a bias may keep a zero gradient)
        [
            np.asarray(p)[np.asarray(m)]
            for p, m in zip(*map(jax.tree.leaves, (avg, masks)), strict=True)
            if p.ndim >= 2
        ]
    )
    assert np.count_nonzero(alive) == alive.size  # only the masked entries are zero


def test_late_phase_with_one_member_is_the_plain_masked_run():
    """Ground truth: K = 1 (cycle, sum) is plain masked training, step for step."""
    model, params, batch = _problem(features=(16,))
    masks = ws.pruning.magnitude_masks(params, 0.5)
    params = ws.pruning.apply_masks(params, masks)
    tx = _lottery_chain()
    loss = ws.training.classification_loss(model.apply)
    state = fresh_state(params, tx, jax.random.PRNGKey(1))
    late = LatePhase(1, select="head")
    s = late.expand_state(state, tx)
    plain = ws.training.make_train_step(loss, tx, donate=False)
    step = late.make_train_step(loss, tx, donate=False)
    late_masks = late.expand_masks(masks)
    for _ in range(4):
        state, _ = plain(state, batch, {"masks": masks})
        s, _ = step(s, batch, {"masks": late_masks})
    avg, _ = late.average(s.params, s.model_state)
    np.testing.assert_allclose(ravel_pytree(avg)[0], ravel_pytree(state.params)[0], atol=1e-6)
    assert _pruned_zero(avg, masks)


# ----------------------------------------------------------------------------- ULR x pruning


def test_ulr_through_mask_gradients_is_unbiased_for_the_pruned_network():
    model, params, batch = _problem(features=(8,), n=8)
    masks = ws.pruning.magnitude_masks(params, 0.5)
    pruned = ws.pruning.apply_masks(params, masks)
    loss = ws.training.classification_loss(model.apply, per_example=True)
    est = lr.ulr(num_copies=16, sigma=0.05, antithetic=True, baseline="mean")
    r = 400
    samples = ws.estimators.sample_gradients(
        est, loss, pruned, {}, batch, jax.random.PRNGKey(3), repeats=r
    )
    tx = ws.pruning.mask_gradients()
    masked = jax.vmap(lambda g: tx.update(g, tx.init(pruned), masks=masks)[0])(samples)
    rows = np.asarray(jax.vmap(lambda t: ravel_pytree(t)[0])(masked))
    mean_loss = lambda p: jnp.mean(loss(p, {}, batch, None)[0])
    with jax.default_matmul_precision("highest"):
        exact = jax.grad(mean_loss)(pruned)
    ref = np.asarray(ravel_pytree(ws.pruning.apply_masks(exact, masks))[0])
    m = np.asarray(ravel_pytree(masks)[0])
    assert np.all(rows[:, ~m] == 0)  # the pruned coordinates get exactly zero
    se = rows[:, m].std(0, ddof=1) / np.sqrt(r)
    z = (rows[:, m].mean(0) - ref[m]) / np.maximum(se, 1e-12)
    slack = 0.02 * np.abs(ref).max()  # sigma = 0.05: the smoothing bias is O(sigma^2)
    assert np.all(np.abs(rows[:, m].mean(0) - ref[m]) <= 4.5 * se + slack), z
    assert np.linalg.norm(se) < 0.2 * np.linalg.norm(ref)  # power: a 20% bias would show


def test_forward_only_training_of_a_pruned_network_keeps_masks_and_lowers_the_loss():
    model, params, batch = _problem(features=(16,), n=64)
    masks = ws.pruning.magnitude_masks(params, 0.7)
    params = ws.pruning.apply_masks(params, masks)
    loss = ws.training.classification_loss(model.apply, per_example=True)
    tx = optax.chain(ws.pruning.mask_gradients(), optax.adam(0.1), ws.pruning.keep_masked())
    est = lr.ulr(num_copies=32, sigma=0.1, antithetic=True, baseline="mean")
    state = fresh_state(params, tx, jax.random.PRNGKey(4))
    step = ws.training.make_train_step(loss, tx, estimator=est, donate=False)
    exact_loss = jax.jit(lambda p: jnp.mean(loss(p, {}, batch, None)[0]))
    before = float(exact_loss(params))
    for _ in range(40):
        state, _ = step(state, batch, {"masks": masks})
        assert _pruned_zero(state.params, masks)
    after = float(exact_loss(state.params))
    assert after < 0.75 * before, (before, after)  # measured: 1.11 -> 0.75


# ----------------------------------------------------------------------------- FIP x pruning


def test_sparsity_path_then_pruning_keeps_the_function_better_than_one_shot():
    model, params, batch = _problem(features=(32,), n=48, d=8)
    f = lambda p, x: model.apply({"params": p}, x)
    level = 0.6
    tx = ip.invariant_path(
        0.05, f, metric="fisher", damping=1e-3, tol=1e-3, maxiter=100, max_norm=1.0, warn=False
    )
    step = ws.training.make_train_step(ip.sparsity_loss(level), tx, donate=False)
    state = fresh_state(params, tx, jax.random.PRNGKey(5))
    x = batch["x"]
    out0 = f(params, x)
    dist0 = float(ip.projection_distance(params, level))
    for _ in range(20):
        state, _ = step(state, batch, {"anchors": x})
    dist = float(ip.projection_distance(state.params, level))
    assert dist < 0.5 * dist0, (dist0, dist)  # the to-be-pruned weights shrank

    def change(p):  # of the softmax outputs on the anchors (what the Fisher metric measures)
        p0 = jax.nn.softmax(out0)
        return float(jnp.linalg.norm(jax.nn.softmax(f(p, x)) - p0) / jnp.linalg.norm(p0))

    oneshot = ws.pruning.apply_masks(params, ws.pruning.magnitude_masks(params, level))
    path_masks = ws.pruning.magnitude_masks(state.params, level)
    pruned_path = ws.pruning.apply_masks(state.params, path_masks)
    assert _pruned_zero(pruned_path, path_masks)
    # ground truth: the same distance travelled by plain gradient steps on the sparsity loss
    plain = params
    grad = jax.jit(jax.grad(lambda p: ip.projection_distance(p, level)))
    travelled = float(optax.tree.norm(jax.tree.map(jnp.subtract, state.params, params)))
    for _ in range(20):
        g = grad(plain)
        size = travelled / 20 / optax.tree.norm(g)
        plain = optax.apply_updates(plain, optax.tree.scale(-size, g))
    # measured: 0.007 vs 0.12 (path vs plain), 0.214 vs 0.243 (pruned after the path vs one-shot)
    assert change(state.params) < 0.1 * change(plain), (change(state.params), change(plain))
    assert change(pruned_path) < 0.92 * change(oneshot), (change(pruned_path), change(oneshot))


# ----------------------------------------------------------------------------- FIP x late-phase


def test_metric_of_the_averaged_network_moves_members_but_not_its_anchor_outputs():
    model, params, batch = _problem(features=(16,), n=24)
    late = LatePhase(3, select="head", schedule="parallel", noise=0.3)
    late_params = late.expand(params, key=jax.random.PRNGKey(6))
    averaged = late.averaged_apply(model.apply)
    f_avg = lambda p, x: averaged({"params": p}, x)
    x = batch["x"]
    # secondary objective: a new task for the members (labels permuted), each member on it
    new = {"x": x + 1.0, "y": (batch["y"] + 1) % 3}
    member_loss = late.parallel_loss(ws.training.classification_loss(model.apply))
    wide = {k: jnp.concatenate([v] * 3) for k, v in new.items()}
    grad = jax.grad(lambda p: member_loss(p, {}, wide, None)[0])(late_params)
    tx = ip.scale_by_invariant_metric(
        f_avg, metric="jacobian", damping=1e-4, tol=1e-4, maxiter=200, warn=False
    )
    d, _ = jax.jit(lambda g, s, p, a: tx.update(g, s, p, anchors=a))(
        grad, tx.init(late_params), late_params, x
    )
    eps = 0.5 / float(optax.tree.norm(d))
    move = lambda direction: jax.tree.map(lambda p, v: p - eps * v, late_params, direction)
    gnorm = float(optax.tree.norm(grad))
    plain = move(jax.tree.map(lambda g: g * float(optax.tree.norm(d)) / gnorm, grad))
    fip = move(d)
    with jax.default_matmul_precision("highest"):
        avg0 = f_avg(late_params, x)
        avg_change = lambda p: float(jnp.linalg.norm(f_avg(p, x) - avg0))

        def member_change(p):
            outs = [model.apply({"params": late.member(p, {}, i)[0]}, x) for i in range(3)]
            base = [
                model.apply({"params": late.member(late_params, {}, i)[0]}, x) for i in range(3)
            ]
            return max(float(jnp.linalg.norm(a - b)) for a, b in zip(outs, base, strict=True))

    assert avg_change(fip) < 0.05 * avg_change(plain), (avg_change(fip), avg_change(plain))
    assert member_change(fip) > 0.5 * member_change(plain)  # the members themselves moved


# ----------------------------------------------------------------------------- experiment, notebook


def test_experiment_quick_runs_and_keeps_masks(tmp_path):
    results = run_experiment("compose", tmp_path / "run", steps=10)
    assert results["smoke"] and len(results["claims"]) == 5
    for claim in results["claims"]:
        assert claim["verdict"] in ("holds", "does not hold", "inconclusive")
        assert claim["n"] == 2
    table = results["tables"]["Test accuracy by arm"]
    col = table["columns"].index("pruned_nonzero")
    assert {row[0] for row in table["rows"]} == {
        "dense",
        "ticket",
        "ticket_late",
        "ticket_late_every",
        "ticket_ulr",
        "random_ulr",
        "dense_ulr",
    }
    assert all(row[col][0] == 0.0 for row in table["rows"])  # pruned weights exactly zero
    assert (tmp_path / "run" / "compose.png").exists()
    with pytest.raises(ValueError, match="late_start"):
        run_experiment("compose", tmp_path / "bad", late_start=1.5)
    assert not (tmp_path / "bad").exists()  # refused before any file write


def test_notebook_executes():
    run_notebook("compose")
