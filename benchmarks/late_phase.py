r"""Speed of a late-phase step (K members under vmap) against the plain step and naive ensembles.

  python -m benchmarks.late_phase [--model=convnet] [--members=10] [--batch_size=100]

Side by side in one process, same model, same global batch B:
  plain      one train step of the plain model on B examples (the baseline);
  late       the late-phase step: K members (BatchNorm affine + head) under
             jax.vmap, member k on slice k (B/K examples), shared weights once;
  naive-vmap K full copies of the model under vmap (every weight a member);
  naive-loop K separate full models, K compiled plain steps on B/K examples each.
Prints ms/step (median of interleaved rounds) and the ratios to the plain step.
Target from the issue: late / plain <= 1.15.
"""

from __future__ import annotations

import statistics
import time

import jax
import numpy as np
import optax
from absl import app, flags

import wspace as ws

flags.DEFINE_string("model", "convnet", "Model name (ws.models.MODELS).")
flags.DEFINE_integer("members", 10, "K.")
flags.DEFINE_integer("batch_size", 100, "Global batch size (divisible by K).")
flags.DEFINE_integer("steps", 20, "Steps per timing round.")
flags.DEFINE_integer("rounds", 7, "Interleaved timing rounds.")
FLAGS = flags.FLAGS


def _timer(step, state, batch, steps):
    """Returns run() -> seconds per step; keeps the state threading through the donated steps."""
    holder = {"state": state}

    def run():
        s = holder["state"]
        s, m = step(s, batch)  # warm / sync
        jax.block_until_ready(m)
        t = time.perf_counter()
        for _ in range(steps):
            s, m = step(s, batch)
        jax.block_until_ready((s, m))
        holder["state"] = s
        return (time.perf_counter() - t) / steps

    return run


def main(argv):
    del argv
    k, bsz = FLAGS.members, FLAGS.batch_size
    ds = ws.data.standardize(ws.data.load("mnist1d"))
    model = ws.models.create(FLAGS.model, ds.num_classes)
    tx = optax.sgd(0.05, momentum=0.9)
    loss = ws.training.classification_loss(model.apply)
    batch = {"x": ds.x_train[:bsz], "y": ds.y_train[:bsz]}
    small = {"x": ds.x_train[: bsz // k], "y": ds.y_train[: bsz // k]}
    state = ws.training.init_state(model, tx, batch["x"][:1], jax.random.PRNGKey(0))
    copy = lambda s: jax.tree.map(lambda x: x.copy(), s)

    plain = ws.training.make_train_step(loss, tx)
    late = ws.training.make_train_step(ws.late_phase.late_phase_loss(loss, k, "bn_head"), tx)
    everything = ws.late_phase.selection(lambda path: True)
    naive_v = ws.training.make_train_step(ws.late_phase.late_phase_loss(loss, k, everything), tx)
    late_state = ws.late_phase.expand_state(copy(state), tx, "bn_head", k)
    naive_state = ws.late_phase.expand_state(copy(state), tx, everything, k)
    loop_states = [copy(state) for _ in range(k)]

    def naive_loop(states, b):
        out, m = [], None
        for s in states:
            s, m = plain(s, b)
            out.append(s)
        return out, m

    runs = {
        "plain": _timer(plain, copy(state), batch, FLAGS.steps),
        "late": _timer(late, late_state, batch, FLAGS.steps),
        "naive-vmap": _timer(naive_v, naive_state, batch, FLAGS.steps),
        "naive-loop": _timer(naive_loop, loop_states, small, FLAGS.steps),
    }
    times = {name: [] for name in runs}
    for _ in range(FLAGS.rounds):
        for name, run in runs.items():
            times[name].append(run())
    med = {name: statistics.median(v) for name, v in times.items()}
    print(f"{FLAGS.model} on mnist1d, batch {bsz}, K={k}, backend {jax.default_backend()}, "
          f"{FLAGS.rounds} rounds x {FLAGS.steps} steps (median)")
    print(f"{'step':<12}{'ms/step':>10}{'vs plain':>10}")
    for name in runs:
        print(f"{name:<12}{1e3 * med[name]:>10.2f}{med[name] / med['plain']:>10.2f}")
    print(f"late / plain = {med['late'] / med['plain']:.3f} (target <= 1.15); "
          f"naive-vmap / late = {med['naive-vmap'] / med['late']:.2f}; "
          f"naive-loop / late = {med['naive-loop'] / med['late']:.2f}")
    spread = {n: (min(v) * 1e3, max(v) * 1e3) for n, v in times.items()}
    print("min/max ms per round:", {n: tuple(np.round(s, 2)) for n, s in spread.items()})


if __name__ == "__main__":
    app.run(main)
