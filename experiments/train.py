r"""Plain supervised training: the baseline every method is compared with.

  python -m experiments.train --workdir=runs/train --dataset=mnist1d --model=convnet
  python -m experiments.train --workdir=runs/quick --quick
  python -m experiments.train --config=experiments/configs/train.py --workdir=...

Writes config.json, metrics.jsonl, results.json and curves.png into --workdir;
rerunning with the same workdir resumes from the latest checkpoint.
"""

from __future__ import annotations

import jax
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import optax  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

import wspace as ws  # noqa: E402
from experiments import common  # noqa: E402

common.define_common_flags("runs/train")
flags.DEFINE_string("model", "convnet", f"One of {sorted(ws.models.MODELS)}.")
flags.DEFINE_enum("optimizer", "sgd", ["sgd", "adam"], "sgd (momentum 0.9) or adam.")
flags.DEFINE_float("lr", 0.05, "Peak learning rate (cosine decay).")
flags.DEFINE_integer("steps", 2000, "Training steps.")
flags.DEFINE_integer("batch_size", 128, "Global batch size.")
flags.DEFINE_integer("eval_every", 200, "Evaluate (and checkpoint) every N steps.")
flags.DEFINE_enum("mode", "jit", list(ws.training.MODES), "jit | sharded | pmap.")
config_flags.DEFINE_config_file("config", None, "Optional ml_collections config; overrides flags.")
FLAGS = flags.FLAGS

_KEYS = (
    "dataset",
    "data_dir",
    "seed",
    "quick",
    "model",
    "optimizer",
    "lr",
    "steps",
    "batch_size",
    "eval_every",
    "mode",
)


def get_config() -> dict:
    """The run's settings: flags, overridden by --config, shrunk by --quick."""
    cfg = {k: getattr(FLAGS, k) for k in _KEYS}
    if FLAGS.config is not None:
        cfg.update(FLAGS.config.to_dict())
    if cfg["quick"]:
        cfg.update(steps=30, eval_every=15, batch_size=32)
    return cfg


def make_optimizer(name: str, lr: float, steps: int) -> optax.GradientTransformation:
    """SGD with momentum 0.9 or Adam, on a cosine-decayed learning rate."""
    schedule = optax.cosine_decay_schedule(lr, max(steps, 1))
    if name == "sgd":
        return optax.sgd(schedule, momentum=0.9)
    return optax.adam(schedule)


def run(workdir: str, cfg: dict, progress: bool = True) -> dict:
    """Trains one model as ``cfg`` says and writes the workdir files; returns results."""
    common.start(workdir, cfg)
    ds = ws.data.standardize(ws.data.load(cfg["dataset"], data_dir=cfg["data_dir"]))
    model = ws.models.create(cfg["model"], ds.num_classes)
    tx = make_optimizer(cfg["optimizer"], cfg["lr"], cfg["steps"])
    state = ws.training.init_state(model, tx, ds.x_train[:1], jax.random.PRNGKey(cfg["seed"]))
    step = ws.training.make_train_step(
        ws.training.classification_loss(model.apply), tx, mode=cfg["mode"]
    )
    state, history = ws.training.fit(
        state,
        step,
        ds,
        apply_fn=model.apply,
        num_steps=cfg["steps"],
        batch_size=cfg["batch_size"],
        seed=cfg["seed"],
        mode=cfg["mode"],
        eval_every=cfg["eval_every"],
        workdir=workdir,
        progress=progress,
    )
    final = history[-1]
    results = {
        "dataset": cfg["dataset"],
        "model": cfg["model"],
        "steps": cfg["steps"],
        "num_params": ws.training.num_params(state.params),
        "test_accuracy": final["test_accuracy"],
        "test_loss": final["test_loss"],
        "train_accuracy": final["train_accuracy"],
        "train_loss": final["train_loss"],
    }
    common.save_results(workdir, results)
    _plot(history, workdir)
    return results


def _plot(history: list[dict], workdir: str) -> None:
    steps = [r["step"] for r in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.5))
    for split in ("train", "test"):
        ax_loss.plot(steps, [r[f"{split}_loss"] for r in history], label=split)
        ax_acc.plot(steps, [r[f"{split}_accuracy"] for r in history], label=split)
    ax_loss.set(xlabel="step", ylabel="cross-entropy", yscale="log")
    ax_acc.set(xlabel="step", ylabel="accuracy")
    ax_acc.legend()
    common.savefig(fig, workdir, "curves.png")


def main(argv):
    del argv
    results = run(FLAGS.workdir, get_config(), progress=FLAGS.progress)
    print({k: round(v, 4) if isinstance(v, float) else v for k, v in results.items()})


if __name__ == "__main__":
    app.run(main)
