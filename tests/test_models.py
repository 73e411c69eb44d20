import jax
import jax.numpy as jnp
import pytest

import wspace as ws


def _init(model, shape):
    return model.init(jax.random.PRNGKey(0), jnp.zeros(shape), train=False)


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
    logits = model.apply(variables, jnp.ones(shape), train=False)
    assert logits.shape == (shape[0], 10)
    assert "head" in variables["params"]
    if "batch_stats" in variables:
        _, new_state = model.apply(variables, jnp.ones(shape), train=True, mutable=["batch_stats"])
        assert jax.tree.structure(new_state["batch_stats"]) == jax.tree.structure(
            variables["batch_stats"]
        )


def test_create_by_name():
    assert isinstance(ws.models.create("convnet", 3), ws.models.ConvNet)
    with pytest.raises(ValueError, match="unknown model 'vgg'"):
        ws.models.create("vgg", 10)
