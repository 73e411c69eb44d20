"""Tests of wspace.late_phase against ground truth: per-member jax.grad, Algorithm 1 by hand,
bit-exact untouched members, exact averaging, masks, K = 1 and sharded-vs-jit agreement."""

from __future__ import annotations

import functools
import os
import warnings

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import wspace as ws
from tests.helpers import FAST_RUN_FLAGS, run_experiment, run_notebook
from wspace import late_phase as lp
from wspace.late_phase import LatePhase

K = 4
HIGHEST = jax.lax.Precision.HIGHEST


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


def _perturb(tree, key, scale=0.3):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, len(leaves))
    noisy = [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    return jax.tree.unflatten(treedef, noisy)


def _flags(cfg, tree) -> list[bool]:
    return jax.tree.leaves(cfg.member_mask(tree))


_assert_tree_close = chex.assert_trees_all_close  # structure, shapes and values
_assert_tree_equal = chex.assert_trees_all_equal


def _exact_or_close(a, b):
    """Bit-exact on CPU; a float32 tolerance on accelerators (fused kernels may reorder)."""
    if jax.default_backend() == "cpu":
        _assert_tree_equal(a, b)
    else:
        _assert_tree_close(a, b, rtol=1e-6, atol=1e-7)


def _member_rows(tree, flags, k):
    return [x[k] for x, f in zip(jax.tree.leaves(tree), flags, strict=True) if f]


# ----------------------------------------------------------------------------- config, expand


def test_presets_choose_bn_affine_and_head_or_rank1_factors():
    _, _, state, _ = _state("convnet")
    late = LatePhase(K)
    params = late.expand(state.params)
    names = ws.paths.named_leaves(params)[0]
    chosen = {n for n, f in zip(names, _flags(late, params), strict=True) if f}
    assert chosen == {
        f"{m}/{n}" for m in ("BatchNorm_0", "BatchNorm_1") for n in ("scale", "bias")
    } | {"head/kernel", "head/bias"}
    assert params["Conv_0"]["kernel"].shape == state.params["Conv_0"]["kernel"].shape
    assert params["head"]["kernel"].shape == (K,) + state.params["head"]["kernel"].shape
    assert late.member_axes(params)["head"]["kernel"] == 0
    assert late.member_axes(params)["Conv_0"]["kernel"] is None

    _, _, mstate, _ = _state("mlp")
    r1cfg = LatePhase(K, "rank1")
    r1 = r1cfg.expand(mstate.params)
    assert r1["Dense_0"]["kernel_rank1_in"].shape == (K, 12)
    assert r1["Dense_0"]["kernel_rank1_out"].shape == (K, 7)
    assert "bias_rank1_in" not in r1["head"]
    assert r1cfg.num_late_phase_params(r1) == K * (12 + 7 + 7 + 3)


def test_expand_copies_noise_and_model_state():
    _, _, state, _ = _state("convnet")
    exact = LatePhase(K).expand(state.params)
    for k in range(K):
        np.testing.assert_array_equal(exact["head"]["kernel"][k], state.params["head"]["kernel"])
    noisy_cfg = LatePhase(K, noise=0.1)
    noisy = noisy_cfg.expand(state.params, key=jax.random.PRNGKey(3))
    _assert_tree_equal(noisy, noisy_cfg.expand(state.params, key=jax.random.PRNGKey(3)))
    diff = noisy["BatchNorm_0"]["scale"] - state.params["BatchNorm_0"]["scale"]
    assert 0.02 < float(jnp.std(diff)) < 0.3
    assert not np.allclose(noisy["head"]["bias"][0], noisy["head"]["bias"][1])
    np.testing.assert_array_equal(noisy["Conv_1"]["kernel"], state.params["Conv_1"]["kernel"])
    ms = LatePhase(K).expand_model_state(state.model_state)
    assert ms["batch_stats"]["BatchNorm_1"]["var"].shape == (K, 6)


def test_bad_inputs_raise_value_error_naming_what_is_allowed():
    model, tx, state, batch = _state("convnet")
    loss = ws.training.classification_loss(model.apply)
    with pytest.raises(ValueError, match="K must be an int >= 1, got 0"):
        LatePhase(0)
    with pytest.raises(ValueError, match="K must be an int >= 1"):
        LatePhase(2.5)
    with pytest.raises(ValueError, match="schedule must be one of.*'cycle'.*got 'cyclic'"):
        LatePhase(K, schedule="cyclic")
    with pytest.raises(ValueError, match=r"combine must be one of \('sum', 'mean'\) for sch"):
        LatePhase(K, schedule="parallel", combine="every")
    with pytest.raises(ValueError, match="combine must be one of"):
        LatePhase(K, combine="max")
    with pytest.raises(ValueError, match="noise must be >= 0"):
        LatePhase(K, noise=-1.0)
    with pytest.raises(ValueError, match="selects no leaves.*BatchNorm_0/bias"):
        LatePhase(K, lambda path: "nothing" in path).expand(state.params)
    with pytest.raises(ValueError, match="selects no kernels"):
        LatePhase(K, lp.selection(lambda path: path[-1] == "bias", rank1=True)).expand(state.params)
    with pytest.raises(ValueError, match="unknown late-phase preset 'bn'.*bn_head"):
        LatePhase(K, "bn")
    with pytest.raises(ValueError, match="noise=0.1 > 0 needs a PRNG key"):
        LatePhase(K, noise=0.1).expand(state.params)
    with pytest.raises(ValueError, match="unknown mode 'gpu'"):
        LatePhase(K).make_train_step(loss, tx, mode="gpu")
    par = LatePhase(5, schedule="parallel")
    late_state = par.expand_state(state, tx)
    with pytest.raises(ValueError, match="divisible by K=5"):
        par.parallel_loss(loss)(late_state.params, late_state.model_state, batch, None)
    with pytest.raises(ValueError, match=r"member_opt_state must be one of \('copy', 'fresh'\)"):
        LatePhase(K, member_opt_state="reset")
    ds = ws.data.Dataset("toy", batch["x"], batch["y"], batch["x"], batch["y"], 3)
    with pytest.raises(ValueError, match=r"t0 must be an int in \[0, num_steps=5\], got 9"):
        lp.fit(state, loss, tx, ds, apply_fn=model.apply, num_members=K, t0=9, num_steps=5,
               batch_size=8, progress=False)  # fmt: skip


# ----------------------------------------------------------------------------- schedules


def _adam_late_state(cfg, name="convnet"):
    """A late-phase state whose members differ and whose Adam moments are non-zero everywhere."""
    model, _, _, batch = _init(name)
    tx = optax.adam(0.05)
    _, _, state, _ = _state(name, tx)
    loss = ws.training.classification_loss(model.apply)
    plain = ws.training.make_train_step(loss, tx, donate=False)
    for _ in range(2):
        state, _ = plain(state, batch)
    return model, tx, cfg.expand_state(state, tx, key=jax.random.PRNGKey(4)), batch, loss


@pytest.mark.parametrize("schedule", ["cycle", "random"])
def test_one_step_touches_exactly_one_member_bit_exact(schedule):
    """Cycle/random: only member k's rows (params, BN statistics, Adam moments) change."""
    cfg = LatePhase(K, schedule=schedule, noise=0.1)
    model, tx, s, batch, loss = _adam_late_state(cfg)
    step = cfg.make_train_step(loss, tx, donate=False)
    flags = _flags(cfg, s.params)
    seen = []
    for t in range(2 * K):
        new, _ = step(s, batch)
        changed = [
            k
            for k in range(K)
            if any(
                not np.array_equal(a, b)
                for a, b in zip(
                    _member_rows(new.params, flags, k),
                    _member_rows(s.params, flags, k),
                    strict=True,
                )
            )
        ]
        assert len(changed) == 1, changed
        k = changed[0]
        if schedule == "cycle":
            assert k == t % K
        seen.append(k)
        for j in set(range(K)) - {k}:  # every other member: bit for bit the same
            _assert_tree_equal(_member_rows(new.params, flags, j), _member_rows(s.params, flags, j))
            _assert_tree_equal(
                jax.tree.map(lambda x, j=j: x[j], new.model_state),
                jax.tree.map(lambda x, j=j: x[j], s.model_state),
            )
            for part in ("mu", "nu"):
                _assert_tree_equal(
                    _member_rows(getattr(new.opt_state.inner[0], part), flags, j),
                    _member_rows(getattr(s.opt_state.inner[0], part), flags, j),
                )
        bn_k = new.model_state["batch_stats"]["BatchNorm_0"]["mean"][k]
        assert not np.array_equal(bn_k, s.model_state["batch_stats"]["BatchNorm_0"]["mean"][k])
        conv_moved = not np.array_equal(
            new.params["Conv_0"]["kernel"], s.params["Conv_0"]["kernel"]
        )
        # cycle + sum: the shared weights step once per K minibatches; random + every: every step
        assert conv_moved == (schedule == "random" or t % K == K - 1)
        s = new
    assert len(set(seen)) > 1


@functools.cache
def _member_vg(loss, cfg):
    """Jitted ``(params, model_state, batch, k) -> ((loss, (new_state_k, _)), grad)`` of member
    k as a plain network (jax.grad at HIGHEST precision); k is traced: one compile."""

    def fn(params, model_state, batch, k):
        pk, sk = cfg.member(params, model_state, k)
        with jax.default_matmul_precision("highest"):
            return jax.value_and_grad(loss, has_aux=True)(pk, sk, batch, None)

    return jax.jit(fn)


def _member_grads(loss, cfg, params, model_state, batch, k):
    """Plain-network gradient of member k and its new BatchNorm statistics."""
    (_, (new_sk, _)), g = _member_vg(loss, cfg)(params, model_state, batch, k)
    return g, new_sk


def test_cycle_sum_is_algorithm_1_and_random_every_is_plain_sgd_on_the_active_member():
    """One cycle of K different minibatches by hand: phi_k <- phi_k - lr g_phi_k(M_k) as soon as
    member k is active; theta <- theta - lr sum_k g_theta(M_k) once, after the K-th minibatch;
    BatchNorm over the whole minibatch with member k's own statistics."""
    model, params, model_state, _ = _init("convnet")
    lr, n = 0.1, 10
    loss = ws.training.classification_loss(model.apply)
    tx = optax.sgd(lr)
    cfg = LatePhase(K, noise=0.2)  # cycle, combine="sum"
    _, _, state, _ = _state("convnet", tx)
    s = cfg.expand_state(state, tx, key=jax.random.PRNGKey(2))
    flags = _flags(cfg, s.params)
    batches = [dict(zip(("x", "y"), _data(n, seed=10 + k), strict=True)) for k in range(K)]
    p, ms = s.params, s.model_state
    want_p, want_ms, shared_sum = p, ms, None
    for k, b in enumerate(batches):
        g, new_sk = _member_grads(loss, cfg, p, ms, b, k)
        gl = jax.tree.leaves(g)
        shared_sum = (
            gl if shared_sum is None else [a + x for a, x in zip(shared_sum, gl, strict=True)]
        )
        leaves = [
            x.at[k].add(-lr * gi) if f else x
            for x, gi, f in zip(jax.tree.leaves(want_p), gl, flags, strict=True)
        ]
        want_p = jax.tree.unflatten(jax.tree.structure(p), leaves)
        want_ms = jax.tree.map(lambda full, x, k=k: full.at[k].set(x), want_ms, new_sk)
    leaves = [
        x if f else x - lr * g
        for x, g, f in zip(jax.tree.leaves(want_p), shared_sum, flags, strict=True)
    ]
    want_p = jax.tree.unflatten(jax.tree.structure(p), leaves)
    step = cfg.make_train_step(loss, tx, donate=False)
    with jax.default_matmul_precision("highest"):
        for b in batches:
            s, _ = step(s, b)
    _assert_tree_close(s.params, want_p, rtol=1e-5, atol=1e-6)
    _assert_tree_close(s.model_state, want_ms, rtol=1e-5, atol=1e-6)
    assert int(s.opt_state.count) == K

    # random + every: theta steps with each minibatch's own gradient, phi_k for the drawn k only
    rnd = LatePhase(K, schedule="random", noise=0.2)
    s = rnd.expand_state(state, tx, key=jax.random.PRNGKey(2))
    k = int(rnd.member_index(s.opt_state))
    g, _ = _member_grads(loss, rnd, s.params, s.model_state, batches[0], k)
    leaves = [
        x.at[k].add(-lr * gi) if f else x - lr * gi
        for x, gi, f in zip(jax.tree.leaves(s.params), jax.tree.leaves(g), flags, strict=True)
    ]
    with jax.default_matmul_precision("highest"):
        s, _ = rnd.make_train_step(loss, tx, donate=False)(s, batches[0])
    _assert_tree_close(
        s.params, jax.tree.unflatten(jax.tree.structure(s.params), leaves), rtol=1e-5, atol=1e-6
    )


def test_parallel_gradients_equal_per_member_grads_on_slices():
    """Parallel schedule: member k's weights get dL_k/dphi_k on slice k; shared weights the mean."""
    model, tx, state, batch = _state("convnet")
    loss = ws.training.classification_loss(model.apply)
    cfg = LatePhase(K, schedule="parallel", noise=0.2)
    late = cfg.expand_state(state, tx, key=jax.random.PRNGKey(2))
    b = len(batch["x"]) // K
    losses, member_grads, member_states = [], [], []
    for k in range(K):
        sl = jax.tree.map(lambda x, k=k: x[k * b : (k + 1) * b], batch)
        (lk, (msk, _)), g = _member_vg(loss, cfg)(late.params, late.model_state, sl, k)
        losses.append(lk)
        member_grads.append(g)
        member_states.append(msk)
    with jax.default_matmul_precision("highest"):
        vg = jax.jit(jax.value_and_grad(cfg.parallel_loss(loss), has_aux=True))
        (value, (new_ms, _)), grads = vg(late.params, late.model_state, batch, None)
    np.testing.assert_allclose(value, np.mean(losses), rtol=1e-5)
    for k in range(K):
        _assert_tree_close(
            jax.tree.map(lambda x, k=k: x[k], new_ms), member_states[k], rtol=1e-5, atol=1e-6
        )
    want = jax.tree.map(
        lambda a, *gs: jnp.stack(gs) if a == 0 else jnp.mean(jnp.stack(gs), axis=0),
        cfg.member_axes(late.params),
        *member_grads,
        is_leaf=lambda x: x is None,
    )
    _assert_tree_close(grads, want, rtol=2e-4, atol=1e-6)


def test_rank1_gradients_with_sum_combine_on_mlp():
    model, tx, state, batch = _state("mlp")
    loss = ws.training.classification_loss(model.apply)
    cfg = LatePhase(K, "rank1", schedule="parallel", combine="sum", noise=0.3)
    late = cfg.expand(state.params, key=jax.random.PRNGKey(5))
    with jax.default_matmul_precision("highest"):
        vg = jax.jit(jax.value_and_grad(cfg.parallel_loss(loss), has_aux=True))
        (value, _), grads = vg(late, {}, batch, None)
    b = len(batch["x"]) // K

    def member_loss(w, r, s, k):  # Dense_0 of member k: W * r s^T, computed by hand
        p = {
            "Dense_0": {"kernel": w * jnp.outer(r, s), "bias": late["Dense_0"]["bias"]},
            "head": cfg.member(late, {}, k)[0]["head"],
        }
        sl = jax.tree.map(lambda x: x[k * b : (k + 1) * b], batch)
        return loss(p, {}, sl, None)[0]

    w = late["Dense_0"]["kernel"]
    rs, ss = late["Dense_0"]["kernel_rank1_in"], late["Dense_0"]["kernel_rank1_out"]
    with jax.default_matmul_precision("highest"):
        vg = jax.jit(jax.value_and_grad(member_loss, argnums=(0, 1, 2)), static_argnums=3)
        vals, per = zip(*[vg(w, rs[k], ss[k], k) for k in range(K)], strict=True)
    np.testing.assert_allclose(value, np.mean(vals), rtol=1e-5)
    np.testing.assert_allclose(  # combine="sum": the shared kernel gets the members' sum
        grads["Dense_0"]["kernel"], np.sum([g[0] for g in per], 0), rtol=1e-4, atol=1e-6
    )
    np.testing.assert_allclose(
        grads["Dense_0"]["kernel_rank1_in"], np.stack([g[1] for g in per]), rtol=1e-4, atol=1e-6
    )


# ----------------------------------------------------------------------------- K = 1, fit


def test_k1_fit_reproduces_plain_training_in_every_schedule():
    """K=1: plain to T0 then late == plain throughout, in every schedule (Adam moments carried)."""
    model, _, _, batch = _init("convnet")
    tx = optax.adam(optax.cosine_decay_schedule(0.05, 12))
    state = _state("convnet", tx)[2]
    ds = ws.data.Dataset("toy", batch["x"], batch["y"], batch["x"], batch["y"], 3)
    loss = ws.training.classification_loss(model.apply)
    no_eval = lambda state: {}  # records without evaluation: fewer compiles
    kw = dict(eval_fn=no_eval, num_steps=9, batch_size=8, eval_every=9, progress=False)
    copy = lambda s: jax.tree.map(jnp.copy, s)
    plain, _ = ws.training.fit(copy(state), ws.training.make_train_step(loss, tx), ds, **kw)
    for schedule in lp.SCHEDULES:
        cfg = LatePhase(1, schedule=schedule)
        late, hist = cfg.fit(copy(state), loss, tx, ds, t0=4, **kw)
        assert [(r["phase"], r["step"]) for r in hist] == [("plain", 4), ("late", 9)]
        p, s = cfg.average(late.params, late.model_state)
        _assert_tree_close(p, plain.params, rtol=1e-5, atol=1e-6)
        _assert_tree_close(s, plain.model_state, rtol=1e-5, atol=1e-6)


def test_sharded_and_pmap_fit_match_jit_on_8_cpu_devices():
    """lp.fit in sharded/pmap mode (batch split over 8 simulated CPU devices) equals jit."""
    devices = jax.devices("cpu")
    assert len(devices) == 8, "tests/conftest.py simulates 8 CPU devices"
    mesh = jax.sharding.Mesh(np.array(devices), ("data",))
    model, _, _, batch = _init("convnet")
    tx = optax.sgd(0.05, momentum=0.9)
    state = _state("convnet", tx)[2]
    x, y = _data(n=32)
    ds = ws.data.Dataset("toy", x, y, x, y, 3)
    loss = ws.training.classification_loss(model.apply)
    kw = dict(eval_fn=lambda s: {}, num_steps=7, t0=3, batch_size=16, eval_every=7, progress=False)
    copy = lambda s: jax.tree.map(jnp.copy, s)
    cfg = LatePhase(2, schedule="cycle")
    with jax.default_matmul_precision("highest"):
        a, _ = cfg.fit(copy(state), loss, tx, ds, **kw)
        b, _ = cfg.fit(copy(state), loss, tx, ds, mode="sharded", mesh=mesh, **kw)
    _assert_tree_close(jax.device_get(b.params), a.params, rtol=1e-4, atol=1e-5)
    _assert_tree_close(jax.device_get(b.model_state), a.model_state, rtol=1e-4, atol=1e-5)
    # pmap (per-device BatchNorm statistics, so a model without BatchNorm): the same run
    mlp = _init("mlp")[0]
    loss = ws.training.classification_loss(mlp.apply)
    cfg, state = LatePhase(2, "head", schedule="random"), _state("mlp", tx)[2]
    with jax.default_matmul_precision("highest"):
        a, _ = cfg.fit(copy(state), loss, tx, ds, **kw)
        b, _ = cfg.fit(copy(state), loss, tx, ds, mode="pmap", **kw)
    _assert_tree_close(b.params, a.params, rtol=1e-4, atol=1e-5)


def test_fit_resumes_bit_identically_from_a_late_phase_checkpoint(tmp_path):
    import shutil

    model, _, _, batch = _init("mlp")
    tx = optax.sgd(0.05, momentum=0.9)
    state = _state("mlp", tx)[2]
    ds = ws.data.Dataset("toy", batch["x"], batch["y"], batch["x"], batch["y"], 3)
    loss = ws.training.classification_loss(model.apply)
    cfg = LatePhase(3, "head")
    kw = dict(apply_fn=model.apply, t0=3, num_steps=9, batch_size=8, eval_every=2, progress=False)
    full, _ = cfg.fit(state, loss, tx, ds, **kw)
    kw.update(workdir=str(tmp_path), checkpoint_every=4)
    cfg.fit(state, loss, tx, ds, **kw)
    shutil.rmtree(tmp_path / "late" / "checkpoints" / "9")  # as if killed after step 8
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "history is missing" warning for the late phase
        resumed, hist = cfg.fit(state, loss, tx, ds, **kw)
    _assert_tree_equal(resumed, full)
    assert [(r["phase"], r["step"]) for r in hist][-3:] == [("late", 6), ("late", 8), ("late", 9)]


# ----------------------------------------------------------------------------- averaging


def test_average_of_identical_members_is_the_original_network():
    _, _, state, _ = _state("convnet")
    stats = jax.tree.map(jnp.abs, _perturb(state.model_state, jax.random.PRNGKey(1), 0.1))
    for select in lp.PRESETS:
        cfg = LatePhase(K, select)
        p, s = cfg.average(cfg.expand(state.params), cfg.expand_model_state(stats))
        _exact_or_close(p, state.params)
        _exact_or_close(s, stats)
    _, _, mstate, _ = _state("mlp")
    cfg = LatePhase(K, "rank1")
    _exact_or_close(cfg.average(cfg.expand(mstate.params), {})[0], mstate.params)


def test_average_head_only_gives_mean_of_member_logits():
    model, _, state, batch = _state("mlp")
    cfg = LatePhase(K, "head", noise=0.5)
    late = cfg.expand(state.params, key=jax.random.PRNGKey(7))
    p, _ = cfg.average(late, {})
    with jax.default_matmul_precision("highest"):
        avg_logits = model.apply({"params": p}, batch["x"])
        member_logits = [
            model.apply({"params": cfg.member(late, {}, k)[0]}, batch["x"]) for k in range(K)
        ]
    assert float(jnp.std(jnp.stack(member_logits), 0).mean()) > 0.1  # members really differ
    np.testing.assert_allclose(avg_logits, np.mean(member_logits, 0), rtol=1e-5, atol=1e-5)


class _DenseBN(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        x = nn.Dense(5, precision=HIGHEST)(x)
        return nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)


class _NestedBN(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        return _DenseBN(name="Block_0")(x, train)  # BatchNorm at Block_0/BatchNorm_0


@pytest.mark.parametrize("model", [_DenseBN(), _NestedBN()], ids=["flat", "nested"])
def test_average_bn_is_mean_of_member_affine_maps(model):
    """Members differ in scale, bias AND running stats: averaged BN output = mean of outputs."""
    x, _ = _data()
    variables = model.init(jax.random.PRNGKey(0), x[:2])
    params, ms = variables["params"], {"batch_stats": variables["batch_stats"]}
    cfg = LatePhase(K, "batchnorm", noise=0.5)
    late = cfg.expand(params, key=jax.random.PRNGKey(1))
    lms = jax.tree.map(lambda t: t + jnp.abs(jax.random.normal(jax.random.PRNGKey(2), t.shape)),
                       cfg.expand_model_state(ms))  # fmt: skip
    p, s = cfg.average(late, lms)
    avg = model.apply({"params": p, **s}, x)
    outs = [
        model.apply({"params": pk, **sk}, x)
        for pk, sk in (cfg.member(late, lms, k) for k in range(K))
    ]
    assert float(jnp.std(jnp.stack(outs), 0).mean()) > 0.1
    np.testing.assert_allclose(avg, np.mean(outs, 0), rtol=1e-5, atol=1e-5)
    naive = {
        "params": jax.tree.map(lambda t, m: t.mean(0) if m else t, late, cfg.member_mask(late)),
        "batch_stats": jax.tree.map(lambda t: t.mean(0), lms["batch_stats"]),
    }
    assert not np.allclose(model.apply(naive, x), np.mean(outs, 0), atol=1e-3)


def test_layout_errors_name_what_was_found():
    rank1 = LatePhase(K, "rank1")
    with pytest.raises(ValueError, match="nested dicts; found tuple"):
        rank1.expand(({"kernel": jnp.ones((3, 4))},))
    clash = {"Dense_0": {"kernel": jnp.ones((3, 4)), "kernel_rank1_in": jnp.ones((2, 3))}}
    with pytest.raises(ValueError, match="already hold Dense_0/kernel_rank1_in"):
        rank1.expand(clash)
    params = {"Block_0": {"BatchNorm_0": {"scale": jnp.ones((K, 3))}}}
    stats = {"Block_0": {"BatchNorm_0": {"mean": jnp.zeros((K, 3)), "var": jnp.ones((K, 3))}}}
    want = r"need 'scale' and 'bias' params at Block_0/BatchNorm_0.*\['Block_0/BatchNorm_0/scale'\]"
    with pytest.raises(ValueError, match=want):
        LatePhase(K, "batchnorm").average(params, {"batch_stats": stats})


def test_expand_opt_state_copies_moments_and_keeps_counts():
    tx = optax.inject_hyperparams(optax.adam)(learning_rate=0.01)
    _, _, state, _ = _state("convnet", tx)
    update = jax.jit(tx.update)
    opt_state = state.opt_state
    for i in range(3):  # a non-trivial Adam state: three updates with random gradients
        grads = _perturb(jax.tree.map(jnp.zeros_like, state.params), jax.random.PRNGKey(i), 1.0)
        _, opt_state = update(grads, opt_state, state.params)
    state = state.replace(opt_state=opt_state)
    late = LatePhase(K).expand_state(state, tx)
    assert int(late.opt_state.count) == 0
    inner, old = late.opt_state.inner.inner_state[0], state.opt_state.inner_state[0]
    assert int(inner.count) == 3 and int(late.opt_state.inner.count) == 3
    assert float(jnp.abs(old.mu["head"]["kernel"]).min()) > 0
    for k in range(K):
        np.testing.assert_array_equal(inner.mu["head"]["kernel"][k], old.mu["head"]["kernel"])
        np.testing.assert_array_equal(
            inner.nu["BatchNorm_1"]["bias"][k], old.nu["BatchNorm_1"]["bias"]
        )
    np.testing.assert_array_equal(inner.nu["Conv_0"]["kernel"], old.nu["Conv_0"]["kernel"])
    r1 = LatePhase(K, "rank1").expand_state(state, tx).opt_state.inner.inner_state[0]
    np.testing.assert_array_equal(r1.mu["Conv_1"]["kernel_rank1_in"], 0.0)
    np.testing.assert_array_equal(r1.mu["Conv_1"]["kernel"], old.mu["Conv_1"]["kernel"])


def test_swa_inside_tx_averages_the_late_phase_iterates_actually_reached():
    model, _, _, batch = _init("mlp")
    start = 2
    tx = optax.chain(optax.sgd(0.1, momentum=0.9), ws.averaging.swa(start=start))
    cfg = LatePhase(K, "head")
    s = cfg.expand_state(_state("mlp", tx)[2], tx)
    step = cfg.make_train_step(ws.training.classification_loss(model.apply), tx, donate=False)
    iterates = []
    for t in range(1, K + 3):
        s, _ = step(s, batch)
        if t >= start:
            iterates.append(s.params)
    want = jax.tree.map(lambda *xs: jnp.mean(jnp.stack(xs), 0), *iterates)
    _assert_tree_close(ws.averaging.swa_params(s.opt_state), want, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- x pruning


def test_pruned_weights_are_exactly_zero_in_every_member_through_expansion_training_averaging():
    model, _, _, batch = _init("convnet")
    params = _init("convnet")[1]
    masks = ws.pruning.magnitude_masks(params, 0.5, exclude=lambda name, leaf: False)
    params = ws.pruning.apply_masks(params, masks)
    tx = optax.chain(optax.sgd(0.1, momentum=0.9), ws.pruning.keep_masked(masks))
    loss = ws.training.classification_loss(model.apply)
    state = _state("convnet", tx)[2].replace(params=params)
    state, _ = ws.training.make_train_step(loss, tx, donate=False)(state, batch)
    for schedule in ("cycle", "random"):
        cfg = LatePhase(K, schedule=schedule, noise=0.3)
        late_masks = cfg.expand_masks(masks)
        s = cfg.expand_state(state, tx, key=jax.random.PRNGKey(0), masks=masks)
        assert s.params["head"]["kernel"].shape == late_masks["head"]["kernel"].shape
        ws.pruning.check_masks(s.params, s.opt_state.inner[1].masks)  # carried over, expanded
        step = cfg.make_train_step(loss, tx, donate=False)
        for _ in range(K + 1):
            for p, m in zip(jax.tree.leaves(s.params), jax.tree.leaves(late_masks), strict=True):
                assert np.all(np.asarray(p)[~np.asarray(m)] == 0)
            s, _ = step(s, batch)
        assert not np.allclose(s.params["head"]["kernel"][0], s.params["head"]["kernel"][1])
        avg, _ = cfg.average(s.params, s.model_state)
        for p, m in zip(jax.tree.leaves(avg), jax.tree.leaves(masks), strict=True):
            assert np.all(np.asarray(p)[~np.asarray(m)] == 0)
        alive = [
            np.asarray(p)[np.asarray(m)]
            for p, m in zip(jax.tree.leaves(avg), jax.tree.leaves(masks), strict=True)
        ]
        assert np.count_nonzero(np.concatenate(alive)) > 0.9 * np.concatenate(alive).size


# ----------------------------------------------------------------------------- experiment, notebook


def test_experiment_quick_runs_and_writes_results(tmp_path):
    from experiments import common
    from experiments import late_phase as lp_experiment
    from experiments.configs.late_phase import get_config
    from experiments.late_phase import run

    results = run_experiment("late_phase", tmp_path)
    assert results["smoke"] and results["seeds"] == [0, 1]
    arms = {(c["arm"], c["baseline"]) for c in results["claims"]}
    assert {("late", "sgd"), ("late", "late_t0_0"), ("nqp_late_random", "nqp_sgd")} <= arms
    assert all(c["verdict"] in common.VERDICTS and c["n"] == 2 for c in results["claims"])
    for name in ("config.json", "results.json", "accuracy.png", "nqp.png"):
        assert os.path.exists(tmp_path / name), name
    assert os.path.exists(tmp_path / "arms" / "late" / "seed_1.json")
    accuracy = [c for c in results["claims"] if c["metric"] == "test_accuracy"]
    assert accuracy and all("disagreements" in c for c in accuracy)  # paired over test examples
    # the late arm went on from the run to T0 it shared with sgd: the same as its own run
    config, late = get_config("quick"), common.read_json(str(tmp_path / "arms/late/seed_1.json"))
    ds = common.load_dataset(config)
    model = ws.models.create(config.model, ds.num_classes)
    tx, spec = lp_experiment._optimizers(config)["sgd"], lp_experiment._late(config, "late")
    state = ws.training.init_states(model, tx, ds.x_train[:1], [1])
    state, _ = spec.fit(state, ws.training.classification_loss(model.apply), tx, ds, seed=[1],
                        t0=lp_experiment._t0(config), num_steps=config.steps, apply_fn=model.apply,
                        batch_size=config.batch_size, eval_every=config.eval_every,
                        train_eval_examples=0, progress=False)  # fmt: skip
    params, model_state = jax.vmap(spec.average)(state.params, state.model_state)
    alone = ws.training.evaluate(model.apply, {"params": params, **model_state}, ds.x_test,
                                 ds.y_test, seed_axis=True)  # fmt: skip
    _exact_or_close(late["test_nll"], float(alone["loss"][0]))
    for arms, message in ((("late", "ensemble"), r"unknown \['ensemble'\]"),
                          (("late",), "must include 'sgd'")):  # fmt: skip
        bad = get_config("quick")
        bad.classify_arms = arms
        with pytest.raises(ValueError, match=f"config.classify_arms=.*{message}"):
            run(bad, str(tmp_path / "bad"))
        assert not os.path.exists(tmp_path / "bad")


def test_notebook_executes():
    run_notebook("late_phase", xla_flags=FAST_RUN_FLAGS)  # a ConvNet: time goes into steps


def test_fit_lays_per_step_masks_out_on_the_member_axis():
    """``tx_args={"masks": m}`` (the lottery convention) works through both phases of `fit`."""
    ds = ws.data.load("digits")
    model = ws.models.MLP(features=(8,))
    tx = optax.chain(ws.pruning.mask_gradients(), optax.adam(1e-2), ws.pruning.keep_masked())
    state = ws.training.init_state(model, tx, ds.x_train[:1], jax.random.PRNGKey(0))
    masks = ws.pruning.magnitude_masks(state.params, 0.5)
    state = state.replace(params=ws.pruning.apply_masks(state.params, masks))
    cfg = LatePhase(2, select="head")
    late, _ = cfg.fit(
        state, ws.training.classification_loss(model.apply), tx, ds, t0=2, num_steps=4,
        apply_fn=model.apply, masks=masks, batch_size=16, tx_args={"masks": masks},
        progress=False, train_eval_examples=16,
    )  # fmt: skip
    late_masks = cfg.expand_masks(masks)
    for p, m in zip(jax.tree.leaves(late.params), jax.tree.leaves(late_masks), strict=True):
        assert not np.any(np.asarray(p)[~np.asarray(m)])


# ----------------------------------------------------------------------------- bound state, seeds


def test_issue_snippet_masks_bound_ulr_rank1_members_on_digits():
    """The composition of issue 20: masks bound in the chain, ULR, rank-1 members, 300 steps."""
    ds = ws.data.standardize(ws.data.load("digits"))
    model = ws.models.MLP(features=(32,), num_classes=ds.num_classes)
    base = ws.training.init_state(model, optax.sgd(0.1), ds.x_train[:1], jax.random.PRNGKey(0))
    masks = ws.pruning.magnitude_masks(base.params, 0.5)
    tx = optax.chain(ws.pruning.mask_gradients(masks), optax.clip_by_global_norm(1.0),
                     optax.sgd(0.05, momentum=0.9), ws.pruning.keep_masked(masks))  # fmt: skip
    pruned = ws.pruning.apply_masks(base.params, masks)
    state = base.replace(params=pruned, opt_state=tx.init(pruned))
    late = LatePhase(num_members=4, select="rank1")
    state = late.expand_state(state, tx, masks=masks)
    est = ws.likelihood_ratio.ulr(num_copies=16, sigma=0.1, baseline="mean", antithetic=True)
    loss = ws.training.classification_loss(model.apply, per_example=True)
    step = late.make_train_step(loss, tx, estimator=est)
    state, _ = ws.training.fit(state, step, ds, num_steps=300, batch_size=64, eval_every=300,
                               eval_fn=lambda s: {}, progress=False)  # fmt: skip
    params, _ = late.average(state.params, state.model_state)
    acc = ws.training.evaluate(model.apply, {"params": params}, ds.x_test, ds.y_test)["accuracy"]
    assert acc > 0.5, acc  # chance: 0.1
    for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(masks), strict=True):
        assert np.all(np.asarray(p)[~np.asarray(m)] == 0)
    members = [late.member(state.params, {}, k)[0] for k in range(4)]
    assert not np.allclose(members[0]["head"]["kernel"], members[1]["head"]["kernel"])


def _masked_problem(name):
    """A pruned model with masks bound in the lottery chain, its state, loss and a Dataset."""
    model, params, model_state, batch = _init(name)
    masks = ws.pruning.magnitude_masks(params, 0.5)
    params = ws.pruning.apply_masks(params, masks)
    tx = optax.chain(ws.pruning.mask_gradients(masks), optax.clip_by_global_norm(1.0),
                     optax.adam(0.05), ws.pruning.keep_masked(masks))  # fmt: skip
    state = ws.training.TrainState(
        step=jnp.zeros((), jnp.int32), params=params, model_state=model_state,
        opt_state=tx.init(params), key=jax.random.PRNGKey(1),
    )  # fmt: skip
    ds = ws.data.Dataset("toy", batch["x"], batch["y"], batch["x"], batch["y"], 3)
    return model, masks, tx, state, ds, ws.training.classification_loss(model.apply)


@pytest.mark.parametrize("name,select", [("mlp", "rank1"), ("convnet", "bn_head")])
def test_masks_bound_at_construction_stay_zero_in_members_through_fit(name, select):
    """Rank-1 and BatchNorm members, masks bound in ``tx``: `fit(masks=...)` and the
    expand/step path keep every pruned weight exactly zero in each member and the average."""
    model, masks, tx, state, ds, loss = _masked_problem(name)
    late = LatePhase(K, select, noise=0.2)
    late_state, hist = late.fit(state, loss, tx, ds, t0=2, num_steps=2 + 2 * K, masks=masks,
                                key=jax.random.PRNGKey(3), apply_fn=model.apply, batch_size=8,
                                eval_every=2 + 2 * K, progress=False)  # fmt: skip
    assert np.isfinite(hist[-1]["test_loss"])
    inner = late_state.opt_state.inner
    ws.pruning.check_masks(late_state.params, inner[0].masks)  # bound masks laid out
    ws.pruning.check_masks(late_state.params, inner[-1].masks)
    for k in range(K):
        member, _ = late.member(late_state.params, late_state.model_state, k)
        for p, m in zip(jax.tree.leaves(member), jax.tree.leaves(masks), strict=True):
            assert np.all(np.asarray(p)[~np.asarray(m)] == 0)
    avg, _ = late.average(late_state.params, late_state.model_state)
    for p, m in zip(jax.tree.leaves(avg), jax.tree.leaves(masks), strict=True):
        assert np.all(np.asarray(p)[~np.asarray(m)] == 0)
    leaves = jax.tree.leaves(late_state.params)
    rows = [x for x, f in zip(leaves, _flags(late, late_state.params), strict=True) if f]
    assert all(not np.allclose(x[0], x[1]) for x in rows)  # members moved apart


def test_fresh_member_opt_state_starts_members_at_tx_init_and_keeps_the_rest():
    """member_opt_state="fresh" (the official code): member rows of Adam's moments from
    tx.init (zero), shared moments and counts carried over; "copy" copies the plain rows."""
    model, _, _, batch = _init("convnet")
    tx = optax.adam(0.05)
    state = _state("convnet", tx)[2]
    plain = ws.training.make_train_step(ws.training.classification_loss(model.apply), tx,
                                        donate=False)  # fmt: skip
    state, _ = plain(state, batch)
    old = state.opt_state[0]
    fresh = LatePhase(K, member_opt_state="fresh").expand_state(state, tx).opt_state.inner[0]
    copy = LatePhase(K).expand_state(state, tx).opt_state.inner[0]
    assert int(fresh.count) == int(old.count) == 1
    np.testing.assert_array_equal(fresh.mu["head"]["kernel"], 0.0)
    np.testing.assert_array_equal(fresh.nu["BatchNorm_0"]["scale"], 0.0)
    np.testing.assert_array_equal(fresh.mu["Conv_0"]["kernel"], old.mu["Conv_0"]["kernel"])
    assert float(jnp.abs(old.mu["head"]["kernel"]).min()) > 0
    for k in range(K):
        np.testing.assert_array_equal(copy.mu["head"]["kernel"][k], old.mu["head"]["kernel"])


def test_recalibrate_is_recompute_batch_stats_of_each_member():
    model, tx, state, batch = _state("convnet")
    loss = ws.training.classification_loss(model.apply)
    cfg = LatePhase(3, noise=0.5)
    late = cfg.expand_state(state, tx, key=jax.random.PRNGKey(2))
    batches = [dict(zip(("x", "y"), _data(12, seed=20 + i), strict=True)) for i in range(3)]
    got = cfg.recalibrate(loss, late.params, late.model_state, batches)
    for k in range(3):
        fn = lambda p, s, b, key, k=k: cfg.member_loss(loss)(p, s, b, key, k)
        want = ws.averaging.recompute_batch_stats(fn, late.params, late.model_state, batches)
        row = lambda t, k=k: jax.tree.map(lambda x: x[k], t)
        _assert_tree_close(row(got), row(want), rtol=1e-5, atol=1e-6)
    mean = got["batch_stats"]["BatchNorm_1"]["mean"]  # after the members' own BatchNorm_0
    assert not np.allclose(mean[0], mean[1])


def test_seeds_as_an_axis_one_checkpoint_resume_bit_identical_and_a_seed_matches_alone(tmp_path):
    """S seeds of plain + late-phase training as one program: seed 1 among 3 gives seed 1
    alone's final loss (1e-4 relative); one checkpoint; a killed run resumes bit-identically."""
    import shutil

    model, _, _, _ = _init("mlp")
    x, y = _data(n=48)
    ds = ws.data.Dataset("toy", x, y, x, y, 3)
    tx = optax.sgd(0.05, momentum=0.9)
    loss = ws.training.classification_loss(model.apply)
    cfg = LatePhase(3, "head")
    kw = dict(apply_fn=model.apply, t0=3, num_steps=12, batch_size=8, eval_every=4,
              progress=False, train_eval_examples=0)  # fmt: skip
    seeds = [0, 1, 2]
    states = ws.training.init_states(model, tx, x[:1], seeds)
    full, hist = cfg.fit(states, loss, tx, ds, seed=seeds, **kw)
    assert len(hist[-1]["test_loss"]) == 3
    alone = ws.training.init_state(model, tx, x[:1], jax.random.PRNGKey(1))
    one, hist1 = cfg.fit(alone, loss, tx, ds, seed=1, **kw)
    np.testing.assert_allclose(hist[-1]["test_loss"][1], hist1[-1]["test_loss"], rtol=1e-4)
    _assert_tree_close(ws.training.seed_slice(full.params, 1), one.params, rtol=1e-4, atol=1e-6)
    kw.update(workdir=str(tmp_path), checkpoint_every=4)
    cfg.fit(states, loss, tx, ds, seed=seeds, **kw)
    assert {"8", "12"} <= set(os.listdir(tmp_path / "late" / "checkpoints"))
    shutil.rmtree(tmp_path / "late" / "checkpoints" / "12")  # as if killed after step 8
    resumed, _ = cfg.fit(states, loss, tx, ds, seed=seeds, **kw)
    _assert_tree_equal(resumed, full)


@pytest.mark.parametrize("schedule", ["cycle", "parallel"])
def test_seeds_looped_inside_the_step_match_vmapped_seeds_through_fit(schedule):
    """``seed_loop="map"`` and ``"unroll"`` (both phases' steps cover the seeds one by one
    inside one program) give the vmapped run's state and records to float tolerance, on a
    BatchNorm ConvNet."""
    model, _, _, batch = _init("convnet")
    ds = ws.data.Dataset("toy", batch["x"], batch["y"], batch["x"], batch["y"], 3)
    tx = optax.sgd(0.05, momentum=0.9)
    loss = ws.training.classification_loss(model.apply)
    seeds = [0, 1]
    kw = dict(apply_fn=model.apply, t0=2, num_steps=6, batch_size=8, eval_every=3, seed=seeds,
              progress=False, train_eval_examples=0)  # fmt: skip
    late = LatePhase(2, "bn_head", schedule)
    init = lambda: ws.training.init_states(model, tx, batch["x"][:1], seeds)
    (vmapped, hist_v), *looped = [
        late.fit(init(), loss, tx, ds, seed_loop=loop, **kw) for loop in ws.training.SEED_LOOPS
    ]
    for state, hist in looped:
        _assert_tree_close(state.params, vmapped.params, rtol=1e-5, atol=1e-6)
        _assert_tree_close(state.model_state, vmapped.model_state, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(hist[-1]["test_loss"], hist_v[-1]["test_loss"], rtol=1e-5)
    assert not np.allclose(*hist_v[-1]["test_loss"])  # the two seeds differ: a real seed axis


def test_fit_warns_when_members_cannot_all_be_trained():
    model, _, _, batch = _init("mlp")
    tx = optax.sgd(0.1)
    ds = ws.data.Dataset("toy", batch["x"], batch["y"], batch["x"], batch["y"], 3)
    loss = ws.training.classification_loss(model.apply)
    with pytest.warns(UserWarning, match="4 late-phase steps for K=16 members: 12 members"):
        LatePhase(16, "head").fit(_state("mlp", tx)[2], loss, tx, ds, t0=2, num_steps=6,
                                  eval_fn=lambda s: {}, batch_size=8, progress=False)  # fmt: skip


def test_expansion_refuses_an_optimizer_state_it_cannot_lay_out():
    """``optax.masked`` keeps per-weight state in partial trees: refused with a clear error."""
    tx = optax.masked(optax.adam(0.1), lambda p: jax.tree.map(lambda x: x.ndim >= 2, p))
    _, _, state, _ = _state("convnet", tx)
    with pytest.raises(ValueError, match="cannot lay the optimizer state out over the late"):
        LatePhase(K).expand_state(state, tx)
    LatePhase(K).expand_state(_state("convnet", optax.adam(0.1))[2], optax.adam(0.1))  # fine


@pytest.mark.parametrize("schedule", ["cycle", "random"])
def test_fused_late_phase_steps_match_the_step_loop(schedule):
    """`fit`'s ``lax.scan`` calls (not the default on CPU) give the per-step run's state to
    float tolerance: XLA compiles a convolution in a loop body on its own (last bits differ)."""
    model, _, _, batch = _init("convnet")
    ds = ws.data.Dataset("toy", batch["x"], batch["y"], batch["x"], batch["y"], 3)
    tx = optax.sgd(0.05, momentum=0.9)
    loss = ws.training.classification_loss(model.apply)
    kw = dict(apply_fn=model.apply, t0=3, num_steps=6, batch_size=8, eval_every=3, seed=[0, 1],
              progress=False, train_eval_examples=0)  # fmt: skip
    late = LatePhase(2, "bn_head", schedule)
    init = lambda: ws.training.init_states(model, tx, batch["x"][:1], [0, 1])
    (fused, hist_f), (loop, hist_l) = [
        late.fit(init(), loss, tx, ds, steps_per_call=n, **kw) for n in (3, 1)
    ]
    _assert_tree_close(fused.params, loop.params, rtol=1e-5, atol=1e-6)
    _assert_tree_close(fused.opt_state, loop.opt_state, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(hist_f[-1]["test_loss"], hist_l[-1]["test_loss"], rtol=1e-5)
