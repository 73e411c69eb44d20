"""Speed of a stochastic-binary train step against the real-valued step of the same shape.

  PYTHONPATH=. python benchmarks/straight_through.py [--hidden=256,256] [--batch=128]

Baseline: `wspace.models.MLP` (ReLU, real weights) with Adam, through the same
`wspace.training.make_train_step`. Compared: `BinaryMLP` with stochastic binary
activations (principled ST, real weights), and with binary weights and
activations (mirror descent on the latents). All steps are compiled first,
then timed in interleaved rounds in one process; the table gives the median
time per step and the ratio to the baseline.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np
import optax

import wspace as ws
from wspace import straight_through as st


def _step_fn(model, tx, x, y):
    state = ws.training.init_state(model, tx, x[:1], jax.random.PRNGKey(0))
    step = ws.training.make_train_step(ws.training.classification_loss(model.apply), tx)
    batch = {"x": x, "y": y}
    state, m = step(state, batch)  # compile
    jax.block_until_ready(m["loss"])
    holder = {"state": state}

    def run(n):
        s = holder["state"]
        t = time.perf_counter()
        for _ in range(n):
            s, m = step(s, batch)
        jax.block_until_ready(m["loss"])
        holder["state"] = s
        return (time.perf_counter() - t) / n

    return run


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--hidden", default="256,256")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--inputs", type=int, default=40)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    hidden = tuple(int(h) for h in args.hidden.split(","))
    x = np.random.default_rng(0).normal(size=(args.batch, args.inputs)).astype(np.float32)
    y = (np.arange(args.batch) % 10).astype(np.int32)
    adam = optax.adam(1e-3)
    binw_tx = optax.multi_transform(
        {"latent": st.mirror_descent(100.0), "real": adam}, st.latent_labels
    )
    arms = {
        "real MLP (ReLU), baseline": _step_fn(ws.models.MLP(hidden, 10), adam, x, y),
        "binary activations (st)": _step_fn(st.BinaryMLP(hidden, 10), adam, x, y),
        "binary weights + activations (md)": _step_fn(
            st.BinaryMLP(hidden, 10, binary_weights=True), binw_tx, x, y
        ),
        "deterministic sign + STE": _step_fn(
            st.BinaryMLP(hidden, 10, activation="deterministic"), adam, x, y
        ),
    }
    times = {k: [] for k in arms}
    for _ in range(args.rounds):
        for k, run in arms.items():
            times[k].append(run(args.steps))
    base = np.median(times["real MLP (ReLU), baseline"])
    print(
        f"MLP {args.inputs}-{'-'.join(map(str, hidden))}-10, batch {args.batch}, "
        f"{jax.devices()[0].platform}, median of {args.rounds} rounds x {args.steps} steps"
    )
    print(f"{'step':36s} {'ms/step':>9s} {'ratio':>7s}")
    for k, v in times.items():
        med = np.median(v)
        print(f"{k:36s} {1e3 * med:9.3f} {med / base:7.2f}")


if __name__ == "__main__":
    main()
