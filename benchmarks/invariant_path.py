r"""Cost of one functionally-invariant-path step against one plain SGD step, side by side.

  PYTHONPATH=. python benchmarks/invariant_path.py [--hidden=256,256] [--batch=128]

Baseline: `ws.training.make_train_step` with ``optax.sgd`` (one forward + backward
on the batch). Path step: the same train step with
``optax.chain(invariant_path(..., cg_iters=k), optax.sgd)``, i.e. one forward +
backward plus a linearisation on the anchors and ``k`` CG iterations (one JVP and
one transposed JVP each); ``tol=0`` so every iteration runs. Also the penalty
formulation (Bhattacharyya to the anchor network on the anchors). All steps are
jitted, warmed up, and timed round-robin in one process; the table reports the
median time per step and the ratio to SGD.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import wspace as ws
from wspace import invariant_path as ip


def _state(params, tx):
    return ws.training.TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        model_state={},
        opt_state=tx.init(params),
        key=jax.random.PRNGKey(0),
    )


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", default="256,256")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--anchors", type=int, default=128)
    parser.add_argument("--cg_iters", default="1,5,10,20,50")
    parser.add_argument("--steps", type=int, default=20, help="steps per timing")
    parser.add_argument("--rounds", type=int, default=5, help="round-robin repeats")
    args = parser.parse_args()

    ds = ws.data.standardize(ws.data.load("mnist1d"))
    model = ws.models.MLP(features=tuple(int(h) for h in args.hidden.split(",")), num_classes=10)
    params = model.init(jax.random.PRNGKey(0), ds.x_train[:1])["params"]

    def f(p, x):
        return model.apply({"params": p}, x)

    ce = ws.training.classification_loss(model.apply)
    batch = {"x": jnp.asarray(ds.x_train[: args.batch]), "y": jnp.asarray(ds.y_train[: args.batch])}
    anchors = jnp.asarray(ds.x_train[-args.anchors :])
    arms = {"sgd": (ce, optax.sgd(0.01), None, batch)}
    for k in (int(c) for c in args.cg_iters.split(",")):
        tx = optax.chain(
            ip.invariant_path(f, damping=1e-3, cg_iters=k, max_norm=1.0), optax.sgd(0.01)
        )
        arms[f"path cg={k}"] = (ce, tx, {"anchors": anchors}, batch)
    arms["penalty"] = (
        ip.penalty_loss(ce, f, params),
        optax.sgd(0.01),
        None,
        {**batch, "anchors": anchors},
    )

    runners = {}
    for name, (loss, tx, tx_args, b) in arms.items():
        step = ws.training.make_train_step(loss, tx, donate=False)
        state = _state(params, tx)
        jax.block_until_ready(step(state, b, tx_args))  # compile + warm up
        runners[name] = (step, state, tx_args, b)

    times = {name: [] for name in runners}
    for _ in range(args.rounds):
        for name, (step, state, tx_args, b) in runners.items():
            t0 = time.perf_counter()
            s = state
            for _ in range(args.steps):
                s, _ = step(s, b, tx_args)
            jax.block_until_ready(s)
            times[name].append((time.perf_counter() - t0) / args.steps)

    print(
        f"MLP {args.hidden}, {ws.training.num_params(params)} params, batch {args.batch}, "
        f"{args.anchors} anchors, {jax.devices()[0].platform}; median of {args.rounds} "
        f"rounds x {args.steps} steps"
    )
    base = float(np.median(times["sgd"]))
    print(f"{'step':14s} {'ms/step':>9s} {'x SGD':>7s}")
    for name, ts in times.items():
        med = float(np.median(ts))
        print(f"{name:14s} {1e3 * med:9.3f} {med / base:7.2f}")


if __name__ == "__main__":
    main()
