r"""Plain supervised training: the baseline every method is compared with.

  python -m experiments.train --workdir=runs/train
  python -m experiments.train --workdir=runs/train_mlp --config.model=mlp --config.lr=0.1
  python -m experiments.train --workdir=/tmp/quick --config=experiments/configs/train.py:quick
  python -m experiments.train --config.dataset=cifar10 --config.data_dir=/data/tfds \
      --config.model=resnet20 --config.mode=sharded

All seeds train as one program (a seed axis) in ``workdir/train/<model>/seeds_<a>-<b>``
(metrics.jsonl, orbax checkpoints; a rerun resumes from the latest checkpoint);
``results.json`` holds the final metrics per seed, ``curves.png`` the learning curves.
"""

from __future__ import annotations

import optax

import wspace as ws
from experiments import cli, common

OPTIMIZERS = ("sgd", "adam")


def validate(config) -> None:
    """Rejects bad fields before any work or file write."""
    choices = {"model": sorted(ws.models.MODELS), "dtype": sorted(ws.models.DTYPES),
               "seed_loop": ws.training.SEED_LOOPS}  # fmt: skip
    common.check(config, choices={**choices, "optimizer": OPTIMIZERS}, positive=("lr",),
                 counts=("steps", "batch_size", "eval_every"))  # fmt: skip


def make_optimizer(name: str, lr: float, steps: int) -> optax.GradientTransformation:
    """SGD with momentum 0.9 or Adam, on a cosine-decayed learning rate."""
    schedule = optax.cosine_decay_schedule(lr, steps)
    return optax.sgd(schedule, momentum=0.9) if name == "sgd" else optax.adam(schedule)


def train_seeds(config, ds, seeds: list[int], workdir: str | None) -> list[dict]:
    """Trains one model per seed as one program (a seed axis); per seed: the final metrics,
    ``num_params`` and the evaluation ``curve``."""
    c = config
    model = ws.models.create(c.model, ds.num_classes, dtype=c.dtype)
    tx = make_optimizer(c.optimizer, c.lr, c.steps)
    state = ws.training.init_states(model, tx, ds.x_train[:1], seeds)
    loss = ws.training.classification_loss(model.apply)
    step = ws.training.make_train_step(loss, tx, mode=c.mode, seed_axis=True,
                                       seed_loop=c.seed_loop)  # fmt: skip
    with common.metric_writer(c, workdir) as writer:  # TensorBoard, if config.tensorboard
        state, history = ws.training.fit(
            state, step, ds, apply_fn=model.apply, num_steps=c.steps, batch_size=c.batch_size,
            seed=seeds, mode=c.mode, eval_every=c.eval_every, workdir=workdir, writer=writer,
            progress=c.progress, identity=common.run_identity(c),
        )  # fmt: skip
    num_params = ws.training.num_params(ws.training.seed_slice(state.params, 0))
    curves = common.seed_curves(history, [k for k in history[-1] if k not in ("step", "time")])
    return [{**curve[-1], "num_params": num_params, "curve": curve} for curve in curves]


def run(config, workdir: str) -> dict:
    """Trains ``config.num_seeds`` models and writes results.json and curves.png."""
    validate(config)
    common.start(config, workdir)
    ds, arm = common.load_dataset(config), config.model
    fn = lambda seeds: train_seeds(config, ds, seeds, common.seeds_workdir(workdir, arm, seeds))
    per_arm = common.run_arms(workdir, config, {arm: fn})
    metrics = ["test_accuracy", "test_loss", "train_accuracy", "train_loss"]
    return common.save_results(
        workdir, config, "train", figures=[_plot(per_arm[arm], workdir, config)],
        tables={f"{arm} on {config.dataset}": common.summarize(per_arm, metrics)},
        extra={"num_params": per_arm[arm][0]["num_params"]},
    )  # fmt: skip


def _plot(results: list[dict], workdir: str, config) -> str:
    """Train (dashed) and test loss and accuracy: mean and 95% interval over seeds."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, metric in zip(axes, ("loss", "accuracy"), strict=True):
        for split, style in (("train", "--"), ("test", "-")):
            common.plot_curves(ax, {split: results}, f"{split}_{metric}", style=style)
    axes[0].set(xlabel="step", ylabel="cross-entropy", yscale="log")
    axes[1].set(xlabel="step", ylabel="accuracy")
    axes[1].legend()
    fig.suptitle(f"{config.model} on {config.dataset}")
    return common.savefig(fig, workdir, "curves.png", config)


if __name__ == "__main__":
    cli.main(run, "train")
