r"""Speed of a late-phase step against the plain step and naive ensembles.

  python -m benchmarks.late_phase [--model=convnet] [--members=10] [--batch_size=100]

Side by side in one process, same model, same global batch B:
  plain      one train step of the plain model on B examples (the baseline);
  late       the paper's late-phase step (schedule "cycle"): member t mod K (BatchNorm
             affine + head) takes the whole batch; only its rows and optimizer state move;
  parallel   the "parallel" schedule: K members under jax.vmap, member k on slice k
             (B/K examples), shared weights once;
  naive-vmap K full copies of the model under vmap (every weight a member);
  naive-loop K separate full models, K compiled plain steps on B/K examples each.
Prints ms/step and the ratios to the plain step: wall-clock median and minimum over
interleaved rounds, and process CPU time (all threads) median -- on a shared, busy machine
the minimum and the CPU time are the steadier estimates. Target from the issue:
late / plain <= 1.15.
"""

from __future__ import annotations

import statistics
import time

import jax
import optax
from absl import app, flags

import wspace as ws

flags.DEFINE_string("model", "convnet", "Model name (ws.models.MODELS).")
flags.DEFINE_integer("members", 10, "K.")
flags.DEFINE_integer("batch_size", 100, "Global batch size (divisible by K).")
flags.DEFINE_integer("steps", 10, "Steps per timing round.")
flags.DEFINE_integer("rounds", 15, "Interleaved timing rounds.")
FLAGS = flags.FLAGS


def _timer(step, state, batch, steps):
    """Returns run() -> (wall, cpu) seconds per step; threads the state through donated steps."""
    holder = {"state": state}

    def run():
        s = holder["state"]
        s, m = step(s, batch)  # warm / sync
        jax.block_until_ready(m)
        t, c = time.perf_counter(), time.process_time()
        for _ in range(steps):
            s, m = step(s, batch)
        jax.block_until_ready((s, m))
        holder["state"] = s
        return (time.perf_counter() - t) / steps, (time.process_time() - c) / steps

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
    cycle = ws.late_phase.LatePhase(k, "bn_head")
    parallel = ws.late_phase.LatePhase(k, "bn_head", schedule="parallel")
    naive = ws.late_phase.LatePhase(k, lambda path: True, schedule="parallel")
    late = cycle.make_train_step(loss, tx)
    par = parallel.make_train_step(loss, tx)
    naive_v = naive.make_train_step(loss, tx)
    late_state = cycle.expand_state(copy(state), tx)
    par_state = parallel.expand_state(copy(state), tx)
    naive_state = naive.expand_state(copy(state), tx)
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
        "parallel": _timer(par, par_state, batch, FLAGS.steps),
        "naive-vmap": _timer(naive_v, naive_state, batch, FLAGS.steps),
        "naive-loop": _timer(naive_loop, loop_states, small, FLAGS.steps),
    }
    times = {name: [] for name in runs}
    for _ in range(FLAGS.rounds):
        for name, run in runs.items():
            times[name].append(run())
    wall_med = {n: statistics.median(w for w, _ in v) for n, v in times.items()}
    wall_min = {n: min(w for w, _ in v) for n, v in times.items()}
    cpu_med = {n: statistics.median(c for _, c in v) for n, v in times.items()}
    print(
        f"{FLAGS.model} on mnist1d, batch {bsz}, K={k}, backend {jax.default_backend()}, "
        f"{FLAGS.rounds} rounds x {FLAGS.steps} steps"
    )
    print(
        f"{'step':<12}{'wall med':>10}{'ratio':>7}{'wall min':>10}{'ratio':>7}"
        f"{'cpu med':>10}{'ratio':>7}   (ms/step)"
    )
    for n in runs:
        print(
            f"{n:<12}{1e3 * wall_med[n]:>10.2f}{wall_med[n] / wall_med['plain']:>7.2f}"
            f"{1e3 * wall_min[n]:>10.2f}{wall_min[n] / wall_min['plain']:>7.2f}"
            f"{1e3 * cpu_med[n]:>10.2f}{cpu_med[n] / cpu_med['plain']:>7.2f}"
        )
    for label, t in (("wall median", wall_med), ("wall min", wall_min), ("cpu median", cpu_med)):
        print(
            f"{label}: late / plain = {t['late'] / t['plain']:.3f} (target <= 1.15); "
            f"parallel / plain = {t['parallel'] / t['plain']:.3f}; "
            f"naive-vmap / late = {t['naive-vmap'] / t['late']:.2f}; "
            f"naive-loop / late = {t['naive-loop'] / t['late']:.2f}"
        )


if __name__ == "__main__":
    app.run(main)
