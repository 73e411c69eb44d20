"""Tests of wspace.lottery: rewinding, arms, resuming, masked training; experiment and notebook."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import wspace as ws
from tests.helpers import fresh_state, run_experiment, run_notebook
from wspace import lottery, pruning
from wspace.stats import unpack_correct

T, K = 10, 4


def _state(seed=0):
    rng = np.random.default_rng(seed)
    params = {
        "Dense_0": {
            "kernel": jnp.asarray(rng.normal(size=(5, 6)), jnp.float32),
            "bias": jnp.zeros((6,), jnp.float32),
        },
        "head": {
            "kernel": jnp.asarray(rng.normal(size=(6, 3)), jnp.float32),
            "bias": jnp.zeros((3,), jnp.float32),
        },
    }
    return ws.training.TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        model_state={},
        opt_state=(),
        key=jax.random.PRNGKey(seed),
    )


class FakeTrainer:
    """Deterministic 'training': params move by a fixed field (shifted by the data-order seed);
    records every start state. ``tx`` is stateless (its state is ``()``)."""

    tx = optax.GradientTransformation(lambda p: (), lambda u, s, p=None: (u, s))

    def __init__(self, keep_zero=True):
        self.starts, self.seeds, self.keep_zero = [], [], keep_zero

    def __call__(self, state, masks, num_steps, seed=None):
        self.starts.append((state, masks))
        self.seeds.append(seed)
        steps = num_steps - int(state.step)
        wiggle = 0.1 * (seed or 0)  # another data order: another end point
        params = jax.tree.map(
            lambda p, m: np.where(
                m | (not self.keep_zero),
                p + 0.1 * steps * np.sign(p + 0.05) + wiggle * np.cos(5 * p),
                0,
            ),
            _np(state.params),
            _np(masks),
        )
        acc = float(sum(np.abs(p).sum() for p in jax.tree.leaves(params)))
        return state.replace(step=np.asarray(num_steps, np.int32), params=params), {
            "test_accuracy": acc,
            "train_accuracy": acc,
        }


def _np(tree):
    return jax.tree.map(np.asarray, tree)


def _tree_equal(a, b):
    return all(
        np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def test_rewind_arm_prunes_survivors_and_rewinds_to_step_k():
    fake = FakeTrainer()
    dense = lottery.train_dense(_state(), fake, num_steps=T, rewind_step=K)
    assert int(dense.rewind.step) == K and int(dense.final.step) == T
    assert _tree_equal(fake.starts[1][0].params, dense.rewind.params)  # dense resumed at k
    fake.starts.clear()
    levels = lottery.run_arm("rewind", dense, fake, levels=3, rate=0.5, layer_rates={"head": 0.25})
    assert [lv.level for lv in levels] == [0, 1, 2, 3]
    for lv, (start, masks) in zip(levels[1:], fake.starts, strict=True):
        prev = levels[lv.level - 1]
        expect = pruning.magnitude_masks(
            prev.params, 0.5, masks=prev.masks, scope="layerwise", layer_sparsity={"head": 0.25}
        )
        assert _tree_equal(masks, expect) and _tree_equal(lv.masks, expect)
        assert int(start.step) == K
        assert _tree_equal(start.params, pruning.apply_masks(dense.rewind.params, masks))
    # survivors after l rounds: n -> n - round(0.5 n) for the body, 0.25 for the head
    body, head = 30, 18
    for lv in levels[1:]:
        body -= int(np.floor(0.5 * body + 0.5))
        head -= int(np.floor(0.25 * head + 0.5))
        s = lv.metrics["layer_sparsity"]
        assert s["Dense_0/kernel"] == pytest.approx(1 - body / 30)
        assert s["head/kernel"] == pytest.approx(1 - head / 18)
    to_init = lottery.run_arm("rewind", dense.rewound_to(0), fake, levels=1, rate=0.5)
    assert int(fake.starts[-1][0].step) == 0 and to_init[1].metrics["arm"] == "rewind"
    assert _tree_equal(
        fake.starts[-1][0].params, pruning.apply_masks(dense.init.params, to_init[1].masks)
    )


def test_control_arms():
    fake = FakeTrainer()
    dense = lottery.train_dense(_state(1), fake, num_steps=T, rewind_step=0)
    ticket = lottery.run_arm("rewind", dense, fake, levels=2, rate=0.4)
    key = jax.random.PRNGKey(7)
    init_fn = lambda k: _state(int(jax.random.randint(k, (), 0, 1000))).params
    fake.starts.clear()
    reinit = lottery.run_arm(
        "reinit", dense, fake, levels=2, rate=0.4, reference=ticket, key=key, init_fn=init_fn
    )
    for lv in (1, 2):
        start, masks = fake.starts[lv - 1]
        assert _tree_equal(masks, ticket[lv].masks) and int(start.step) == 0
        fresh = pruning.apply_masks(init_fn(jax.random.fold_in(key, lv)), masks)
        assert _tree_equal(start.params, fresh)
        assert not _tree_equal(start.params, pruning.apply_masks(dense.init.params, masks))
    assert reinit[2].metrics["density"] == ticket[2].metrics["density"]
    rand = lottery.run_arm("random", dense, fake, levels=2, rate=0.4, reference=ticket, key=key)
    for lv in (1, 2):
        assert rand[lv].metrics["layer_sparsity"] == ticket[lv].metrics["layer_sparsity"]
        assert not _tree_equal(rand[lv].masks, ticket[lv].masks)
    one = lottery.run_arm("oneshot", dense, fake, levels=2, rate=0.4, layer_rates={"head": 0.2})
    expect = pruning.magnitude_masks(
        dense.final.params, 1 - 0.6**2, scope="layerwise", layer_sparsity={"head": 1 - 0.8**2}
    )
    assert _tree_equal(one[2].masks, expect)
    with pytest.raises(ValueError, match="init_fn"):
        lottery.run_arm("reinit", dense, fake, levels=1, reference=ticket, key=key)
    with pytest.raises(ValueError, match="unknown arm"):
        lottery.run_arm("late", dense, fake, levels=1)


def test_bad_rewind_step_and_rate():
    for k in (T, T + 5, -1):
        with pytest.raises(ValueError, match=rf"rewind_step must be an int in \[0, {T}\).*{k}"):
            lottery.train_dense(_state(), FakeTrainer(), num_steps=T, rewind_step=k)
    dense = lottery.train_dense(_state(), FakeTrainer(), num_steps=T)
    with pytest.raises(ValueError, match=r"rate must be in \[0, 1\), got 1.2"):
        lottery.run_arm("rewind", dense, FakeTrainer(), levels=1, rate=1.2)
    with pytest.raises(ValueError, match="cannot rewind to 3"):
        dense.rewound_to(3)


def test_resume_at_first_unfinished_level(tmp_path):
    fake = FakeTrainer()
    dense = lottery.train_dense(
        _state(), fake, num_steps=T, rewind_step=K, workdir=str(tmp_path / "dense")
    )
    first = lottery.run_arm("rewind", dense, fake, levels=3, workdir=str(tmp_path / "arm"))
    os.remove(tmp_path / "arm" / "level_03" / "metrics.json")  # as if killed during level 3
    again = FakeTrainer()
    dense2 = lottery.train_dense(
        _state(), again, num_steps=T, rewind_step=K, workdir=str(tmp_path / "dense")
    )
    assert again.starts == [] and _tree_equal(dense2.rewind, dense.rewind)
    second = lottery.run_arm("rewind", dense2, again, levels=3, workdir=str(tmp_path / "arm"))
    assert len(again.starts) == 1  # only level 3 was redone
    for a, b in zip(first, second, strict=True):
        assert _tree_equal(a.params, b.params) and _tree_equal(a.masks, b.masks)
        assert a.metrics["test_accuracy"] == b.metrics["test_accuracy"]
    with open(tmp_path / "arm" / "level_02" / "metrics.json") as f:
        assert json.load(f)["density"] == second[2].metrics["density"]


def _mlp_apply(variables, x, train=False, rngs=None):
    """A hand-written one-hidden-layer MLP in flax's calling convention (no flax init cost)."""
    del train, rngs
    p = variables["params"]
    h = jax.nn.relu(x.reshape(len(x), -1) @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"])
    return h @ p["head"]["kernel"] + p["head"]["bias"]


def _digits_params(key):
    k1, k2 = jax.random.split(key)
    return {
        "Dense_0": {"kernel": jax.random.normal(k1, (64, 16)) / 8, "bias": jnp.zeros(16)},
        "head": {"kernel": jax.random.normal(k2, (16, 10)) / 4, "bias": jnp.zeros(10)},
    }


def _digits_setup(rewind_step=3):
    ds = ws.data.load("digits")
    rng = np.random.default_rng(0)
    params = {
        "Dense_0": {
            "kernel": jnp.asarray(rng.normal(size=(64, 16)) / 8, jnp.float32),
            "bias": jnp.zeros(16),
        },
        "head": {
            "kernel": jnp.asarray(rng.normal(size=(16, 10)) / 4, jnp.float32),
            "bias": jnp.zeros(10),
        },
    }
    schedule = optax.cosine_decay_schedule(0.1, 12)
    tx = optax.chain(
        pruning.mask_gradients(),
        optax.clip_by_global_norm(1.0),
        optax.add_decayed_weights(1e-2),
        optax.sgd(schedule, momentum=0.9),
        pruning.keep_masked(),
    )
    state = fresh_state(params, tx, jax.random.PRNGKey(0))
    return ds, tx, state


def _trainer(ds, tx, **kw):
    loss = ws.training.classification_loss(_mlp_apply)
    return lottery.Trainer(loss, tx, ds, apply_fn=_mlp_apply, batch_size=64, **kw)


def test_trainer_sends_each_calls_record_to_its_writer():
    class Recorder(ws.io.MetricWriter):
        def __init__(self):
            self.calls = []

        def write_scalars(self, step, scalars):
            self.calls.append((step, dict(scalars)))

    ds, tx, state = _digits_setup()
    writer = Recorder()
    dense = lottery.train_dense(state, _trainer(ds, tx, writer=writer), num_steps=12, rewind_step=3)
    assert [step for step, _ in writer.calls] == [3, 12]  # to the rewind step, then to T
    assert writer.calls[-1][1]["test_accuracy"] == dense.metrics["test_accuracy"]


def test_masked_training_keeps_pruned_weights_exactly_zero_and_sharded_agrees():
    ds, tx, state = _digits_setup()
    train = _trainer(ds, tx)
    dense = lottery.train_dense(state, train, num_steps=12, rewind_step=3)
    levels = lottery.run_arm("rewind", dense, train, levels=2, rate=0.5)
    for lv in levels[1:]:
        for p, m, p0 in zip(
            jax.tree.leaves(lv.params),
            jax.tree.leaves(lv.masks),
            jax.tree.leaves(dense.rewind.params),
            strict=True,
        ):
            p, m = np.asarray(p), np.asarray(m)
            assert (p[~m] == 0).all()
            assert (p[m] != np.asarray(p0)[m]).mean() > 0.9  # survivors did train
        assert lv.metrics["test_accuracy"] > 0.2
    assert levels[2].metrics["density"] == pytest.approx(0.25, abs=0.01)
    # the same IMP on 8 simulated CPU devices, batch split along "data"
    mesh = jax.sharding.Mesh(np.array(jax.devices("cpu")[:8]), ("data",))
    sharded = _trainer(ds, tx, mode="sharded", mesh=mesh)
    dense_s = lottery.train_dense(state, sharded, num_steps=12, rewind_step=3)
    levels_s = lottery.run_arm("rewind", dense_s, sharded, levels=2, rate=0.5)
    for a, b in zip(levels, levels_s, strict=True):
        assert _tree_equal(a.masks, b.masks)
        for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-5)
        assert a.metrics["test_accuracy"] == pytest.approx(b.metrics["test_accuracy"], abs=0.01)


def _seed_states(tx, seeds):
    """Per-seed step-0 states stacked on a leading seed axis (own init and PRNG stream)."""
    states = [
        fresh_state(_digits_params(jax.random.PRNGKey(s)), tx, jax.random.PRNGKey(s)) for s in seeds
    ]
    return jax.tree.map(lambda *xs: jnp.stack(xs), *states)


def _imp(ds, tx, seed, state, *, workdir=None):
    """Dense run plus the rewind (with instability), random and reinit arms, 2 levels."""
    train = _trainer(ds, tx, seed=seed)
    many = isinstance(seed, list)
    # the per-seed key of the seed-axis run is the key of the same seed alone
    key = (
        jnp.stack([jax.random.PRNGKey(10 + s) for s in seed])
        if many
        else jax.random.PRNGKey(10 + seed)
    )
    where = (lambda name: os.path.join(workdir, name)) if workdir else (lambda name: None)
    dense = lottery.train_dense(state, train, num_steps=12, rewind_step=3, workdir=where("dense"))
    test = ws.landscape.classification_objective(_mlp_apply, {}, ds.x_test, ds.y_test, metric="all")
    kw = dict(levels=2, rate=0.5, layer_rates={"head": 0.25})
    second = [s + 100 for s in seed] if many else seed + 100
    ticket = lottery.run_arm(
        "rewind", dense, train, **kw, instability_eval=test, instability_seed=second,
        workdir=where("ticket"),
    )  # fmt: skip
    rand = lottery.run_arm(
        "random", dense, train, **kw, reference=ticket, key=key, workdir=where("random")
    )
    reinit = lottery.run_arm(
        "reinit", dense.rewound_to(0), train, **kw, reference=ticket, key=key,
        init_fn=_digits_params, workdir=where("reinit"),
    )  # fmt: skip
    return {"ticket": ticket, "random": rand, "reinit": reinit}


def test_seed_axis_gives_each_seed_what_it_gives_alone_and_keeps_pruned_weights_zero():
    ds, tx, _ = _digits_setup()
    seeds = [0, 1, 2]
    arms = _imp(ds, tx, seeds, _seed_states(tx, seeds))
    for name, levels in arms.items():
        for lv in levels[1:]:
            for i in range(len(seeds)):  # per seed: pruned weights exactly zero, survivors moved
                for p, m in zip(jax.tree.leaves(lv.params), jax.tree.leaves(lv.masks), strict=True):
                    p, m = np.asarray(p)[i], np.asarray(m)[i]
                    assert m.shape == p.shape and (p[~m] == 0).all(), name
                    assert (p[m] != 0).mean() > 0.9, name
            assert len(lv.metrics["test_loss"]) == len(seeds)
        density = np.asarray(levels[2].metrics["density"])
        np.testing.assert_allclose(density, levels[2].metrics["density"][0])  # same counts
    # seeds differ from each other: their masks are their own
    masks = np.asarray(arms["ticket"][2].masks["Dense_0"]["kernel"])
    assert not np.array_equal(masks[0], masks[1])
    i, seed = 2, seeds[2]
    alone = _imp(ds, tx, seed, ws.training.seed_slice(_seed_states(tx, [seed]), 0))
    for name, levels in arms.items():
        for a, b in zip(levels, alone[name], strict=True):
            assert _tree_equal(ws.training.seed_slice(a.masks, i), b.masks), (name, a.level)
            for metric in ("train_loss", "test_loss"):
                assert a.metrics[metric][i] == pytest.approx(b.metrics[metric], rel=1e-4)
        assert levels[1].metrics["density"][i] == alone[name][1].metrics["density"]
    inst = arms["ticket"][2].metrics["instability_loss"][i]
    assert inst == pytest.approx(alone["ticket"][2].metrics["instability_loss"], rel=1e-3, abs=1e-6)


def test_seed_axis_levels_resume_bit_identical(tmp_path):
    ds, tx, _ = _digits_setup()
    seeds = [3, 4]
    first = _imp(ds, tx, seeds, _seed_states(tx, seeds), workdir=str(tmp_path))
    for arm in ("ticket", "reinit"):  # as if killed during level 2 of these arms
        os.remove(tmp_path / arm / "level_02" / "metrics.json")
    second = _imp(ds, tx, seeds, _seed_states(tx, seeds), workdir=str(tmp_path))
    for name, levels in first.items():
        for a, b in zip(levels, second[name], strict=True):
            assert np.shape(jax.tree.leaves(b.params)[0])[0] == len(seeds)  # all seeds saved
            assert _tree_equal(a.params, b.params) and _tree_equal(a.masks, b.masks)
            without_time = [
                {k: v for k, v in lv.metrics.items() if k != "train_time"} for lv in (a, b)
            ]
            assert without_time[0] == without_time[1]


def test_fresh_rewind_resets_moments_and_fast_forwards_the_schedule():
    """Closed forms for the first step after rewinding to k: fresh SGD-momentum steps by
    -lr(k) g (empty momentum), restore by -lr(k) (0.9 trace_k + g); fresh Adam steps by
    -lr(k) g / (|g| + eps) (bias correction restarts)."""
    _, _, state = _digits_setup()
    params = state.params
    masks = pruning.magnitude_masks(params, 0.5)
    schedule = optax.linear_schedule(0.2, 0.02, 10)
    k = 4
    grads = [jax.tree.map(lambda x, i=i: jnp.cos(x * (i + 1)), params) for i in range(k + 1)]
    gm = jax.tree.map(lambda x, m: np.where(m, x, 0.0), grads[k], masks)
    for name, inner in [
        ("sgd", optax.sgd(schedule, momentum=0.9)),
        ("adam", optax.adam(schedule)),
        ("inject_adam", optax.inject_hyperparams(optax.adam)(learning_rate=schedule)),
    ]:
        tx = optax.chain(pruning.mask_gradients(), inner, pruning.keep_masked())
        p, s = params, tx.init(params)
        for g in grads[:k]:
            u, s = tx.update(g, s, p, masks=lottery.all_true(params))
            p = optax.apply_updates(p, u)
        at_k = state.replace(step=jnp.asarray(k, jnp.int32), params=p, opt_state=s)
        fresh = lottery.start_state(at_k, masks, tx=tx)
        restored = lottery.start_state(at_k, masks, rewind="restore")
        assert _tree_equal(fresh.params, pruning.apply_masks(p, masks))
        u, _ = tx.update(grads[k], fresh.opt_state, fresh.params, masks=masks)
        lr = float(schedule(k))
        if name == "sgd":
            expect = jax.tree.map(lambda x, lr=lr: -lr * x, gm)
            v, _ = tx.update(grads[k], restored.opt_state, restored.params, masks=masks)
            trace = s[1][0].trace
            expect_r = jax.tree.map(lambda t, x, lr=lr: -lr * (0.9 * np.asarray(t) + x), trace, gm)
            for a, b, m in zip(
                jax.tree.leaves(v), jax.tree.leaves(expect_r), jax.tree.leaves(masks), strict=True
            ):
                np.testing.assert_allclose(np.asarray(a)[m], b[m], rtol=1e-5, atol=1e-7)
        else:
            expect = jax.tree.map(lambda x, lr=lr: -lr * x / (np.abs(x) + 1e-8), gm)
        for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(expect), strict=True):
            np.testing.assert_allclose(np.asarray(a), b, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="rewind='fresh' at step 4 needs the optax chain"):
        lottery.start_state(at_k, masks)
    with pytest.raises(ValueError, match="unknown rewind 'late'"):
        lottery.start_state(at_k, masks, rewind="late")


def test_instability_per_level_is_the_barrier_between_two_data_orders():
    fake = FakeTrainer()
    dense = lottery.train_dense(_state(), fake, num_steps=T, rewind_step=K)

    def g(p):  # concave: the barrier is at least |θ1 - θ2|² / 4 (the midpoint's excess)
        return {"loss": -sum(jnp.sum(x**2) for x in jax.tree.leaves(p))}

    levels = lottery.run_arm(
        "rewind", dense, fake, levels=2, rate=0.5, instability_eval=g, instability_seed=1
    )
    assert fake.seeds == [None, None, 1, None, 1, None, 1]  # dense to k and T, then levels
    starts = list(fake.starts)
    for lv in levels:
        start, masks = starts[2 + 2 * lv.level]  # the second copy's start
        assert int(start.step) == K
        copy, _ = fake(start, masks, T, seed=1)
        expect = ws.landscape.linear_barrier(g, lv.params, copy.params)["barrier"]["loss"]
        assert lv.metrics["instability_loss"] == pytest.approx(float(expect), rel=1e-6)
        quarter = 0.25 * float(ws.landscape.l2_distance(lv.params, copy.params)) ** 2
        assert lv.metrics["instability_loss"] >= quarter * (1 - 1e-5) and quarter > 1e-3
    with pytest.raises(ValueError, match="instability_seed"):
        lottery.run_arm("rewind", dense, fake, levels=1, instability_eval=g)
    no_tx = FakeTrainer()
    no_tx.tx = None
    with pytest.raises(ValueError, match="rewind='fresh' after step 0 needs train.tx"):
        lottery.run_arm("rewind", dense, no_tx, levels=1)


def test_training_that_moves_pruned_weights_is_refused():
    leaky = FakeTrainer(keep_zero=False)
    dense = lottery.train_dense(_state(), leaky, num_steps=4)
    with pytest.raises(ValueError, match="keep_masked"):
        lottery.run_arm("rewind", dense, leaky, levels=1, rate=0.5)


def test_experiment_quick(tmp_path):
    results = run_experiment("lottery", tmp_path, steps=12, rewind_step=3)
    for name in ("config.json", "results.json", "lth.png", "geometry.png"):
        assert (tmp_path / name).exists(), name
    assert results["smoke"] and results["method"] == "lottery" and len(results["seeds"]) == 2
    claims = {c["arm"] + " vs " + c["baseline"]: c for c in results["claims"]}
    assert set(claims) == {
        "ticket vs dense",
        "ticket vs reinit",
        "ticket vs random",
        "ticket vs threshold",
    }
    assert claims["ticket vs dense"]["margin"] == 0.01
    for c in claims.values():
        assert c["verdict"] in ("holds", "does not hold", "inconclusive") and c["n"] == 2
    with open(tmp_path / "arms" / "ticket" / "seed_0.json") as f:
        ticket = json.load(f)
    assert len(ticket["density"]) == 3 and ticket["density"][0] == 1.0
    for level, packed in enumerate(ticket["test_correct"]):  # per level, this seed's test set
        correct = unpack_correct(packed)
        assert correct.mean() == pytest.approx(ticket["test_accuracy"][level], abs=1e-6)
    for key in ("sharpness", "trace", "trace_per_weight", "instability_error"):
        assert all(np.isfinite(ticket[key])), key
    # trace / trace per weight = the number of surviving weights (biases included)
    surviving = np.asarray(ticket["trace"]) / np.asarray(ticket["trace_per_weight"])
    prunable = 40 * 300 + 300 * 100 + 100 * 10
    expect = 400 + 10 + prunable * np.asarray(ticket["density"])
    np.testing.assert_allclose(surviving, expect, rtol=1e-4)
    ticket_dir = tmp_path / "train" / "ticket" / "seeds_0-1"  # both seeds, one run
    assert (ticket_dir / "level_02" / "metrics.json").exists()
    with pytest.raises(ValueError, match="rewind_step=20"):
        run_experiment("lottery", tmp_path / "bad", steps=12, rewind_step=20)
    with pytest.raises(ValueError, match="must include 'ticket'"):
        run_experiment(
            "lottery", tmp_path / "bad", arms="reinit", geometry_arms="", instability_arms=""
        )
    assert not (tmp_path / "bad").exists()


def test_experiment_runs_with_its_optional_lists_emptied(tmp_path):
    """Issue 23: ``--config.geometry_arms=`` crashed in the geometry plot after all training
    (`tests/test_config_space.py` runs each list emptied alone)."""
    none = dict(geometry_arms="", instability_arms="")
    results = run_experiment("lottery", tmp_path, steps=6, rewind_step=2, levels=1, num_seeds=1,
                             **none)  # fmt: skip
    assert results["figures"] == ["lth.png"] and (tmp_path / "lth.png").exists()
    assert {c["baseline"] for c in results["claims"]} >= {"dense"}
    with pytest.raises(ValueError, match=r"config.geometry_arms=\['reinit'\] must be a subset"):
        run_experiment("lottery", tmp_path / "bad", arms="ticket", geometry_arms="reinit")
    assert not (tmp_path / "bad").exists()


def test_notebook():
    run_notebook("lottery")
