"""Weight-perturbation (evolution strategies) gradients: the baseline ULR must beat.

``g = 1/(N sigma) sum_n (L(theta + sigma eps_n) - b) eps_n`` with
``eps_n ~ N(0, I)`` over all parameters (OpenAI-ES with antithetic pairs;
Salimans, Ho, Chen, Sidor, Sutskever, 2017, arXiv 1703.03864).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from wspace.likelihood_ratio._copies import (
    check_options,
    forward_evaluations,
    reduce_copies,
    split_loss,
    validate,
    weights,
)
from wspace.likelihood_ratio._noise import _noise_key, num_pairs, pair_noise


@dataclasses.dataclass(frozen=True, eq=False)
class ES:
    """An evolution-strategies gradient estimator (build it with `es`; same options).

    ``g = 1/(N sigma) sum_n (L(theta + sigma eps_n) - b) eps_n``, ``eps_n ~ N(0, I)``.

    Attributes:
      num_copies: N, perturbed parameter vectors (forward evaluations per example).
      sigma: perturbation scale, finite and > 0.
      antithetic: pairs ``theta +- sigma eps`` (N even).
      baseline: ``none``, ``clean`` (one extra unperturbed pass: N + 1
        forward evaluations) or ``mean`` (leave-one-out over copies, or over
        pairs with ``antithetic``).

    Calling it, ``est(loss_fn, has_aux=True)(params, model_state, batch, key) ->
    ((loss, aux), grads)``: per-example losses are averaged; ``loss`` is the
    mean over copies (the clean loss with ``baseline="clean"``).

    Raises:
      ValueError: for an invalid option (before any work).

    Reference: Salimans, Ho, Chen, Sidor, Sutskever, 2017, arXiv 1703.03864.
    """

    num_copies: int = 16
    sigma: float = 0.01
    antithetic: bool = True
    baseline: str = "none"

    def __post_init__(self):
        validate(self.num_copies, self.sigma, "gaussian", self.antithetic, self.baseline)

    @property
    def forward_evaluations(self) -> int:
        """Forward evaluations per example of one gradient: N (+1 with a clean baseline)."""
        return forward_evaluations(num_copies=self.num_copies, baseline=self.baseline)

    def __call__(self, loss_fn: Callable, has_aux: bool = True) -> Callable:
        """``fn(params, model_state, batch, key) -> ((loss, aux), grads)``."""
        return functools.partial(_es_gradient, self, loss_fn, has_aux)


def es(**options: Any) -> ES:
    """An ES gradient estimator from keyword options: the fields of `ES`, with its defaults.

    ``est = es(num_copies=16, sigma=0.01)``, then
    ``est(loss_fn)(params, model_state, batch, key) -> ((loss, aux), grads)``.

    Args:
      **options: ``num_copies``, ``sigma``, ``antithetic``, ``baseline`` (see `ES`).

    Returns:
      An `ES` estimator.

    Raises:
      ValueError: for an unknown or invalid option (before any work).

    Reference: Salimans, Ho, Chen, Sidor, Sutskever, 2017, arXiv 1703.03864.
    """
    check_options(ES, options)
    return ES(**options)


def _es_gradient(cfg: ES, loss_fn, has_aux, params, model_state, batch, key):
    """The ES estimate (see `ES`): each pair's perturbation drawn once, ``-eps`` for its partner."""
    key_noise, key_loss = _noise_key(key), key
    leaves, treedef = jax.tree.flatten(params)
    n_pairs = num_pairs(cfg.num_copies, cfg.antithetic)

    def draw(pair):
        return [
            pair_noise(key_noise, i, pair, x.shape, num_pairs=n_pairs, dtype=x.dtype)
            for i, x in enumerate(leaves)
        ]

    eps = jax.vmap(draw)(jnp.arange(n_pairs))
    if cfg.antithetic:
        eps = [jnp.concatenate([e, -e]) for e in eps]
    eps = jax.tree.unflatten(treedef, eps)  # (N, ...) per leaf, copy-major

    def one(eps_n):
        p = jax.tree.map(lambda x, e: x + cfg.sigma * e, params, eps_n)
        loss, aux = split_loss(loss_fn(p, model_state, batch, key_loss), has_aux)
        return jnp.mean(loss), aux

    losses, aux = jax.vmap(one)(eps)  # the N models exist anyway
    clean_loss, clean_aux = None, None
    if cfg.baseline == "clean":
        clean_loss, clean_aux = split_loss(loss_fn(params, model_state, batch, key_loss), has_aux)
        clean_loss = jnp.mean(clean_loss)
    w = weights(losses, clean_loss, cfg) / (cfg.num_copies * cfg.sigma)
    grads = jax.tree.map(lambda e: jnp.tensordot(w, e, axes=1), eps)
    loss = jnp.mean(losses) if clean_loss is None else clean_loss
    aux = reduce_copies(aux) if clean_loss is None else clean_aux
    return ((loss, aux) if has_aux else loss), grads
