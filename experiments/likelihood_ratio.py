r"""Likelihood-ratio (ULR) gradients: gradient quality, training, FGSM robustness.

  python -m experiments.likelihood_ratio --workdir=runs/likelihood_ratio
  python -m experiments.likelihood_ratio --workdir=runs/lr_quick --quick

(a) Gradient quality: mean cosine between ULR estimates and the exact gradient
    of an MLP against forward evaluations per example, for each variance
    reduction, with the ES (weight perturbation) baseline -> gradient_quality.png.
(b) Training an MLP on mnist1d and digits with backprop, ULR, ES and (when
    `evosax` is importable) evosax's OpenES, the forward-only methods at the
    same number of forward evaluations per step -> training.png, table.
(c) FGSM: test accuracy of the backprop- and ULR-trained models under
    ``x + eps sign(grad_x L)`` -> robustness.png.

Every arm writes its own JSON (and checkpoints) under --workdir, so a rerun
skips finished work. results.json holds the headline tables.
Paper: Jiang et al., ICLR 2024, arXiv 2305.08960.
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from absl import app, flags  # noqa: E402

import wspace as ws  # noqa: E402
from experiments import common  # noqa: E402
from wspace import likelihood_ratio as lr  # noqa: E402

common.define_common_flags("runs/likelihood_ratio")
flags.DEFINE_list("datasets", ["mnist1d", "digits"], "Datasets for the training part (b).")
flags.DEFINE_list("hidden", ["128", "128"], "MLP hidden widths.")
flags.DEFINE_integer("steps", 1500, "Training steps per arm.")
flags.DEFINE_integer("batch_size", 64, "Batch size.")
flags.DEFINE_float("lr", 2e-3, "Adam learning rate (all arms).")
flags.DEFINE_integer("copies", 16, "Copies N of the forward-only methods in training.")
flags.DEFINE_float("sigma", 0.1, "ULR noise scale (pre-activations).")
flags.DEFINE_float("es_sigma", 0.01, "ES / OpenES weight-perturbation scale.")
flags.DEFINE_list("quality_copies", ["4", "16", "64"], "N values for the gradient-quality part.")
flags.DEFINE_integer("quality_repeats", 8, "Estimates per (method, N) in part (a).")
flags.DEFINE_list("fgsm_eps", ["0", "0.05", "0.1", "0.2", "0.3"], "FGSM budgets (std. inputs).")
FLAGS = flags.FLAGS

_KEYS = (
    "dataset",
    "seed",
    "quick",
    "datasets",
    "hidden",
    "steps",
    "batch_size",
    "lr",
    "copies",
    "sigma",
    "es_sigma",
    "quality_copies",
    "quality_repeats",
    "fgsm_eps",
)

# Part (a): each variance reduction alone (and layer-wise with a clean baseline), plus ES.
QUALITY = {
    "ulr": dict(),
    "ulr+antithetic": dict(antithetic=True),
    "ulr+clean baseline": dict(baseline="clean"),
    "ulr+mean baseline": dict(baseline="mean"),
    "ulr+layerwise": dict(layerwise=True),
    "ulr+layerwise+clean": dict(layerwise=True, baseline="clean"),
    "ulr+qmc": dict(qmc=True),
    "ulr+antithetic+qmc": dict(antithetic=True, qmc=True),
    "ulr+antithetic+mean": dict(antithetic=True, baseline="mean"),
    "ulr+antithetic+clean": dict(antithetic=True, baseline="clean"),
    "es (antithetic)": "es",
}
QUICK_QUALITY = ("ulr+mean baseline", "es (antithetic)")
# Part (b): the ULR arm uses the leave-one-out mean baseline: no extra forward pass, so exactly
# N forward evaluations like ES; among the best of part (a).
ULR_TRAIN = dict(baseline="mean")


def get_config() -> dict:
    cfg = {k: getattr(FLAGS, k) for k in _KEYS}
    if cfg["quick"]:
        cfg.update(
            datasets=["digits"],
            hidden=["32"],
            steps=30,
            batch_size=32,
            copies=8,
            quality_copies=["4"],
            quality_repeats=2,
            fgsm_eps=["0.1"],
        )
    return cfg


def _model(cfg, ds):
    return ws.models.MLP(features=tuple(int(h) for h in cfg["hidden"]), num_classes=ds.num_classes)


def _flat(tree):
    return jnp.concatenate([a.ravel() for a in jax.tree.leaves(tree)])


# ----------------------------------------------------------------------------- (a)


def gradient_quality(workdir: str, cfg: dict) -> dict:
    """Mean cosine to the exact gradient per (method, N); one JSON per method."""
    ds = ws.data.standardize(ws.data.load(cfg["datasets"][0]))
    model = _model(cfg, ds)
    key = jax.random.PRNGKey(cfg["seed"])
    params = model.init(key, ds.x_train[:1])["params"]
    batch = {
        "x": jnp.asarray(ds.x_train[: cfg["batch_size"]]),
        "y": jnp.asarray(ds.y_train[: cfg["batch_size"]]),
    }
    per_ex = ws.training.classification_loss(model.apply, per_example=True)
    mean_loss = ws.training.classification_loss(model.apply)
    exact = _flat(jax.grad(lambda p: mean_loss(p, {}, batch, None)[0])(params))
    out = {}
    for name, options in QUALITY.items():
        if cfg["quick"] and name not in QUICK_QUALITY:
            continue
        path = os.path.join(workdir, "quality", f"{name.replace(' ', '_')}.json")
        done = common.load_json(path)
        if done is not None:
            out[name] = done
            continue
        rows = []
        for n in (int(c) for c in cfg["quality_copies"]):
            if options == "es":
                est = lr.es(mean_loss, num_copies=n, sigma=cfg["es_sigma"])
                evals = n
            else:
                est = lr.ulr(per_ex, num_copies=n, sigma=cfg["sigma"], **options)
                evals = lr.forward_evaluations(
                    num_copies=n, baseline=options.get("baseline", "none")
                )
            fn = jax.jit(lambda k, est=est: _flat(est(params, {}, batch, k)[1]))
            cos = []
            for r in range(cfg["quality_repeats"]):
                g = fn(jax.random.PRNGKey(1000 + r))
                cos.append(float(g @ exact / (jnp.linalg.norm(g) * jnp.linalg.norm(exact))))
            rows.append(
                {
                    "copies": n,
                    "forward_evals": evals,
                    "cosine": float(np.mean(cos)),
                    "cosine_se": float(np.std(cos) / np.sqrt(len(cos))),
                }
            )
        ws.training.write_json(path, rows)
        out[name] = rows
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, rows in out.items():
        ax.errorbar(
            [r["forward_evals"] for r in rows],
            [r["cosine"] for r in rows],
            yerr=[r["cosine_se"] for r in rows],
            marker="o",
            capsize=2,
            label=name,
            linestyle="--" if name.startswith("es") else "-",
        )
    ax.set(
        xscale="log",
        xlabel="forward evaluations per example",
        ylabel="cosine to exact gradient",
        title=f"{cfg['datasets'][0]}, MLP {'x'.join(cfg['hidden'])}, batch {cfg['batch_size']}",
    )
    ax.legend(fontsize=7)
    common.savefig(fig, workdir, "gradient_quality.png")
    return out


# ----------------------------------------------------------------------------- (b)


def _estimator(method: str, cfg: dict):
    if method == "backprop":
        return jax.value_and_grad
    if method == "ulr":
        return lr.likelihood_ratio(num_copies=cfg["copies"], sigma=cfg["sigma"], **ULR_TRAIN)
    return lr.evolution_strategies(num_copies=cfg["copies"], sigma=cfg["es_sigma"])


def train_arm(workdir: str, cfg: dict, dataset: str, method: str, progress: bool):
    """Trains one arm with ws.training.fit (resumable); returns (results, params)."""
    ds = ws.data.standardize(ws.data.load(dataset))
    model = _model(cfg, ds)
    tx = optax.adam(cfg["lr"])
    state = ws.training.init_state(model, tx, ds.x_train[:1], jax.random.PRNGKey(cfg["seed"]))
    loss_fn = ws.training.classification_loss(model.apply, per_example=(method == "ulr"))
    step = ws.training.make_train_step(loss_fn, tx, estimator=_estimator(method, cfg))
    arm_dir = os.path.join(workdir, "train", f"{dataset}_{method}")
    t0 = time.time()
    state, history = ws.training.fit(
        state,
        step,
        ds,
        apply_fn=model.apply,
        num_steps=cfg["steps"],
        batch_size=cfg["batch_size"],
        seed=cfg["seed"],
        eval_every=max(cfg["steps"] // 6, 1),
        workdir=arm_dir,
        checkpoint_every=cfg["steps"],
        progress=progress,
    )
    path = os.path.join(arm_dir, "result.json")
    result = common.load_json(path)
    if result is None:
        evals = {"backprop": "1 fwd + 1 bwd"}.get(method, cfg["copies"])
        result = {
            "dataset": dataset,
            "method": method,
            "forward_evals_per_step": evals,
            "test_accuracy": history[-1]["test_accuracy"],
            "train_accuracy": history[-1]["train_accuracy"],
            "test_loss": history[-1]["test_loss"],
            "seconds": round(time.time() - t0, 1),
            "history": history,
        }
        ws.training.write_json(path, result)
    return result, state.params, model


def train_openes(workdir: str, cfg: dict, dataset: str):
    """evosax's OpenES (antithetic, Adam, centred ranks) on the same batches, if importable."""
    path = os.path.join(workdir, "train", f"{dataset}_openes", "result.json")
    done = common.load_json(path)
    if done is not None:
        return done
    try:
        from evosax.algorithms import Open_ES
    except ImportError as e:  # evosax belongs to the bench extra only
        return {"dataset": dataset, "method": "openes (evosax)", "skipped": f"{e}"}
    from jax.flatten_util import ravel_pytree

    ds = ws.data.standardize(ws.data.load(dataset))
    model = _model(cfg, ds)
    params = model.init(jax.random.PRNGKey(cfg["seed"]), ds.x_train[:1])["params"]
    flat0, unravel = ravel_pytree(params)
    strategy = Open_ES(
        population_size=cfg["copies"],
        solution=flat0,
        optimizer=optax.adam(cfg["lr"]),
        std_schedule=optax.constant_schedule(cfg["es_sigma"]),
    )
    es_params = strategy.default_params
    state = strategy.init(jax.random.PRNGKey(cfg["seed"]), flat0, es_params)
    loss = ws.training.classification_loss(model.apply)

    @jax.jit
    def step(state, batch, key):
        k1, k2 = jax.random.split(key)
        pop, state = strategy.ask(k1, state, es_params)
        fit = jax.vmap(lambda f: loss(unravel(f), {}, batch, None)[0])(pop)
        state, _ = strategy.tell(k2, pop, fit, state, es_params)
        return state, jnp.mean(fit)

    t0 = time.time()
    stream = ws.data.batches(
        ds.x_train, ds.y_train, cfg["batch_size"], seed=cfg["seed"], epochs=None
    )
    key = jax.random.PRNGKey(cfg["seed"] + 1)
    for _ in range(cfg["steps"]):
        key, sub = jax.random.split(key)
        state, _ = step(state, next(stream), sub)
    final = {"params": unravel(state.mean)}
    test = ws.training.evaluate(model.apply, final, ds.x_test, ds.y_test)
    train = ws.training.evaluate(model.apply, final, ds.x_train, ds.y_train)
    result = {
        "dataset": dataset,
        "method": "openes (evosax)",
        "forward_evals_per_step": cfg["copies"],
        "test_accuracy": test["accuracy"],
        "train_accuracy": train["accuracy"],
        "test_loss": test["loss"],
        "seconds": round(time.time() - t0, 1),
    }
    ws.training.write_json(path, result)
    return result


# ----------------------------------------------------------------------------- (c)


def fgsm_accuracy(model, params, x, y, eps: float) -> float:
    """Test accuracy under FGSM: ``x + eps * sign(grad_x CE)`` (Goodfellow et al. 2015)."""

    @jax.jit
    def acc(x, y):
        def ce(xx):
            logits = model.apply({"params": params}, xx)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).sum()

        adv = x + eps * jnp.sign(jax.grad(ce)(x))
        return jnp.sum(jnp.argmax(model.apply({"params": params}, adv), -1) == y)

    return float(
        sum(int(acc(x[i : i + 1000], y[i : i + 1000])) for i in range(0, len(x), 1000)) / len(x)
    )


def run(workdir: str, cfg: dict, progress: bool = True) -> dict:
    common.start(workdir, cfg)
    quality = gradient_quality(workdir, cfg)
    training, robustness = [], {}
    for dataset in cfg["datasets"]:
        ds = ws.data.standardize(ws.data.load(dataset))
        trained = {}
        for method in ("backprop", "ulr") if cfg["quick"] else ("backprop", "ulr", "es"):
            result, params, model = train_arm(workdir, cfg, dataset, method, progress)
            training.append({k: v for k, v in result.items() if k != "history"})
            trained[method] = (params, model, result["history"])
        if not cfg["quick"]:  # the smoke test covers the library's arms only
            training.append(train_openes(workdir, cfg, dataset))
        path = os.path.join(workdir, f"robustness_{dataset}.json")
        rob = common.load_json(path)
        if rob is None:
            rob = {
                m: {
                    e: fgsm_accuracy(mod, p, ds.x_test, ds.y_test, float(e))
                    for e in cfg["fgsm_eps"]
                }
                for m, (p, mod, _) in trained.items()
                if m in ("backprop", "ulr")
            }
            ws.training.write_json(path, rob)
        robustness[dataset] = rob
        _plot_training(workdir, cfg, dataset, trained)
    _plot_robustness(workdir, robustness)
    results = {
        "gradient_quality": {
            m: {str(r["forward_evals"]): round(r["cosine"], 4) for r in rows}
            for m, rows in quality.items()
        },
        "training": training,
        "robustness": robustness,
    }
    common.save_results(workdir, results)
    return results


def _plot_training(workdir, cfg, dataset, trained):
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for method, (_, _, history) in trained.items():
        ax.plot(
            [r["step"] for r in history],
            [r["test_accuracy"] for r in history],
            marker="o",
            label=method,
        )
    ax.set(xlabel="step", ylabel="test accuracy", title=f"{dataset}: N={cfg['copies']}")
    ax.legend()
    name = "training.png" if dataset == cfg["datasets"][0] else f"training_{dataset}.png"
    common.savefig(fig, workdir, name)


def _plot_robustness(workdir, robustness):
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for dataset, rob in robustness.items():
        for method, accs in rob.items():
            ax.plot(
                [float(e) for e in accs],
                list(accs.values()),
                marker="o",
                label=f"{dataset} {method}",
            )
    ax.set(xlabel="FGSM eps", ylabel="test accuracy")
    ax.legend(fontsize=8)
    common.savefig(fig, workdir, "robustness.png")


def main(argv):
    del argv
    results = run(FLAGS.workdir, get_config(), progress=FLAGS.progress)
    print("gradient quality (cosine by forward evaluations):")
    for m, row in results["gradient_quality"].items():
        print(f"  {m:24s} {row}")
    print("training:")
    for r in results["training"]:
        print("  ", {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()})
    print("robustness:", results["robustness"])


if __name__ == "__main__":
    app.run(main)
