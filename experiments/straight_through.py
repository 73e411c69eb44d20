r"""Straight-through estimators and forward-only ULR on stochastic binary networks (SBNs).

  python -m experiments.straight_through --workdir=runs/straight_through
  python -m experiments.straight_through --config=experiments/configs/straight_through.py:quick

(a) **ULR vs principled ST vs identity ST vs REINFORCE on one SBN with exact gradients**
(the comparison neither paper made). The SBN is the ST paper's toy: 2 inputs, layers of 5
logistic-noise binary units (``sbn_hidden``), a real linear head, softmax cross-entropy
on ``sbn_points`` two-moons points; its exact expected loss and gradient come from
enumerating all ``2^units`` states per point. Per seed (a fresh initialisation), for each
estimator: the exact bias of the ST estimators (enumeration), the Monte Carlo bias of all,
cosine and relative RMSE to the exact gradient at equal forward evaluations per example
(``sbn_budgets``: ST averages F samples, REINFORCE uses F samples with a leave-one-out
baseline, ULR F noisy copies with the leave-one-out mean baseline), and Adam training at
equal forward evaluations per step (``sbn_train_evals``) scored by the exact expected loss.

How ULR's noise relates to the SBN's: ULR adds noise to each layer's output. Put on the
pre-activations of the binary layers (``BinaryMLP(activation="sign")``, layer types
``BinaryDense`` and ``Dense``), logistic noise of scale 1 followed by a hard sign *is*
the SBN's own noise (``P(x = +1) = sigmoid(a)``): ULR runs exactly the SBN, and its
estimate for the binary layers is unbiased for the SBN's gradient, with no extra noise.
Only the real head needs noise of its own (``ulr_head_sigma`` on the logits), which
smooths the loss: ULR estimates the gradient of ``E[L(logits + sigma_h e)]``, not of the
SBN loss itself; its measured bias against the exact SBN gradient is that smoothing.

(b) **Training binary networks on ``config.dataset``** (digits by default): MLPs with
binary (Bernoulli) weights and binary activations, latents by mirror descent (=
``optax.sgd``) and the real parameters by Adam. Arms change one thing each:
``bin_identity`` vs ``bin_st`` the activation estimator; ``bin_st_uniform`` the weight
noise (uniform); ``bin_st_uniform_clip`` adds the clipping of latents to [-1, 1];
``bin_st_sgd_latent`` the weight gradient (2F' factor: SGD on latents instead of mirror
descent, same step size); ``act_<est>`` real weights with each activation estimator
(`ARM_SPECS`, `ARM_PARENTS`). Every arm reports the
mode network's accuracy (``sign`` of every unit) and the mean-of-S-samples accuracy side
by side.

Claims (paired by seed, 95% intervals): principled ST has lower exact bias than identity
ST at initialisation; principled ST beats identity ST in test accuracy with binary weights
(mode and mean-of-samples); the ULR / ST / REINFORCE table with exact ground truth.

References: Shekhovtsov & Yanush 2021 (arXiv 2006.06880); Shekhovtsov, Yanush & Flach
2020 (arXiv 2006.03143, the gradeval protocol); Jiang et al. 2024 (arXiv 2305.08960, ULR);
Williams 1992 (REINFORCE).
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
_BIN = dict(binary_weights=True, weight_noise="logistic", weight_estimator="identity", clip=0.0)
ARM_SPECS = {  # each arm changes one field of its parent (ARM_PARENTS)
    **{f"act_{e}": dict(activation=e, binary_weights=False) for e in st.LAYER_ESTIMATORS},
    "bin_st": dict(activation="st", **_BIN),
    "bin_identity": dict(_BIN, activation="identity"),
    "bin_st_uniform": dict(_BIN, activation="st", weight_noise="uniform"),
    "bin_st_uniform_clip": dict(_BIN, activation="st", weight_noise="uniform", clip=1.0),
    "bin_st_sgd_latent": dict(_BIN, activation="st", weight_estimator="st"),
}
ARM_PARENTS = {
    **{f"act_{e}": "act_st" for e in st.LAYER_ESTIMATORS if e != "st"},
    "bin_identity": "bin_st",
    "bin_st_uniform": "bin_st",
    "bin_st_uniform_clip": "bin_st_uniform",
    "bin_st_sgd_latent": "bin_st",
}
TRAIN_ARMS = tuple(ARM_SPECS)


def validate(config) -> None:
    """Rejects bad fields before any work or file write."""
    for est in config.sbn_estimators:
        if est not in SBN_ESTIMATORS:
            raise ValueError(f"config.sbn_estimators has {est!r}; use some of {SBN_ESTIMATORS}")
    for arm in config.train_arms:
        if arm not in TRAIN_ARMS:
            raise ValueError(f"config.train_arms has {arm!r}; use some of {TRAIN_ARMS}")
    if not config.sbn_budgets or min(config.sbn_budgets) < 2:
        raise ValueError(f"config.sbn_budgets={config.sbn_budgets}; need values >= 2")
    if sum(config.sbn_hidden) > st.MAX_UNITS or min(config.sbn_hidden, default=0) < 1:
        raise ValueError(
            f"config.sbn_hidden={config.sbn_hidden}: widths >= 1 and at most "
            f"{st.MAX_UNITS} binary units in all (2^units states are enumerated)"
        )
    common.require_at_least_one(
        config, "sbn_points", "sbn_steps", "sbn_evals", "steps", "batch_size", "eval_samples"
    )
    if config.sbn_repeats < 2 or config.sbn_train_evals < 2:
        raise ValueError("config.sbn_repeats and config.sbn_train_evals must be >= 2")
    for field in ("sbn_lr", "ulr_head_sigma", "lr", "latent_lr"):
        if not 0 < config[field] < float("inf"):
            raise ValueError(f"config.{field}={config[field]}; must be finite and > 0")


# ------------------------------------------------------------------- (a) the SBN


def two_moons(n: int, seed: int = 0):
    """Two interleaved half-moons with Gaussian jitter (0.2), standardised; labels 0/1."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    t = rng.uniform(0, np.pi, n)
    x = np.stack(
        [np.cos(t) + y * (1 - 2 * np.cos(t)) - 0.5 * y, np.sin(t) * (1 - 2 * y) + 0.5 * y], 1
    )
    x = x + 0.2 * rng.normal(size=x.shape)
    x = (x - x.mean(0)) / x.std(0)
    return x.astype(np.float32), y.astype(np.int32)


def reinforce_estimator(slf: st.StatesLoss, num_samples: int):
    """`st.reinforce` in the library's estimator signature (it ignores ``loss_fn``)."""
    fn = st.reinforce(slf, num_samples)

    def estimator(loss_fn, has_aux=True):
        del loss_fn  # REINFORCE needs the network as a function of its states: slf

        def call(params, model_state, batch, key):
            loss, grads = fn(params, key, batch["x"], batch["y"])
            return ((loss, (model_state, {})) if has_aux else loss), grads

        return call

    return estimator


def sbn_arm_fns(config) -> dict:
    """Arm ``sbn_<estimator>`` -> ``fn(seeds) -> [result per seed]`` for part (a).

    Every estimator starts from the same initialisation of a seed (`init_states`) and
    trains with the same Adam; training runs all seeds on the seed axis, scored by the
    exact expected loss (enumeration, vmapped over seeds). The gradient study at init
    (`ws.estimators.metrics_vs_samples`) reduces its samples on the host, so it stays a
    loop over seeds (its sampler is compiled once for all of them).
    """
    hidden = tuple(config.sbn_hidden)
    x, y = two_moons(config.sbn_points, seed=0)
    ds = ws.data.Dataset("two_moons", x, y, x, y, num_classes=2)
    batch = {"x": jnp.asarray(x), "y": jnp.asarray(y)}
    tx = optax.adam(config.sbn_lr)  # every estimator trains with the same Adam
    models = {e: st.BinaryMLP(hidden, num_classes=2, activation=e) for e in ("st", "identity")}
    models["ulr"] = st.BinaryMLP(hidden, num_classes=2, activation="sign")
    models["reinforce"] = models["st"]
    shapes = jax.eval_shape(models["st"].init, jax.random.PRNGKey(0), x[:1])  # no values used
    slf = st.states_loss(models["st"].apply, shapes, x)
    exact = jax.vmap(st.exact_value_and_grad(slf), in_axes=(0, None, None))
    expected = {
        e: jax.vmap(
            st.expected_estimate(st.states_loss(models[e].apply, shapes, x, straight_through=True)),
            in_axes=(0, None, None),
        )
        for e in ("st", "identity")
    }
    sigma = {f"BinaryDense_{i}": 1.0 for i in range(len(hidden))}
    sigma["head"] = config.ulr_head_sigma
    ulr = functools.partial(  # logistic, scale 1 on BinaryDense outputs: the SBN's own noise
        ws.likelihood_ratio.ulr, noise="logistic", sigma=sigma, baseline="mean",
        layer_types=(st.BinaryDense, nn.Dense),
    )  # fmt: skip
    budgets = sorted(set(config.sbn_budgets) | {config.sbn_train_evals})
    families = {  # built once: the estimator objects key the samplers' compilation cache
        "reinforce": {m: reinforce_estimator(slf, m) for m in budgets},
        "ulr": {m: ulr(num_copies=m) for m in budgets},
    }

    def estimator(est: str, budget: int):
        if est in families:
            return families[est][budget]
        return ws.estimators.average_estimator(jax.value_and_grad, budget)

    def measure(est: str, seeds: list[int]) -> list[dict]:
        loss = ws.training.classification_loss(models[est].apply, per_example=est == "ulr")
        state = ws.training.init_states(models["st"], tx, x[:1], seeds)
        loss0, grads = exact(state.params, batch["x"], batch["y"])
        out = [{"exact_loss_init": float(v)} for v in loss0]
        if est in expected:
            _, means = expected[est](state.params, batch["x"], batch["y"])
            for i, o in enumerate(out):
                o["exact_relative_bias"] = _relative(*ws.training.seed_slice((means, grads), i))
        for i, seed in enumerate(seeds):  # host statistics: a loop (see the docstring)
            curve = ws.estimators.metrics_vs_samples(
                families[est].get if est in families else jax.value_and_grad,
                loss, ws.training.seed_slice(state.params, i), {}, batch,
                ws.training.seed_slice(grads, i), jax.random.PRNGKey(1000 + seed),
                num_samples=config.sbn_budgets, repeats=config.sbn_repeats,
                family=est in families,
            )  # fmt: skip
            out[i].update(
                forward_evaluations=curve["forward_evaluations"],
                cosine=curve["cosine"],
                relative_rmse=curve["relative_rmse"],
                # Monte Carlo ||E g - G|| / ||G|| at the largest budget (debiased, clipped at 0)
                mc_relative_bias=float(np.sqrt(max(curve["bias_squared"][-1], 0)) / curve["norm"]),
                **{
                    f"cosine_at_{f}": c
                    for f, c in zip(curve["num_samples"], curve["cosine"], strict=True)
                },
            )
        step = ws.training.make_train_step(
            loss, tx, estimator=estimator(est, config.sbn_train_evals), seed_axis=True
        )
        _, history = ws.training.fit(
            state, step, ds, num_steps=config.sbn_steps, batch_size=config.sbn_points,
            seed=seeds, eval_every=max(config.sbn_steps // config.sbn_evals, 1), progress=False,
            eval_fn=lambda s: {"exact_loss": exact(s.params, batch["x"], batch["y"])[0]},
        )  # fmt: skip
        steps = [0] + [r["step"] for r in history]
        for i, o in enumerate(out):
            losses = [o["exact_loss_init"]] + [r["exact_loss"][i] for r in history]
            o.update(
                train_steps=steps,
                train_forward_evaluations=[n * config.sbn_train_evals for n in steps],
                train_exact_loss=losses,
                final_exact_loss=losses[-1],
            )
        return out

    return {f"sbn_{e}": functools.partial(measure, e) for e in config.sbn_estimators}


def _relative(a, b) -> float:
    fa, fb = (jax.flatten_util.ravel_pytree(t)[0] for t in (a, b))
    return float(jnp.linalg.norm(fa - fb) / jnp.linalg.norm(fb))


# -------------------------------------------------------------- (b) training


def build_arm(arm: str, config, num_classes: int):
    """Model and optimizer of a training arm from its `ARM_SPECS` entry.

    Binary weights: latents by mirror descent (``optax.sgd``, with `st.clip_latents`
    when ``clip > 0``); with ``weight_estimator="st"`` the same SGD step sees the
    2F'-scaled gradient, i.e. plain SGD on the latent weights. Real parameters: Adam.
    """
    spec = ARM_SPECS[arm]
    model = st.BinaryMLP(
        tuple(config.hidden),
        num_classes=num_classes,
        activation=spec["activation"],
        binary_weights=spec["binary_weights"],
        weight_estimator=spec.get("weight_estimator", "identity"),
        weight_noise=spec.get("weight_noise", "logistic"),
    )
    real = optax.adam(config.lr)
    if not spec["binary_weights"]:
        return model, real
    latent = st.mirror_descent(config.latent_lr, clip=spec["clip"] or None)
    return model, optax.multi_transform({"latent": latent, "real": real}, st.latent_labels)


@functools.partial(jax.jit, static_argnums=0)
def sampled_predictions(apply_fn, params, x, keys):
    """Per seed, the argmax of the mean softmax of stochastic passes (one per key).

    ``params`` and ``keys`` (``[S, samples, 2]``) carry a leading seed axis; returns ``[S, N]``.
    """

    def one_seed(p, ks):
        one = lambda k: jax.nn.softmax(  # noqa: E731
            apply_fn({"params": p}, x, train=True, rngs={"dropout": k})
        )
        return jnp.argmax(jnp.mean(jax.lax.map(one, ks), 0), -1)

    return jax.vmap(one_seed)(params, keys)


def train_arm(arm: str, config, ds, seeds: list[int]) -> list[dict]:
    """Trains a part-(b) arm for all ``seeds`` at once (a seed axis); one result per seed."""
    model, tx = build_arm(arm, config, ds.num_classes)
    step = ws.training.make_train_step(
        ws.training.classification_loss(model.apply), tx, mode=config.mode, seed_axis=True
    )
    state, history = ws.training.fit(
        ws.training.init_states(model, tx, ds.x_train[:1], seeds), step, ds,
        apply_fn=model.apply, num_steps=config.steps, batch_size=config.batch_size, seed=seeds,
        mode=config.mode, eval_every=max(config.steps // 4, 1), progress=config.progress,
    )  # fmt: skip
    mode_correct = ws.training.correct_predictions(
        model.apply, state.variables, ds.x_test, ds.y_test, seed_axis=True
    )
    keys = jnp.stack([jax.random.split(jax.random.PRNGKey(10_000 + s), config.eval_samples)
                      for s in seeds])  # fmt: skip
    sampled = np.asarray(sampled_predictions(model.apply, state.params, ds.x_test, keys))
    sampled_correct = sampled == ds.y_test
    labels = jax.tree.leaves(st.latent_labels(state.params))
    latents = [
        np.mean(np.abs(v), axis=tuple(range(1, v.ndim)))
        for v, label in zip(jax.tree.leaves(state.params), labels, strict=True)
        if label == "latent"
    ]
    return [
        {
            "test_accuracy": history[-1]["test_accuracy"][i],  # the mode network: sign(a)
            "sampled_test_accuracy": float(sampled_correct[i].mean()),
            "train_accuracy": history[-1]["train_accuracy"][i],
            "train_loss": history[-1]["train_loss"][i],
            "mean_abs_latent": float(np.mean([v[i] for v in latents])) if latents else 0.0,
            "curve": [
                {
                    k: r[k] if k == "step" else r[k][i]
                    for k in ("step", "test_accuracy", "train_loss")
                }
                for r in history
            ],
            "test_correct": common.pack_correct(mode_correct[i]),
            "sampled_test_correct": common.pack_correct(sampled_correct[i]),
        }
        for i in range(len(seeds))
    ]


# ------------------------------------------------------------------------- run


def run(config, workdir: str) -> dict:
    """Runs parts (a) and (b); writes results.json and the figures; returns the results."""
    validate(config)
    common.start(config, workdir)
    ds = common.load_dataset(config)
    arm_fns = sbn_arm_fns(config)
    arm_fns.update({a: functools.partial(train_arm, a, config, ds) for a in config.train_arms})
    per_arm = common.run_arms(workdir, config, arm_fns)
    claims = _claims(config, per_arm)
    sbn_arms = {k: v for k, v in per_arm.items() if k.startswith("sbn_")}
    train_arms = {k: v for k, v in per_arm.items() if not k.startswith("sbn_")}
    budgets = config.sbn_budgets
    tables = {}
    if sbn_arms:
        cols = ["mc_relative_bias", *[f"cosine_at_{f}" for f in budgets], "final_exact_loss"]
        if all("exact_relative_bias" in r[0] for r in sbn_arms.values()):
            cols.insert(0, "exact_relative_bias")
        tables[
            f"SBN {list(config.sbn_hidden)} (exact gradients): bias, cosine at F forward "
            f"evaluations per example, exact loss after {config.sbn_steps} steps at "
            f"{config.sbn_train_evals} evaluations/step"
        ] = common.summarize(sbn_arms, cols)
        st_arms = {k: v for k, v in sbn_arms.items() if "exact_relative_bias" in v[0]}
        if st_arms:
            tables["Exact bias of the ST estimators (enumeration)"] = common.summarize(
                st_arms, ["exact_relative_bias"]
            )
    if train_arms:
        tables[f"Training on {config.dataset}: mode network vs mean of S samples"] = (
            common.summarize(
                train_arms, ["test_accuracy", "sampled_test_accuracy", "train_accuracy"]
            )
        )
    figures = []
    if sbn_arms:
        figures.append(_plot_sbn(sbn_arms, workdir, config))
    if train_arms:
        figures.append(_plot_training(train_arms, workdir, config))
    notes = [
        "SBN part: the toy is 2-D two-moons (fixed data); seeds vary the initialisation. "
        "config.dataset is the training part's dataset.",
        "ULR uses logistic noise of scale 1 on the binary layers' pre-activations (exactly "
        f"the SBN's noise) and scale {config.ulr_head_sigma} on the logits; its bias vs the "
        "exact SBN gradient is the logit smoothing. ST and REINFORCE also run one backward "
        "pass per sample; ULR none. Forward evaluations are per example.",
        "mc_relative_bias: sqrt(max(0, ||mean - G||^2 - var/R)) / ||G|| at the largest "
        "budget (Monte Carlo; a noisy floor for unbiased estimators).",
        f"Training: one latent step size for every arm (latent_lr={config.latent_lr:g}; the "
        "default 100 was the best of {10, 30, 100, 300} for bin_st on digits, seed 0, a seed "
        "of the claims; identity ST's best on that seed was also 100).",
    ]
    return common.save_results(
        workdir,
        config,
        "straight_through",
        claims=claims,
        tables=tables,
        figures=figures,
        notes=notes,
    )


def _claims(config, per_arm) -> list[dict]:
    claims = []
    has = lambda *arms: all(a in per_arm for a in arms)
    if has("sbn_st", "sbn_identity"):
        claims.append(
            common.compare(
                "Principled ST has lower exact bias than identity ST (SBN, at init)",
                "exact_relative_bias",
                "sbn_st",
                "sbn_identity",
                per_arm,
                higher_is_better=False,
            )
        )
    f = max(config.sbn_budgets)
    for a, b in (("sbn_ulr", "sbn_reinforce"), ("sbn_st", "sbn_ulr")):
        if has(a, b):
            claims.append(
                common.compare(
                    f"{a[4:]} has a higher cosine to the exact SBN gradient than {b[4:]} "
                    f"at {f} forward evaluations",
                    f"cosine_at_{f}",
                    a,
                    b,
                    per_arm,
                )
            )
    for a, b in (("sbn_ulr", "sbn_reinforce"), ("sbn_st", "sbn_ulr")):
        if has(a, b):
            claims.append(
                common.compare(
                    f"{a[4:]} trains the SBN to a lower exact loss than {b[4:]} at equal "
                    "forward evaluations",
                    "final_exact_loss",
                    a,
                    b,
                    per_arm,
                    higher_is_better=False,
                )
            )
    if has("bin_st", "bin_identity"):
        for metric, what in (
            ("test_accuracy", "mode network"),
            ("sampled_test_accuracy", "mean of samples"),
        ):
            claims.append(
                common.compare(
                    f"Principled ST beats identity ST with binary weights on {config.dataset} "
                    f"({what})",
                    metric,
                    "bin_st",
                    "bin_identity",
                    per_arm,
                )
            )
    return claims


def _plot_sbn(sbn_arms, workdir, config) -> str:
    import matplotlib.pyplot as plt

    fig, (ax_cos, ax_train) = plt.subplots(1, 2, figsize=(10, 3.8))
    for arm, results in sbn_arms.items():
        f = results[0]["forward_evaluations"]
        common.plot_mean_ci(ax_cos, f, [r["cosine"] for r in results], style="o-", label=arm[4:])
        t = results[0]["train_forward_evaluations"]
        common.plot_mean_ci(ax_train, t, [r["train_exact_loss"] for r in results], label=arm[4:])
    budgets = list(config.sbn_budgets)
    ax_cos.set_xscale("log", base=2)
    ax_cos.set_xticks(budgets, [str(b) for b in budgets])
    ax_cos.minorticks_off()
    ax_cos.set(
        xlabel="forward evaluations per example",
        ylabel="cosine to exact gradient",
        title=f"SBN {list(config.sbn_hidden)} at init (95% interval over seeds)",
    )
    ax_train.set(
        xlabel="forward evaluations per example",
        ylabel="exact expected loss",
        title=f"Adam, {config.sbn_train_evals} evaluations/step",
    )
    ax_cos.legend(fontsize=8)
    fig.tight_layout()
    return common.savefig(fig, workdir, "sbn_estimators.png", config)


def _plot_training(train_arms, workdir, config) -> str:
    import matplotlib.pyplot as plt

    names = list(train_arms)
    mode, mode_ci = common.mean_ci([[r["test_accuracy"] for r in train_arms[a]] for a in names], 1)
    sampled, sampled_ci = common.mean_ci(
        [[r["sampled_test_accuracy"] for r in train_arms[a]] for a in names], 1
    )
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(names) + 1.5))
    pos = np.arange(len(names))
    ax.barh(pos - 0.2, mode, 0.4, xerr=np.nan_to_num(mode_ci), label="mode network")
    ax.barh(pos + 0.2, sampled, 0.4, xerr=np.nan_to_num(sampled_ci),
            label=f"mean of {config.eval_samples} samples")  # fmt: skip
    ax.set(yticks=pos, yticklabels=names, xlabel="test accuracy (95% interval over seeds)",
           title=config.dataset)  # fmt: skip
    ax.set_xlim(min(min(mode), min(sampled)) - 0.05, 1.0)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return common.savefig(fig, workdir, "training.png", config)


if __name__ == "__main__":
    cli.main(run, "straight_through")
