"""Train-step speed of wspace (JAX, jit) against an equivalent PyTorch loop on the same device.

  python -m benchmarks.train_step [--steps=200] [--batch_size=128] [--repeats=5]

Same shapes, batch, optimizer (SGD, momentum 0.9) and loss for both. The
models: LeNet-300-100 on 28x28 inputs, the BatchNorm ConvNet on
mnist1d-shaped (40-long) signals, and ResNet-20 on CIFAR-shaped 32x32x3
images (float32, and bfloat16 compute for JAX on accelerators). PyTorch runs on
CUDA when JAX's default backend is a GPU and torch sees one, else on the CPU.
Timings alternate JAX and PyTorch blocks in one process and report the median
of the repeats, since this machine is noisy; ``ratio`` = wspace steps/s /
PyTorch steps/s (> 1: wspace is faster). Also prints the compile time of
wspace's first step. Needs ``torch`` (the ``bench`` extra), never a dependency
of the library.
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
flags.DEFINE_string("models", "lenet,convnet,resnet20", "Comma-separated cases to run.")
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

    class Block(nn.Module):
        def __init__(self, c_in, c, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(c_in, c, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(c)
            self.conv2 = nn.Conv2d(c, c, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(c)
            self.short = nn.Sequential()
            if stride != 1 or c_in != c:  # projection shortcut, as wspace.models.ResNet20
                self.short = nn.Sequential(
                    nn.Conv2d(c_in, c, 1, stride, bias=False), nn.BatchNorm2d(c)
                )

        def forward(self, x):
            y = torch.relu(self.bn1(self.conv1(x)))
            return torch.relu(self.short(x) + self.bn2(self.conv2(y)))

    def resnet20(width=16):
        layers, c_in = (
            [nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()],
            width,
        )
        for stage in range(3):
            for block in range(3):
                c = width * 2**stage
                layers.append(Block(c_in, c, 2 if stage > 0 and block == 0 else 1))
                c_in = c
        return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, 10))

    return torch, {"lenet": lenet, "convnet": convnet, "resnet20": resnet20}


def _torch_device(torch) -> str:
    return "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"


def _torch_runner(torch, model, x, y, lr=0.05):
    device = _torch_device(torch)
    model = model.to(device)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    xb = torch.from_numpy(x).to(device)
    yb = torch.from_numpy(y.astype(np.int64)).to(device)
    loss_fn = torch.nn.CrossEntropyLoss()

    def run(n):
        for _ in range(n):
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(xb), yb)
            loss.backward()
            opt.step()
        loss.item()  # waits for the device

    run(3)  # warm-up
    return run


def _median_rate(run, steps, repeats_log):
    t0 = time.perf_counter()
    run(steps)
    repeats_log.append(steps / (time.perf_counter() - t0))


def main(argv):
    del argv
    torch, torch_models = _torch_models()
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # as XLA
    rng = np.random.default_rng(0)
    b = FLAGS.batch_size
    y = rng.integers(0, 10, b).astype(np.int32)
    images = rng.normal(size=(b, 32, 32, 3)).astype(np.float32)
    cases = {  # name: (flax model, torch model name, JAX input, torch input)
        "lenet": [("LeNet-300-100 (28x28)", ws.models.lenet_300_100(), "lenet",
                   rng.normal(size=(b, 28, 28, 1)).astype(np.float32), lambda x: x.reshape(b, -1))],
        "convnet": [("ConvNet+BN (mnist1d, 40)", ws.models.ConvNet(), "convnet",
                     rng.normal(size=(b, 40)).astype(np.float32), lambda x: x.reshape(b, 1, 40))],
        "resnet20": [("ResNet-20 (32x32x3)", ws.models.ResNet20(), "resnet20", images,
                      lambda x: np.ascontiguousarray(x.transpose(0, 3, 1, 2)))],
    }  # fmt: skip
    if jax.default_backend() != "cpu":  # bf16 compute is an accelerator feature
        cases["resnet20"].append(
            ("ResNet-20 bf16 compute", ws.models.ResNet20(dtype=jnp.bfloat16), "resnet20",
             images, lambda x: np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
        )  # fmt: skip
    print(
        f"jax {jax.__version__} ({jax.devices()[0].device_kind}), torch {torch.__version__} "
        f"on {_torch_device(torch)} ({torch.get_num_threads()} threads); batch {b}, "
        f"{FLAGS.steps} steps x {FLAGS.repeats} repeats, median"
    )
    print(
        f"{'model':28s} {'wspace steps/s':>15s} {'torch steps/s':>14s} {'ratio':>6s} "
        f"{'compile s':>10s}"
    )
    for key in FLAGS.models.split(","):
        for name, flax_model, torch_name, x, to_torch in cases[key]:
            jax_run, compile_s = _jax_runner(flax_model, x, y)
            jax_run(3)
            torch_run = _torch_runner(torch, torch_models[torch_name](), to_torch(x), y)
            jax_rates, torch_rates = [], []
            for _ in range(FLAGS.repeats):
                _median_rate(jax_run, FLAGS.steps, jax_rates)
                _median_rate(torch_run, FLAGS.steps, torch_rates)
            j, t = statistics.median(jax_rates), statistics.median(torch_rates)
            print(f"{name:28s} {j:15.1f} {t:14.1f} {j / t:6.2f} {compile_s:10.2f}", flush=True)


if __name__ == "__main__":
    app.run(main)
