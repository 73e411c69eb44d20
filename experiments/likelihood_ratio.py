r"""Likelihood-ratio (ULR) gradients: gradient quality, training, adversarial robustness.

  python -m experiments.likelihood_ratio --workdir=runs/likelihood_ratio
  python -m experiments.likelihood_ratio --config=experiments/configs/likelihood_ratio.py:quick
  python -m experiments.likelihood_ratio --config.dataset=mnist1d --workdir=runs/lr_mnist1d

(a) Gradient quality: cosine and relative bias of ULR estimates (several
    variance reductions) and of ES (weight perturbation) against the exact
    gradient (jax.grad at HIGHEST precision), as functions of the forward
    evaluations per example (`wspace.estimators.metrics_vs_samples`; a clean
    baseline counts N + 1) -> gradient_quality.png.
(b) Training an MLP, all seeds of an arm as one program (a seed axis), every arm Adam
    with the same steps and batches:
    ``backprop``; ``es`` (N copies); for each noise setting "family:sigma":
    ``ulr_<family><sigma>`` (N copies, leave-one-out mean baseline) and
    ``noisy_bp_<family><sigma>``, backprop through the same injected noise
    (`likelihood_ratio.noisy_loss`): the control that separates the
    estimator's effect from the noise's -> training.png.
(c) FGSM (``x + eps sign(grad_x CE)``, on standardized inputs, so ``eps`` is in
    units of the training inputs' std; the results note the pixel equivalent; models
    evaluated without noise): white-box, and transfer from a separately trained
    backprop model (seed + ``source_seed_offset``) -> robustness.png.

Claims (paired by seed, 95% t-intervals): for each noise setting, ULR is more
robust than backprop and than the noise-injected backprop control under
white-box and transfer FGSM at each of ``claim_eps``; ULR beats ES in test accuracy at
equal forward evaluations (N per example and step); ULR is within 2 points of
backprop's test accuracy at equal steps (backprop: 1 forward + 1 backward).

Papers: Jiang et al., ICLR 2024, arXiv 2305.08960 (ULR); the robustness
protocol (Laplace noise, sigma = 1, FGSM) is the predecessor's, Peng et al.,
LR_Experiment (INFORMS JoC); ES: Salimans et al. 2017, arXiv 1703.03864.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import wspace as ws  # noqa: E402
from experiments import cli, common  # noqa: E402
from wspace import likelihood_ratio as lr  # noqa: E402

QUALITY_VARIANTS = {
    "none": dict(),
    "mean": dict(baseline="mean"),
    "clean": dict(baseline="clean"),
    "antithetic+mean": dict(antithetic=True, baseline="mean"),
    "layerwise+clean": dict(layerwise=True, baseline="clean"),
    "qmc": dict(qmc=True),
    "es": None,
}
ACCURACY_MARGIN = 0.02  # "within 2 points of backprop"


def parse_setting(setting: str) -> tuple[str, float]:
    """``"laplace:1.0"`` -> ``("laplace", 1.0)``; ValueError for a bad family or sigma."""
    family, sep, sigma = str(setting).partition(":")
    try:
        value = float(sigma)
    except ValueError:
        value = float("nan")
    if not sep or family not in lr.NOISES or not np.isfinite(value) or value <= 0:
        raise ValueError(
            f"config.noise_settings entry {setting!r}: use 'family:sigma' with family in "
            f"{lr.NOISES} and a finite sigma > 0, e.g. 'laplace:1.0'"
        )
    return family, value


def setting_name(setting: str) -> str:
    family, sigma = parse_setting(setting)
    return f"{family}{sigma:g}"


def validate(config) -> None:
    """Rejects bad fields before any work or file write."""
    common.require_at_least_one(
        config, "steps", "batch_size", "eval_every", "copies", "quality_repeats"
    )
    if config.quality_repeats < 2:
        raise ValueError(f"config.quality_repeats={config.quality_repeats}; need >= 2")
    if not (np.isfinite(config.lr) and config.lr > 0):
        raise ValueError(f"config.lr={config.lr}; must be finite and > 0")
    if not config.noise_settings:
        raise ValueError("config.noise_settings is empty; give at least one 'family:sigma'")
    for s in config.noise_settings:
        parse_setting(s)
    lr.ulr(num_copies=config.copies, baseline=config.baseline)  # raises on bad N / baseline
    lr.es(num_copies=config.copies, sigma=config.es_sigma)
    if any(not (np.isfinite(e) and e >= 0) for e in config.fgsm_eps):
        raise ValueError(f"config.fgsm_eps={tuple(config.fgsm_eps)}; need finite eps >= 0")
    if not config.claim_eps or not set(config.claim_eps) <= set(config.fgsm_eps):
        raise ValueError(
            f"config.claim_eps={tuple(config.claim_eps)} must be a non-empty subset of "
            f"config.fgsm_eps={tuple(config.fgsm_eps)}"
        )
    unknown = set(config.quality_variants) - set(QUALITY_VARIANTS)
    if unknown:
        raise ValueError(
            f"config.quality_variants has {sorted(unknown)}; use {sorted(QUALITY_VARIANTS)}"
        )
    if not config.quality_copies or min(config.quality_copies) < 2:
        raise ValueError(f"config.quality_copies={tuple(config.quality_copies)}; need N >= 2")


# ----------------------------------------------------------------------------- (a)


def gradient_quality(config, ds, model, workdir: str) -> dict:
    """Cosine and relative bias vs forward evaluations per variant (cached in quality.json)."""
    path = os.path.join(workdir, "quality.json")
    if os.path.exists(path):
        return ws.io.read_json(path)
    key = jax.random.PRNGKey(config.seed)
    params = model.init(key, ds.x_train[:1])["params"]
    batch = {
        "x": jnp.asarray(ds.x_train[: config.batch_size]),
        "y": jnp.asarray(ds.y_train[: config.batch_size]),
    }
    per_ex = ws.training.classification_loss(model.apply, per_example=True)
    mean_loss = ws.training.classification_loss(model.apply)
    with jax.default_matmul_precision("highest"):
        exact = jax.grad(lambda p: mean_loss(p, {}, batch, None)[0])(params)
    out = {}
    for name in config.quality_variants:
        options = QUALITY_VARIANTS[name]
        if options is None:
            family = lambda m: lr.es(num_copies=m, sigma=config.es_sigma)  # noqa: E731
            loss = mean_loss
        else:
            family = lambda m, o=options: lr.ulr(  # noqa: E731
                num_copies=m - 1 if o.get("baseline") == "clean" else m,
                sigma=config.quality_sigma,
                **o,
            )
            loss = per_ex
        copies = [int(n) for n in config.quality_copies]
        m = ws.estimators.metrics_vs_samples(
            family,
            loss,
            params,
            {},
            batch,
            exact,
            jax.random.fold_in(key, 1),
            num_samples=copies,
            repeats=int(config.quality_repeats),
            family=True,
        )
        out[name] = {
            "forward_evaluations": [family(n).forward_evaluations for n in copies],
            "cosine": m["cosine"],
            "cosine_se": m["cosine_se"],
            "relative_bias": m["relative_bias"],
            "relative_rmse": m["relative_rmse"],
        }
    ws.io.write_json(path, out)
    return out


# ----------------------------------------------------------------------------- (b), (c)


def _arm_specs(config, model) -> dict:
    """arm -> (loss, estimator, forward evaluations per example and step); built once."""
    clean = ws.training.classification_loss(model.apply)
    specs = {"backprop": (clean, jax.value_and_grad, "1 fwd + 1 bwd")}
    per_example = ws.training.classification_loss(model.apply, per_example=True)
    for s in config.noise_settings:
        family, sigma = parse_setting(s)
        est = lr.ulr(num_copies=config.copies, sigma=sigma, noise=family, baseline=config.baseline)
        specs[f"ulr_{setting_name(s)}"] = (per_example, est, est.forward_evaluations)
        noisy = lr.noisy_loss(clean, sigma=sigma, noise=family)
        specs[f"noisy_bp_{setting_name(s)}"] = (noisy, jax.value_and_grad, "1 fwd + 1 bwd")
    es = lr.es(num_copies=config.copies, sigma=config.es_sigma)
    specs["es"] = (clean, es, es.forward_evaluations)
    return specs


def train_seeds(config, ds, model, tx, spec, seeds):
    """Trains one model per seed as one program (a seed axis); returns params and history."""
    loss, estimator, _ = spec
    step = ws.training.make_train_step(
        loss, tx, estimator=estimator, mode=config.mode, seed_axis=True
    )
    state, history = ws.training.fit(
        ws.training.init_states(model, tx, ds.x_train[:1], seeds), step, ds,
        apply_fn=model.apply, num_steps=config.steps, batch_size=config.batch_size, seed=seeds,
        mode=config.mode, eval_every=config.eval_every, progress=False,
    )  # fmt: skip
    return state.params, history


@functools.partial(jax.jit, static_argnums=0)
def fgsm(apply_fn, params, x, y, eps):
    """``x + eps sign(grad_x CE)`` against each seed's network (params with a seed axis)."""

    def one(p):
        ce = lambda z: optax.softmax_cross_entropy_with_integer_labels(  # noqa: E731
            apply_fn({"params": p}, z), y
        ).sum()
        return x + eps * jnp.sign(jax.grad(ce)(x))

    return jax.vmap(one)(params)


@functools.partial(jax.jit, static_argnums=0)
def _correct(apply_fn, params, x, y):
    """``[S, N]``: whether seed ``i``'s network gets each of its own inputs ``x[i]`` right."""
    return jax.vmap(lambda p, xs: jnp.argmax(apply_fn({"params": p}, xs), -1) == y)(params, x)


def arm_fns(config, ds, model) -> dict:
    """Arm -> ``fn(seeds) -> [result per seed]``, each arm trained on the seed axis."""
    tx = optax.adam(config.lr)
    specs = _arm_specs(config, model)
    x, y = jnp.asarray(ds.x_test), jnp.asarray(ds.y_test)
    eps = [float(e) for e in config.fgsm_eps]
    sources = {}  # seeds -> FGSM inputs crafted on their sources (shared by every arm)

    def transfer_inputs(seeds):
        if tuple(seeds) not in sources:
            offset = [s + config.source_seed_offset for s in seeds]
            params, _ = train_seeds(config, ds, model, tx, specs["backprop"], offset)
            sources[tuple(seeds)] = {f"{e:g}": fgsm(model.apply, params, x, y, e) for e in eps}
        return sources[tuple(seeds)]

    def arm_fn(spec):
        def fn(seeds):
            params, history = train_seeds(config, ds, model, tx, spec, seeds)
            white = {f"{e:g}": fgsm(model.apply, params, x, y, e) for e in eps}
            attacks = jax.tree.map(  # kind -> eps -> [S, N]: correct on each seed's inputs
                lambda a: np.asarray(_correct(model.apply, params, a, y)),
                {"whitebox": white, "transfer": transfer_inputs(seeds)},
            )
            clean = ws.training.correct_predictions(
                model.apply, {"params": params}, ds.x_test, ds.y_test, seed_axis=True
            )
            last, seed_of = history[-1], lambda tree, i: jax.tree.map(lambda c: c[i], tree)
            return [
                {
                    **{k: last[k][i] for k in ("test_accuracy", "test_loss", "train_accuracy")},
                    "forward_evaluations": spec[2],
                    **jax.tree.map(lambda c: float(c.mean()), seed_of(attacks, i)),
                    "curve": [[r["step"], r["test_accuracy"][i]] for r in history],
                    "test_correct": common.pack_correct(clean[i]),
                    **{f"{k}_correct": v for k, v in
                       jax.tree.map(common.pack_correct, seed_of(attacks, i)).items()},
                }
                for i in range(len(seeds))
            ]  # fmt: skip

        return fn

    return {arm: arm_fn(spec) for arm, spec in specs.items()}


def _attack(kind, eps):
    key = f"{eps:g}"
    fn = lambda r: r[kind][key]  # noqa: E731
    fn.__name__ = f"{kind} FGSM acc (eps={key})"
    return fn


def _claims(config, per_arm) -> list[dict]:
    claims = []
    for s in config.noise_settings:
        ulr_arm, ctrl = f"ulr_{setting_name(s)}", f"noisy_bp_{setting_name(s)}"
        family, sigma = parse_setting(s)
        tag = f"ULR ({family}, sigma={sigma:g})"
        attacks = [(k, e) for e in config.claim_eps for k in ("whitebox", "transfer")]
        for kind, eps in attacks:
            metric, label = _attack(kind, eps), kind.replace("whitebox", "white-box")
            for base, name in (("backprop", "backprop"), (ctrl, "backprop + the same noise")):
                claims.append(
                    common.compare(
                        f"{tag}-trained models are more robust than {name} under {label} "
                        f"FGSM at eps={eps:g}",
                        metric,
                        ulr_arm,
                        base,
                        per_arm,
                        metric_name=metric.__name__,
                    )
                )
        claims.append(
            common.compare(
                f"{tag} beats ES in test accuracy at equal forward evaluations (N={config.copies})",
                "test_accuracy",
                ulr_arm,
                "es",
                per_arm,
            )
        )
        claims.append(
            common.compare(
                f"{tag} is within {ACCURACY_MARGIN:g} of backprop's test accuracy (equal steps)",
                "test_accuracy",
                ulr_arm,
                "backprop",
                per_arm,
                margin=ACCURACY_MARGIN,
            )
        )
    return claims


def run(config, workdir: str) -> dict:
    """Runs parts (a)-(c); writes results.json and three figures."""
    validate(config)
    common.start(config, workdir)
    raw = common.load_dataset(config, standardize=False).x_train
    raw_std, raw_range = float(raw.std()), (float(raw.min()), float(raw.max()))
    ds = common.load_dataset(config)
    model = ws.models.MLP(features=tuple(config.hidden), num_classes=ds.num_classes)
    quality = gradient_quality(config, ds, model, workdir)
    per_arm = common.run_arms(workdir, config, arm_fns(config, ds, model))
    attacks = [_attack(k, e) for k in ("whitebox", "transfer") for e in config.fgsm_eps]
    tables = {
        "Test accuracy and FGSM accuracy by arm": common.summarize(
            per_arm, ["test_accuracy", *attacks]
        ),
        "Forward evaluations per example and step": {
            "columns": ["arm", "forward evaluations"],
            "rows": [[arm, str(r[0]["forward_evaluations"])] for arm, r in per_arm.items()],
        },
        "Gradient quality at initialisation (cosine to jax.grad by forward evaluations)": {
            "columns": ["estimator", "forward evaluations", "cosine", "relative bias"],
            "rows": [
                [name, n, c, b]
                for name, q in quality.items()
                for n, c, b in zip(
                    q["forward_evaluations"], q["cosine"], q["relative_bias"], strict=True
                )
            ],
        },
    }
    figures = [
        _plot_quality(config, quality, workdir),
        _plot_training(config, per_arm, workdir),
        _plot_robustness(config, per_arm, workdir),
    ]
    notes = [
        f"{config.dataset}, MLP {tuple(config.hidden)}, Adam {config.lr:g}, {config.steps} steps "
        f"of batch {config.batch_size}; ULR and ES with N={config.copies} copies",
        f"FGSM eps is in standardized units (inputs / the training inputs' std): eps = 0.1 "
        f"is {0.1 * raw_std:.3g} in raw pixel units ({config.dataset} pixels in "
        f"[{raw_range[0]:g}, {raw_range[1]:g}]); every model is attacked and evaluated "
        "without noise",
        "transfer: adversarial examples crafted on a backprop model trained with seed + "
        f"{config.source_seed_offset}",
        "noisy_bp arms: backprop through the same injected noise as the ULR arm "
        "(likelihood_ratio.noisy_loss), the control for the noise's own effect",
        "transfer accuracy also rises as a model grows less similar to the source (ES, the "
        "least accurate arm, keeps the most under transfer): read it next to white-box",
        "gradient quality: one batch at initialisation; relative bias includes Monte Carlo "
        f"error (~sqrt(variance/R), R={config.quality_repeats})",
    ]
    return common.save_results(
        workdir,
        config,
        "likelihood_ratio",
        claims=_claims(config, per_arm),
        tables=tables,
        figures=figures,
        notes=notes,
    )


# ----------------------------------------------------------------------------- figures


def _plot_quality(config, quality, workdir):
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for name, q in quality.items():
        style = "--" if name == "es" else "-"
        axes[0].errorbar(
            q["forward_evaluations"], q["cosine"], yerr=q["cosine_se"], marker="o", capsize=2,
            linestyle=style, label=name,
        )  # fmt: skip
        axes[1].plot(q["forward_evaluations"], q["relative_bias"], marker="o", linestyle=style)
    axes[0].set(xscale="log", xlabel="forward evaluations per example", ylabel="cosine to jax.grad")
    axes[1].set(
        xscale="log", yscale="log", xlabel="forward evaluations per example",
        ylabel="relative bias (incl. MC error)",
    )  # fmt: skip
    ticks = sorted({n for q in quality.values() for n in q["forward_evaluations"]})
    for ax in axes:
        ax.set_xticks(ticks, [str(n) for n in ticks])
        ax.minorticks_off()
    if quality:  # no variants: an empty panel, no legend
        axes[0].legend(fontsize=7)
    fig.suptitle(f"{config.dataset}, MLP {tuple(config.hidden)}, sigma={config.quality_sigma:g}")
    return common.savefig(fig, workdir, "gradient_quality.png", config)


def _plot_training(config, per_arm, workdir):
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for arm, results in per_arm.items():
        curves = np.asarray([r["curve"] for r in results])  # (seeds, points, 2)
        common.plot_mean_ci(ax, curves[0, :, 0], curves[:, :, 1], style="o-", label=arm)
    ax.set(xlabel="step", ylabel=f"test accuracy (mean, 95% interval, {config.num_seeds} seeds)")
    ax.legend(fontsize=7)
    return common.savefig(fig, workdir, "training.png", config)


def _plot_robustness(config, per_arm, workdir):
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5), sharey=True)
    eps = [0.0, *sorted(float(e) for e in config.fgsm_eps)]
    for ax, kind in zip(axes, ("whitebox", "transfer"), strict=True):
        for arm, results in per_arm.items():
            accs = np.asarray(
                [[r["test_accuracy"]] + [r[kind][f"{e:g}"] for e in eps[1:]] for r in results]
            )
            common.plot_mean_ci(ax, eps, accs, style="o-", label=arm, bars=True)
        ax.set(xlabel="FGSM eps (standardized inputs)", title=f"{kind} FGSM")
    axes[0].set_ylabel("test accuracy")
    axes[0].legend(fontsize=7)
    return common.savefig(fig, workdir, "robustness.png", config)


if __name__ == "__main__":
    cli.main(run, "likelihood_ratio")
