"""Train-step speed of wspace (JAX, jit) against an equivalent PyTorch CPU loop.

  python -m benchmarks.train_step [--steps=200] [--batch_size=128] [--repeats=5]

Same shapes, batch, optimizer (SGD, momentum 0.9) and loss for both. The
models: LeNet-300-100 on 28x28 inputs and the BatchNorm ConvNet on
mnist1d-shaped (40-long) signals. Timings alternate JAX and PyTorch blocks in
one process and report the median of the repeats, since this machine is
noisy; ``ratio`` = wspace steps/s / PyTorch steps/s (> 1: wspace is faster).
Also prints the compile time of wspace's first step. Needs ``torch`` (the
``bench`` extra), never a dependency of the library.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

import wspace as ws

flags.DEFINE_integer("steps", 200, "Steps per timed block.")
flags.DEFINE_integer("batch_size", 128, "Batch size.")
flags.DEFINE_integer("repeats", 5, "Timed blocks per framework (median reported).")
FLAGS = flags.FLAGS


def _jax_runner(model, x, y, lr=0.05):
    tx = optax.sgd(lr, momentum=0.9)
    state = ws.training.init_state(model, tx, x[:1], jax.random.PRNGKey(0))
    step = ws.training.make_train_step(ws.training.classification_loss(model.apply), tx)
    batch = {"x": jnp.asarray(x), "y": jnp.asarray(y)}
    t0 = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t0

    def run(n):
        nonlocal state
        for _ in range(n):
            state, metrics = step(state, batch)
        jax.block_until_ready(metrics)

    return run, compile_s


def _torch_models():
    import torch
    from torch import nn

    def lenet():
        return nn.Sequential(
            nn.Flatten(),
            nn.Linear(784, 300),
            nn.ReLU(),
            nn.Linear(300, 100),
            nn.ReLU(),
            nn.Linear(100, 10),
        )

    def convnet(channels=(32, 64, 64)):
        layers, c_in = [], 1
        for c in channels:
            layers += [
                nn.Conv1d(c_in, c, 3, padding=1, bias=False),
                nn.BatchNorm1d(c),
                nn.ReLU(),
                nn.MaxPool1d(2),
            ]
            c_in = c
        return nn.Sequential(*layers, nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(c_in, 10))

    return torch, lenet, convnet


def _torch_runner(torch, model, x, y, lr=0.05):
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    xb, yb = torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))
    loss_fn = torch.nn.CrossEntropyLoss()

    def run(n):
        for _ in range(n):
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(xb), yb)
            loss.backward()
            opt.step()
        float(loss)

    run(3)  # warm-up
    return run


def _median_rate(run, steps, repeats_log):
    t0 = time.perf_counter()
    run(steps)
    repeats_log.append(steps / (time.perf_counter() - t0))


def main(argv):
    del argv
    torch, torch_lenet, torch_convnet = _torch_models()
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    b = FLAGS.batch_size
    y = rng.integers(0, 10, b).astype(np.int32)
    cases = {
        "LeNet-300-100 (28x28)": (
            ws.models.lenet_300_100(),
            torch_lenet(),
            rng.normal(size=(b, 28, 28, 1)).astype(np.float32),
        ),
        "ConvNet+BN (mnist1d, 40)": (
            ws.models.ConvNet(),
            torch_convnet(),
            rng.normal(size=(b, 40)).astype(np.float32),
        ),
    }
    print(
        f"jax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__} "
        f"({torch.get_num_threads()} threads); batch {b}, {FLAGS.steps} steps x "
        f"{FLAGS.repeats} repeats, median"
    )
    print(
        f"{'model':28s} {'wspace steps/s':>15s} {'torch steps/s':>14s} {'ratio':>6s} "
        f"{'compile s':>10s}"
    )
    for name, (flax_model, torch_model, x) in cases.items():
        jax_run, compile_s = _jax_runner(flax_model, x, y)
        jax_run(3)
        x_torch = x.reshape(b, 1, 40) if x.ndim == 2 else x.reshape(b, -1)
        torch_run = _torch_runner(torch, torch_model, x_torch, y)
        jax_rates, torch_rates = [], []
        for _ in range(FLAGS.repeats):
            _median_rate(jax_run, FLAGS.steps, jax_rates)
            _median_rate(torch_run, FLAGS.steps, torch_rates)
        j, t = statistics.median(jax_rates), statistics.median(torch_rates)
        print(f"{name:28s} {j:15.1f} {t:14.1f} {j / t:6.2f} {compile_s:10.2f}")


if __name__ == "__main__":
    app.run(main)
