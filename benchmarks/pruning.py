r"""Masked train step (keep_masked last in the chain) vs the dense step of the same model.

  PYTHONPATH=. python benchmarks/pruning.py [--repeats=7] [--steps=50] [--imp_levels=10]

Baseline: `wspace.training.make_train_step` with ``optax.sgd(lr, momentum=0.9)``;
masked: the same chain followed by `wspace.pruning.keep_masked`, masks (80%
pruned) passed as ``tx_args`` every step (`wspace.lottery` keeps them in the
optimizer state instead, `wspace.pruning.set_masks`: the same step). Blocks of
``--steps`` steps alternate between the two, ``--repeats`` times; the table
shows median seconds per step and their ratio (target <= 1.05), and the ratio
of the fastest blocks (less sensitive to a busy machine). Then times a
10-level IMP run (rewind to init, LeNet-300-100 on mnist1d, the experiment's
default step count, no geometry).
"""

from __future__ import annotations

import time

import jax
import numpy as np
import optax
from absl import app, flags

import wspace as ws
from wspace import lottery, pruning

flags.DEFINE_integer("repeats", 7, "Alternating timing blocks per variant.")
flags.DEFINE_integer("steps", 50, "Steps per timing block.")
flags.DEFINE_integer("batch_size", 128, "Batch size.")
flags.DEFINE_integer("imp_levels", 10, "Levels of the timed IMP run (0: skip it).")
flags.DEFINE_integer("imp_steps", 1000, "Training steps per IMP level.")
FLAGS = flags.FLAGS


def _block(step, state, batch, tx_args, n):
    t0 = time.perf_counter()
    for _ in range(n):
        state, metrics = step(state, batch, tx_args)
    jax.block_until_ready((state, metrics))
    return state, (time.perf_counter() - t0) / n


def compare_steps(name, input_shape, num_classes=10):
    """Median seconds per step of the dense and the masked step; returns the ratio."""
    rng = np.random.default_rng(0)
    batch = {
        "x": rng.normal(size=(FLAGS.batch_size, *input_shape)).astype(np.float32),
        "y": rng.integers(0, num_classes, FLAGS.batch_size).astype(np.int32),
    }
    model = ws.models.lenet_300_100(num_classes)
    loss = ws.training.classification_loss(model.apply)
    key = jax.random.PRNGKey(0)
    base = optax.sgd(0.01, momentum=0.9)
    masked_tx = optax.chain(pruning.mask_gradients(), base, pruning.keep_masked())
    dense_state = ws.training.init_state(model, base, batch["x"][:1], key)
    masked_state = ws.training.init_state(model, masked_tx, batch["x"][:1], key)
    masks = pruning.magnitude_masks(masked_state.params, 0.8, layer_sparsity={"head": 0.2})
    masked_state = masked_state.replace(params=pruning.apply_masks(masked_state.params, masks))
    dense_step = ws.training.make_train_step(loss, base)
    masked_step = ws.training.make_train_step(loss, masked_tx)
    args = {"masks": masks}
    dense_state, _ = _block(dense_step, dense_state, batch, None, 3)  # compile + warm up
    masked_state, _ = _block(masked_step, masked_state, batch, args, 3)
    times = {"dense": [], "masked": []}
    for _ in range(FLAGS.repeats):
        dense_state, t = _block(dense_step, dense_state, batch, None, FLAGS.steps)
        times["dense"].append(t)
        masked_state, t = _block(masked_step, masked_state, batch, args, FLAGS.steps)
        times["masked"].append(t)
    zero = all(
        bool((np.asarray(p)[~np.asarray(m)] == 0).all())
        for p, m in zip(jax.tree.leaves(masked_state.params), jax.tree.leaves(masks), strict=True)
    )
    d, m = np.median(times["dense"]), np.median(times["masked"])
    best = np.min(times["masked"]) / np.min(times["dense"])
    n = optax.tree.size(dense_state.params)
    print(
        f"{name:26s} {n:>8d} {d * 1e3:10.3f} {m * 1e3:10.3f} {m / d:7.3f} {best:9.3f}"
        f"   pruned==0: {zero}"
    )
    return m / d


def time_imp(levels, steps):
    """Wall seconds of the dense run plus ``levels`` IMP levels (rewind to init)."""
    ds = ws.data.standardize(ws.data.load("mnist1d"))
    model = ws.models.lenet_300_100(ds.num_classes)
    tx = optax.chain(
        pruning.mask_gradients(),
        optax.sgd(optax.cosine_decay_schedule(0.05, steps), momentum=0.9),
        pruning.keep_masked(),
    )
    t0 = time.perf_counter()
    state = ws.training.init_state(model, tx, ds.x_train[:1], jax.random.PRNGKey(0))
    loss = ws.training.classification_loss(model.apply)
    train = lottery.Trainer(loss, tx, ds, apply_fn=model.apply, batch_size=128)
    dense = lottery.train_dense(state, train, num_steps=steps)
    t1 = time.perf_counter()
    out = lottery.run_arm("rewind", dense, train, levels=levels, layer_rates={"head": 0.1})
    t2 = time.perf_counter()
    last = out[-1].metrics
    print(
        f"IMP: dense {t1 - t0:.1f} s + {levels} levels {t2 - t1:.1f} s = {t2 - t0:.1f} s "
        f"({steps} steps/level); final density {last['density']:.3f}, "
        f"test acc {last['test_accuracy']:.3f} (dense {dense.metrics['test_accuracy']:.3f})"
    )
    return t2 - t0


def main(argv):
    del argv
    print(
        f"devices: {jax.devices()}; batch {FLAGS.batch_size}; median of {FLAGS.repeats} "
        f"blocks of {FLAGS.steps} steps"
    )
    head = ("model / input", "params", "dense ms", "masked ms", "ratio", "min-ratio")
    print(f"{head[0]:26s} {head[1]:>8s} {head[2]:>10s} {head[3]:>10s} {head[4]:>7s} {head[5]:>9s}")
    compare_steps("LeNet-300-100 / mnist1d", (40,))
    compare_steps("LeNet-300-100 / 28x28", (28, 28, 1))
    if FLAGS.imp_levels:
        time_imp(FLAGS.imp_levels, FLAGS.imp_steps)


if __name__ == "__main__":
    app.run(main)
