"""Tests of wspace.late_phase against ground truth: per-member jax.grad, exact averaging, SWA."""

from __future__ import annotations

import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import wspace as ws
from tests.helpers import run_experiment, run_notebook
from wspace import late_phase as lp

K = 4


def _data(n=24, length=12, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, length)).astype(np.float32)
    y = rng.integers(0, classes, n).astype(np.int32)
    return x, y


@functools.cache
def _init(name):
    """Model, params, model_state and a batch; initialised once (jitted) per test process."""
    if name == "convnet":
        model = ws.models.ConvNet(channels=(4, 6), num_classes=3)
    else:
        model = ws.models.MLP(features=(7,), num_classes=3)
    x, y = _data()
    variables = jax.jit(lambda k, x: model.init(k, x, train=False))(jax.random.PRNGKey(0), x[:2])
    params = variables["params"]
    model_state = {k: v for k, v in variables.items() if k != "params"}
    return model, params, model_state, {"x": x, "y": y}


def _state(name, tx=None):
    model, params, model_state, batch = _init(name)
    tx = tx or optax.sgd(0.1)
    copy = lambda t: jax.tree.map(jnp.copy, t)
    state = ws.training.TrainState(
        step=jnp.zeros((), jnp.int32),
        params=copy(params),
        model_state=copy(model_state),
        opt_state=tx.init(params),
        key=jax.random.PRNGKey(1),
    )
    return model, tx, state, batch


def _convnet_state(tx=None):
    return _state("convnet", tx)


def _mlp_state(tx=None):
    return _state("mlp", tx)


def _perturb(tree, key, scale=0.3):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, len(leaves))
    noisy = [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    return jax.tree.unflatten(treedef, noisy)


def _assert_tree_close(a, b, **kw):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), **kw)


def _assert_tree_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ----------------------------------------------------------------------------- selection / expand


def test_presets_choose_bn_affine_and_head_or_rank1_factors():
    _, _, state, _ = _convnet_state()
    late = lp.expand(state.params, "bn_head", K)
    axes = lp.member_axes(late, "bn_head")
    chosen = {
        "/".join(p)
        for p, a in zip(
            lp._paths(late), jax.tree.leaves(axes, is_leaf=lambda x: x is None), strict=True
        )
        if a == 0
    }
    assert chosen == {
        "BatchNorm_0/scale",
        "BatchNorm_0/bias",
        "BatchNorm_1/scale",
        "BatchNorm_1/bias",
        "head/kernel",
        "head/bias",
    }
    assert late["Conv_0"]["kernel"].shape == state.params["Conv_0"]["kernel"].shape
    assert late["head"]["kernel"].shape == (K,) + state.params["head"]["kernel"].shape

    _, _, mstate, _ = _mlp_state()
    r1 = lp.expand(mstate.params, "rank1", K)
    assert r1["Dense_0"]["kernel_rank1_in"].shape == (K, 12)
    assert r1["Dense_0"]["kernel_rank1_out"].shape == (K, 7)
    assert r1["head"]["kernel_rank1_out"].shape == (K, 3)
    assert "bias_rank1_in" not in r1["head"]
    assert lp.num_late_phase_params(r1, "rank1") == K * (12 + 7 + 7 + 3)


def test_expand_copies_noise_and_model_state():
    _, _, state, _ = _convnet_state()
    exact = lp.expand(state.params, "bn_head", K)
    for k in range(K):
        np.testing.assert_array_equal(exact["head"]["kernel"][k], state.params["head"]["kernel"])
    noisy = lp.expand(state.params, "bn_head", K, key=jax.random.PRNGKey(3), noise=0.1)
    again = lp.expand(state.params, "bn_head", K, key=jax.random.PRNGKey(3), noise=0.1)
    _assert_tree_equal(noisy, again)
    diff = noisy["BatchNorm_0"]["scale"] - state.params["BatchNorm_0"]["scale"]
    assert 0.02 < float(jnp.std(diff)) < 0.3
    assert not np.allclose(noisy["head"]["bias"][0], noisy["head"]["bias"][1])
    np.testing.assert_array_equal(noisy["Conv_1"]["kernel"], state.params["Conv_1"]["kernel"])
    ms = lp.expand_model_state(state.model_state, K)
    assert ms["batch_stats"]["BatchNorm_1"]["var"].shape == (K, 6)


def test_bad_inputs_raise_value_error_naming_what_is_allowed():
    model, tx, state, batch = _convnet_state()
    loss = ws.training.classification_loss(model.apply)
    with pytest.raises(ValueError, match="K must be an int >= 1, got 0"):
        lp.expand(state.params, "bn_head", 0)
    with pytest.raises(ValueError, match="K must be an int >= 1"):
        lp.late_phase_loss(loss, 2.5)
    with pytest.raises(ValueError, match="selects no leaves.*BatchNorm_0/bias"):
        lp.expand(state.params, lambda path: "nothing" in path, K)
    with pytest.raises(ValueError, match="selects no kernels"):
        lp.expand(state.params, lp.selection(lambda path: path[-1] == "bias", rank1=True), K)
    with pytest.raises(ValueError, match="unknown late-phase preset 'bn'.*bn_head"):
        lp.expand(state.params, "bn", K)
    with pytest.raises(ValueError, match="noise=0.1 > 0 needs a PRNG key"):
        lp.expand(state.params, "bn_head", K, noise=0.1)
    with pytest.raises(ValueError, match="combine must be one of"):
        lp.late_phase_loss(loss, K, combine="max")
    late_state = lp.expand_state(state, tx, "bn_head", K)
    wrapped = lp.late_phase_loss(loss, 5)
    with pytest.raises(ValueError, match="divisible by K=5"):
        wrapped(late_state.params, late_state.model_state, batch, jax.random.PRNGKey(0))
    nothing = lp.late_phase_loss(loss, K, lambda path: False)
    with pytest.raises(ValueError, match="selects no leaves"):
        nothing(late_state.params, late_state.model_state, batch, jax.random.PRNGKey(0))
    ds = ws.data.Dataset("toy", batch["x"], batch["y"], batch["x"], batch["y"], 3)
    with pytest.raises(ValueError, match=r"t0 must be an int in \[0, num_steps=5\], got 9"):
        lp.fit(
            state,
            loss,
            tx,
            ds,
            apply_fn=model.apply,
            num_members=K,
            t0=9,
            num_steps=5,
            batch_size=8,
            progress=False,
        )


# ----------------------------------------------------------------------------- gradients


def test_late_phase_gradients_equal_per_member_grads():
    """Member k's weights get dL_k/dphi_k; shared weights the mean (or sum) over members."""
    model, tx, state, batch = _convnet_state()
    loss = ws.training.classification_loss(model.apply)
    late = lp.expand_state(state, tx, "bn_head", K, key=jax.random.PRNGKey(2), noise=0.2)
    member_vg = jax.jit(jax.value_and_grad(loss, has_aux=True))

    b = len(batch["x"]) // K
    axes = lp.member_axes(late.params, "bn_head")
    losses, member_grads, member_states = [], [], []
    for k in range(K):
        pk, sk = lp.member(late.params, late.model_state, k)
        sl = jax.tree.map(lambda x, k=k: x[k * b : (k + 1) * b], batch)
        (lk, (msk, _)), gk = member_vg(pk, sk, sl, None)
        losses.append(lk)
        member_grads.append(gk)
        member_states.append(msk)
    for combine, factor in (("mean", 1.0),):  # "sum" is checked on the MLP below
        wrapped = lp.late_phase_loss(loss, K, "bn_head", combine=combine)
        (value, (new_ms, _)), grads = jax.jit(jax.value_and_grad(wrapped, has_aux=True))(
            late.params, late.model_state, batch, jax.random.PRNGKey(0)
        )
        np.testing.assert_allclose(value, np.mean(losses), rtol=1e-5)
        for k in range(K):
            _assert_tree_close(
                jax.tree.map(lambda x, k=k: x[k], new_ms), member_states[k], rtol=1e-5, atol=1e-6
            )

        def expected(a, *gs, factor=factor):
            if a == 0:
                return jnp.stack(gs)
            return factor * jnp.mean(jnp.stack(gs), axis=0)

        want = jax.tree.map(expected, axes, *member_grads, is_leaf=lambda x: x is None)
        _assert_tree_close(grads, want, rtol=2e-4, atol=1e-6)


def test_rank1_gradients_with_sum_combine_on_mlp():
    model, tx, state, batch = _mlp_state()
    loss = ws.training.classification_loss(model.apply)
    late = lp.expand(state.params, "rank1", K, key=jax.random.PRNGKey(5), noise=0.3)
    wrapped = lp.late_phase_loss(loss, K, "rank1", combine="sum")
    (value, _), grads = jax.jit(jax.value_and_grad(wrapped, has_aux=True))(late, {}, batch, None)
    b = len(batch["x"]) // K

    def member_loss(w, r, s, k):  # Dense_0 of member k: W * r s^T, computed by hand
        p = {
            "Dense_0": {"kernel": w * jnp.outer(r, s), "bias": late["Dense_0"]["bias"]},
            "head": lp.member(late, {}, k, "rank1")[0]["head"],
        }
        sl = jax.tree.map(lambda x: x[k * b : (k + 1) * b], batch)
        return loss(p, {}, sl, None)[0]

    w = late["Dense_0"]["kernel"]
    rs, ss = late["Dense_0"]["kernel_rank1_in"], late["Dense_0"]["kernel_rank1_out"]
    vg = jax.jit(jax.value_and_grad(member_loss, argnums=(0, 1, 2)), static_argnums=3)
    vals, per = zip(*[vg(w, rs[k], ss[k], k) for k in range(K)], strict=True)
    np.testing.assert_allclose(value, np.mean(vals), rtol=1e-5)
    # combine="sum": the shared kernel gets the sum of the members' gradients
    np.testing.assert_allclose(
        grads["Dense_0"]["kernel"], np.sum([g[0] for g in per], 0), rtol=1e-4, atol=1e-6
    )
    np.testing.assert_allclose(
        grads["Dense_0"]["kernel_rank1_in"], np.stack([g[1] for g in per]), rtol=1e-4, atol=1e-6
    )
    np.testing.assert_allclose(
        grads["Dense_0"]["kernel_rank1_out"], np.stack([g[2] for g in per]), rtol=1e-4, atol=1e-6
    )


# ----------------------------------------------------------------------------- averaging


def test_average_of_identical_members_is_the_original_network_exactly():
    model, tx, state, batch = _convnet_state()
    state = state.replace(model_state=_perturb(state.model_state, jax.random.PRNGKey(1), 0.1))
    state = state.replace(model_state=jax.tree.map(jnp.abs, state.model_state))
    for select in ("bn_head", "batchnorm", "head", "rank1"):
        p, s = lp.average(
            lp.expand(state.params, select, K), lp.expand_model_state(state.model_state, K), select
        )
        _assert_tree_equal(p, state.params)
        _assert_tree_equal(s, state.model_state)
    _, _, mstate, _ = _mlp_state()
    p, s = lp.average(lp.expand(mstate.params, "rank1", K), {}, "rank1")
    _assert_tree_equal(p, mstate.params)


def test_average_head_only_gives_mean_of_member_logits():
    model, _, state, batch = _mlp_state()
    late = lp.expand(state.params, "head", K, key=jax.random.PRNGKey(7), noise=0.5)
    p, _ = lp.average(late, {}, "head")
    avg_logits = model.apply({"params": p}, batch["x"])
    member_logits = [
        model.apply({"params": lp.member(late, {}, k, "head")[0]}, batch["x"]) for k in range(K)
    ]
    assert float(jnp.std(jnp.stack(member_logits), 0).mean()) > 0.1  # members really differ
    np.testing.assert_allclose(avg_logits, np.mean(member_logits, 0), rtol=1e-5, atol=1e-5)


class _DenseBN(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        x = nn.Dense(5)(x)
        return nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)


def test_average_bn_is_mean_of_member_affine_maps():
    """Members differ in scale, bias AND running stats: averaged BN output = mean of outputs."""
    model = _DenseBN()
    x, _ = _data()
    variables = model.init(jax.random.PRNGKey(0), x[:2])
    params, ms = variables["params"], {"batch_stats": variables["batch_stats"]}
    late = lp.expand(params, "batchnorm", K, key=jax.random.PRNGKey(1), noise=0.5)
    lms = lp.expand_model_state(ms, K)
    lms = jax.tree.map(
        lambda t, k: t + jnp.abs(jax.random.normal(k, t.shape)),
        lms,
        {
            "batch_stats": {
                "BatchNorm_0": {"mean": jax.random.PRNGKey(2), "var": jax.random.PRNGKey(3)}
            }
        },
    )
    p, s = lp.average(late, lms, "batchnorm")
    avg = model.apply({"params": p, **s}, x)
    outs = [
        model.apply({"params": pk, **sk}, x)
        for pk, sk in (lp.member(late, lms, k, "batchnorm") for k in range(K))
    ]
    assert float(jnp.std(jnp.stack(outs), 0).mean()) > 0.1
    np.testing.assert_allclose(avg, np.mean(outs, 0), rtol=1e-5, atol=1e-5)
    naive = {
        "params": jax.tree.map(lambda t: t.mean(0), late, is_leaf=None),
        "batch_stats": jax.tree.map(lambda t: t.mean(0), lms["batch_stats"]),
    }
    naive["params"]["Dense_0"] = late["Dense_0"]
    assert not np.allclose(model.apply(naive, x), np.mean(outs, 0), atol=1e-3)


# ----------------------------------------------------------------------------- training


def test_k1_late_phase_fit_reproduces_plain_training_through_the_switch():
    """With K=1 the late-phase step is the plain step: plain to T0 then late == plain throughout.

    Also checks the Adam moments are carried over (a reset would change the trajectory).
    """
    model, _, _, batch = _convnet_state()
    tx = optax.adam(optax.cosine_decay_schedule(0.05, 12))
    state = _convnet_state(tx)[2]
    ds = ws.data.Dataset("toy", batch["x"], batch["y"], batch["x"], batch["y"], 3)
    loss = ws.training.classification_loss(model.apply)
    kw = dict(apply_fn=model.apply, num_steps=12, batch_size=8, eval_every=12, progress=False)
    copy = lambda s: jax.tree.map(jnp.copy, s)
    plain, _ = ws.training.fit(copy(state), ws.training.make_train_step(loss, tx), ds, **kw)
    late, hist = lp.fit(copy(state), loss, tx, ds, num_members=1, t0=5, **kw)
    assert [(r["phase"], r["step"]) for r in hist] == [("plain", 5), ("late", 12)]
    p, s = lp.average(late.params, late.model_state)
    _assert_tree_close(p, plain.params, rtol=1e-4, atol=1e-5)
    _assert_tree_close(s, plain.model_state, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(
        hist[-1]["test_loss"],
        ws.training.evaluate(model.apply, plain.variables, batch["x"], batch["y"])["loss"],
        rtol=1e-4,
    )
    reset = lp.expand_state(copy(state), tx, "bn_head", 1, reset_opt_state=True)
    assert int(reset.opt_state[0].count) == 0


def test_expand_opt_state_copies_moments_and_keeps_counts():
    _, _, _, batch = _convnet_state()
    tx = optax.inject_hyperparams(optax.adam)(learning_rate=0.01)
    state = _convnet_state(tx)[2]
    update = jax.jit(tx.update)
    opt_state = state.opt_state
    for i in range(3):  # a non-trivial Adam state: three updates with random gradients
        grads = _perturb(jax.tree.map(jnp.zeros_like, state.params), jax.random.PRNGKey(i), 1.0)
        _, opt_state = update(grads, opt_state, state.params)
    state = state.replace(opt_state=opt_state)
    late = lp.expand_state(state, tx, "bn_head", K)
    inner, old = late.opt_state.inner_state[0], state.opt_state.inner_state[0]
    assert int(inner.count) == 3 and int(late.opt_state.count) == 3
    assert float(jnp.abs(old.mu["head"]["kernel"]).min()) > 0
    for k in range(K):
        np.testing.assert_array_equal(inner.mu["head"]["kernel"][k], old.mu["head"]["kernel"])
        np.testing.assert_array_equal(
            inner.nu["BatchNorm_1"]["bias"][k], old.nu["BatchNorm_1"]["bias"]
        )
    np.testing.assert_array_equal(inner.nu["Conv_0"]["kernel"], old.nu["Conv_0"]["kernel"])
    r1 = lp.expand_state(state, tx, "rank1", K)
    inner = r1.opt_state.inner_state[0]
    np.testing.assert_array_equal(inner.mu["Conv_1"]["kernel_rank1_in"], 0.0)
    np.testing.assert_array_equal(inner.mu["Conv_1"]["kernel"], old.mu["Conv_1"]["kernel"])
    assert int(inner.count) == 3


# ----------------------------------------------------------------------------- SWA


def test_swa_keeps_the_running_mean_of_iterates_also_injected_and_late_phase():
    model, _, state, batch = _mlp_state()
    loss = ws.training.classification_loss(model.apply)
    start, every, steps = 2, 2, 7
    for tx in (
        optax.chain(optax.sgd(0.1), lp.swa(start=start, every=every)),
        optax.inject_hyperparams(
            lambda start, every: optax.chain(optax.sgd(0.1), lp.swa(start=start, every=every))
        )(start=start, every=every),
    ):
        s = lp.expand_state(_mlp_state(tx)[2], tx, "head", K)
        step = ws.training.make_train_step(lp.late_phase_loss(loss, K, "head"), tx)
        iterates = []
        for t in range(1, steps + 1):
            s, _ = step(s, batch)
            if t >= start and (t - start) % every == 0:
                iterates.append(jax.tree.map(jnp.copy, s.params))
        want = jax.tree.map(lambda *xs: jnp.mean(jnp.stack(xs), 0), *iterates)
        _assert_tree_close(lp.swa_params(s.opt_state), want, rtol=1e-5, atol=1e-6)
        assert lp.swa_params(s.opt_state)["head"]["kernel"].shape[0] == K
    with pytest.raises(ValueError, match="exactly one SWAState"):
        lp.swa_params(optax.sgd(0.1).init(state.params))


def test_recompute_batch_stats_follows_the_bn_running_average():
    model = _DenseBN()
    x, y = _data()
    variables = model.init(jax.random.PRNGKey(0), x[:2])
    params, ms = variables["params"], {"batch_stats": variables["batch_stats"]}
    loss = lambda p, s, b, k: (
        0.0,
        (model.apply({"params": p, **s}, b["x"], train=True, mutable=["batch_stats"])[1], {}),
    )
    new = lp.recompute_batch_stats(loss, params, ms, [{"x": x, "y": y}] * 3)
    h = x @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"]
    m = 0.9**3
    np.testing.assert_allclose(
        new["batch_stats"]["BatchNorm_0"]["mean"], (1 - m) * h.mean(0), rtol=1e-4, atol=1e-6
    )
    np.testing.assert_allclose(
        new["batch_stats"]["BatchNorm_0"]["var"], m + (1 - m) * h.var(0), rtol=1e-4, atol=1e-6
    )


# ----------------------------------------------------------------------------- experiment, notebook


def test_experiment_quick_runs_and_writes_results(tmp_path):
    run_experiment("late_phase", tmp_path)
    for name in ("config.json", "results.json", "accuracy.png"):
        assert os.path.exists(tmp_path / name), name
    run_experiment("late_phase", tmp_path / "nqp", "--problem=nqp")
    for name in ("config.json", "results.json", "nqp.png"):
        assert os.path.exists(tmp_path / "nqp" / name), name


def test_notebook_executes():
    run_notebook("late_phase")
