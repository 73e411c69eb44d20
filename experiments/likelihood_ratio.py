"""Likelihood-ratio (ULR) gradients: gradient quality, training and FGSM robustness.

  python -m experiments.likelihood_ratio --workdir=runs/likelihood_ratio
  python -m experiments.likelihood_ratio --config=experiments/configs/likelihood_ratio.py:quick

Runs (a) gradient quality: cosine and relative bias to jax.grad of ULR variance reductions
and ES by forward evaluations per example; (b) an MLP trained by each arm, all seeds at
once, with Adam and equal steps and batches: ``backprop``, ``es`` and per noise setting
"family:sigma" ``ulr_<family><sigma>`` and ``noisy_bp_<family><sigma>`` (backprop through
the same noise); (c) white-box and transfer FGSM; judged by `claims`. Papers: Jiang et al.,
ICLR 2024, arXiv 2305.08960 (ULR); Peng et al., LR_Experiment, INFORMS JoC (the robustness
protocol); Salimans et al. 2017 (ES).
"""

import functools
import itertools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

import wspace as ws
from experiments import cli, common
from experiments.common import Claim
from experiments.configs.likelihood_ratio import QUALITY_VARIANTS
from wspace import likelihood_ratio as lr

ACCURACY_MARGIN = 0.02  # "within 2 points of backprop"
KINDS = ("whitebox", "transfer")


def noise_settings(config) -> dict[str, tuple[str, float]]:
    """``{"laplace1": ("laplace", 1.0), ...}`` from ``config.noise_settings`` (family:sigma)."""
    out = {}
    for setting in config.noise_settings:
        family, _, sigma = str(setting).partition(":")
        try:
            value = float(sigma)
        except ValueError:
            value = math.nan
        if family not in lr.NOISES or not 0 < value < math.inf:
            raise ValueError(f"config.noise_settings entry {setting!r}: use 'family:sigma' with "
                             f"family in {lr.NOISES}, sigma > 0, e.g. 'laplace:1.0'")  # fmt: skip
        out[f"{family}{value:g}"] = (family, value)
    if not out:
        raise ValueError("config.noise_settings is empty; give at least one 'family:sigma'")
    return out


def validate(config) -> None:
    """Rejects bad fields before any work or file write."""
    counts = ("steps", "batch_size", "eval_every", "copies", "quality_repeats")
    common.check(config, counts=counts, positive=("lr", "quality_sigma"), widths=("hidden",))
    noise_settings(config)
    lr.ulr(num_copies=config.copies, baseline=config.baseline)  # raises on a bad baseline
    lr.es(num_copies=config.copies, sigma=config.es_sigma)
    if not all(0 <= e < math.inf for e in config.fgsm_eps):
        raise ValueError(f"config.fgsm_eps={tuple(config.fgsm_eps)}; need finite eps >= 0")
    if not config.claim_eps or not set(config.claim_eps) <= set(config.fgsm_eps):
        raise ValueError(f"config.claim_eps={tuple(config.claim_eps)} must be a non-empty "
                         f"subset of config.fgsm_eps={tuple(config.fgsm_eps)}")  # fmt: skip
    if unknown := set(config.quality_variants) - set(QUALITY_VARIANTS):
        raise ValueError(f"config.quality_variants: {sorted(unknown)}; use {[*QUALITY_VARIANTS]}")
    if config.quality_repeats < 2 or min(config.quality_copies, default=0) < 2:
        raise ValueError(f"config.quality_repeats={config.quality_repeats}, quality_copies="
                         f"{tuple(config.quality_copies)}; need each >= 2")  # fmt: skip


def attack(kind: str, eps: float):
    """``result -> accuracy under FGSM`` of ``kind`` at ``eps``, named for tables and claims."""
    fn = lambda r: r[kind][f"{eps:g}"]
    fn.__name__ = f"{kind} FGSM acc (eps={eps:g})"
    return fn


def claims(config) -> list[Claim]:
    """Per noise setting: robustness by eps, attack and baseline; then test accuracy."""
    out = []
    for name, (family, sigma) in noise_settings(config).items():
        arm, tag = f"ulr_{name}", f"ULR ({family}, sigma={sigma:g})"
        bases = {"backprop": "backprop", f"noisy_bp_{name}": "backprop + the same noise"}
        for eps, kind, (base, what) in itertools.product(config.claim_eps, KINDS, bases.items()):
            label, metric = kind.replace("whitebox", "white-box"), attack(kind, eps)
            text = f"{tag}-trained models are more robust than {what} under {label} FGSM at eps="
            out.append(Claim(f"{text}{eps:g}", metric, arm, base, metric_name=metric.__name__,
                             per_example=f"{kind}_correct_{eps:g}"))  # fmt: skip
        vs_es = f"{tag} beats ES in test accuracy at equal forward evaluations (N={config.copies})"
        vs_bp = f"{tag} is within {ACCURACY_MARGIN:g} of backprop's test accuracy (equal steps)"
        out += [
            Claim(vs_es, "test_accuracy", arm, "es", per_example="test_correct"),
            Claim(vs_bp, "test_accuracy", arm, "backprop", margin=ACCURACY_MARGIN,
                  per_example="test_correct"),
        ]  # fmt: skip
    return out


def quality_estimator(config, name: str, n: int):
    """Variant ``name`` of `QUALITY_VARIANTS` at ``n`` forward evaluations per example."""
    options = QUALITY_VARIANTS[name]
    if options is None:
        return lr.es(num_copies=n, sigma=config.es_sigma)
    clean_pass = options.get("baseline") == "clean"  # a clean baseline costs one more
    return lr.ulr(num_copies=n - clean_pass, sigma=config.quality_sigma, **options)


def gradient_quality(config, ds, model, workdir: str) -> dict:
    """(a) on one batch at initialisation, per variant and cost (cached in quality.json)."""
    path = os.path.join(workdir, "quality.json")
    if os.path.exists(path):
        return ws.io.read_json(path)
    key = jax.random.PRNGKey(config.seed)
    params = model.init(key, ds.x_train[:1])["params"]
    batch = {"x": jnp.asarray(ds.x_train[: config.batch_size]),
             "y": jnp.asarray(ds.y_train[: config.batch_size])}  # fmt: skip
    mean_loss = ws.training.classification_loss(model.apply)
    per_example = ws.training.classification_loss(model.apply, per_example=True)
    with jax.default_matmul_precision("highest"):
        exact = jax.grad(lambda p: mean_loss(p, {}, batch, None)[0])(params)
    copies, out = [int(n) for n in config.quality_copies], {}
    for name in config.quality_variants:
        family = functools.partial(quality_estimator, config, name)
        m = ws.estimators.metrics_vs_samples(
            family, mean_loss if name == "es" else per_example, params, {}, batch, exact,
            jax.random.fold_in(key, 1), num_samples=copies, repeats=config.quality_repeats,
            family=True,
        )  # fmt: skip
        out[name] = {k: m[k] for k in ("cosine", "cosine_se", "relative_bias", "relative_rmse")}
        out[name]["forward_evaluations"] = [family(n).forward_evaluations for n in copies]
    ws.io.write_json(path, out)
    return out


@functools.partial(jax.jit, static_argnums=0)
def fgsm_correct(apply_fn, source, target, x, y, eps):
    """``[S, N]``: seed s's ``target`` right on ``x + eps sign(grad_x CE(source_s))``."""

    def one(source, target):
        logits = lambda z: apply_fn({"params": source}, z)
        ce = lambda z: optax.softmax_cross_entropy_with_integer_labels(logits(z), y).sum()
        adversarial = x + eps * jnp.sign(jax.grad(ce)(x))
        return jnp.argmax(apply_fn({"params": target}, adversarial), -1) == y

    return jax.vmap(one)(source, target)


def arm_fns(config, ds, model, workdir: str) -> dict:
    """Arm -> ``fn(seeds) -> [result per seed]``, each arm trained on the seed axis."""
    tx, eps = optax.adam(config.lr), config.fgsm_eps
    x, y = jnp.asarray(ds.x_test), jnp.asarray(ds.y_test)
    clean = ws.training.classification_loss(model.apply)
    per_example = ws.training.classification_loss(model.apply, per_example=True)
    backprop = (jax.value_and_grad, "1 fwd + 1 bwd")
    specs = {"backprop": (clean, *backprop)}  # arm -> (loss, estimator, forward evaluations)
    for name, (family, sigma) in noise_settings(config).items():
        ulr = lr.ulr(num_copies=config.copies, sigma=sigma, noise=family, baseline=config.baseline)
        specs[f"ulr_{name}"] = (per_example, ulr, ulr.forward_evaluations)
        specs[f"noisy_bp_{name}"] = (lr.noisy_loss(clean, sigma=sigma, noise=family), *backprop)
    es = lr.es(num_copies=config.copies, sigma=config.es_sigma)
    specs["es"] = (clean, es, es.forward_evaluations)

    def train(name, spec, seeds):  # -> (params, history)
        state, history = common.fit_seeds(
            config, workdir, name, seeds, ws.training.init_states(model, tx, ds.x_train[:1], seeds),
            spec[0], tx, ds, estimator=spec[1], apply_fn=model.apply, num_steps=config.steps,
            batch_size=config.batch_size, eval_every=config.eval_every, progress=False,
        )  # fmt: skip
        return state.params, history

    @functools.cache  # the transfer attacks' backprop models, shared by every arm
    def source(seeds: tuple[int, ...]):
        return train("source", specs["backprop"], [s + config.source_seed_offset for s in seeds])[0]

    def fn(arm, seeds):
        params, history = train(arm, specs[arm], seeds)
        curves = common.seed_curves(history, ["test_accuracy"])
        sources = {"whitebox": params, "transfer": source(tuple(seeds))}
        correct = {(k, f"{e:g}"): np.asarray(fgsm_correct(model.apply, sources[k], params, x, y, e))
                   for k in KINDS for e in eps}  # fmt: skip
        clean = ws.training.correct_predictions(
            model.apply, {"params": params}, ds.x_test, ds.y_test, seed_axis=True)  # fmt: skip
        return [{
            **{k: history[-1][k][i] for k in ("test_accuracy", "test_loss", "train_accuracy")},
            "forward_evaluations": specs[arm][2],
            "curve": curves[i],
            **{k: {f"{e:g}": float(correct[k, f"{e:g}"][i].mean()) for e in eps} for k in KINDS},
            "test_correct": ws.stats.pack_correct(clean[i]),
            **{f"{k}_correct_{e}": ws.stats.pack_correct(c[i]) for (k, e), c in correct.items()},
        } for i in range(len(seeds))]  # fmt: skip

    return {arm: functools.partial(fn, arm) for arm in specs}


def run(config, workdir: str) -> dict:
    """Runs (a)-(c); writes results.json and three figures."""
    validate(config)
    common.start(config, workdir)
    raw = common.load_dataset(config, standardize=False)
    ds = ws.data.standardize(raw)
    model = ws.models.MLP(features=tuple(config.hidden), num_classes=ds.num_classes)
    quality = gradient_quality(config, ds, model, workdir)
    per_arm = common.run_arms(workdir, config, arm_fns(config, ds, model, workdir))
    accuracies = ["test_accuracy", *(attack(k, e) for k in KINDS for e in config.fgsm_eps)]
    tables = {
        "Test accuracy and FGSM accuracy by arm": common.summarize(per_arm, accuracies),
        "Gradient quality at initialisation (cosine to jax.grad by forward evaluations)": {
            "columns": ["estimator", "forward evaluations", "cosine", "relative bias"],
            "rows": [[name, *row] for name, q in quality.items() for row in zip(
                q["forward_evaluations"], q["cosine"], q["relative_bias"], strict=True)],
        },
    }  # fmt: skip
    x = raw.x_train
    notes = [
        f"{config.dataset}, MLP {tuple(config.hidden)}, Adam {config.lr:g}, {config.steps} steps "
        f"of batch {config.batch_size}; forward evaluations per example and step: "
        + ", ".join(f"{arm} {r[0]['forward_evaluations']}" for arm, r in per_arm.items()),
        "noisy_bp arms: backprop through the ULR arm's noise, the control for the noise's effect",
        f"FGSM eps is in units of the training inputs' std: eps = 0.1 is {0.1 * x.std():.3g} in "
        f"raw units ({config.dataset} in [{x.min():g}, {x.max():g}]); models are attacked and "
        "evaluated without noise",
        f"transfer: crafted on backprop models trained with seed + {config.source_seed_offset}; "
        "its accuracy also rises as a model grows less like the source (ES keeps the most): "
        "read it next to white-box",
        "gradient quality: one batch at initialisation; relative bias includes Monte Carlo "
        f"error (~sqrt(variance/R), R={config.quality_repeats})",
    ]
    figures = [plot_quality(config, quality, workdir), *plot_arms(config, per_arm, workdir)]
    return common.save_results(
        workdir, config, "likelihood_ratio", claims=common.judge(claims(config), per_arm),
        tables=tables, figures=figures, notes=notes,
    )  # fmt: skip


def plot_quality(config, quality: dict, workdir: str) -> str:
    """gradient_quality.png: cosine (± its Monte Carlo s.e.) and relative bias by cost."""
    import matplotlib.pyplot as plt

    fig, (cosine, bias) = plt.subplots(1, 2, figsize=(9, 3.5))
    for name, q in quality.items():
        n, style = q["forward_evaluations"], "--" if name == "es" else "-"
        cosine.errorbar(n, q["cosine"], q["cosine_se"], marker="o", capsize=2, ls=style, label=name)
        bias.plot(n, q["relative_bias"], marker="o", ls=style)
    cosine.set(ylabel="cosine to jax.grad")
    bias.set(yscale="log", ylabel="relative bias (incl. MC error)")
    ticks = sorted({n for q in quality.values() for n in q["forward_evaluations"]})
    for ax in (cosine, bias):
        ax.set(
            xscale="log", xlabel="forward evaluations per example", xticks=ticks, xticklabels=ticks
        )
        ax.minorticks_off()
    if quality:  # no variants: an empty panel, no legend
        cosine.legend(fontsize=7)
    fig.suptitle(f"{config.dataset}, MLP {tuple(config.hidden)}, sigma={config.quality_sigma:g}")
    return common.savefig(fig, workdir, "gradient_quality.png", config)


def plot_arms(config, per_arm: dict, workdir: str) -> list[str]:
    """training.png (test accuracy by step) and robustness.png (accuracy by FGSM eps)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    common.plot_curves(ax, per_arm, "test_accuracy", style="o-")
    ax.set(xlabel="step", ylabel=f"test accuracy (mean, 95% interval, {config.num_seeds} seeds)")
    ax.legend(fontsize=7)
    paths = [common.savefig(fig, workdir, "training.png", config)]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5), sharey=True)
    eps = sorted(config.fgsm_eps)
    for ax, kind in zip(axes, KINDS, strict=True):
        for arm, results in per_arm.items():
            acc = [[r["test_accuracy"], *(attack(kind, e)(r) for e in eps)] for r in results]
            common.plot_mean_ci(ax, [0.0, *eps], acc, style="o-", label=arm, bars=True)
        ax.set(xlabel="FGSM eps (standardized inputs)", title=f"{kind} FGSM")
    axes[0].set(ylabel="test accuracy")
    axes[0].legend(fontsize=7)
    return [*paths, common.savefig(fig, workdir, "robustness.png", config)]


if __name__ == "__main__":
    cli.main(run, "likelihood_ratio")
