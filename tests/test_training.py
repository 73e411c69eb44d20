import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import wspace as ws
from tests.helpers import fresh_state


@pytest.fixture(scope="module")
def digits():
    return ws.data.load("digits")


def _setup(ds, lr=0.05, model=None):
    model = model or ws.models.MLP(features=(64,))
    tx = optax.sgd(lr, momentum=0.9)
    state = ws.training.init_state(model, tx, ds.x_train[:1], jax.random.PRNGKey(0))
    return model, tx, state, ws.training.classification_loss(model.apply)


def _max_diff(a, b):
    return max(
        float(jnp.max(jnp.abs(x - y)))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def test_loss_falls_on_digits(digits):
    model, tx, state, loss_fn = _setup(digits)
    step = ws.training.make_train_step(loss_fn, tx)
    before = ws.training.evaluate(model.apply, state.variables, digits.x_test, digits.y_test)
    state, history = ws.training.fit(
        state,
        step,
        digits,
        apply_fn=model.apply,
        num_steps=200,
        batch_size=64,
        eval_every=100,
        progress=False,
    )
    assert int(state.step) == 200 and len(history) == 2
    assert history[-1]["test_loss"] < 0.3 * before["loss"]
    assert history[-1]["test_accuracy"] > 0.9


def test_three_modes_agree_on_8_devices(digits):
    assert jax.device_count() == 8
    model, tx, state, loss_fn = _setup(digits)
    finals = {}
    for mode in ws.training.MODES:
        step = ws.training.make_train_step(loss_fn, tx, mode=mode)
        finals[mode], _ = ws.training.fit(
            state,
            step,
            digits,
            apply_fn=model.apply,
            num_steps=20,
            batch_size=64,
            mode=mode,
            eval_every=20,
            progress=False,
        )
    assert _max_diff(finals["jit"].params, state.params) > 1e-2  # it did train
    for mode in ("sharded", "pmap"):
        assert _max_diff(finals["jit"].params, finals[mode].params) < 1e-5, mode
        assert int(finals[mode].step) == 20


def test_batchnorm_state_is_updated(digits):
    model, tx, state, loss_fn = _setup(digits, model=ws.models.ConvNet(channels=(8,)))
    step = ws.training.make_train_step(loss_fn, tx)
    new, metrics = step(
        jax.tree.map(jnp.copy, state), {"x": digits.x_train[:32], "y": digits.y_train[:32]}
    )
    assert _max_diff(new.model_state, state.model_state) > 0
    assert set(metrics) >= {"loss", "accuracy"}


class _Interrupt(Exception):
    pass


def _dies_at_call(step, n: int):
    """``step``, but its ``n``-th call raises `_Interrupt` (a killed run)."""
    calls = {"n": 0}

    def dying(s, batch, tx_args=None):
        calls["n"] += 1
        if calls["n"] == n:
            raise _Interrupt
        return step(s, batch, tx_args)

    return dying


def test_resume_after_interruption_is_bit_identical(digits, tmp_path):
    model, tx, state, loss_fn = _setup(digits)
    step = ws.training.make_train_step(loss_fn, tx)
    kwargs = dict(apply_fn=model.apply, num_steps=30, batch_size=64, eval_every=10, progress=False)
    reference, ref_history = ws.training.fit(state, step, digits, **kwargs)

    workdir = str(tmp_path / "run")
    with pytest.raises(_Interrupt):
        ws.training.fit(state, _dies_at_call(step, 25), digits, workdir=workdir, **kwargs)
    resumed, history = ws.training.fit(state, step, digits, workdir=workdir, **kwargs)
    for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(resumed), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        steps = [json.loads(line)["step"] for line in f]
    assert steps == [10, 20, 30]
    assert [r["test_loss"] for r in history] == [r["test_loss"] for r in ref_history]


def test_nan_guard_names_step_and_keeps_last_good_checkpoint(digits, tmp_path):
    model = ws.models.MLP(features=(16,))
    tx = optax.sgd(lambda count: jnp.where(count < 12, 0.01, jnp.nan))  # update 13 poisons
    state = ws.training.init_state(model, tx, digits.x_train[:1], jax.random.PRNGKey(0))
    step = ws.training.make_train_step(ws.training.classification_loss(model.apply), tx)
    workdir = str(tmp_path / "nan")
    with pytest.raises(
        FloatingPointError, match="at step 14.*newest checkpoint, step 10, is finite"
    ):
        ws.training.fit(
            state,
            step,
            digits,
            apply_fn=model.apply,
            num_steps=40,
            batch_size=32,
            eval_every=5,
            workdir=workdir,
            progress=False,
        )
    ckpt = ws.io.Checkpointer(os.path.join(workdir, "checkpoints"))
    assert ckpt.latest_step() == 10
    restored = ckpt.restore(state)
    ckpt.close()
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(restored.params))


def test_bad_mode():
    with pytest.raises(ValueError, match="unknown mode 'gpu'"):
        ws.training.make_train_step(lambda *a: None, optax.sgd(0.1), mode="gpu")


# --------------------------------------------------------------------------- generic fit


def _quadratic(dim=3, lr=0.1, offset_scale=0.0):
    """``L(w) = 1/2 |w - b|^2`` on batches ``b``; SGD then adds ``offset`` from tx_args."""

    def loss_fn(params, model_state, batch, key):
        loss = 0.5 * jnp.sum((params["w"] - batch["b"]) ** 2)
        return loss, (model_state, {"loss": loss})

    def add_offset():
        def update(updates, state, params=None, *, offset, **extra):
            return jax.tree.map(lambda u: u + offset, updates), state

        return optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), update)

    tx = optax.chain(optax.sgd(lr), add_offset())
    params = {"w": jnp.zeros(dim, jnp.float32)}
    state = fresh_state(params, tx, jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    targets = rng.normal(size=(40, dim)).astype(np.float32)
    return state, ws.training.make_train_step(loss_fn, tx), targets


def test_fit_on_an_iterable_with_tx_args_callable_matches_closed_form(tmp_path):
    lr, c = 0.1, 0.05
    state, step, targets = _quadratic(lr=lr)
    records = []

    class ListWriter(ws.io.MetricWriter):
        def write_scalars(self, s, scalars):
            records.append({"step": s, **scalars})

    final, history = ws.training.fit(
        state,
        step,
        ({"b": b} for b in targets),
        num_steps=30,
        eval_every=10,
        tx_args=lambda batch: {"offset": c * batch["b"]},
        eval_fn=lambda s: {"w0": s.params["w"][0]},
        writer=ListWriter(),
        progress=False,
    )
    w, losses = np.zeros(3), []
    for b in targets[:30]:  # w <- w - lr (w - b) + c b
        losses.append(0.5 * np.sum((w - b) ** 2))
        w = w - lr * (w - b) + c * b
    np.testing.assert_allclose(np.asarray(final.params["w"]), w, rtol=1e-5)
    assert [r["step"] for r in history] == [10, 20, 30] and records == history
    np.testing.assert_allclose(history[-1]["w0"], w[0], rtol=1e-5)
    np.testing.assert_allclose(history[0]["batch_loss"], np.mean(losses[:10]), rtol=1e-5)


def test_fit_on_an_iterable_resumes_bit_identically(tmp_path):
    state, step, targets = _quadratic()
    kw = dict(num_steps=20, eval_every=5, tx_args={"offset": 0.0}, progress=False)
    reference, ref_history = ws.training.fit(state, step, ({"b": b} for b in targets), **kw)
    workdir = str(tmp_path / "q")

    def dies_after(n):
        for i, b in enumerate(targets):
            if i == n:
                raise _Interrupt
            yield {"b": b}

    with pytest.raises(_Interrupt):
        ws.training.fit(state, step, dies_after(13), workdir=workdir, **kw)
    resumed, history = ws.training.fit(
        state, step, ({"b": b} for b in targets), workdir=workdir, **kw
    )
    np.testing.assert_array_equal(np.asarray(reference.params["w"]), resumed.params["w"])
    assert [r["batch_loss"] for r in history] == [r["batch_loss"] for r in ref_history]
    assert [r["step"] for r in ws.io.read_jsonl(os.path.join(workdir, "metrics.jsonl"))] == [
        5,
        10,
        15,
        20,
    ]


def test_evaluate_sharded_matches_jit(digits):
    model, _, state, _ = _setup(digits)
    x, y = digits.x_test[:203], digits.y_test[:203]  # not a multiple of 8: padding counts 0
    ref = ws.training.evaluate(model.apply, state.variables, x, y, batch_size=64)
    placed = ws.training.place_state(state, "sharded")
    got = ws.training.evaluate(model.apply, placed.variables, x, y, batch_size=64, mode="sharded")
    logits = model.apply(state.variables, x, train=False)
    exact = float(jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y)))
    np.testing.assert_allclose(ref["loss"], exact, rtol=1e-5)
    np.testing.assert_allclose(got["loss"], ref["loss"], rtol=1e-5)
    assert got["accuracy"] == ref["accuracy"] == np.mean(np.argmax(np.asarray(logits), -1) == y)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_steps=0), "num_steps must be an int >= 1, got 0"),
        (dict(eval_every=0), "eval_every must be an int >= 1, got 0"),
        (dict(batch_size=0), "batch_size must be an int >= 1, got 0"),
        (dict(checkpoint_every=0), "checkpoint_every must be an int >= 1, got 0"),
        (dict(batch_size=None), "needs batch_size"),
        (dict(apply_fn=None), "needs apply_fn"),
        (dict(train_eval_examples=-1), "train_eval_examples must be"),
        (dict(tx_args=[1]), "tx_args must be a dict, a callable"),
        (dict(writer=object()), "writer must have write_scalars"),
        (dict(seed=0.5), "seed must be an int, got 0.5"),
        (dict(eval_fn="acc"), "eval_fn must be callable"),
    ],
)
def test_fit_rejects_bad_arguments_before_writing(digits, tmp_path, kwargs, match):
    model, tx, state, loss_fn = _setup(digits)
    step = lambda s, b, a=None: (s, {})  # never called
    kw = dict(apply_fn=model.apply, num_steps=5, batch_size=8, progress=False)
    with pytest.raises(ValueError, match=match):
        ws.training.fit(state, step, digits, workdir=str(tmp_path / "w"), **{**kw, **kwargs})
    assert not (tmp_path / "w").exists()


def test_fit_refuses_a_workdir_of_another_run(tmp_path):
    state, step, targets = _quadratic()
    kw = dict(eval_every=5, tx_args={"offset": 0.0}, progress=False, workdir=str(tmp_path))
    ws.training.fit(state, step, ({"b": b} for b in targets), num_steps=10, **kw)
    with pytest.raises(ValueError, match="num_steps: stored 10, given 20"):
        ws.training.fit(state, step, ({"b": b} for b in targets), num_steps=20, **kw)
    with pytest.raises(ValueError, match=r"seed: stored 0, given 1"):
        ws.training.fit(state, step, ({"b": b} for b in targets), num_steps=10, seed=1, **kw)
    other, step2, _ = _quadratic(dim=4)
    with pytest.raises(ValueError, match=r"\['w'\]: stored float32\[3\], given float32\[4\]"):
        ws.training.fit(other, step2, ({"b": b} for b in targets), num_steps=10, **kw)


def test_tensorboard_writer_writes_readable_events(tmp_path):
    pytest.importorskip("tensorboardX")
    from tensorboardX.proto import event_pb2

    with ws.io.TensorBoardWriter(str(tmp_path)) as w:
        w.write_scalars(3, {"loss": 0.5, "acc": np.float32(0.25), "note": "skipped"})
    (path,) = [p for p in tmp_path.iterdir() if "tfevents" in p.name]
    data, got = path.read_bytes(), {}
    while data:  # TFRecord: u64 length, u32 crc, payload, u32 crc
        n = int.from_bytes(data[:8], "little")
        event = event_pb2.Event.FromString(data[12 : 12 + n])
        data = data[16 + n :]
        for v in event.summary.value:
            got[v.tag] = (event.step, v.simple_value)
    assert got == {"loss": (3, 0.5), "acc": (3, 0.25)}


@pytest.mark.parametrize("mode", ["sharded", "pmap"])
def test_resume_in_multi_device_modes_is_bit_identical(digits, tmp_path, mode):
    model = ws.models.MLP(features=(16,))
    tx = optax.sgd(0.05, momentum=0.9)
    state = ws.training.init_state(model, tx, digits.x_train[:1], jax.random.PRNGKey(0))
    step = ws.training.make_train_step(ws.training.classification_loss(model.apply), tx, mode=mode)
    kw = dict(apply_fn=model.apply, num_steps=12, batch_size=64, eval_every=4, mode=mode)
    kw.update(progress=False, train_eval_examples=256)
    reference, ref_history = ws.training.fit(state, step, digits, **kw)
    workdir = str(tmp_path / mode)
    with pytest.raises(_Interrupt):
        ws.training.fit(state, _dies_at_call(step, 10), digits, workdir=workdir, **kw)
    resumed, history = ws.training.fit(state, step, digits, workdir=workdir, **kw)
    for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(resumed), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert [r["test_loss"] for r in history] == [r["test_loss"] for r in ref_history]


# ----------------------------------------------------------------------------- seeds as an axis


def _seed_fit(ds, seeds, **kw):
    """The MLP on digits for ``seeds`` (a list: one seed-axis program; an int: alone)."""
    model = ws.models.MLP(features=(32,))
    tx = optax.sgd(0.05, momentum=0.9)
    loss_fn = ws.training.classification_loss(model.apply)
    many = isinstance(seeds, list)
    if many:
        state = ws.training.init_states(model, tx, ds.x_train[:1], seeds)
    else:
        state = ws.training.init_state(model, tx, ds.x_train[:1], jax.random.PRNGKey(seeds))
    kw = dict(num_steps=40, batch_size=32, eval_every=20, progress=False) | kw
    mode, seed_loop = kw.pop("mode", "jit"), kw.pop("seed_loop", "vmap")
    step = ws.training.make_train_step(loss_fn, tx, mode=mode, seed_axis=many, seed_loop=seed_loop)
    return ws.training.fit(state, step, ds, apply_fn=model.apply, seed=seeds, mode=mode, **kw)


def test_step_rebuilt_from_the_same_loss_and_tx_is_the_same_compiled_step(digits):
    _, tx, state, loss_fn = _setup(digits)
    first = ws.training.make_train_step(loss_fn, tx)
    assert ws.training.make_train_step(loss_fn, tx) is first
    assert ws.training.make_train_step(loss_fn, tx, seed_axis=True) is not first
    batch = {"x": digits.x_train[:8], "y": digits.y_train[:8]}
    first(jax.tree.map(jnp.copy, state), batch)
    again = ws.training.make_train_step(loss_fn, tx)
    again(jax.tree.map(jnp.copy, state), batch)
    assert first._one._cache_size() == 1  # the second build's call compiled nothing


def test_init_states_slices_equal_init_state_per_seed(digits):
    model, tx = ws.models.MLP(features=(8,)), optax.adam(1e-3)
    stacked = ws.training.init_states(model, tx, digits.x_train[:1], [3, 7])
    for i, seed in enumerate([3, 7]):
        alone = ws.training.init_state(model, tx, digits.x_train[:1], jax.random.PRNGKey(seed))
        chex.assert_trees_all_equal(ws.training.seed_slice(stacked, i), alone)


@pytest.mark.parametrize("seed_loop", ws.training.SEED_LOOPS)
def test_seed_tx_args_give_each_seed_its_own(digits, seed_loop):
    # tx scales the gradient by its extra argument: seed i steps with scale[i]
    def update(g, state, params=None, *, scale):
        return jax.tree.map(lambda u: -scale * u, g), state

    tx = optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), update)
    model = ws.models.MLP(features=(8,))
    loss_fn = ws.training.classification_loss(model.apply)
    states = ws.training.init_states(model, tx, digits.x_train[:1], [0, 1])
    batch = {"x": np.stack([digits.x_train[:8]] * 2), "y": np.stack([digits.y_train[:8]] * 2)}
    step = ws.training.make_train_step(loss_fn, tx, seed_axis=True, seed_loop=seed_loop,
                                       seed_tx_args=True, donate=False)  # fmt: skip
    new, _ = step(states, batch, {"scale": jnp.array([0.1, 0.2])})
    one = ws.training.make_train_step(loss_fn, tx, donate=False)
    for i, scale in enumerate([0.1, 0.2]):
        alone, _ = one(ws.training.seed_slice(states, i), ws.training.seed_slice(batch, i),
                       {"scale": jnp.asarray(scale)})  # fmt: skip
        chex.assert_trees_all_close(ws.training.seed_slice(new.params, i), alone.params,
                                    rtol=1e-6, atol=1e-7)  # fmt: skip
    with pytest.raises(ValueError, match="seed_tx_args=True needs seed_axis=True"):
        ws.training.make_train_step(loss_fn, tx, seed_tx_args=True)


def test_a_seed_among_several_matches_the_seed_alone(digits):
    state, history = _seed_fit(digits, [0, 1, 2])
    assert np.shape(state.step) == (3,) and len(history[-1]["test_loss"]) == 3
    alone, alone_history = _seed_fit(digits, 1)
    got, want = history[-1]["test_loss"][1], alone_history[-1]["test_loss"]
    assert abs(got - want) <= 1e-4 * abs(want)
    chex.assert_trees_all_close(
        ws.training.seed_slice(state.params, 1), alone.params, rtol=1e-4, atol=1e-5
    )
    assert history[-1]["test_loss"][0] != history[-1]["test_loss"][2]  # own data, own init


def test_fused_steps_are_bit_identical_to_the_step_loop(digits):
    fused, fused_history = _seed_fit(digits, [0, 1], steps_per_call=20)
    loop, loop_history = _seed_fit(digits, [0, 1], steps_per_call=1)
    chex.assert_trees_all_equal(fused, loop)
    assert fused_history[-1]["batch_loss"] == loop_history[-1]["batch_loss"]


def test_seed_axis_resumes_bit_identically(digits, tmp_path):
    full, _ = _seed_fit(digits, [0, 1])
    _seed_fit(digits, [0, 1], num_steps=20, workdir=str(tmp_path))
    # the identity holds num_steps: a rerun to 40 steps needs its own fit.json
    os.remove(tmp_path / "fit.json")
    resumed, history = _seed_fit(digits, [0, 1], workdir=str(tmp_path))
    chex.assert_trees_all_equal(resumed, full)
    assert [r["step"] for r in history] == [20, 40]


@pytest.mark.parametrize("seed_loop", ["vmap", "unroll"])
def test_seed_axis_splits_over_8_devices_in_sharded_mode(digits, seed_loop):
    seeds = list(range(8))
    sharded, history = _seed_fit(digits, seeds, mode="sharded", num_steps=20, seed_loop=seed_loop)
    assert len(sharded.params["Dense_0"]["kernel"].sharding.device_set) == 8
    single, single_history = _seed_fit(digits, seeds, num_steps=20)
    chex.assert_trees_all_close(sharded.params, single.params, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(history[-1]["test_loss"], single_history[-1]["test_loss"], 1e-4)


def test_fit_refuses_seeds_that_do_not_match_the_step_or_state(digits):
    model, tx, state, loss_fn = _setup(digits)
    plain = ws.training.make_train_step(loss_fn, tx)
    with pytest.raises(ValueError, match="seed_axis=True"):
        ws.training.fit(state, plain, digits, num_steps=2, batch_size=8, seed=[0, 1],
                        apply_fn=model.apply)  # fmt: skip
    axis = ws.training.make_train_step(loss_fn, tx, seed_axis=True)
    with pytest.raises(ValueError, match="leading axis of 2 seeds"):
        ws.training.fit(state, axis, digits, num_steps=2, batch_size=8, seed=[0, 1],
                        apply_fn=model.apply)  # fmt: skip
    with pytest.raises(ValueError, match="distinct"):
        ws.training.init_states(model, tx, digits.x_train[:1], [1, 1])


def test_seed_axis_with_fewer_seeds_than_devices_splits_the_batch(digits):
    sharded, _ = _seed_fit(digits, [0, 1], mode="sharded", num_steps=20)
    single, _ = _seed_fit(digits, [0, 1], num_steps=20)
    chex.assert_trees_all_close(sharded.params, single.params, rtol=1e-4, atol=1e-5)


def test_correct_predictions_average_to_evaluate_accuracy(digits):
    model, tx, _, _ = _setup(digits)
    states = ws.training.init_states(model, tx, digits.x_train[:1], [0, 1])
    x, y = digits.x_test, digits.y_test
    correct = ws.training.correct_predictions(model.apply, states.variables, x, y, 100,
                                              seed_axis=True)  # fmt: skip
    assert correct.shape == (2, len(y)) and correct.dtype == bool
    for i in range(2):
        one = ws.training.seed_slice(states, i).variables
        acc = ws.training.evaluate(model.apply, one, x, y)["accuracy"]
        assert correct[i].mean() == pytest.approx(acc, abs=1e-6)
        np.testing.assert_array_equal(
            ws.training.correct_predictions(model.apply, one, x, y), correct[i]
        )


def test_a_state_built_for_another_optimizer_is_a_clear_error(digits):
    _, _, state, loss_fn = _setup(digits)  # SGD with momentum
    step = ws.training.make_train_step(loss_fn, optax.adam(1e-3))
    batch = {"x": digits.x_train[:8], "y": digits.y_train[:8]}
    with pytest.raises(ValueError, match="opt_state .* does not match tx"):
        step(state, batch)


def test_seeds_looped_inside_the_step_match_vmapped_seeds(digits):
    model, tx, _, loss_fn = _setup(digits)
    states = ws.training.init_states(model, tx, digits.x_train[:1], [0, 1])
    batch = {"x": np.stack([digits.x_train[:16]] * 2), "y": np.stack([digits.y_train[:16]] * 2)}
    outs = []
    for seed_loop in ws.training.SEED_LOOPS:
        step = ws.training.make_train_step(loss_fn, tx, seed_axis=True, seed_loop=seed_loop)
        outs.append(step(jax.tree.map(jnp.copy, states), batch))
    for out in outs[1:]:
        chex.assert_trees_all_close(outs[0], out, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="unknown seed_loop 'pmap'"):
        ws.training.make_train_step(loss_fn, tx, seed_axis=True, seed_loop="pmap")
    with pytest.raises(ValueError, match="seed_loop='unroll' needs seed_axis=True"):
        ws.training.make_train_step(loss_fn, tx, seed_loop="unroll")
