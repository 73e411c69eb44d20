"""Tests of wspace.pruning against enumeration and closed forms."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from wspace import pruning


def _params(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "Dense_0": {
            "kernel": jnp.asarray(rng.normal(size=(6, 5)), jnp.float32),
            "bias": jnp.asarray(rng.normal(size=(5,)), jnp.float32),
        },
        "head": {
            "kernel": jnp.asarray(rng.normal(size=(5, 4)), jnp.float32),
            "bias": jnp.asarray(rng.normal(size=(4,)), jnp.float32),
        },
    }


def test_layerwise_magnitude_prunes_exactly_the_smallest():
    params = _params()
    masks = pruning.magnitude_masks(params, 0.3, scope="layerwise")
    for layer in ("Dense_0", "head"):
        w = np.abs(np.asarray(params[layer]["kernel"])).ravel()
        m = np.asarray(masks[layer]["kernel"]).ravel()
        k = int(np.floor(0.3 * w.size + 0.5))
        expect = np.ones_like(m)
        expect[np.argsort(w, kind="stable")[:k]] = False
        np.testing.assert_array_equal(m, expect)
        assert np.asarray(masks[layer]["bias"]).all()  # biases never pruned


def test_global_magnitude_uses_one_threshold_across_layers():
    params = _params(1)
    masks = pruning.magnitude_masks(params, 0.5, scope="global")
    kept = np.concatenate(
        [
            np.abs(np.asarray(params[n]["kernel"]))[np.asarray(masks[n]["kernel"])]
            for n in ("Dense_0", "head")
        ]
    )
    cut = np.concatenate(
        [
            np.abs(np.asarray(params[n]["kernel"]))[~np.asarray(masks[n]["kernel"])]
            for n in ("Dense_0", "head")
        ]
    )
    assert len(cut) == 25 and kept.min() >= cut.max()
    s = pruning.sparsity(masks)
    assert s["pruned"] == 25 and s["prunable"] == 50 and s["overall"] == 0.5
    assert s["total"] == 59
    assert s["layers"]["Dense_0/kernel"] != s["layers"]["head/kernel"]  # global, not uniform


def test_iterative_pruning_removes_a_fraction_of_survivors_and_never_revives():
    params = _params(2)
    m1 = pruning.magnitude_masks(params, 0.2, scope="layerwise")
    # change the params so that pruned weights become large: they must stay pruned
    bumped = jax.tree.map(lambda p, m: jnp.where(m, p, 100.0), params, m1)
    m2 = pruning.magnitude_masks(bumped, 0.2, scope="layerwise", masks=m1)
    for layer, n in (("Dense_0", 30), ("head", 20)):
        a, b = np.asarray(m1[layer]["kernel"]), np.asarray(m2[layer]["kernel"])
        assert not (b & ~a).any()
        alive1 = n - int(np.floor(0.2 * n + 0.5))
        assert b.sum() == alive1 - int(np.floor(0.2 * alive1 + 0.5))


def test_layer_sparsity_overrides_and_exclude():
    params = _params(3)
    masks = pruning.magnitude_masks(params, 0.4, layer_sparsity={"head": 0.1})
    s = pruning.sparsity(masks)
    assert s["layers"]["head/kernel"] == 2 / 20  # round(0.1 * 20)
    assert s["layers"]["Dense_0/kernel"] == 12 / 30
    rate = lambda n, x: 0.5 if "head" in n else None
    fn = pruning.magnitude_masks(params, 0.4, layer_sparsity=rate)
    assert pruning.sparsity(fn)["layers"]["head/kernel"] == 0.5
    exclude = lambda n, x: not n.startswith("Dense") or x.ndim < 2
    only_dense = pruning.magnitude_masks(params, 0.5, exclude=exclude)
    assert np.asarray(only_dense["head"]["kernel"]).all()
    assert pruning.sparsity(only_dense)["layers"]["Dense_0/kernel"] == 0.5


def test_random_masks_counts_determinism_and_survivors():
    params = _params()
    key = jax.random.PRNGKey(0)
    a = pruning.random_masks(params, 0.5, key=key, scope="layerwise")
    b = pruning.random_masks(params, 0.5, key=key, scope="layerwise")
    c = pruning.random_masks(params, 0.5, key=jax.random.PRNGKey(1), scope="layerwise")
    assert jax.tree.all(jax.tree.map(lambda x, y: bool((x == y).all()), a, b))
    assert not (np.asarray(a["Dense_0"]["kernel"]) == np.asarray(c["Dense_0"]["kernel"])).all()
    assert pruning.sparsity(a)["layers"] == {"Dense_0/kernel": 0.5, "head/kernel": 0.5}
    d = pruning.random_masks(params, 0.5, key=key, masks=a, scope="layerwise")
    assert not (np.asarray(d["head"]["kernel"]) & ~np.asarray(a["head"]["kernel"])).any()
    assert pruning.sparsity(d)["pruned"] == 25 + 13  # 25 survivors -> round(12.5)=13 removed


def test_shuffle_masks_keeps_per_layer_counts():
    params = _params()
    m = pruning.magnitude_masks(params, 0.7, scope="global")
    r = pruning.shuffle_masks(m, key=jax.random.PRNGKey(3))
    assert pruning.sparsity(r)["layers"] == pruning.sparsity(m)["layers"]
    assert not (np.asarray(r["Dense_0"]["kernel"]) == np.asarray(m["Dense_0"]["kernel"])).all()


def test_apply_masks_zeros_exactly():
    params = _params()
    m = pruning.magnitude_masks(params, 0.5)
    out = pruning.apply_masks(params, m)
    for layer in ("Dense_0", "head"):
        w, mm = np.asarray(out[layer]["kernel"]), np.asarray(m[layer]["kernel"])
        assert (w[~mm] == 0).all() and (w[mm] == np.asarray(params[layer]["kernel"])[mm]).all()


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5])
def test_bad_sparsity_raises(bad):
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\), got"):
        pruning.magnitude_masks(_params(), bad)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        pruning.random_masks(_params(), bad, key=jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        pruning.gradual_pruning(bad, begin_step=0, end_step=10)


def test_mismatched_masks_raise():
    params = _params()
    masks = pruning.magnitude_masks(params, 0.5)
    head = {"kernel": jnp.ones((4, 5), bool), "bias": masks["head"]["bias"]}
    wrong_shape = {**masks, "head": head}
    with pytest.raises(ValueError, match="shape"):
        pruning.apply_masks(params, wrong_shape)
    with pytest.raises(ValueError, match="does not match"):
        pruning.magnitude_masks(params, 0.1, masks={"Dense_0": masks["Dense_0"]})
    with pytest.raises(ValueError, match="scope"):
        pruning.magnitude_masks(params, 0.1, scope="per-layer")


@pytest.mark.parametrize("inner", ["sgd_momentum_wd", "adamw"])
def test_keep_masked_keeps_zeros_and_leaves_survivors_untouched(inner):
    params = _params()
    masks = pruning.magnitude_masks(params, 0.6)
    if inner == "adamw":
        base = optax.adamw(0.05, weight_decay=0.1)
    else:
        base = optax.chain(optax.add_decayed_weights(0.1), optax.sgd(0.1, momentum=0.9))
    tx = optax.chain(base, pruning.keep_masked(masks))
    start = pruning.apply_masks(params, masks)
    p, s = start, tx.init(start)
    q, r = start, base.init(start)  # the same inner chain without the mask
    update, update_base = jax.jit(tx.update), jax.jit(base.update)
    for i in range(5):
        g = jax.tree.map(lambda x, i=i: jnp.full_like(x, 0.3 * (i + 1)) + x, _params(10 + i))
        u, s = update(g, s, p)
        p = optax.apply_updates(p, u)
        v, r = update_base(g, r, q)
        q = optax.apply_updates(q, v)
        q = pruning.apply_masks(q, masks)  # survivors of the dense chain only see survivors
    for layer in ("Dense_0", "head"):
        mm = np.asarray(masks[layer]["kernel"])
        w = np.asarray(p[layer]["kernel"])
        assert (w[~mm] == 0.0).all()
        assert np.abs(w[mm]).min() > 0
        np.testing.assert_allclose(w[mm], np.asarray(q[layer]["kernel"])[mm], rtol=1e-6)
    assert int(s[1].count) == 5


def test_keep_masked_masks_as_extra_arg_without_recompiling():
    params = _params()
    tx = optax.chain(optax.sgd(0.1), pruning.keep_masked())
    traces = []

    @jax.jit
    def step(p, s, masks):
        traces.append(1)
        u, s = tx.update(jax.tree.map(jnp.ones_like, p), s, p, masks=masks)
        return optax.apply_updates(p, u), s

    p, s = params, tx.init(params)
    for sp in (0.2, 0.5, 0.8):
        masks = pruning.magnitude_masks(params, sp)
        p, s = step(p, s, masks)
        assert pruning.sparsity(masks)["pruned"] == int(
            sum(
                (np.asarray(x) == 0).sum()
                for x in jax.tree.leaves({k: v["kernel"] for k, v in p.items()})
            )
        )
    assert len(traces) == 1 and s[1].masks is None and int(s[1].count) == 3


def test_keep_masked_without_params_or_masks_raises():
    masks = pruning.magnitude_masks(_params(), 0.5)
    tx = pruning.keep_masked(masks)
    with pytest.raises(ValueError, match="params"):
        tx.update(_params(), tx.init(_params()))
    tx = pruning.keep_masked()
    with pytest.raises(ValueError, match="masks="):
        tx.update(_params(), tx.init(_params()), _params())


def test_polynomial_schedule_closed_form():
    kw = dict(final_sparsity=0.8, begin_step=10, end_step=50, frequency=10, initial_sparsity=0.1)
    for t, expect in [
        (0, 0.0),
        (9, 0.0),
        (10, 0.1),
        (15, 0.1),
        (30, 0.8 - 0.7 * 0.5**3),
        (49, 0.8 - 0.7 * 0.25**3),
        (50, 0.8),
        (1000, 0.8),
    ]:
        np.testing.assert_allclose(float(pruning.polynomial_sparsity(t, **kw)), expect, rtol=1e-6)


def test_gradual_pruning_in_jit_and_inject_hyperparams():
    params = _params(4)
    make = optax.inject_hyperparams(pruning.gradual_pruning, static_args=("scope", "exclude"))
    tx = optax.chain(
        optax.sgd(0.01), make(0.7, begin_step=2, end_step=8, frequency=2, scope="layerwise")
    )
    p, s = params, tx.init(params)

    @jax.jit
    def step(p, s):
        g = jax.tree.map(jnp.ones_like, p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    seen = []
    prev = jax.tree.map(lambda x: jnp.ones(x.shape, bool), params)
    for _ in range(12):
        p, s = step(p, s)
        masks = s[1].inner_state.masks
        assert not any(
            (np.asarray(b) & ~np.asarray(a)).any()  # never revived
            for a, b in zip(jax.tree.leaves(prev), jax.tree.leaves(masks), strict=True)
        )
        prev = masks
        seen.append(pruning.sparsity(masks)["layers"]["Dense_0/kernel"])
        zero = np.asarray(p["Dense_0"]["kernel"])[~np.asarray(masks["Dense_0"]["kernel"])]
        assert (zero == 0).all()
    expect = [
        float(
            pruning.polynomial_sparsity(
                t, final_sparsity=0.7, begin_step=2, end_step=8, frequency=2
            )
        )
        for t in range(12)
    ]
    np.testing.assert_allclose(seen, [np.floor(e * 30 + 0.5) / 30 for e in expect])
    assert seen[-1] == 21 / 30 and seen[1] == 0.0


def _grads(i):
    return jax.tree.map(lambda x: 2.0 * x + 0.5 * i, _params(20 + i))


@pytest.mark.parametrize("inner", ["clip_sgd", "clip_adam"])
def test_mask_gradients_equals_the_chain_on_a_zeroed_gradient(inner):
    """Bit-exact: the chain with mask_gradients runs the same ops on the same inputs as the
    reference chain fed where(m, g, 0); a chain without it differs (clipping sees pruned g)."""
    params = _params()
    masks = pruning.magnitude_masks(params, 0.7)
    if inner == "clip_adam":
        core = [optax.clip_by_global_norm(1.0), optax.adam(0.05)]
    else:
        core = [optax.clip_by_global_norm(1.0), optax.sgd(0.1, momentum=0.9)]
    tx = optax.chain(pruning.mask_gradients(), *core, pruning.keep_masked())
    ref = optax.chain(*core, pruning.keep_masked())
    leaky = optax.chain(*core, pruning.keep_masked())  # masks only the final update

    @jax.jit
    def steps(p, s, q, r, z, t, g):
        u, s = tx.update(g, s, p, masks=masks)
        zeroed = jax.tree.map(lambda x, m: jnp.where(m, x, 0.0), g, masks)
        v, r = ref.update(zeroed, r, q, masks=masks)
        w, t = leaky.update(g, t, z, masks=masks)
        return u, s, v, r, w, t

    start = pruning.apply_masks(params, masks)
    p = q = z = start
    s, r, t = tx.init(start), ref.init(start), leaky.init(start)
    for i in range(4):
        u, s, v, r, w, t = steps(p, s, q, r, z, t, _grads(i))
        for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(v), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        if i == 0 and inner == "clip_sgd":  # closed form: -lr * g_s * min(1, c / ||g_s||)
            gs = jax.tree.map(lambda x, m: np.where(m, x, 0.0), _grads(0), masks)
            norm = np.sqrt(sum(float(np.sum(np.square(x))) for x in jax.tree.leaves(gs)))
            scale = -0.1 * min(1.0, 1.0 / norm)
            expect = jax.tree.map(lambda x, c=scale: c * x, gs)
            for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(expect), strict=True):
                np.testing.assert_allclose(np.asarray(a), b, rtol=1e-6, atol=1e-7)
        if inner == "clip_sgd":  # without it, clipping shrinks the survivors' update
            keep = np.asarray(masks["Dense_0"]["kernel"])
            kernel_u, kernel_w = (np.asarray(x["Dense_0"]["kernel"])[keep] for x in (u, w))
            assert np.abs(kernel_w).max() < 0.9 * np.abs(kernel_u).max()
        p, q, z = (optax.apply_updates(a, b) for a, b in ((p, u), (q, v), (z, w)))
    for a, m in zip(jax.tree.leaves(p), jax.tree.leaves(masks), strict=True):
        assert (np.asarray(a)[~np.asarray(m)] == 0).all()
    assert int(s[0].count) == 4 and s[0].masks is None


def test_mask_gradients_under_inject_hyperparams_and_changing_masks():
    params = _params(3)

    def make(learning_rate, max_norm):
        return optax.chain(
            pruning.mask_gradients(),
            optax.clip_by_global_norm(max_norm),
            optax.sgd(learning_rate),
            pruning.keep_masked(),
        )

    tx = optax.inject_hyperparams(make)(learning_rate=0.1, max_norm=0.5)
    traces = []

    @jax.jit
    def step(p, s, masks, g):
        traces.append(1)
        u, s = tx.update(g, s, p, masks=masks)
        return optax.apply_updates(p, u), s

    p, s = params, tx.init(params)
    for i, sp in enumerate((0.3, 0.6)):
        masks = pruning.magnitude_masks(params, sp)
        before = pruning.apply_masks(p, masks)
        p, s = step(before, s, masks, _grads(i))
        gs = jax.tree.map(lambda x, m: np.where(m, x, 0.0), _grads(i), masks)
        norm = np.sqrt(sum(float(np.sum(np.square(x))) for x in jax.tree.leaves(gs)))
        for a, b, g in zip(
            jax.tree.leaves(p), jax.tree.leaves(before), jax.tree.leaves(gs), strict=True
        ):
            expect = np.asarray(b) - 0.1 * g * min(1.0, 0.5 / norm)
            np.testing.assert_allclose(np.asarray(a), expect, rtol=1e-6, atol=1e-7)
    assert len(traces) == 1
    with pytest.raises(ValueError, match="masks="):
        pruning.mask_gradients().update(params, pruning.mask_gradients().init(params))
    with pytest.raises(ValueError, match="has shape"):
        bad = jax.tree.map(lambda x: jnp.ones((2,), bool), params)
        pruning.mask_gradients(bad).init(params)


def test_masks_held_in_the_state_survive_a_donating_step():
    """A train step donates its state; the caller's mask arrays must stay usable."""
    import wspace as ws

    model = ws.models.MLP(features=(8,), num_classes=3)
    x = np.random.default_rng(0).normal(size=(16, 5)).astype(np.float32)
    y = np.arange(16, dtype=np.int32) % 3
    params = model.init(jax.random.PRNGKey(0), x[:1])["params"]
    masks = ws.pruning.magnitude_masks(params, 0.5)
    tx = optax.chain(optax.sgd(0.1), ws.pruning.keep_masked(masks))
    state = ws.training.init_state(model, tx, x[:1], jax.random.PRNGKey(0))
    state = state.replace(opt_state=tx.init(state.params))  # eager init, as users write it
    step = ws.training.make_train_step(ws.training.classification_loss(model.apply), tx)
    state, _ = step(state, {"x": x, "y": y})
    assert pruning.sparsity(masks)["overall"] == pytest.approx(0.5, abs=0.05)  # not deleted


def test_set_masks_puts_one_mask_per_seed_into_the_state():
    """Masks in the state act as ``masks=`` does; under vmap each seed uses its own mask."""
    tx = optax.chain(pruning.mask_gradients(), optax.sgd(0.1, momentum=0.9), pruning.keep_masked())
    seeds = [_params(s) for s in range(3)]
    masks = [pruning.magnitude_masks(p, 0.2 * (i + 1)) for i, p in enumerate(seeds)]
    grads = [jax.tree.map(lambda x: jnp.cos(3 * x), p) for p in seeds]
    stack = lambda trees: jax.tree.map(lambda *xs: jnp.stack(xs), *trees)
    states = stack([pruning.set_masks(tx.init(p), m) for p, m in zip(seeds, masks, strict=True)])
    updates, new = jax.vmap(lambda g, s, p: tx.update(g, s, p))(stack(grads), states, stack(seeds))
    for i, (p, m, g) in enumerate(zip(seeds, masks, grads, strict=True)):
        expect, _ = tx.update(g, tx.init(p), p, masks=m)
        for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(expect), strict=True):
            np.testing.assert_array_equal(np.asarray(a)[i], np.asarray(b))
    kept = jax.tree.leaves(new[0].masks)  # the step keeps each seed's masks in its state
    assert all(
        np.array_equal(k, w) for k, w in zip(kept, jax.tree.leaves(stack(masks)), strict=True)
    )
    out = pruning.set_masks(tx.init(seeds[0]), None)
    assert jax.tree.structure(out) == jax.tree.structure(tx.init(seeds[0]))
    with pytest.raises(ValueError, match="no mask_gradients"):
        pruning.set_masks(optax.sgd(0.1).init(seeds[0]), masks[0])
