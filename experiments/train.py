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
    choices = {"model": sorted(ws.models.MODELS), "dtype": sorted(ws.models.DTYPES)}
    common.check(config, choices={**choices, "optimizer": OPTIMIZERS}, positive=("lr",),
                 counts=("steps", "batch_size", "eval_every"))  # fmt: skip


def make_optimizer(name: str, lr: float, steps: int) -> optax.GradientTransformation:
    """SGD with momentum 0.9 or Adam, on a cosine-decayed learning rate."""
    schedule = optax.cosine_decay_schedule(lr, steps)
    return optax.sgd(schedule, momentum=0.9) if name == "sgd" else optax.adam(schedule)


def train_seeds(config, ds, seeds: list[int], workdir: str | None) -> list[dict]:
    """Trains one model per seed as one program (a seed axis); returns each seed's result.

    Each result holds the final metrics, ``num_params`` and the evaluation ``curve``.
    """
    model = ws.models.create(config.model, ds.num_classes, dtype=config.dtype)
    tx = make_optimizer(config.optimizer, config.lr, config.steps)
    state = ws.training.init_states(model, tx, ds.x_train[:1], seeds)
    step = ws.training.make_train_step(
        ws.training.classification_loss(model.apply), tx, mode=config.mode, seed_axis=True
    )
    with common.metric_writer(config, workdir) as writer:  # TensorBoard, if config.tensorboard
        state, history = ws.training.fit(
            state,
            step,
            ds,
            apply_fn=model.apply,
            num_steps=config.steps,
            batch_size=config.batch_size,
            seed=seeds,
            mode=config.mode,
            eval_every=config.eval_every,
            workdir=workdir,
            writer=writer,
            progress=config.progress,
            identity=common.run_identity(config),
        )
    num_params = ws.training.num_params(ws.training.seed_slice(state.params, 0))
    curves = [[_seed_record(r, i) for r in history] for i in range(len(seeds))]
    return [
        {**{k: v for k, v in curve[-1].items() if k != "time"}, "num_params": num_params,
         "curve": curve}
        for curve in curves
    ]  # fmt: skip


def _seed_record(record: dict, i: int) -> dict:
    """Seed ``i``'s values of a `fit` record of a seed-axis run."""
    return {k: v[i] if isinstance(v, list) else v for k, v in record.items()}


def run(config, workdir: str) -> dict:
    """Trains ``config.num_seeds`` models and writes results.json and curves.png."""
    validate(config)
    common.start(config, workdir)
    ds = common.load_dataset(config)

    def all_seeds(seeds):
        return train_seeds(config, ds, seeds, common.seeds_workdir(workdir, config.model, seeds))

    per_arm = common.run_arms(workdir, config, {config.model: all_seeds})
    metrics = ["test_accuracy", "test_loss", "train_accuracy", "train_loss"]
    figure = _plot(per_arm[config.model], workdir, config)
    return common.save_results(
        workdir,
        config,
        "train",
        tables={f"{config.model} on {config.dataset}": common.summarize(per_arm, metrics)},
        figures=[figure],
        extra={"num_params": per_arm[config.model][0]["num_params"]},
    )


def _plot(results: list[dict], workdir: str, config) -> str:
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.5))
    for i, r in enumerate(results):
        steps = [c["step"] for c in r["curve"]]
        for split, style in (("train", "--"), ("test", "-")):
            label = split if i == 0 else None
            ax_loss.plot(steps, [c[f"{split}_loss"] for c in r["curve"]], style, label=label)
            ax_acc.plot(steps, [c[f"{split}_accuracy"] for c in r["curve"]], style, label=label)
    ax_loss.set(xlabel="step", ylabel="cross-entropy", yscale="log")
    ax_acc.set(xlabel="step", ylabel="accuracy")
    ax_acc.legend()
    fig.suptitle(f"{config.model} on {config.dataset}")
    return common.savefig(fig, workdir, "curves.png", config)


if __name__ == "__main__":
    cli.main(run, "train")
