r"""Straight-through estimators and forward-only ULR on stochastic binary networks (SBNs).

(a) Arms ``sbn_<estimator>``: ULR, principled ST, identity ST and REINFORCE against the exact
gradient (all states enumerated) of the ST paper's toy SBN on two-moons: bias, cosine and
relative RMSE at equal forward evaluations per example, Adam training scored by exact loss.
(b) Arms training MLPs with Bernoulli weights and binary activations on ``config.dataset``,
each changing one thing of its parent (`ARMS`): mode-network and mean-of-samples accuracy.

References: Shekhovtsov & Yanush 2021 (arXiv 2006.06880); Shekhovtsov, Yanush & Flach
2020 (arXiv 2006.03143, gradeval); Jiang et al. 2024 (arXiv 2305.08960, ULR); Williams 1992.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import wspace as ws
from experiments import cli, common
from wspace import straight_through as st

SBN_ESTIMATORS = ("ulr", "st", "identity", "reinforce")
ARMS = {  # part (b): arm -> (its parent, the one field it changes); roots have no parent
    "act_st": (None, dict(activation="st", binary_weights=False)),
    **{f"act_{e}": ("act_st", dict(activation=e)) for e in st.LAYER_ESTIMATORS if e != "st"},
    "bin_st": (None, dict(activation="st", binary_weights=True, clip=0.0)),  # clip: latents
    "bin_identity": ("bin_st", dict(activation="identity")),
    "bin_st_uniform": ("bin_st", dict(weight_noise="uniform")),
    "bin_st_uniform_clip": ("bin_st_uniform", dict(clip=1.0)),
    "bin_st_sgd_latent": ("bin_st", dict(weight_estimator="st")),
}
ARM_SPECS: dict[str, dict] = {}  # the full BinaryMLP fields (+ clip) of each arm
for _arm, (_parent, _change) in ARMS.items():  # a parent comes before its children
    ARM_SPECS[_arm] = {**ARM_SPECS.get(_parent, {}), **_change}
TRAIN_ARMS = tuple(ARM_SPECS)
PAIRS = (("ulr", "reinforce"), ("st", "ulr"))  # the SBN comparisons: (arm, baseline)


def claims(config) -> list[common.Claim]:
    """The claims, paired by seed (`common.judge` skips those whose arms did not run)."""
    f, claim = max(config.sbn_budgets), common.Claim
    return [
        claim("Principled ST has lower exact bias than identity ST (SBN, at init)",
              "exact_relative_bias", "sbn_st", "sbn_identity", higher_is_better=False),
        *[claim(f"{a} has a higher cosine to the exact SBN gradient than {b} at {f} forward "
                "evaluations", f"cosine_at_{f}", f"sbn_{a}", f"sbn_{b}") for a, b in PAIRS],
        *[claim(f"{a} trains the SBN to a lower exact loss than {b} at equal forward "
                "evaluations", "final_exact_loss", f"sbn_{a}", f"sbn_{b}", higher_is_better=False)
          for a, b in PAIRS],
        *[claim(f"Principled ST beats identity ST with binary weights on {config.dataset} "
                f"({what})", f"{key}_accuracy", "bin_st", "bin_identity",
                per_example=f"{key}_correct")
          for key, what in (("test", "mode network"), ("sampled_test", "mean of samples"))],
    ]  # fmt: skip


def validate(config) -> None:
    """Rejects bad fields before any work or file write (either arm list may be empty)."""
    lists = {"sbn_estimators": SBN_ESTIMATORS, "train_arms": TRAIN_ARMS}
    common.check(
        config, subsets={field: allowed for field, allowed in lists.items() if config[field]},
        counts=("sbn_points", "sbn_steps", "sbn_evals", "sbn_repeats", "sbn_train_evals",
                "steps", "batch_size", "eval_samples"),
        positive=("sbn_lr", "ulr_head_sigma", "lr", "latent_lr"),
        widths=("sbn_hidden", "sbn_budgets", "hidden"),
    )  # fmt: skip
    for field in ("sbn_budgets", "sbn_repeats", "sbn_train_evals"):
        if min(np.ravel(config[field])) < 2:  # leave-one-out baselines, sample variances
            raise ValueError(f"config.{field}={config[field]!r}; must be >= 2")
    if sum(config.sbn_hidden) > st.MAX_UNITS:  # all 2^units states are enumerated
        raise ValueError(f"config.sbn_hidden={config.sbn_hidden}; at most {st.MAX_UNITS} units")


def sbn_arm_fns(config, workdir: str) -> dict:
    """Part (a): ``sbn_<estimator>`` -> ``fn(seeds)``; all start from a seed's same init."""
    x, y = ws.data.two_moons(config.sbn_points)
    ds, batch = ws.data.Dataset("two_moons", x, y, x, y, num_classes=2), {"x": x, "y": y}
    hidden, evals = tuple(config.sbn_hidden), config.sbn_train_evals
    activations = {"st": "st", "identity": "identity", "ulr": "sign", "reinforce": "st"}
    models = {e: st.BinaryMLP(hidden, num_classes=2, activation=a) for e, a in activations.items()}
    tx = optax.adam(config.sbn_lr)
    shapes = jax.eval_shape(models["st"].init, jax.random.PRNGKey(0), x[:1])  # no values used
    over_seeds = functools.partial(jax.vmap, in_axes=(0, None, None))  # params [S, ...]
    slf = st.states_loss(models["st"].apply, shapes, x)
    exact = over_seeds(st.exact_value_and_grad(slf))
    # ULR: logistic noise of scale 1 on the BinaryDense outputs, the SBN's own noise
    sigma = {f"BinaryDense_{i}": 1.0 for i in range(len(hidden))} | {"head": config.ulr_head_sigma}
    ulr = functools.partial(ws.likelihood_ratio.ulr, noise="logistic", sigma=sigma,
                            baseline="mean", layer_types=(st.BinaryDense, nn.Dense))  # fmt: skip
    budgets = sorted(set(config.sbn_budgets) | {evals})
    families = {  # built once: the estimator objects key the samplers' compilation cache
        "reinforce": {m: st.reinforce_estimator(slf, m) for m in budgets},
        "ulr": {m: ulr(num_copies=m) for m in budgets},
    }

    def measure(est: str, seeds: list[int]) -> list[dict]:
        family = families.get(est)  # None for ST: the mean of m single-sample estimates
        loss = ws.training.classification_loss(models[est].apply, per_example=est == "ulr")
        state = ws.training.init_states(models["st"], tx, x[:1], seeds)
        loss0, grads = exact(state.params, x, y)
        curves = ws.estimators.metrics_vs_samples(
            family.get if family else jax.value_and_grad, loss, state.params, {}, batch, grads,
            jax.vmap(jax.random.PRNGKey)(1000 + jnp.asarray(seeds)), family=family is not None,
            num_samples=config.sbn_budgets, repeats=config.sbn_repeats, seed_axis=True,
        )  # fmt: skip
        family = family or {evals: ws.estimators.average_estimator(jax.value_and_grad, evals)}
        _, history = common.fit_seeds(
            config, workdir, f"sbn_{est}", seeds, state, loss, tx, ds, mode="jit",
            estimator=family[evals], num_steps=config.sbn_steps, batch_size=config.sbn_points,
            eval_every=max(config.sbn_steps // config.sbn_evals, 1), progress=False,
            eval_fn=lambda s: {"exact_loss": exact(s.params, x, y)[0]},
        )  # fmt: skip
        losses = np.transpose([np.asarray(loss0).tolist()] + [r["exact_loss"] for r in history])
        out = [
            {
                **{k: c[k] for k in ("forward_evaluations", "cosine", "relative_rmse")},
                **{f"cosine_at_{f}": v for f, v in zip(c["num_samples"], c["cosine"], strict=True)},
                # Monte Carlo ||E g - G|| / ||G|| at the largest budget (debiased, clipped at 0)
                "mc_relative_bias": float(np.sqrt(max(c["bias_squared"][-1], 0)) / c["norm"]),
                "train_forward_evaluations": [0] + [r["step"] * evals for r in history],
                "train_exact_loss": curve.tolist(),
                "final_exact_loss": float(curve[-1]),
            }
            for c, curve in zip(curves, losses, strict=True)
        ]
        if est in ("st", "identity"):  # ||E[ST estimate] - G|| / ||G||, both by enumeration
            slf_st = st.states_loss(models[est].apply, shapes, x, straight_through=True)
            _, means = over_seeds(st.expected_estimate(slf_st))(state.params, x, y)
            norm = jax.vmap(optax.tree.norm)
            bias = norm(jax.tree.map(jnp.subtract, means, grads)) / norm(grads)
            out = [{**o, "exact_relative_bias": b} for o, b in zip(out, bias.tolist(), strict=True)]
        return out

    return {f"sbn_{e}": functools.partial(measure, e) for e in config.sbn_estimators}


def build_arm(arm: str, config, num_classes: int):
    """Model and optimizer of a part-(b) arm: latents by mirror descent (`st.mirror_descent`;
    ``weight_estimator="st"`` scales its gradient by 2F': plain SGD on them), the rest Adam."""
    spec = dict(ARM_SPECS[arm])  # BinaryMLP's fields (its defaults otherwise) and clip
    clip = spec.pop("clip", 0.0)
    model = st.BinaryMLP(tuple(config.hidden), num_classes=num_classes, **spec)
    if not spec["binary_weights"]:
        return model, optax.adam(config.lr)
    parts = {"latent": st.mirror_descent(config.latent_lr, clip=clip or None)}
    return model, optax.multi_transform(parts | {"real": optax.adam(config.lr)}, st.latent_labels)


def train_arm(arm: str, config, ds, workdir: str, seeds: list[int]) -> list[dict]:
    """Trains a part-(b) arm for all ``seeds`` at once (a seed axis); one result per seed."""
    model, tx = build_arm(arm, config, ds.num_classes)
    state, history = common.fit_seeds(
        config, workdir, arm, seeds, ws.training.init_states(model, tx, ds.x_train[:1], seeds),
        ws.training.classification_loss(model.apply), tx, ds, apply_fn=model.apply,
        num_steps=config.steps, batch_size=config.batch_size,
        eval_every=max(config.steps // 4, 1), progress=config.progress,
    )  # fmt: skip
    mode_correct = ws.training.correct_predictions(model.apply, state.variables, ds.x_test,
                                                   ds.y_test, seed_axis=True)  # fmt: skip
    keys = [jax.random.split(jax.random.PRNGKey(10_000 + s), config.eval_samples) for s in seeds]
    sample = lambda p, k: st.sampled_predictions(model.apply, p, ds.x_test, k)  # noqa: E731
    sampled_correct = np.asarray(jax.vmap(sample)(state.params, jnp.stack(keys))) == ds.y_test
    curves = common.seed_curves(history, ["test_accuracy", "train_loss"])
    latents = jax.tree.leaves(jax.tree.map(  # mean |latent| per seed, on latent leaves only
        lambda v, label: np.abs(v).reshape(len(seeds), -1).mean(1) if label == "latent" else None,
        state.params, st.latent_labels(state.params),
    ))  # fmt: skip
    return [
        {
            **{k: history[-1][k][i] for k in ("test_accuracy", "train_accuracy", "train_loss")},
            "sampled_test_accuracy": float(sampled_correct[i].mean()),  # test_accuracy: mode net
            "mean_abs_latent": float(np.mean([v[i] for v in latents])) if latents else 0.0,
            "curve": curves[i],
            "test_correct": ws.stats.pack_correct(mode_correct[i]),
            "sampled_test_correct": ws.stats.pack_correct(sampled_correct[i]),
        }
        for i in range(len(seeds))
    ]  # fmt: skip


def run(config, workdir: str) -> dict:
    """Runs parts (a) and (b); writes results.json and the figures; returns the results."""
    validate(config)
    common.start(config, workdir)
    ds = common.load_dataset(config)
    train = {a: functools.partial(train_arm, a, config, ds, workdir) for a in config.train_arms}
    per_arm = common.run_arms(workdir, config, sbn_arm_fns(config, workdir) | train)
    sbn = {k: v for k, v in per_arm.items() if k.startswith("sbn_")}
    trained = {k: v for k, v in per_arm.items() if k not in sbn}
    tables, figures = {}, []
    if sbn:
        title = (f"SBN {list(config.sbn_hidden)} (exact gradients): bias, cosine at F forward "
                 f"evaluations per example, exact loss after {config.sbn_steps} steps at "
                 f"{config.sbn_train_evals} evaluations/step")  # fmt: skip
        cols = ["mc_relative_bias", *[f"cosine_at_{f}" for f in config.sbn_budgets]]
        tables[title] = common.summarize(sbn, [*cols, "final_exact_loss"])
        figures.append(_plot_sbn(sbn, workdir, config))
    if trained:
        tables[f"Training on {config.dataset}: mode network vs mean of S samples"] = (
            common.summarize(trained, ["test_accuracy", "sampled_test_accuracy", "train_accuracy"])
        )
        figures.append(_plot_training(trained, workdir, config))
    notes = [
        "SBN: fixed 2-D two-moons data; seeds vary the initialisation. Forward evaluations are "
        "per example; ST and REINFORCE also run a backward pass per sample, ULR none. ULR's "
        "logistic noise of scale 1 on the binary layers is exactly the SBN's noise; its noise of "
        f"scale {config.ulr_head_sigma} on the logits smooths the loss: its bias vs the SBN's.",
        "mc_relative_bias: sqrt(max(0, ||mean - G||^2 - var/R)) / ||G|| at the largest budget.",
        f"latent_lr={config.latent_lr:g} in every arm (100: the best of {{10, 30, 100, 300}} for "
        "bin_st, and for bin_identity, on digits at seed 0, a seed of the claims).",
    ]
    judged = common.judge(claims(config), per_arm, skip_missing=True)
    return common.save_results(workdir, config, "straight_through", claims=judged,
                               tables=tables, figures=figures, notes=notes)  # fmt: skip


def _plot_sbn(sbn, workdir, config) -> str:
    import matplotlib.pyplot as plt

    fig, (ax_cos, ax_train) = plt.subplots(1, 2, figsize=(10, 3.8))
    for arm, results in sbn.items():
        f, t = results[0]["forward_evaluations"], results[0]["train_forward_evaluations"]
        common.plot_mean_ci(ax_cos, f, [r["cosine"] for r in results], style="o-", label=arm[4:])
        common.plot_mean_ci(ax_train, t, [r["train_exact_loss"] for r in results], label=arm[4:])
    ax_cos.set_xscale("log", base=2)
    ax_cos.set(xlabel="forward evaluations per example", ylabel="cosine to exact gradient",
               title=f"SBN {list(config.sbn_hidden)} at init (95% CI over seeds)")  # fmt: skip
    ax_train.set(xlabel="forward evaluations per example", ylabel="exact expected loss",
                 title=f"Adam, {config.sbn_train_evals} evaluations/step")  # fmt: skip
    ax_cos.legend(fontsize=8)
    fig.tight_layout()
    return common.savefig(fig, workdir, "sbn_estimators.png", config)


def _plot_training(trained, workdir, config) -> str:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(0.8 * len(trained) + 3, 3.6))
    samples = f"mean of {config.eval_samples} samples"
    series = {"test_accuracy": "mode network", "sampled_test_accuracy": samples}
    common.plot_by_arm(ax, trained, series)
    ax.set(ylabel="test accuracy (95% interval over seeds)", title=config.dataset)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return common.savefig(fig, workdir, "training.png", config)


if __name__ == "__main__":
    cli.main(run, "straight_through")
