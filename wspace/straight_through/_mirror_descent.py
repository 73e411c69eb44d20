"""The optimizer side of Bernoulli weights: mirror descent on their latents.

`mirror_descent` (``optax.sgd`` on the latents, plus `clip_latents` for the
clipped-latent variant) and `latent_labels` for ``optax.multi_transform``.

Reference: Shekhovtsov & Yanush 2021, arXiv 2006.06880, Sec. 4.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from wspace import paths, training
from wspace.straight_through._layers import LATENT

PyTree = Any


def latent_labels(params: PyTree) -> PyTree:
    """Labels each leaf ``"latent"`` (a binary layer's latent weights) or ``"real"``.

    For ``optax.multi_transform({"latent": mirror_descent(...), "real": ...}, latent_labels)``.
    """

    def label(name: str, _) -> str:
        return "latent" if name.split("/")[-1] == LATENT else "real"

    return paths.label_tree(params, label)


def clip_latents(bound: float) -> optax.GradientTransformationExtraArgs:
    """Projects the next latent weights into ``[-bound, bound]``: ``u <- clip(p + u) - p``.

    The projection step of clipped-latent mirror descent (BinaryConnect's
    clipping); put it last in a chain. Needs ``params`` in ``update``.

    Args:
      bound: ``c > 0``; the new latents are ``clip(params + updates, -c, c)``.

    Returns:
      An optax ``GradientTransformationExtraArgs``.

    Reference: Courbariaux et al. 2015, arXiv 1511.00363; Shekhovtsov & Yanush
    2021, arXiv 2006.06880, Sec. 4 (the clipping as a mirror-descent projection).
    """

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        if params is None:
            raise ValueError("clip_latents (mirror_descent(clip=...)) needs params in update()")
        new = jax.tree.map(lambda u, p: jnp.clip(p + u, -bound, bound) - p, updates, params)
        return new, state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def mirror_descent(
    learning_rate: float | Callable, *, clip: float | None = None
) -> optax.GradientTransformation:
    """Mirror descent on Bernoulli weight probabilities, as a step on the latent weights.

    With ``mu = E[w] = 2F(eta) - 1`` and the mirror map ``grad Phi(mu) =
    F^{-1}((mu + 1)/2) = eta``, mirror descent is ``eta <- eta - lr * g`` with
    ``g`` the (ST) gradient with respect to ``mu``, which is what the
    ``identity`` weight estimator delivers as the gradient of ``eta``
    (`bernoulli_weights`). So without ``clip`` this *is* ``optax.sgd(lr)``
    applied to the latents (and returns it). For logistic noise it is the
    exponentiated-gradient update of ``P(w = +1)``. ``clip=c`` chains
    `clip_latents`: ``eta <- clip(eta - lr g, -c, c)``; with uniform noise on
    [-1, 1] and ``c = 1`` the mirror map is the identity on [-1, 1] and this is
    projected gradient descent on ``mu`` (the latent clipping of BinaryConnect).

    Args:
      learning_rate: a number or an optax schedule ``count -> lr``.
      clip: optional bound on ``|eta|`` (then ``update`` needs ``params``).

    Returns:
      ``optax.sgd(learning_rate)``, or that chained with ``clip_latents(clip)``.

    Reference: Shekhovtsov & Yanush 2021, arXiv 2006.06880, Sec. 4.
    """
    training.check_learning_rate(learning_rate)
    if clip is None:
        return optax.sgd(learning_rate)
    return optax.chain(optax.sgd(learning_rate), clip_latents(clip))
