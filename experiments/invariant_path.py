r"""Functionally invariant paths (Raghavan & Thomson, arXiv 2205.00334) at small scale.

  python -m experiments.invariant_path --workdir=runs/invariant_path
  python -m experiments.invariant_path --workdir=/tmp/fip_quick --quick

Three parts, all on an MLP (inputs standardised):

(a) ``continual``: class-incremental learning, classes 0-4 then 5-9 with one
    10-way head, on each of ``--datasets``. After task 1, the arms train on
    task 2 for the same number of steps: naive fine-tuning, FIP (the metric
    step: new-task gradient through `invariant_path` with the replay buffer's
    inputs as anchors, then SGD at each of ``--fip_lrs``), the penalty method
    (new-task CE + Bhattacharyya to the task-1 network on the buffer inputs,
    each of ``--penalty_weights``), replay (new-task CE + CE on the same buffer
    with its labels) and EWC (Kirkpatrick et al. 2017, exact diagonal Fisher on
    the task-1 training set, each of ``--ewc_weights``). Reported: accuracy on
    each task's test examples (10-way argmax), on all test examples, and
    task-aware accuracy (argmax within the task's classes).
(b) ``sparsity``: a network trained on all classes is sparsified to each of
    ``--sparsities`` (global magnitude pruning of the kernels): one-shot
    pruning, one-shot + masked fine-tuning, the FIP path (secondary objective
    = distance to the magnitude projection, anchors = training inputs; run
    level after level, then projected) with and without the same fine-tuning,
    and the penalty path of the official code.
(c) ``robustness``: the same network moved towards PGD robustness: PGD
    adversarial fine-tuning, the FIP path with the PGD loss as secondary
    objective (anchors = the clean batch), and the penalty path.

Writes config.json, per-arm JSON files (a rerun skips finished arms),
results.json and continual.png, sparsity.png, robustness.png into --workdir.
"""

from __future__ import annotations

import os
import time

import flax.serialization
import jax
import jax.numpy as jnp
import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import optax  # noqa: E402
from absl import app, flags  # noqa: E402

import wspace as ws  # noqa: E402
from experiments import common  # noqa: E402
from wspace import invariant_path as ip  # noqa: E402

common.define_common_flags("runs/invariant_path")
flags.DEFINE_list("parts", ["continual", "sparsity", "robustness"], "Parts to run.")
flags.DEFINE_list("datasets", ["mnist1d", "digits"], "Datasets of the continual part.")
flags.DEFINE_list("hidden", ["128", "128"], "MLP hidden widths.")
flags.DEFINE_float("lr", 1e-3, "Adam learning rate (base training and baselines).")
flags.DEFINE_integer("batch_size", 64, "Batch size.")
flags.DEFINE_integer("base_steps", 1500, "Steps of task-1 / dense training.")
flags.DEFINE_integer("task2_steps", 500, "Steps on task 2 for every continual arm.")
flags.DEFINE_integer("buffer_size", 100, "Replay buffer of task-1 training examples.")
flags.DEFINE_list("fip_lrs", ["0.03", "0.1"], "Continual part: SGD rates after the path step.")
flags.DEFINE_list("penalty_weights", ["10", "100"], "Continual part: Bhattacharyya weights.")
flags.DEFINE_list("ewc_weights", ["100", "1e6"], "Continual part: EWC strengths.")
flags.DEFINE_float("path_lr", 0.2, "Sparsity part: SGD rate after the path step.")
flags.DEFINE_float("robust_path_lr", 0.5, "Robustness part: SGD rate after the path step.")
flags.DEFINE_float("max_norm", 1.0, "Norm bound of the path direction (step = path_lr * this).")
flags.DEFINE_float("damping", 1e-3, "lambda in (g + lambda I) d = grad.")
flags.DEFINE_integer("cg_iters", 10, "CG iterations per path step.")
flags.DEFINE_enum("metric", "jacobian", list(ip.METRICS), "Metric of the path step.")
flags.DEFINE_float("penalty_weight", 10.0, "Sparsity/robustness parts: penalty weight.")
flags.DEFINE_list("sparsities", ["0.5", "0.8", "0.9", "0.95"], "Sparsity levels.")
flags.DEFINE_integer("path_steps", 200, "Path steps per sparsity level.")
flags.DEFINE_integer("ft_steps", 200, "Masked fine-tuning steps per sparsity level.")
flags.DEFINE_integer("anchor_batch", 128, "Anchor inputs per step in the sparsity part.")
flags.DEFINE_float("eps", 0.1, "L-inf radius of the attacks (standardised input units).")
flags.DEFINE_integer("attack_steps", 5, "PGD steps in adversarial training.")
flags.DEFINE_integer("eval_attack_steps", 20, "PGD steps in the robustness evaluation.")
flags.DEFINE_integer("robust_steps", 300, "Steps of each robustness arm.")
FLAGS = flags.FLAGS

_KEYS = (
    "dataset",
    "seed",
    "quick",
    "parts",
    "datasets",
    "hidden",
    "lr",
    "batch_size",
    "base_steps",
    "task2_steps",
    "buffer_size",
    "path_lr",
    "robust_path_lr",
    "max_norm",
    "damping",
    "cg_iters",
    "metric",
    "fip_lrs",
    "penalty_weights",
    "ewc_weights",
    "penalty_weight",
    "sparsities",
    "path_steps",
    "ft_steps",
    "anchor_batch",
    "eps",
    "attack_steps",
    "eval_attack_steps",
    "robust_steps",
)
SPARSITY_ARMS = ("oneshot", "path", "penalty")
ROBUST_ARMS = ("base", "adv_ft", "fip", "penalty")


def get_config() -> dict:
    """The run's settings from flags, shrunk by --quick."""
    cfg = {k: getattr(FLAGS, k) for k in _KEYS}
    cfg["hidden"] = [int(h) for h in cfg["hidden"]]
    for key in ("sparsities", "fip_lrs", "penalty_weights", "ewc_weights"):
        cfg[key] = [float(v) for v in cfg[key]]
    if cfg["quick"]:
        cfg.update(
            datasets=["digits"],
            dataset="digits",
            hidden=[32],
            base_steps=40,
            task2_steps=8,
            buffer_size=20,
            path_steps=4,
            ft_steps=4,
            robust_steps=4,
            sparsities=[0.5, 0.9],
            attack_steps=2,
            eval_attack_steps=3,
            anchor_batch=32,
            batch_size=32,
            cg_iters=3,
            fip_lrs=[0.1],
            penalty_weights=[10.0],
            ewc_weights=[100.0],
        )
    return cfg


# ----------------------------------------------------------------------------- plumbing


class _Net:
    """The MLP, its ``(params, x) -> logits`` closure and jitted evaluation."""

    def __init__(self, hidden, input_shape, seed):
        self.model = ws.models.MLP(features=tuple(hidden), num_classes=10)
        self.init = self.model.init(jax.random.PRNGKey(seed), jnp.zeros((1, *input_shape)))[
            "params"
        ]
        self.f = lambda p, x: self.model.apply({"params": p}, x)
        self.ce = ws.training.classification_loss(self.model.apply)
        self.logits = jax.jit(self.f)

    def accuracy(self, params, x, y, classes=None) -> float:
        logits = np.asarray(self.logits(params, x))
        if classes is not None:
            logits = logits[:, classes]
            y = np.searchsorted(np.asarray(classes), y)
        return float(np.mean(logits.argmax(-1) == y))


class _Trainer:
    """One compiled `ws.training.make_train_step`, reused for every run of an arm."""

    def __init__(self, loss_fn, tx):
        self.tx = tx
        self.step = ws.training.make_train_step(loss_fn, tx)

    def __call__(self, params, stream, steps, seed, tx_args_fn=None, progress=False, desc=""):
        """``steps`` steps from ``params`` on batches of ``stream``; returns the final params."""
        from tqdm.auto import tqdm

        state = ws.training.TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            model_state={},
            opt_state=self.tx.init(params),
            key=jax.random.PRNGKey(seed),
        )
        state = jax.tree.map(jnp.copy, state)  # the step donates its input
        metrics = {"loss": jnp.nan}
        for _ in tqdm(range(steps), disable=not progress, desc=desc, leave=False):
            batch = next(stream)
            state, metrics = self.step(state, batch, tx_args_fn(batch) if tx_args_fn else None)
        loss = float(metrics["loss"])
        if steps and not np.isfinite(loss):
            raise FloatingPointError(f"{desc}: non-finite loss {loss}")
        return state.params


def _path_tx(cfg, f):
    """The FIP step: `invariant_path` on the anchors, then plain SGD."""
    return optax.chain(
        ip.invariant_path(
            f,
            damping=cfg["damping"],
            cg_iters=cfg["cg_iters"],
            max_norm=cfg["max_norm"],
            metric=cfg["metric"],
        ),
        optax.sgd(cfg["path_lr"]),
    )


def _cached_params(path, like, make):
    """Loads params from ``path`` (msgpack) or makes and saves them."""
    if os.path.exists(path):
        with open(path, "rb") as f:
            return flax.serialization.from_bytes(like, f.read())
    params = make()
    with ws.data.atomic_open(path, "wb") as f:
        f.write(flax.serialization.to_bytes(params))
    return params


def _stream(x, y, bs, seed, **extra):
    for batch in ws.data.batches(x, y, min(bs, len(x)), seed=seed, epochs=None):
        yield {**batch, **extra}


def _arm(path, run):
    """Runs an arm unless its results file exists (resume); returns its results."""
    done = common.load_json(path)
    if done is not None:
        return done
    t0 = time.time()
    result = run()
    result["seconds"] = round(time.time() - t0, 2)
    ws.training.write_json(path, result)
    return result


# ----------------------------------------------------------------------------- (a) continual


def run_continual(workdir, cfg, name, progress):
    ds = ws.data.standardize(ws.data.load(name))
    net = _Net(cfg["hidden"], ds.input_shape, cfg["seed"])
    old_tr, new_tr = ds.y_train < 5, ds.y_train >= 5
    old_te, new_te = ds.y_test < 5, ds.y_test >= 5
    x1, y1 = ds.x_train[old_tr], ds.y_train[old_tr]
    x2, y2 = ds.x_train[new_tr], ds.y_train[new_tr]
    rng = np.random.default_rng(cfg["seed"])
    buf = rng.choice(len(x1), min(cfg["buffer_size"], len(x1)), replace=False)
    buf_x, buf_y = x1[buf], y1[buf]
    bs, seed, lr = cfg["batch_size"], cfg["seed"], cfg["lr"]
    out = os.path.join(workdir, "continual", name)

    p1 = _cached_params(
        os.path.join(out, "task1.msgpack"),
        net.init,
        lambda: _Trainer(net.ce, optax.adam(lr))(
            net.init,
            _stream(x1, y1, bs, seed),
            cfg["base_steps"],
            seed,
            progress=progress,
            desc=f"{name} task 1",
        ),
    )

    def evaluate(params):
        xt1, yt1 = ds.x_test[old_te], ds.y_test[old_te]
        xt2, yt2 = ds.x_test[new_te], ds.y_test[new_te]
        return {
            "task1_accuracy": net.accuracy(params, xt1, yt1),
            "task2_accuracy": net.accuracy(params, xt2, yt2),
            "all_accuracy": net.accuracy(params, ds.x_test, ds.y_test),
            "task1_aware_accuracy": net.accuracy(params, xt1, yt1, classes=list(range(5))),
            "task2_aware_accuracy": net.accuracy(params, xt2, yt2, classes=list(range(5, 10))),
            "buffer_distance": float(ip.output_distance(net.f(params, buf_x), net.f(p1, buf_x))),
        }

    def replay_loss(params, model_state, batch, key):
        new, (_, m) = net.ce(params, model_state, batch, key)
        old, _ = net.ce(params, model_state, {"x": batch["buf_x"], "y": batch["buf_y"]}, key)
        return new + old, (model_state, m)

    fisher = []  # computed once, by the first EWC arm

    def arm(kind, value):
        stream = _stream(x2, y2, bs, seed + 1)
        tx, loss, tx_args = optax.adam(lr), net.ce, None
        if kind == "fip":
            tx = _path_tx({**cfg, "path_lr": value}, net.f)
            tx_args = lambda b: {"anchors": buf_x}  # noqa: E731
        elif kind == "penalty":
            loss = ip.penalty_loss(net.ce, net.f, p1, weight=value)
            stream = _stream(x2, y2, bs, seed + 1, anchors=buf_x)
        elif kind == "replay":
            loss = replay_loss
            stream = _stream(x2, y2, bs, seed + 1, buf_x=buf_x, buf_y=buf_y)
        elif kind == "ewc":
            if not fisher:
                fisher.append(ip.diagonal_fisher(net.f, p1, x1))
            loss = ip.ewc_loss(net.ce, p1, fisher[0], weight=value)
        params = _Trainer(loss, tx)(
            p1,
            stream,
            cfg["task2_steps"],
            seed + 2,
            tx_args,
            progress=progress,
            desc=f"{name} {kind}",
        )
        return {"arm": kind, "value": value, **evaluate(params)}

    results = {
        "after_task1": _arm(
            os.path.join(out, "after_task1.json"), lambda: {"arm": "after_task1", **evaluate(p1)}
        )
    }
    for label, kind, value in continual_arms(cfg):
        results[label] = _arm(os.path.join(out, f"{label}.json"), lambda k=kind, v=value: arm(k, v))
    return results


def continual_arms(cfg) -> list[tuple[str, str, float | None]]:
    """Continual arms ``(label, kind, value)``, e.g. ``("fip_lr0.1", "fip", 0.1)``."""
    arms = [("naive", "naive", None), ("replay", "replay", None)]
    for kind, key, tag in (
        ("fip", "fip_lrs", "lr"),
        ("penalty", "penalty_weights", "w"),
        ("ewc", "ewc_weights", "w"),
    ):
        arms += [(f"{kind}_{tag}{v:g}", kind, v) for v in cfg[key]]
    return arms


# ----------------------------------------------------------------------------- (b) sparsity


def _dense(workdir, cfg, ds, net, progress):
    return _cached_params(
        os.path.join(workdir, "dense.msgpack"),
        net.init,
        lambda: _Trainer(net.ce, optax.adam(cfg["lr"]))(
            net.init,
            _stream(ds.x_train, ds.y_train, cfg["batch_size"], cfg["seed"]),
            cfg["base_steps"],
            cfg["seed"],
            progress=progress,
            desc="dense",
        ),
    )


def run_sparsity(workdir, cfg, progress):
    ds = ws.data.standardize(ws.data.load(cfg["dataset"]))
    net = _Net(cfg["hidden"], ds.input_shape, cfg["seed"])
    dense = _dense(workdir, cfg, ds, net, progress)
    levels, seed = cfg["sparsities"], cfg["seed"]
    out = os.path.join(workdir, "sparsity")

    def level_loss(params, model_state, batch, key):  # the level is data: one compile
        return ip.sparsity_loss(batch["sparsity"])(params, model_state, batch, key)

    trainers = {
        "finetune": _Trainer(net.ce, optax.chain(optax.adam(cfg["lr"]), ws.pruning.keep_masked())),
        "path": _Trainer(level_loss, _path_tx(cfg, net.f)),
        "penalty": _Trainer(
            ip.penalty_loss(level_loss, net.f, dense, weight=cfg["penalty_weight"]),
            optax.adam(cfg["lr"]),
        ),
    }

    def inputs(k, level):
        for b in _stream(ds.x_train, ds.y_train, cfg["anchor_batch"], seed + 10 + k):
            yield {"anchors": b["x"], "sparsity": np.float32(level)}

    def finetune(params, masks, k, steps):
        stream = _stream(ds.x_train, ds.y_train, cfg["batch_size"], seed + 20 + k)
        params = trainers["finetune"](
            params, stream, steps, seed, lambda b: {"masks": masks}, progress, "finetune"
        )
        return net.accuracy(params, ds.x_test, ds.y_test)

    def record(params, level):
        masks = ws.pruning.magnitude_masks(params, level)
        pruned = ws.pruning.apply_masks(params, masks)
        rec = {
            "sparsity": ws.pruning.sparsity(masks)["overall"],
            "test_accuracy": net.accuracy(pruned, ds.x_test, ds.y_test),
            "distance_before_projection": float(ip.projection_distance(params, level)),
        }
        return rec, pruned, masks

    def arm(kind):
        rows, params = [], dense
        for k, level in enumerate(levels):
            if kind != "oneshot":  # move along the path (from the previous level's end point)
                tx_args = None if kind == "penalty" else (lambda b: {"anchors": b["anchors"]})
                params = trainers[kind](
                    params,
                    inputs(k, level),
                    cfg["path_steps"],
                    seed + k,
                    tx_args,
                    progress,
                    f"{kind} {level}",
                )
            rec, pruned, masks = record(params, level)
            rec["unpruned_test_accuracy"] = net.accuracy(params, ds.x_test, ds.y_test)
            rec["ft_test_accuracy"] = finetune(pruned, masks, k, cfg["ft_steps"])
            if kind == "oneshot":  # as many steps as the path took to get here, plus its FT
                steps = (k + 1) * cfg["path_steps"] + cfg["ft_steps"]
                rec["ft_matched_steps"] = steps
                rec["ft_matched_test_accuracy"] = finetune(pruned, masks, k, steps)
            rows.append({"target": level, **rec})
        return {"arm": kind, "levels": rows}

    results = {"dense_test_accuracy": net.accuracy(dense, ds.x_test, ds.y_test)}
    for kind in SPARSITY_ARMS:
        results[kind] = _arm(os.path.join(out, f"{kind}.json"), lambda k=kind: arm(k))
    return results


# ----------------------------------------------------------------------------- (c) robustness


def run_robustness(workdir, cfg, progress):
    ds = ws.data.standardize(ws.data.load(cfg["dataset"]))
    net = _Net(cfg["hidden"], ds.input_shape, cfg["seed"])
    dense = _dense(workdir, cfg, ds, net, progress)
    seed, out = cfg["seed"], os.path.join(workdir, "robustness")
    adv = ip.adversarial_loss(net.ce, eps=cfg["eps"], method="pgd", steps=cfg["attack_steps"])

    @jax.jit
    def attack(params, x, y, key):
        def loss_of_x(z):
            return optax.softmax_cross_entropy_with_integer_labels(net.f(params, z), y).mean()

        return ip.pgd(loss_of_x, x, key, eps=cfg["eps"], steps=cfg["eval_attack_steps"])

    def evaluate(params):
        x_adv = attack(
            params, jnp.asarray(ds.x_test), jnp.asarray(ds.y_test), jax.random.PRNGKey(seed + 99)
        )
        return {
            "clean_accuracy": net.accuracy(params, ds.x_test, ds.y_test),
            "robust_accuracy": net.accuracy(params, x_adv, ds.y_test),
            "train_distance": float(
                ip.output_distance(net.f(params, ds.x_train), net.f(dense, ds.x_train))
            ),
        }

    def arm(kind):
        if kind == "base":
            return {"arm": kind, **evaluate(dense)}
        stream = _stream(ds.x_train, ds.y_train, cfg["batch_size"], seed + 30)
        tx, loss, tx_args = optax.adam(cfg["lr"]), adv, None
        if kind == "fip":
            tx = _path_tx({**cfg, "path_lr": cfg["robust_path_lr"]}, net.f)
            tx_args = lambda b: {"anchors": b["x"]}  # noqa: E731
        elif kind == "penalty":
            loss = ip.penalty_loss(adv, net.f, dense, weight=cfg["penalty_weight"])
            stream = ({**b, "anchors": b["x"]} for b in stream)
        params = _Trainer(loss, tx)(
            dense,
            stream,
            cfg["robust_steps"],
            seed + 3,
            tx_args,
            progress=progress,
            desc=f"robust {kind}",
        )
        return {"arm": kind, **evaluate(params)}

    return {
        kind: _arm(os.path.join(out, f"{kind}.json"), lambda k=kind: arm(k)) for kind in ROBUST_ARMS
    }


# ----------------------------------------------------------------------------- plots, main


def _plot_continual(results, workdir):
    names = list(results)
    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        arms = list(results[name])
        pos = np.arange(len(arms))
        for j, (key, label) in enumerate(
            (("task1_accuracy", "task 1 (0-4)"), ("task2_accuracy", "task 2 (5-9)"))
        ):
            ax.bar(pos + 0.4 * j - 0.2, [results[name][a][key] for a in arms], 0.4, label=label)
        ax.set_xticks(pos, arms, rotation=45, ha="right")
        ax.set(ylabel="test accuracy (10-way)", title=name, ylim=(0, 1))
        ax.legend(fontsize=8, loc="lower left")
    common.savefig(fig, workdir, "continual.png")


def _plot_sparsity(results, workdir):
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for j, kind in enumerate(SPARSITY_ARMS):
        rows, color = results[kind]["levels"], f"C{j}"
        levels = [r["target"] for r in rows]
        ax.plot(levels, [r["test_accuracy"] for r in rows], "o-", color=color, label=kind)
        ax.plot(
            levels,
            [r["ft_test_accuracy"] for r in rows],
            "s--",
            color=color,
            label=f"{kind} + fine-tune",
        )
    rows = results["oneshot"]["levels"]
    ax.plot(
        [r["target"] for r in rows],
        [r["ft_matched_test_accuracy"] for r in rows],
        "^:",
        color="C0",
        label="oneshot + step-matched fine-tune",
    )
    ax.axhline(results["dense_test_accuracy"], color="k", ls=":", label="dense")
    ax.set(xlabel="sparsity", ylabel="test accuracy")
    ax.legend(fontsize=8)
    common.savefig(fig, workdir, "sparsity.png")


def _plot_robustness(results, workdir):
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    pos = np.arange(len(ROBUST_ARMS))
    for j, key in enumerate(("clean_accuracy", "robust_accuracy")):
        ax.bar(pos + 0.4 * j - 0.2, [results[a][key] for a in ROBUST_ARMS], 0.4, label=key)
    ax.set_xticks(pos, ROBUST_ARMS)
    ax.set(ylabel="test accuracy", ylim=(0, 1))
    ax.legend(fontsize=8)
    common.savefig(fig, workdir, "robustness.png")


def run(workdir: str, cfg: dict, progress: bool = True) -> dict:
    """Runs the requested parts; writes the workdir files; returns results."""
    common.start(workdir, cfg)
    results = {}
    if "continual" in cfg["parts"]:
        results["continual"] = {
            n: run_continual(workdir, cfg, n, progress) for n in cfg["datasets"]
        }
        _plot_continual(results["continual"], workdir)
    if "sparsity" in cfg["parts"]:
        results["sparsity"] = run_sparsity(workdir, cfg, progress)
        _plot_sparsity(results["sparsity"], workdir)
    if "robustness" in cfg["parts"]:
        results["robustness"] = run_robustness(workdir, cfg, progress)
        _plot_robustness(results["robustness"], workdir)
    common.save_results(workdir, results)
    return results


def _summary(results: dict) -> str:
    lines = []
    for name, res in results.get("continual", {}).items():
        lines.append(f"continual {name}: arm  task1  task2  all  (task-aware t1 t2)")
        for arm, r in res.items():
            lines.append(
                f"  {arm:12s} {r['task1_accuracy']:.3f} {r['task2_accuracy']:.3f} "
                f"{r['all_accuracy']:.3f}  ({r['task1_aware_accuracy']:.3f} "
                f"{r['task2_aware_accuracy']:.3f})"
            )
    if "sparsity" in results:
        res = results["sparsity"]
        lines.append(f"sparsity (dense {res['dense_test_accuracy']:.3f}): arm  acc per level")
        for kind in SPARSITY_ARMS:
            accs = " ".join(
                f"{r['target']}:{r['test_accuracy']:.3f}/{r['ft_test_accuracy']:.3f}"
                for r in res[kind]["levels"]
            )
            lines.append(f"  {kind:12s} {accs}   (projected / + fine-tune)")
        accs = " ".join(
            f"{r['target']}:{r['ft_matched_test_accuracy']:.3f}" for r in res["oneshot"]["levels"]
        )
        lines.append(f"  oneshot + fine-tune with as many steps as path + FT: {accs}")
    if "robustness" in results:
        lines.append("robustness: arm  clean  robust")
        for kind, r in results["robustness"].items():
            lines.append(f"  {kind:12s} {r['clean_accuracy']:.3f} {r['robust_accuracy']:.3f}")
    return "\n".join(lines)


def main(argv):
    del argv
    if FLAGS.quick and "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
        # Tiny runs are all compilation: skip XLA's backend optimisations (read when the
        # backend starts, which is after this point: nothing has touched a device yet).
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
        ).strip()
    results = run(FLAGS.workdir, get_config(), progress=FLAGS.progress)
    print(_summary(results))


if __name__ == "__main__":
    app.run(main)
