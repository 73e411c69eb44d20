import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import wspace as ws


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


def test_resume_after_interruption_is_bit_identical(digits, tmp_path):
    model, tx, state, loss_fn = _setup(digits)
    step = ws.training.make_train_step(loss_fn, tx)
    kwargs = dict(apply_fn=model.apply, num_steps=30, batch_size=64, eval_every=10, progress=False)
    reference, ref_history = ws.training.fit(state, step, digits, **kwargs)

    calls = {"n": 0}

    def dies_at_step_25(s, batch, tx_args=None):
        calls["n"] += 1
        if calls["n"] == 25:
            raise _Interrupt
        return step(s, batch, tx_args)

    workdir = str(tmp_path / "run")
    with pytest.raises(_Interrupt):
        ws.training.fit(state, dies_at_step_25, digits, workdir=workdir, **kwargs)
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
    with pytest.raises(FloatingPointError, match="at step 14.*last good checkpoint is step 10"):
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
    ckpt = ws.training.Checkpointer(os.path.join(workdir, "checkpoints"))
    assert ckpt.latest_step() == 10
    restored = ckpt.restore(state)
    ckpt.close()
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(restored.params))


def test_bad_mode():
    with pytest.raises(ValueError, match="unknown mode 'gpu'"):
        ws.training.make_train_step(lambda *a: None, optax.sgd(0.1), mode="gpu")
