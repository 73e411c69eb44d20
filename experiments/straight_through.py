r"""Straight-through estimators for stochastic binary networks, judged against exact gradients.

  python -m experiments.straight_through --workdir=runs/straight_through
  python -m experiments.straight_through --workdir=runs/st_quick --quick

(a) Estimator accuracy on the paper's toy (a [2, 5, 5, 5] network: 2 inputs,
three layers of 5 logistic-noise binary units, a real linear head, on a 2-D
two-moons problem): the exact gradient by enumerating all 2^15 states per
point; for each estimator (principled ``st``, ``identity``, ``hardtanh``,
``tanh``, deterministic sign + clipped STE, REINFORCE with a leave-one-out
baseline) cosine and RMSE to the exact gradient against the number of
samples, at initialisation and after training; the exact ST bias by
enumeration. (b) Training binary-activation MLPs, and MLPs with binary
weights and activations (mirror descent on the latents), on mnist1d and
digits with each estimator; mirror descent vs its clipped-latent variant vs
SGD on the latent weights over a small learning-rate grid.

Writes config.json, toy_<point>.json and arm_<dataset>_<arm>.json (one per
finished unit of work: a rerun skips them), results.json (tables), and
toy_estimators.png, training.png into --workdir.
"""

from __future__ import annotations

import os
import time

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
from wspace import straight_through as st  # noqa: E402

ESTIMATORS = ("st", "identity", "hardtanh", "tanh", "deterministic")
common.define_common_flags("runs/straight_through")
flags.DEFINE_list("datasets", ["digits", "mnist1d"], "Datasets of part (b).")
flags.DEFINE_list("parts", ["toy", "train"], "Which parts to run: toy (a) and/or train (b).")
flags.DEFINE_list("estimators", list(ESTIMATORS), f"Activation estimators, from {ESTIMATORS}.")
flags.DEFINE_list("toy_hidden", ["5", "5", "5"], "Binary layers of the toy (2 inputs).")
flags.DEFINE_integer("toy_points", 32, "Two-moons points of the toy problem.")
flags.DEFINE_integer("toy_train_steps", 300, "Adam steps (principled ST) to the 'trained' point.")
flags.DEFINE_integer("max_samples", 64, "Largest number of samples in the toy curves.")
flags.DEFINE_integer("repeats", 32, "Independent estimates per number of samples.")
flags.DEFINE_list("hidden", ["64", "64"], "Hidden widths of the binary MLPs.")
flags.DEFINE_integer("steps", 500, "Training steps per arm.")
flags.DEFINE_integer("batch_size", 64, "Batch size.")
flags.DEFINE_float("lr", 3e-3, "Adam learning rate of the real-valued parameters.")
flags.DEFINE_float("latent_lr", 1000.0, "Mirror-descent step on the latents (estimator arms).")
flags.DEFINE_list("latent_grid", ["300", "3000"], "Latent learning rates compared.")
flags.DEFINE_integer("eval_samples", 8, "Samples averaged for the stochastic test accuracy.")
FLAGS = flags.FLAGS
_KEYS = (
    "parts",
    "datasets",
    "estimators",
    "seed",
    "quick",
    "toy_hidden",
    "toy_points",
    "toy_train_steps",
    "max_samples",
    "repeats",
    "hidden",
    "steps",
    "batch_size",
    "lr",
    "latent_lr",
    "latent_grid",
    "eval_samples",
)


def get_config() -> dict:
    """The run's settings from flags, shrunk by --quick."""
    cfg = {k: getattr(FLAGS, k) for k in _KEYS}
    cfg["hidden"] = [int(h) for h in cfg["hidden"]]
    cfg["toy_hidden"] = [int(h) for h in cfg["toy_hidden"]]
    cfg["latent_grid"] = [float(v) for v in cfg["latent_grid"]]
    if not set(cfg["parts"]) <= {"toy", "train"} or not cfg["parts"]:
        raise ValueError(f"--parts must be a non-empty subset of toy,train; got {cfg['parts']}")
    for est in cfg["estimators"]:
        if est not in ESTIMATORS:
            raise ValueError(f"unknown estimator {est!r}; use some of {ESTIMATORS}")
    if cfg["quick"]:
        cfg.update(
            datasets=["digits"],
            estimators=["st"],
            toy_hidden=[2],
            toy_points=4,
            toy_train_steps=0,
            max_samples=2,
            repeats=2,
            hidden=[16],
            steps=10,
            batch_size=32,
            latent_grid=[],
            eval_samples=2,
        )
    return cfg


# ------------------------------------------------------------------ (a) the toy


def _toy_data(n: int, seed: int):
    """Two interleaved half-moons with Gaussian jitter (0.2), standardised; labels 0/1."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    t = rng.uniform(0, np.pi, n)
    x = np.stack(
        [np.cos(t) + y * (1 - 2 * np.cos(t)) - 0.5 * y, np.sin(t) * (1 - 2 * y) + 0.5 * y], 1
    )
    x = x + 0.2 * rng.normal(size=x.shape)
    x = (x - x.mean(0)) / x.std(0)
    return jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.int32)


def _toy_model(estimator: str, hidden) -> st.BinaryMLP:
    return st.BinaryMLP(tuple(hidden), num_classes=2, activation=estimator, noise="logistic")


def _toy_point(cfg: dict, x, y, params, name: str, workdir: str) -> dict:
    """Exact gradient, exact ST means, and metric curves at one parameter point."""
    path = os.path.join(workdir, f"toy_{name}.json")
    done = common.load_json(path)
    if done is not None:
        return done
    t0 = time.time()
    variables = {"params": params}
    base = _toy_model("st", cfg["toy_hidden"])
    exact_loss, exact = st.exact_value_and_grad(st.states_loss(base.apply, variables, x))(
        params, x, y
    )
    num_samples = [2**i for i in range(int(np.log2(cfg["max_samples"])) + 1)]
    batch = {"x": x, "y": y}
    key = jax.random.fold_in(jax.random.PRNGKey(cfg["seed"]), len(name))
    out = {
        "exact_loss": float(exact_loss),
        "exact_norm": float(np.linalg.norm(st._flat(exact))),
        "num_samples": num_samples,
        "estimators": {},
    }
    for i, est in enumerate(cfg["estimators"]):
        model = _toy_model(est, cfg["toy_hidden"])
        loss_fn = ws.training.classification_loss(model.apply)
        single = lambda k, f=loss_fn: jax.grad(lambda p: f(p, {}, batch, k)[0])(params)
        samples = jax.jit(jax.vmap(single))(
            jax.random.split(jax.random.fold_in(key, i), cfg["repeats"] * num_samples[-1])
        )
        curves = _grouped_metrics(samples, exact, num_samples, cfg["repeats"])
        if est != "deterministic":
            _, mean_st = st.expected_estimate(
                st.states_loss(model.apply, variables, x, straight_through=True)
            )(params, x, y)
        else:  # no randomness: the estimate is its own mean
            mean_st = jax.tree.map(lambda v: v[0], samples)
        curves["exact_bias"] = _rel(mean_st, exact)
        curves["exact_bias_cosine"] = _cos(mean_st, exact)
        out["estimators"][est] = curves
    rf = {k: [] for k in ("bias", "variance", "rmse", "cosine")}
    slf = st.states_loss(base.apply, variables, x)
    for m in num_samples:
        fn = st.reinforce(slf, m)
        keys = jax.random.split(jax.random.fold_in(key, 100 + m), cfg["repeats"])
        est = jax.jit(jax.vmap(lambda k, fn=fn: fn(params, k, x, y)[1]))(keys)
        met = st.gradient_metrics(est, exact)
        for k in rf:
            rf[k].append(
                met[k]
                / (met["norm"] ** 2 if k == "variance" else 1.0 if k == "cosine" else met["norm"])
            )
    rf["exact_bias"] = 0.0
    rf["exact_bias_cosine"] = 1.0
    out["estimators"]["reinforce"] = rf
    out["seconds"] = round(time.time() - t0, 1)
    ws.training.write_json(path, out)
    return out


def _rel(a, b) -> float:
    fa, fb = st._flat(a), st._flat(b)
    return float(np.linalg.norm(fa - fb) / np.linalg.norm(fb))


def _cos(a, b) -> float:
    fa, fb = st._flat(a), st._flat(b)
    return float(fa @ fb / (np.linalg.norm(fa) * np.linalg.norm(fb) + 1e-30))


def _grouped_metrics(samples, exact, num_samples, repeats) -> dict:
    """Relative metrics of m-sample means built from disjoint groups of single-sample estimates."""
    out = {k: [] for k in ("bias", "variance", "rmse", "cosine")}
    for m in num_samples:
        groups = jax.tree.map(
            lambda v, m=m: np.asarray(v)[: repeats * m].reshape((repeats, m) + v.shape[1:]).mean(1),
            samples,
        )
        met = st.gradient_metrics(groups, exact)
        out["bias"].append(met["bias"] / met["norm"])
        out["variance"].append(met["variance"] / met["norm"] ** 2)
        out["rmse"].append(met["rmse"] / met["norm"])
        out["cosine"].append(met["cosine"])
    return out


def run_toy(cfg: dict, workdir: str) -> dict:
    """Part (a): metrics at initialisation and after ``toy_train_steps`` of principled-ST Adam."""
    x, y = _toy_data(cfg["toy_points"], cfg["seed"])
    model = _toy_model("st", cfg["toy_hidden"])
    params = jax.jit(model.init)(jax.random.PRNGKey(cfg["seed"]), x)["params"]
    results = {"init": _toy_point(cfg, x, y, params, "init", workdir)}
    if cfg["toy_train_steps"] <= 0:
        return results
    tx = optax.adam(0.03)
    loss_fn = ws.training.classification_loss(model.apply)

    @jax.jit
    def step(p, o, k):
        g = jax.grad(lambda q: loss_fn(q, {}, {"x": x, "y": y}, k)[0])(p)
        u, o = tx.update(g, o, p)
        return optax.apply_updates(p, u), o

    opt, key = tx.init(params), jax.random.PRNGKey(cfg["seed"] + 1)
    for i in range(cfg["toy_train_steps"]):
        params, opt = step(params, opt, jax.random.fold_in(key, i))
    results["trained"] = _toy_point(cfg, x, y, params, "trained", workdir)
    return results


def plot_toy(toy: dict, workdir: str) -> None:
    fig, axes = plt.subplots(len(toy), 2, figsize=(10, 3.6 * len(toy)), squeeze=False)
    for row, (name, res) in enumerate(toy.items()):
        ns = res["num_samples"]
        for est, c in res["estimators"].items():
            style = "--" if est == "reinforce" else "-"
            axes[row, 0].plot(ns, c["cosine"], style, marker="o", ms=3, label=est)
            axes[row, 1].plot(ns, c["rmse"], style, marker="o", ms=3, label=est)
        axes[row, 0].axhline(1.0, color="k", lw=0.8, label="exact")
        axes[row, 1].axhline(0.0, color="k", lw=0.8, label="exact")
        axes[row, 0].set(
            xscale="log",
            xlabel="samples",
            ylabel="cosine to exact",
            title=f"toy [2,5,5,5], {name} (exact loss {res['exact_loss']:.3f})",
        )
        axes[row, 1].set(
            xscale="log",
            yscale="log",
            xlabel="samples",
            ylabel="RMSE / ||exact||",
            title=f"toy, {name}",
        )
        axes[row, 1].legend(fontsize=7)
    fig.tight_layout()
    common.savefig(fig, workdir, "toy_estimators.png")


# -------------------------------------------------------------- (b) training


def _arms(cfg: dict) -> list[dict]:
    arms = []
    for est in cfg["estimators"]:
        arms.append(dict(name=f"act_{est}", estimator=est, binary_weights=False))
    for est in cfg["estimators"]:
        arms.append(
            dict(
                name=f"bin_{est}",
                estimator=est,
                binary_weights=True,
                latent="md",
                latent_lr=cfg["latent_lr"],
            )
        )
    for latent in ("md", "md_clip", "sgd"):
        for lr in cfg["latent_grid"]:
            if latent == "md" and lr == cfg["latent_lr"]:
                continue  # the same run as bin_st
            arms.append(
                dict(
                    name=f"latent_{latent}_{lr:g}",
                    estimator="st",
                    binary_weights=True,
                    latent=latent,
                    latent_lr=lr,
                )
            )
    return arms


def _build(arm: dict, cfg: dict, num_classes: int):
    latent = arm.get("latent", "md")
    model = st.BinaryMLP(
        tuple(cfg["hidden"]),
        num_classes=num_classes,
        activation=arm["estimator"],
        binary_weights=arm["binary_weights"],
        weight_estimator="st" if latent == "sgd" else "identity",
        weight_noise="uniform" if latent == "md_clip" else "logistic",
    )
    real = optax.adam(cfg["lr"])
    if not arm["binary_weights"]:
        return model, real
    lat = {
        "md": lambda lr: st.mirror_descent(lr),
        "md_clip": lambda lr: st.mirror_descent(lr, clip=1.0),
        "sgd": lambda lr: optax.sgd(lr),
    }[latent](arm["latent_lr"])
    return model, optax.multi_transform({"latent": lat, "real": real}, st.latent_labels)


def _sampled_accuracy(model, params, x, y, key, samples: int) -> float:
    """Test accuracy of the mean of ``samples`` stochastic forward passes' softmax."""

    @jax.jit
    def probs(k):
        return jax.nn.softmax(model.apply({"params": params}, x, train=True, rngs={"dropout": k}))

    mean = sum(probs(k) for k in jax.random.split(key, samples)) / samples
    return float(jnp.mean(jnp.argmax(mean, -1) == y))


def run_arm(arm: dict, cfg: dict, dataset: str, ds, workdir: str, progress: bool) -> dict:
    path = os.path.join(workdir, f"arm_{dataset}_{arm['name']}.json")
    done = common.load_json(path)
    if done is not None:
        return done
    t0 = time.time()
    model, tx = _build(arm, cfg, ds.num_classes)
    key = jax.random.PRNGKey(cfg["seed"])
    state = ws.training.init_state(model, tx, ds.x_train[:1], key)
    step = ws.training.make_train_step(ws.training.classification_loss(model.apply), tx)
    state, history = ws.training.fit(
        state,
        step,
        ds,
        apply_fn=model.apply,
        num_steps=cfg["steps"],
        batch_size=cfg["batch_size"],
        seed=cfg["seed"],
        eval_every=max(cfg["steps"] // 2, 1),
        progress=progress,
    )
    final = history[-1]
    latents = [
        v
        for p, v in jax.tree_util.tree_leaves_with_path(state.params)
        if getattr(p[-1], "key", None) == "latent"
    ]
    out = {
        **arm,
        "dataset": dataset,
        "history": history,
        "test_accuracy": final["test_accuracy"],
        "train_accuracy": final["train_accuracy"],
        "train_loss": final["train_loss"],
        "sampled_test_accuracy": _sampled_accuracy(
            model,
            state.params,
            jnp.asarray(ds.x_test),
            jnp.asarray(ds.y_test),
            jax.random.fold_in(key, 7),
            cfg["eval_samples"],
        ),
        "mean_abs_latent": (
            float(np.mean([float(jnp.mean(jnp.abs(v))) for v in latents])) if latents else None
        ),
        "seconds": round(time.time() - t0, 1),
    }
    ws.training.write_json(path, out)
    return out


def plot_training(arms: dict, workdir: str) -> None:
    datasets = sorted({a["dataset"] for a in arms.values()})
    fig, axes = plt.subplots(1, len(datasets), figsize=(7 * len(datasets), 4.5), squeeze=False)
    for ax, dset in zip(axes[0], datasets, strict=True):
        rows = [a for a in arms.values() if a["dataset"] == dset]
        names = [a["name"] for a in rows]
        ax.barh(names, [a["test_accuracy"] for a in rows], label="deterministic (mode)")
        ax.scatter(
            [a["sampled_test_accuracy"] for a in rows],
            names,
            color="k",
            s=12,
            zorder=3,
            label="mean of samples",
        )
        ax.set(xlabel="test accuracy", title=dset, xlim=(0, 1))
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    common.savefig(fig, workdir, "training.png")


def run(workdir: str, cfg: dict, progress: bool = True) -> dict:
    """Runs parts (a) and (b) as ``cfg`` says; writes the workdir files; returns results."""
    common.start(workdir, cfg)
    toy, arms = {}, {}
    if "toy" in cfg["parts"]:
        toy = run_toy(cfg, workdir)
        plot_toy(toy, workdir)
    if "train" in cfg["parts"]:
        for dset in cfg["datasets"]:
            ds = ws.data.standardize(ws.data.load(dset))
            for arm in _arms(cfg):
                arms[f"{dset}/{arm['name']}"] = run_arm(arm, cfg, dset, ds, workdir, progress)
        plot_training(arms, workdir)
    toy_table = {
        point: {
            est: {
                "exact_bias": c["exact_bias"],
                "cosine_1": c["cosine"][0],
                "cosine_max": c["cosine"][-1],
                "rmse_1": c["rmse"][0],
                "rmse_max": c["rmse"][-1],
            }
            for est, c in res["estimators"].items()
        }
        for point, res in toy.items()
    }
    train_table = {
        k: {
            "test_accuracy": a["test_accuracy"],
            "sampled_test_accuracy": a["sampled_test_accuracy"],
            "train_accuracy": a["train_accuracy"],
        }
        for k, a in arms.items()
    }
    results = {
        "toy": toy_table,
        "training": train_table,
        "toy_max_samples": toy["init"]["num_samples"][-1] if toy else None,
    }
    common.save_results(workdir, results)
    return results


def main(argv):
    del argv
    results = run(FLAGS.workdir, get_config(), progress=FLAGS.progress)
    for point, tab in results["toy"].items():
        print(f"toy {point}:")
        for est, r in tab.items():
            print(
                f"  {est:13s} bias {r['exact_bias']:.3f}  cos@1 {r['cosine_1']:.3f}  "
                f"cos@{results['toy_max_samples']} {r['cosine_max']:.3f}  "
                f"rmse@1 {r['rmse_1']:.3f}"
            )
    for k, r in results["training"].items():
        print(f"{k:30s} test {r['test_accuracy']:.3f}  sampled {r['sampled_test_accuracy']:.3f}")


if __name__ == "__main__":
    app.run(main)
