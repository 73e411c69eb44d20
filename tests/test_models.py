import jax
import jax.numpy as jnp
import pytest

import wspace as ws


def _init(model, shape):
    """Variable shapes only: `jax.eval_shape` traces without compiling (fast tests)."""
    return jax.eval_shape(
        lambda x: model.init(jax.random.PRNGKey(0), x, train=False), jnp.zeros(shape)
    )


def test_lenet_300_100_param_count():
    variables = _init(ws.models.lenet_300_100(), (1, 28, 28, 1))
    assert ws.training.num_params(variables["params"]) == 266_610


@pytest.mark.parametrize(
    "model, shape",
    [
        (ws.models.MLP(features=(32,)), (4, 40)),
        (ws.models.ConvNet(channels=(8, 8)), (4, 40)),  # mnist1d signals: 1-D convs
        (ws.models.ConvNet(channels=(8, 8)), (4, 28, 28, 1)),  # images: 2-D convs
        (ws.models.ResNet20(width=4), (2, 16, 16, 3)),
    ],
)
def test_output_shapes_and_batch_stats(model, shape):
    variables = _init(model, shape)
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    logits = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x)
    assert logits.shape == (shape[0], 10)
    assert "head" in variables["params"]
    if "batch_stats" in variables:
        _, new_state = jax.eval_shape(
            lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]), variables, x
        )
        assert jax.tree.structure(new_state["batch_stats"]) == jax.tree.structure(
            variables["batch_stats"]
        )


def test_create_by_name():
    assert isinstance(ws.models.create("convnet", 3), ws.models.ConvNet)
    with pytest.raises(ValueError, match="unknown model 'vgg'"):
        ws.models.create("vgg", 10)


def test_convnet_refuses_images_without_a_channel_axis():
    hint = r"shape \(4, 28, 28\).*add a channel axis.*\(4, 28, 28, 1\)"
    with pytest.raises(ValueError, match=hint):
        _init(ws.models.ConvNet(channels=(8,)), (4, 28, 28))
    grey = _init(ws.models.ConvNet(channels=(8,)), (4, 28, 28, 1))  # the fix the message names
    assert grey["params"]["Conv_0"]["kernel"].shape == (3, 3, 1, 8)  # 2-D convs, one channel
    signal = _init(ws.models.ConvNet(channels=(8,), spatial_dims=1), (4, 40, 3))
    assert signal["params"]["Conv_0"]["kernel"].shape == (3, 3, 8)  # 1-D convs, 3 channels
    mnist1d = _init(ws.models.ConvNet(channels=(8,)), (4, 40))
    assert mnist1d["params"]["Conv_0"]["kernel"].shape == (3, 1, 8)
    with pytest.raises(ValueError, match="spatial_dims must be None, 1 or 2, got 3"):
        _init(ws.models.ConvNet(channels=(8,), spatial_dims=3), (4, 40))
    with pytest.raises(ValueError, match=r"got input of shape \(4, 40\) with spatial_dims=2"):
        _init(ws.models.ConvNet(channels=(8,), spatial_dims=2), (4, 40))


def test_bfloat16_compute_keeps_float32_state_and_trains():
    """Mixed precision: bf16 activations, float32 params/optimizer state; the loss falls."""
    import numpy as np
    import optax

    model = ws.models.create("convnet", 3, dtype="bfloat16", channels=(8, 8))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 16)).astype(np.float32)
    y = (x[:, :3].argmax(1)).astype(np.int32)  # a learnable rule
    tx = optax.adam(1e-2)
    state = ws.training.init_state(model, tx, x[:1], jax.random.PRNGKey(0))
    logits = model.apply(state.variables, x, train=False)
    assert logits.dtype == jnp.float32
    step = ws.training.make_train_step(ws.training.classification_loss(model.apply), tx)
    losses = []
    for _ in range(15):
        state, metrics = step(state, {"x": x, "y": y})
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.7 * losses[0], losses
    for leaf in jax.tree.leaves((state.params, state.opt_state, state.model_state)):
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            assert leaf.dtype == jnp.float32, leaf.dtype
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        ws.models.create("mlp", 3, dtype="float8")
