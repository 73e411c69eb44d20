"""Tests of wspace.straight_through against enumeration, finite differences and closed forms."""

import functools
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import wspace as ws
from tests.helpers import run_experiment, run_notebook
from wspace import straight_through as st


def _toy(hidden=(3, 3), n=4, seed=0, **kw):
    model = st.BinaryMLP(hidden, num_classes=2, **kw)
    x = jax.random.normal(jax.random.PRNGKey(seed + 1), (n, 2))
    y = (x[:, 0] * x[:, 1] > 0).astype(jnp.int32)
    params = jax.jit(model.init)(jax.random.PRNGKey(seed), x)["params"]
    return model, params, x, y


# ------------------------------------------------------------------- units


@pytest.mark.parametrize("noise", st.NOISES)
def test_stochastic_sign_probability_is_cdf(noise):
    a = jnp.array([-1.5, -0.3, 0.0, 0.4, 0.9])
    xs = jax.vmap(lambda k: st.stochastic_sign(k, a, noise=noise))(
        jax.random.split(jax.random.PRNGKey(0), 20000)
    )
    p_hat = np.asarray(jnp.mean(xs == 1.0, 0))
    p = np.asarray(st.noise_cdf(a, noise))
    assert set(np.unique(np.asarray(xs))) <= {-1.0, 1.0}
    np.testing.assert_array_less(np.abs(p_hat - p), 4 * np.sqrt(p * (1 - p) / 20000) + 1e-3)


def test_backward_rules():
    a = jnp.linspace(-3.0, 3.0, 13)
    key = jax.random.PRNGKey(1)
    grad = lambda noise, est: jax.grad(
        lambda v: jnp.sum(st.stochastic_sign(key, v, noise=noise, estimator=est))
    )(a)
    # principled ST for logistic noise = d/da tanh(a/2); for uniform noise = hardtanh'
    np.testing.assert_allclose(
        grad("logistic", "st"), jax.vmap(jax.grad(lambda v: jnp.tanh(v / 2)))(a), rtol=1e-5
    )
    np.testing.assert_allclose(grad("uniform", "st"), grad("uniform", "hardtanh"))
    np.testing.assert_allclose(grad("gaussian", "st"), 2 * jax.scipy.stats.norm.pdf(a), rtol=1e-5)
    np.testing.assert_allclose(grad("logistic", "identity"), np.ones(13))
    np.testing.assert_allclose(
        grad("logistic", "tanh"), 1 - np.tanh(np.asarray(a)) ** 2, rtol=1e-5, atol=1e-6
    )
    # the forward value does not depend on the estimator, only on key and noise
    np.testing.assert_array_equal(
        st.stochastic_sign(key, a, estimator="identity"), st.stochastic_sign(key, a, estimator="st")
    )
    # deterministic sign with the clipped STE
    np.testing.assert_array_equal(st.sign_ste(a), np.where(np.asarray(a) >= 0, 1.0, -1.0))
    np.testing.assert_array_equal(
        jax.grad(lambda v: jnp.sum(st.sign_ste(v)))(a),
        (np.abs(np.asarray(a)) <= 1).astype(np.float32),
    )


def test_bernoulli_weights_estimators():
    eta = jnp.array([-2.0, 0.0, 1.0])
    key = jax.random.PRNGKey(2)
    g_id = jax.grad(lambda e: jnp.sum(jnp.arange(3.0) * st.bernoulli_weights(key, e)))(eta)
    g_st = jax.grad(
        lambda e: jnp.sum(jnp.arange(3.0) * st.bernoulli_weights(key, e, estimator="st"))
    )(eta)
    np.testing.assert_allclose(g_id, jnp.arange(3.0))  # dL/dw: the mirror-descent direction
    np.testing.assert_allclose(g_st, jnp.arange(3.0) * 2 * st.noise_pdf(eta), rtol=1e-6)


# ------------------------------------------------------ exact enumeration


def test_exact_gradient_matches_finite_differences():
    model, params, x, y = _toy()
    slf = st.states_loss(model.apply, {"params": params}, x)
    assert slf.num_units == 6
    vg = st.exact_value_and_grad(slf)
    value, grads = vg(params, x, y)
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    f = lambda v: vg(unravel(v), x, y)[0]  # vg is jitted: no second compile
    g = jax.flatten_util.ravel_pytree(grads)[0]
    for i in range(3):
        d = jax.random.normal(jax.random.PRNGKey(10 + i), flat.shape)
        d = d / jnp.linalg.norm(d)
        eps = 1e-2
        fd = (f(flat + eps * d) - f(flat - eps * d)) / (2 * eps)
        np.testing.assert_allclose(fd, g @ d, rtol=2e-2, atol=2e-4)
    # the value is the probability-weighted mean of per-state losses, and probabilities sum to 1
    states = st.all_states(6)
    losses, logps = jax.vmap(lambda x1, y1: jax.vmap(lambda s: slf.fn(params, s, x1, y1))(states))(
        x, y
    )
    np.testing.assert_allclose(jnp.sum(jnp.exp(logps), 1), np.ones(len(x)), rtol=1e-5)
    np.testing.assert_allclose(value, jnp.mean(jnp.sum(jnp.exp(logps) * losses, 1)), rtol=1e-5)
    assert np.isfinite(float(value))


def _single_unit_affine(estimator, noise):
    """One stochastic unit (real weights) and a loss affine in it: L = 3 x - 1."""
    model = st.BinaryDense(1, binary_weights=False, activation=estimator, noise=noise)
    x = jnp.array([[1.0, 0.6], [-0.2, 0.9]])
    params = {"kernel": jnp.array([[1.5], [0.5]]), "bias": jnp.zeros(1), "scale": jnp.ones(1)}
    # pre-activations 1.8 and 0.15: one outside [-1, 1], where uniform noise is deterministic
    loss = lambda out, y: 3.0 * out[:, 0] - 1.0
    y = jnp.zeros(2, jnp.int32)
    v = {"params": params}
    _, exact = st.exact_value_and_grad(st.states_loss(model.apply, v, x, loss=loss))(params, x, y)
    _, mean_st = st.expected_estimate(
        st.states_loss(model.apply, v, x, loss=loss, straight_through=True)
    )(params, x, y)
    return exact, mean_st


@pytest.mark.parametrize("noise", st.NOISES)
def test_principled_st_exact_for_affine_loss_identity_not(noise):
    exact, mean_st = _single_unit_affine("st", noise)
    _, mean_id = _single_unit_affine("identity", noise)
    fe, fs, fi = (jax.flatten_util.ravel_pytree(t)[0] for t in (exact, mean_st, mean_id))
    assert float(jnp.linalg.norm(fe)) > 1e-2
    np.testing.assert_allclose(fs, fe, rtol=1e-5, atol=1e-7)
    assert float(jnp.linalg.norm(fi - fe)) > 0.1 * float(jnp.linalg.norm(fe))


def test_paper_toy_st_bias_below_identity():
    model, params, x, y = _toy(hidden=(5, 5, 5), n=3)
    v = {"params": params}
    slf = st.states_loss(model.apply, v, x)
    assert slf.num_units == 15
    _, exact = st.exact_value_and_grad(slf)(params, x, y)
    biases = {}
    for est in ("st", "identity"):
        m = st.BinaryMLP((5, 5, 5), num_classes=2, activation=est)
        _, mean = st.expected_estimate(st.states_loss(m.apply, v, x, straight_through=True))(
            params, x, y
        )
        biases[est] = ws.estimators.gradient_metrics(
            jax.tree.map(lambda a: jnp.stack([a, a]), mean), exact
        )["bias"]
    assert biases["st"] < biases["identity"], biases


def test_expected_st_matches_monte_carlo():
    model, params, x, y = _toy()
    _, mean = st.expected_estimate(
        st.states_loss(model.apply, {"params": params}, x, straight_through=True)
    )(params, x, y)
    loss = ws.training.classification_loss(model.apply)
    single = lambda k: jax.grad(lambda p: loss(p, {}, {"x": x, "y": y}, k)[0])(params)
    samples = jax.jit(jax.vmap(single))(jax.random.split(jax.random.PRNGKey(4), 4000))
    met = ws.estimators.gradient_metrics(samples, mean)
    assert met["bias"] < 4 * np.sqrt(met["variance"] / 4000) + 1e-5, met


def test_reinforce_is_unbiased():
    model, params, x, y = _toy(hidden=(2,), n=2)
    slf = st.states_loss(model.apply, {"params": params}, x)
    _, exact = st.exact_value_and_grad(slf)(params, x, y)
    fn = st.reinforce(slf, 2)
    est = jax.jit(jax.vmap(lambda k: fn(params, k, x, y)[1]))(
        jax.random.split(jax.random.PRNGKey(5), 8000)
    )
    met = ws.estimators.gradient_metrics(est, exact)
    assert met["bias"] < 4 * np.sqrt(met["variance"] / 8000), met
    assert met["variance"] > 0
    # the same estimator in the library's signature (for training steps, wspace.estimators)
    est = st.reinforce_estimator(slf, 2)(None)
    batch, key = {"x": x, "y": y}, jax.random.PRNGKey(6)
    (loss, (model_state, aux)), grads = est(params, {"s": 1}, batch, key)
    want_loss, want_grads = fn(params, key, x, y)
    assert float(loss) == float(want_loss) and model_state == {"s": 1} and aux == {}
    jax.tree.map(np.testing.assert_array_equal, grads, want_grads)
    loss_only, _ = st.reinforce_estimator(slf, 2)(None, has_aux=False)(params, {}, batch, key)
    assert float(loss_only) == float(want_loss)


def test_ulr_on_binary_mlp_unbiased_for_sbn():
    """ULR (logistic noise of scale 1 on each BinaryDense output) runs the logistic SBN.

    With a squared-error loss the head's extra noise only adds a constant to the
    smoothed objective, so ULR's mean must equal the SBN's exact gradient by
    enumeration, coordinate by coordinate, within standard errors.
    """
    model, params, x, y = _toy(hidden=(3,), n=4)
    sq = lambda out, yy: jnp.sum((out - jax.nn.one_hot(yy, 2)) ** 2, -1)
    slf = st.states_loss(model.apply, {"params": params}, x, loss=sq)
    _, exact = st.exact_value_and_grad(slf)(params, x, y)
    sign_model = st.BinaryMLP((3,), num_classes=2, activation="sign")

    def loss_fn(p, ms, batch, key):
        return sq(sign_model.apply({"params": p}, batch["x"], train=True), batch["y"]), (ms, {})

    ulr = ws.likelihood_ratio.ulr(
        num_copies=32,
        noise="logistic",
        sigma={"BinaryDense_0": 1.0, "head": 0.5},
        baseline="mean",
        layer_types=(st.BinaryDense, nn.Dense),
    )
    r = 300
    est = ws.estimators.sample_gradients(
        ulr, loss_fn, params, {}, {"x": x, "y": y}, jax.random.PRNGKey(6), repeats=r
    )
    rows = jax.vmap(lambda t: jax.flatten_util.ravel_pytree(t)[0])(est)
    ref = jax.flatten_util.ravel_pytree(exact)[0]
    se = np.asarray(jnp.std(rows, 0, ddof=1)) / np.sqrt(r)
    z = (np.asarray(jnp.mean(rows, 0)) - np.asarray(ref)) / se
    assert np.all(np.abs(z) < 4.5), z
    assert np.linalg.norm(se) < 0.1 * float(jnp.linalg.norm(ref))  # power: a 10% bias shows


def test_binary_weights_enumerated():
    model = st.BinaryDense(2, binary_weights=True, activation="st", use_scale=False)
    x = jnp.array([[1.0, -0.5]])
    params = model.init(jax.random.PRNGKey(0), x)["params"]
    loss = lambda out, y: jnp.sum(out * jnp.array([1.0, -2.0]), -1)
    slf = st.states_loss(model.apply, {"params": params}, x, loss=loss)
    assert slf.num_units == 4 + 2  # 2x2 weights, 2 activations
    val, _ = st.exact_value_and_grad(slf)(params, x, jnp.zeros(1, jnp.int32))
    # closed form by hand: sum over weights of P(w) * sum_j c_j (2 F(a_j) - 1)
    eta, b = params["latent"], params["bias"]
    total = 0.0
    for s in np.asarray(st.all_states(4)):
        w = s.reshape(2, 2)
        p = np.prod(np.asarray(st.noise_cdf(jnp.asarray(w) * eta)))
        a = x[0] @ w / np.sqrt(2) + b
        total += p * float(jnp.sum(jnp.array([1.0, -2.0]) * (2 * st.noise_cdf(a) - 1)))
    np.testing.assert_allclose(val, total, rtol=1e-5)


# ----------------------------------------------- layers and optax


def test_layers_train_in_the_foundation_step():
    for model in (st.BinaryMLP((8,), num_classes=3, binary_weights=True),):
        x = jax.random.normal(jax.random.PRNGKey(0), (16, 5))
        y = jnp.arange(16) % 3
        tx = optax.multi_transform(
            {"latent": st.mirror_descent(10.0), "real": optax.adam(1e-2)}, st.latent_labels
        )
        state = ws.training.init_state(model, tx, x[:1], jax.random.PRNGKey(1))
        step = ws.training.make_train_step(ws.training.classification_loss(model.apply), tx)
        before = jax.tree.map(np.asarray, state.params)
        new, metrics = step(state, {"x": x, "y": y})  # donates state
        assert np.isfinite(float(metrics["loss"]))
        moved = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), before, new.params)
        assert max(jax.tree.leaves(moved)) > 0
        # eval mode is deterministic and needs no rng
        apply = jax.jit(model.apply)
        out1 = apply({"params": new.params}, x)
        np.testing.assert_array_equal(out1, apply({"params": new.params}, x))


def test_binary_conv_shapes_and_values():
    conv = st.BinaryConv(4, kernel_size=(3,), activation=None, use_scale=False, use_bias=False)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 10, 3))
    params = jax.jit(conv.init)(jax.random.PRNGKey(1), x)["params"]
    y = jax.jit(conv.apply)({"params": params}, x)  # eval: w = sign(latent)
    assert y.shape == (2, 10, 4)
    w = jnp.where(params["latent"] >= 0, 1.0, -1.0) / np.sqrt(9)
    ref = jax.lax.conv_general_dilated(x, w, (1,), "SAME", dimension_numbers=("NWC", "WIO", "NWC"))
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-6)
    conv2 = st.BinaryConv(2, kernel_size=(3, 3), strides=(2, 2))
    x2 = jnp.ones((1, 8, 8, 1))
    v2 = jax.jit(conv2.init)(jax.random.PRNGKey(0), x2)
    out = jax.jit(functools.partial(conv2.apply, train=True))(
        v2, x2, rngs={"dropout": jax.random.PRNGKey(2)}
    )
    assert out.shape == (1, 4, 4, 2) and set(np.unique(np.asarray(out))) <= {-1.0, 1.0}


def test_latent_labels():
    _, params, _, _ = _toy(binary_weights=True)
    labels = st.latent_labels(params)
    assert labels["BinaryDense_0"]["latent"] == "latent"
    assert labels["BinaryDense_0"]["bias"] == "real" and labels["head"]["kernel"] == "real"


def test_mirror_descent_is_sgd_and_clipped_is_projected():
    params = {"latent": jnp.array([0.5, -0.9, 2.0])}
    g = {"latent": jnp.array([1.0, 1.0, -1.0])}
    sched = optax.linear_schedule(1.0, 0.0, 10)
    for lr in (0.3, sched):  # without clip: exactly optax.sgd, bit for bit, schedules included
        tx, ref = st.mirror_descent(lr), optax.sgd(lr)
        s1, s2 = tx.init(params), ref.init(params)
        for _ in range(3):
            (u1, s1), (u2, s2) = tx.update(g, s1, params), ref.update(g, s2, params)
            np.testing.assert_array_equal(u1["latent"], u2["latent"])
    txc = st.mirror_descent(0.3, clip=1.0)
    uc, _ = jax.jit(txc.update)(g, txc.init(params), params)
    np.testing.assert_allclose(params["latent"] + uc["latent"], [0.2, -1.0, 1.0], rtol=1e-6)
    inj = optax.inject_hyperparams(st.mirror_descent)(learning_rate=0.3, clip=1.0)
    ui, _ = jax.jit(inj.update)(g, inj.init(params), params)
    np.testing.assert_allclose(ui["latent"], uc["latent"], rtol=1e-6)
    with pytest.raises(ValueError, match="params"):
        txc.update(g, txc.init(params))


def test_mirror_descent_is_exponentiated_gradient_for_logistic():
    # eta <- eta - lr g  <=>  p/(1-p) <- p/(1-p) exp(-lr g), p = F(eta) = sigmoid(eta)
    eta = jnp.array([0.3, -1.2])
    g = jnp.array([0.5, -2.0])
    tx = st.mirror_descent(0.1)
    u, _ = tx.update(g, tx.init(eta))
    p0, p1 = jax.nn.sigmoid(eta), jax.nn.sigmoid(eta + u)
    np.testing.assert_allclose(p1 / (1 - p1), p0 / (1 - p0) * np.exp(-0.1 * g), rtol=1e-5)


# ------------------------------------------------------------ bad input


def test_bad_inputs():
    a = jnp.zeros(3)
    with pytest.raises(ValueError, match="noise"):
        st.stochastic_sign(jax.random.PRNGKey(0), a, noise="laplace")
    with pytest.raises(ValueError, match="estimator"):
        st.stochastic_sign(jax.random.PRNGKey(0), a, estimator="gumbel")
    with pytest.raises(ValueError, match="noise"):
        st.noise_cdf(a, "cauchy")
    with pytest.raises(ValueError, match="estimator"):
        st.BinaryDense(3, activation="relu").init(jax.random.PRNGKey(0), jnp.ones((1, 2)))
    with pytest.raises(ValueError, match="33,554,432"):
        st.all_states(25)
    model, params, x, _ = _toy(hidden=(11, 11))
    with pytest.raises(ValueError, match=r"2\*\*22 = 4,194,304"):
        st.exact_value_and_grad(st.states_loss(model.apply, {"params": params}, x))
    with pytest.raises(ValueError, match="num_samples"):
        st.reinforce(st.states_loss(model.apply, {"params": params}, x), 0)
    with pytest.raises(ValueError, match="rank"):
        st.BinaryConv(2, kernel_size=(3, 3)).init(jax.random.PRNGKey(0), jnp.ones((1, 4, 1)))


def test_layer_in_a_user_model():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            x = st.BinaryDense(4, noise="gaussian")(x, train)
            return nn.Dense(2)(x)

    net = Net()
    x = jnp.ones((3, 5))
    v = net.init(jax.random.PRNGKey(0), x)
    a = net.apply(v, x, train=True, rngs={"dropout": jax.random.PRNGKey(1)})
    b = net.apply(v, x, train=True, rngs={"dropout": jax.random.PRNGKey(1)})
    np.testing.assert_array_equal(a, b)  # same key, same result
    with pytest.raises(Exception, match="dropout"):
        net.apply(v, x, train=True)


# ------------------------------------------------- experiment and notebook


def test_experiment_quick(tmp_path):
    from experiments import common

    res = run_experiment("straight_through", tmp_path / "run")
    for name in ("config.json", "results.json", "sbn_estimators.png", "training.png"):
        assert os.path.exists(tmp_path / "run" / name), name
    assert res["smoke"] and res["method"] == "straight_through"
    assert len(res["claims"]) == 7
    assert all(c["verdict"] in common.VERDICTS and c["n"] == 2 for c in res["claims"])
    with open(tmp_path / "run" / "arms" / "sbn_ulr" / "seed_0.json") as f:
        ulr = json.load(f)
    assert ulr["forward_evaluations"] == [2] and len(ulr["train_exact_loss"]) == 2
    with open(tmp_path / "run" / "arms" / "bin_st" / "seed_0.json") as f:
        arm = json.load(f)
    assert 0 <= arm["test_accuracy"] <= 1 and 0 <= arm["sampled_test_accuracy"] <= 1
    for key in ("test", "sampled_test"):  # per test example, this seed
        accuracy = ws.stats.unpack_correct(arm[f"{key}_correct"]).mean()
        assert abs(accuracy - arm[f"{key}_accuracy"]) < 1e-6
    with pytest.raises(ValueError, match="gumbel"):
        run_experiment("straight_through", tmp_path / "bad", sbn_estimators=["gumbel"])
    assert not os.path.exists(tmp_path / "bad")  # refused before any file write


def test_experiment_arms_change_one_thing_each():
    from experiments import straight_through as exp
    from experiments.configs.straight_through import get_config as exp_config

    parents = {arm: parent for arm, (parent, _) in exp.ARMS.items() if parent}
    for arm, parent in parents.items():
        a, b = exp.ARM_SPECS[arm], exp.ARM_SPECS[parent]
        changed = [k for k in a.keys() | b.keys() if a.get(k) != b.get(k)]
        assert len(changed) == 1, (arm, parent, changed)
    assert set(exp.ARM_SPECS) == set(parents) | {"act_st", "bin_st"}
    assert exp.ARM_SPECS["bin_st_uniform_clip"] == dict(
        activation="st", binary_weights=True, clip=1.0, weight_noise="uniform"
    )  # its parent's parent's fields too
    config = exp_config("quick")
    for arm in exp.TRAIN_ARMS:  # every arm builds (shapes only: no compile)
        model, tx = exp.build_arm(arm, config, 3)
        v = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.ones((1, 5)))
        jax.eval_shape(tx.init, v["params"])
        has_latent = "latent" in jax.tree.leaves(st.latent_labels(v["params"]))
        assert has_latent == arm.startswith("bin_"), arm


def test_notebook():
    run_notebook("straight_through")


def test_sampled_predictions_is_the_argmax_of_the_mean_softmax():
    model, params, x, _ = _toy(hidden=(4,), n=16, binary_weights=True)
    keys = jax.random.split(jax.random.PRNGKey(3), 5)
    probs = [
        jax.nn.softmax(model.apply({"params": params}, x, train=True, rngs={"dropout": k}))
        for k in keys
    ]
    want = np.argmax(np.mean(probs, 0), -1)
    np.testing.assert_array_equal(st.sampled_predictions(model.apply, params, x, keys), want)
    assert not all(np.array_equal(np.argmax(p, -1), want) for p in probs)  # passes differ
    det, det_params, _, _ = _toy(hidden=(4,), n=16, activation="deterministic")
    mode = np.argmax(det.apply({"params": det_params}, x), -1)  # no noise: every pass the same
    np.testing.assert_array_equal(st.sampled_predictions(det.apply, det_params, x, keys), mode)
