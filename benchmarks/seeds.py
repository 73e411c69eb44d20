r"""Seeds as an axis: S seeds trained serially against S seeds as one program.

  python -m benchmarks.seeds [--seeds=1,8,32] [--models=mlp,convnet,resnet20]
  python -m benchmarks.seeds --models=resnet20 --batch_size=512 --dtype=bfloat16  # a GPU

Side by side in one process, wall time including compilation (what a user waits for):
  serial  S calls of `ws.training.fit`, one per seed, with one compiled step (the step
          cache makes the rebuilt step free; before it, every seed also compiled);
  vmap    one `fit` of S seeds as one program (`init_states`, `seed_axis=True`, fused
          steps between evaluations), the step vmapped over the seeds;
  map     the same program, the step covering the seeds by `lax.map` (`seed_loop="map"`);
  unroll  the same program, S copies of the one-seed step in it (`seed_loop="unroll"`).
Problems: the MLP on digits (the issue's command), the ConvNet on mnist1d, ResNet-20 on
random 32x32x3 inputs. The persistent compilation cache is off here, so every row pays its
compilation; the baseline of each ratio is the serial run with the same S. Prints seconds
and each seed loop's ratio to serial.
"""

from __future__ import annotations

import time

import jax
import numpy as np
import optax
from absl import app, flags

import wspace as ws

flags.DEFINE_list("seeds", ["1", "8", "32"], "Seed counts S.")
flags.DEFINE_list("models", ["mlp", "convnet", "resnet20"], "Problems (see the docstring).")
flags.DEFINE_integer("batch_size", 0, "Batch size (0: each problem's own).")
flags.DEFINE_integer("steps", 0, "Training steps, evaluated at the end (0: each problem's own).")
flags.DEFINE_string("dtype", "float32", "Computation dtype (float32 | bfloat16).")
flags.DEFINE_bool("serial", True, "Also time the serial baseline.")
flags.DEFINE_list("seed_loops", list(ws.training.SEED_LOOPS), "Seed loops of the one program.")
FLAGS = flags.FLAGS

# model -> (dataset, steps, eval_every, batch size, training examples evaluated)
PROBLEMS = {
    "mlp": ("digits", 300, 100, 32, 1000),
    "convnet": ("mnist1d", 200, 100, 64, 1000),
    # few steps, test set only: on CPU a step of 8 vmapped ResNet-20 seeds took 5.9 s
    "resnet20": ("random32", 6, 6, 32, 0),
}


def _dataset(name: str) -> ws.data.Dataset:
    if name != "random32":
        return ws.data.standardize(ws.data.load(name))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2048, 32, 32, 3)).astype(np.float32)
    y = rng.integers(0, 10, 2048).astype(np.int32)
    return ws.data.Dataset(name, x[:1792], y[:1792], x[1792:], y[1792:], num_classes=10)


def _time(fn) -> float:
    t = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - t


def run_problem(model_name: str, seeds: list[int]) -> dict[str, dict[int, float]]:
    """Seconds for each S: ``{"serial": {S: s}, <seed loop>: {S: s}, ...}``."""
    data_name, steps, eval_every, batch, train_eval = PROBLEMS[model_name]
    batch = FLAGS.batch_size or batch
    steps, eval_every = (FLAGS.steps, FLAGS.steps) if FLAGS.steps else (steps, eval_every)
    ds = _dataset(data_name)
    model = ws.models.create(model_name, ds.num_classes, dtype=FLAGS.dtype)
    tx = optax.sgd(optax.cosine_decay_schedule(0.05, steps), momentum=0.9)
    loss_fn = ws.training.classification_loss(model.apply)
    kw = dict(apply_fn=model.apply, num_steps=steps, batch_size=batch, eval_every=eval_every,
              train_eval_examples=train_eval, progress=False)  # fmt: skip
    out: dict[str, dict[int, float]] = {k: {} for k in ("serial", *FLAGS.seed_loops)}
    for s in seeds:

        def axis(s, seed_loop):
            state = ws.training.init_states(model, tx, ds.x_train[:1], list(range(s)))
            step = ws.training.make_train_step(loss_fn, tx, seed_axis=True, seed_loop=seed_loop)
            return ws.training.fit(state, step, ds, seed=list(range(s)), **kw)[0].params

        for seed_loop in FLAGS.seed_loops:
            jax.clear_caches()  # every row pays its compilation, as a fresh process would
            out[seed_loop][s] = _time(lambda s=s, loop=seed_loop: axis(s, loop))
        if not FLAGS.serial:
            continue
        jax.clear_caches()

        def serial(s=s):
            finals = []
            for seed in range(s):
                key = jax.random.PRNGKey(seed)
                state = ws.training.init_state(model, tx, ds.x_train[:1], key)
                step = ws.training.make_train_step(loss_fn, tx)
                finals.append(ws.training.fit(state, step, ds, seed=seed, **kw)[0].params)
            return finals

        out["serial"][s] = _time(serial)
    return out


def main(argv):
    del argv
    seeds = [int(s) for s in FLAGS.seeds]
    print(f"backend {jax.default_backend()}, {jax.device_count()} device(s), dtype {FLAGS.dtype}")
    loops = FLAGS.seed_loops
    columns = ["problem", "S", "serial (s)", *(f"{k} (s)" for k in loops)]
    columns += [f"{k} / serial" for k in loops]
    print("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    for name in FLAGS.models:
        times = run_problem(name, seeds)
        for s in seeds:
            ser, *rest = (times[k].get(s) for k in ("serial", *loops))
            cells = [f"{t:.1f}" if t else "–" for t in (ser, *rest)]
            cells += [f"{t / ser:.2f}" if t and ser else "–" for t in rest]
            print(f"| {name} ({PROBLEMS[name][0]}) | {s} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    app.run(main)
