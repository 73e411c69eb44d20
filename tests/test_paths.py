"""wspace.paths: leaf names, label/selection trees and prefix lookup."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
import pytest

from wspace import paths


class _Pair(NamedTuple):
    first: jax.Array
    second: list


def _params():
    return {
        "Dense_0": {"kernel": jnp.ones((3, 4)), "bias": jnp.zeros(4)},
        "Dense_10": {"kernel": jnp.ones((4, 4))},
        "head": {"kernel": jnp.ones((4, 2)), "bias": jnp.zeros(2)},
    }


def test_names_of_dict_attribute_and_sequence_keys():
    tree = {"a": _Pair(jnp.ones(1), [jnp.ones(2), jnp.ones(3)])}
    names, leaves, treedef = paths.named_leaves(tree)
    assert names == ["a/first", "a/second/0", "a/second/1"]
    assert [x.shape for x in leaves] == [(1,), (2,), (3,)]
    assert jax.tree.unflatten(treedef, leaves)["a"].second[1].shape == (3,)
    keypath = jax.tree_util.tree_flatten_with_path(tree)[0][1][0]
    assert paths.path_names(keypath) == ("a", "second", "0")
    assert paths.path_name(keypath) == "a/second/0"


def test_leaves_by_name_looks_leaves_up_across_layouts():
    params = _params()
    by_name = paths.leaves_by_name(params)
    assert list(by_name) == paths.named_leaves(params)[0]
    assert by_name["Dense_10/kernel"] is params["Dense_10"]["kernel"]
    # a tree with an extra leaf (an expanded layout) looks the shared leaves up by name
    grown = {**params, "head": {**params["head"], "kernel_rank1_in": jnp.ones((2, 4))}}
    kept = paths.label_tree(grown, lambda n, x: by_name.get(n, jnp.zeros_like(x)))
    assert kept["Dense_0"]["kernel"] is params["Dense_0"]["kernel"]
    assert float(jnp.sum(kept["head"]["kernel_rank1_in"])) == 0.0
    assert paths.leaves_by_name({}) == {}


def test_label_tree_and_select_have_the_params_structure():
    params = _params()
    labels = paths.label_tree(params, lambda n, x: "head" if n.startswith("head/") else "body")
    assert labels["head"]["bias"] == "head" and labels["Dense_0"]["kernel"] == "body"
    chosen = paths.select(params, lambda n, x: x.ndim >= 2)
    assert jax.tree.structure(chosen) == jax.tree.structure(params)
    assert chosen["Dense_0"] == {"kernel": True, "bias": False}
    # the label tree drives optax directly: only the chosen leaves move
    tx = optax.masked(optax.sgd(1.0), chosen)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    assert float(jnp.sum(updates["Dense_0"]["kernel"])) == -12.0  # chosen: an SGD step
    assert float(jnp.sum(updates["head"]["bias"])) == 2.0  # not chosen: passed through


def test_by_prefix_takes_the_longest_whole_component_match():
    mapping = {"Dense_1": 0.5, "head": 0.1, "head/kernel": 0.2}
    assert paths.by_prefix(mapping, "head/bias") == 0.1
    assert paths.by_prefix(mapping, "head/kernel") == 0.2
    assert paths.by_prefix(mapping, "Dense_1/kernel") == 0.5
    assert paths.by_prefix(mapping, "Dense_10/kernel") is None  # not a component prefix
    assert paths.by_prefix(mapping, "Dense_10/kernel", default=0.3) == 0.3
    assert paths.by_prefix({}, "head") is None


@pytest.mark.parametrize("bad", [None, "head"])
def test_label_tree_and_select_need_a_callable(bad):
    with pytest.raises(ValueError, match="callable.*" + repr(bad)):
        paths.label_tree(_params(), bad)
    with pytest.raises(ValueError, match="callable.*" + repr(bad)):
        paths.select(_params(), bad)
