r"""Cost of one functionally-invariant-path step against one plain SGD step, side by side.

  PYTHONPATH=. python benchmarks/invariant_path.py [--hidden=256,256] [--batch=128]

Baseline: `ws.training.make_train_step` with ``optax.sgd`` (one forward + backward
on the batch). Path step: the same train step with
``invariant_path(lr, f, tol=0, maxiter=k)`` (metric step, then the learning rate),
i.e. one forward + backward plus a linearisation on the anchors and ``k`` CG
iterations (one JVP and one transposed JVP each); ``tol=0`` so every iteration runs.
Also the penalty formulation (Bhattacharyya to the anchor network on the anchors).
All steps are jitted, warmed up, and timed round-robin in one process; the table reports the
median time per step and the ratio to SGD.

  PYTHONPATH=. python benchmarks/invariant_path.py --residuals [--dataset=digits]

measures instead how well the linear solve converges (how the defaults of
`scale_by_invariant_metric` were chosen): an MLP is fitted to classes 0-4 (600 Adam
steps), then ``(g + lambda I) d = b`` is solved with ``jax.scipy.sparse.linalg.cg``
(``tol=0``, fixed iterations) for the experiment's two problems: continual (``b`` =
gradient of a class 5-9 batch, 100 anchors from classes 0-4) and sparsity (``b`` =
gradient of the distance to the 80%-sparse projection, 128 training anchors). Each cell
is ``true relative residual / metric movement of the unit step relative to the unit
gradient's`` (``sqrt(d^T g d) / |d|`` over ``sqrt(b^T g b) / |b|``: how invariant the step is).
"""

from __future__ import annotations

import argparse
import itertools
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


def residuals(dataset: str, hidden: tuple[int, ...]) -> None:
    """Prints the residual / invariance table of the docstring."""
    ds = ws.data.standardize(ws.data.load(dataset))
    model = ws.models.MLP(features=hidden, num_classes=10)

    def f(p, x):
        return model.apply({"params": p}, x)

    old = ds.y_train < 5
    x1, y1 = jnp.asarray(ds.x_train[old]), jnp.asarray(ds.y_train[old])
    params = model.init(jax.random.PRNGKey(0), x1[:1])["params"]
    ce = ws.training.classification_loss(model.apply)
    step = ws.training.make_train_step(ce, optax.adam(1e-3), donate=False)
    state = _state(params, optax.adam(1e-3))
    for b in itertools.islice(ws.data.batches(x1, y1, 64, seed=0, epochs=None), 600):
        state, _ = step(state, b)
    params = state.params
    rng = np.random.default_rng(0)
    new = {"x": jnp.asarray(ds.x_train[~old][:64]), "y": jnp.asarray(ds.y_train[~old][:64])}
    problems = {
        "continual": (
            jnp.asarray(x1[rng.choice(len(x1), 100, replace=False)]),
            jax.grad(lambda q: ce(q, {}, new, None)[0])(params),
        ),
        "sparsity": (
            jnp.asarray(ds.x_train[:128]),
            jax.grad(lambda q: ip.projection_distance(q, 0.8))(params),
        ),
    }
    iters = (10, 30, 100, 300)
    print(f"{dataset}, MLP {hidden}, {optax.tree.size(params)} params; residual / movement")
    for problem, (anchors, b) in problems.items():
        for metric in ip.METRICS:
            gv = ip.metric_matvec(f, params, anchors, metric=metric)

            @jax.jit
            def solve(lam, maxiter, gv=gv, b=b):
                def a(u):
                    return jax.tree.map(lambda x, y: x + lam * y, gv(u), u)

                d, _ = jax.scipy.sparse.linalg.cg(a, b, tol=0.0, maxiter=maxiter)
                r = jax.tree.map(jnp.subtract, b, a(d))
                res = optax.tree.norm(r) / optax.tree.norm(b)
                move = jnp.sqrt(optax.tree.vdot(d, gv(d))) / optax.tree.norm(d)
                return res, move / (jnp.sqrt(optax.tree.vdot(b, gv(b))) / optax.tree.norm(b))

            v = jax.tree.map(jnp.ones_like, b)
            for _ in range(50):  # power iteration for the largest eigenvalue
                w = gv(v)
                top = optax.tree.norm(w)
                v = jax.tree.map(lambda x, top=top: x / top, w)
            print(f"{problem} {metric} (largest eigenvalue {float(top):.3g})")
            print("  lambda  " + "  ".join(f"{k:>5d} iterations" for k in iters))
            for lam in (1e-4, 1e-3, 1e-2, 1e-1, 1.0):
                cells = [solve(lam, k) for k in iters]
                row = "  ".join(f"{float(r):7.3f} / {float(m):5.3f}" for r, m in cells)
                print(f"  {lam:6g}  {row}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--residuals", action="store_true", help="solve accuracy, not speed")
    parser.add_argument("--dataset", default="digits", help="--residuals: the dataset")
    parser.add_argument("--hidden", default="256,256")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--anchors", type=int, default=128)
    parser.add_argument("--cg_iters", default="1,5,10,20,50")
    parser.add_argument("--steps", type=int, default=20, help="steps per timing")
    parser.add_argument("--rounds", type=int, default=5, help="round-robin repeats")
    args = parser.parse_args()
    if args.residuals:
        return residuals(args.dataset, tuple(int(h) for h in args.hidden.split(",")))

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
        tx = ip.invariant_path(0.01, f, tol=0.0, maxiter=k, max_norm=1.0, warn=False)
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
        f"MLP {args.hidden}, {optax.tree.size(params)} params, batch {args.batch}, "
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
