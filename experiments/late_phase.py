r"""Late-phase weights vs SGD: a BatchNorm ConvNet on mnist1d, and the noisy quadratic problem.

  python -m experiments.late_phase --workdir=runs/late_phase        # small: the demo size
  python -m experiments.late_phase --config=experiments/configs/late_phase.py:quick
  python -m experiments.late_phase --config=experiments/configs/late_phase.py:paper

Late-phase arms train plainly up to T0 and then as `wspace.late_phase.LatePhase` (K members
of the BatchNorm affine + head weights, fresh member optimizer state at T0 as the official
code, averaged in weight space at the end). Every arm has the same steps (minibatches),
batch and learning-rate schedule; every arm trains all its seeds as one program (a seed
axis) and stores each seed's per-example test correctness (``test_correct``).

Classification arms (SGD + momentum 0.9, cosine learning rate; ``config.classify_arms``):
  sgd            plain training (the baseline);
  late           the paper's algorithm: schedule "cycle" (member t mod K takes the whole
                 minibatch), shared weights step once per K minibatches with the sum of
                 their gradients (official CIFAR code), T0 = 60% of the steps;
  late_t0_0      the same from step 0 (the paper's ablation: no gain expected); at equal
                 minibatches, so its shared weights take steps/K optimizer steps where
                 ``late``'s take T0 + (steps - T0)/K: the claim says so;
  late_random    a member drawn per step, shared weights every step (the code's other path);
  late_parallel  a different algorithm: all K members per step on slices of B/K examples;
  sgd_ghost_bn   control for late_parallel: plain SGD with BatchNorm statistics per slice
                 of B/K examples ("ghost BatchNorm"), no members;
  swa            SWA: cosine decay to swa_lr at T0, then constant, average every swa_every
                 steps, BatchNorm statistics recomputed for the average;
  late_swa       late-phase on the SWA schedule, SWA of the late-phase params, per-member
                 statistics recomputed (`LatePhase.recalibrate`), then members averaged.

NQP arms (plain SGD, ``config.nqp_arms``): l(w; c) = 1/2 sum_i h_i (w_i - c_i)^2 with a fresh
minimum c ~ N(1, diag(h)) per example, h_i = 1/i; the model is w = theta * gain (elementwise,
the analogue of a layer followed by a BatchNorm scale): every arm trains both vectors; the
late-phase arms replicate ``gain`` into K members. Arms: sgd, late (cycle + sum), late_random
(random + every), late_mean (cycle, mean: the ImageNet script's lr / K), late_parallel,
sgd_lr_over_K (plain SGD with lr / K from T0: the learning-rate confound). Metric: the excess
loss E_c l(w) - min_w E_c l(w) of each arm's output network, averaged over the last quarter
of the run.

Claims (paired by seed, 95% t-interval of the difference, verdict): late beats sgd in test
accuracy and NLL; T0 = 60% beats T0 = 0 at equal minibatches; T0 = 0 beats sgd (the paper:
it does not); each other late arm beats its baseline (late_random, late_parallel vs sgd;
late_swa vs swa; late_parallel vs sgd_ghost_bn); on the NQP, late, late_random and
late_mean reach a lower excess loss than sgd, and late_mean beats sgd_lr_over_K.

Reference: von Oswald, Kobayashi, Meulemans, Henning, Grewe, Sacramento, "Neural networks with
late-phase weights", ICLR 2021, arXiv 2007.12927; Izmailov et al. 2018 (SWA), arXiv 1803.05407.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

import wspace as ws
from experiments import cli, common
from experiments.configs.late_phase import CLASSIFY_ARMS, NQP_ARMS
from wspace.averaging import recompute_batch_stats, swa, swa_params
from wspace.late_phase import LatePhase

PARTS = ("classify", "nqp")
# arm -> (schedule, combine) of its LatePhase (None: a plain arm)
_LATE = {
    "late": ("cycle", None),
    "late_t0_0": ("cycle", None),
    "late_random": ("random", None),
    "late_mean": ("cycle", "mean"),
    "late_parallel": ("parallel", None),
    "late_swa": ("cycle", None),
}
_NQP_SELECT = ws.late_phase.selection(lambda path: path[-1] == "gain")


def validate(config) -> None:
    """Rejects bad fields before any work or file write."""
    bad = [p for p in config.parts if p not in PARTS]
    if bad or not config.parts:
        raise ValueError(f"config.parts={config.parts!r}; use a non-empty subset of {PARTS}")
    for field, allowed in (("classify_arms", CLASSIFY_ARMS), ("nqp_arms", NQP_ARMS)):
        bad = [a for a in config[field] if a not in allowed]
        if bad or "sgd" not in config[field]:
            raise ValueError(
                f"config.{field}={config[field]!r}; arms from {allowed}, including 'sgd'"
            )
    if config.model not in ws.models.MODELS:
        raise ValueError(f"config.model={config.model!r}; use one of {sorted(ws.models.MODELS)}")
    common.require_at_least_one(
        config, "members", "steps", "batch_size", "eval_every", "swa_every", "nqp_dim"
    )
    common.require_at_least_one(config, "nqp_steps", "nqp_batch_size", "nqp_eval_every")
    if not 0 < config.t0_frac < 1:
        raise ValueError(f"config.t0_frac={config.t0_frac}; must be in (0, 1)")
    for field in ("lr", "nqp_lr", "swa_lr"):
        if not 0 < config[field] < float("inf"):
            raise ValueError(f"config.{field}={config[field]}; must be finite and > 0")
    if config.batch_size % config.members or config.nqp_batch_size % config.members:
        raise ValueError(
            f"config.batch_size={config.batch_size} and nqp_batch_size={config.nqp_batch_size} "
            f"must be divisible by members={config.members} (parallel arms and ghost BatchNorm)"
        )
    _late(config, "late")  # raises on a bad select, noise or member_opt_state


def _late(config, arm: str, select=None) -> LatePhase:
    schedule, combine = _LATE[arm]
    return LatePhase(config.members, select or config.select, schedule, combine, config.noise,
                     member_opt_state=config.member_opt_state)  # fmt: skip


def _check_select(config, model, sample_x) -> None:
    """Refuses a ``config.select`` that picks no weight of ``config.model`` (shapes only)."""
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0), sample_x)["params"]
    try:
        key = jax.random.PRNGKey(0)  # noise > 0 draws from it; only shapes are computed
        jax.eval_shape(lambda p: _late(config, "late").expand(p, key=key), params)
    except ValueError as e:
        first = str(e).splitlines()[0]
        raise ValueError(
            f"config.select={config.select!r} does not fit config.model={config.model!r}: {first}"
        ) from None


# ----------------------------------------------------------------------------- classification


def _optimizers(config) -> dict:
    """SGD + momentum 0.9 on a cosine schedule, and (SWA arms) cosine to swa_lr at T0, then
    constant, averaging from T0; built once per run, so arms share compiled plain steps."""
    steps, t0, lr = config.steps, int(config.t0_frac * config.steps), config.lr
    decay = optax.cosine_decay_schedule(lr, max(t0, 1), alpha=config.swa_lr / lr)
    schedule = optax.join_schedules([decay, optax.constant_schedule(config.swa_lr)], [t0])
    return {
        "sgd": optax.sgd(optax.cosine_decay_schedule(lr, steps), momentum=0.9),
        "swa": optax.chain(
            optax.sgd(schedule, momentum=0.9), swa(start=t0, every=config.swa_every)
        ),
    }


def _ghost_bn_loss(loss_fn, num_slices: int):
    """The plain loss with BatchNorm statistics per slice of the batch; shared running stats."""

    def wrapped(params, model_state, batch, key):
        sliced = jax.tree.map(lambda x: x.reshape((num_slices, -1) + x.shape[1:]), batch)
        losses, (new_state, metrics) = jax.vmap(loss_fn, in_axes=(None, None, 0, None))(
            params, model_state, sliced, key
        )
        mean0 = lambda t: jax.tree.map(lambda x: jnp.mean(x, axis=0), t)
        return jnp.mean(losses), (mean0(new_state), mean0(metrics))

    return wrapped


def _recalibration_batches(ds, config, num_batches: int = 50):
    """Training batches for recomputing BatchNorm statistics (momentum 0.9: 0.9^50 ~ 5e-3)."""
    stream = ws.data.batches(ds.x_train, ds.y_train, config.batch_size, seed=12345, epochs=None)
    return [next(stream) for _ in range(num_batches)]


def classify_arm(config, ds, model, loss, txs, arm: str, seeds: list[int]) -> list[dict]:
    """Trains one arm for all seeds at once; each seed's final test metrics, correctness and
    test curve."""
    uses_swa = arm in ("swa", "late_swa")
    tx = txs["swa" if uses_swa else "sgd"]
    state = ws.training.init_states(model, tx, ds.x_train[:1], seeds)
    kw = dict(num_steps=config.steps, batch_size=config.batch_size, seed=seeds,
              mode=config.mode, eval_every=config.eval_every, train_eval_examples=0,
              progress=config.progress)  # fmt: skip
    if arm in _LATE:
        late = _late(config, arm)
        t0 = 0 if arm == "late_t0_0" else int(config.t0_frac * config.steps)
        # the members' initial noise (config.noise > 0) draws from this key, split per seed
        key = jax.random.PRNGKey(seeds[0]) if config.noise > 0 else None
        state, hist = late.fit(state, loss, tx, ds, apply_fn=model.apply, t0=t0, key=key, **kw)
        params = swa_params(state.opt_state) if uses_swa else state.params
        model_state = state.model_state
        if uses_swa:
            batches = _recalibration_batches(ds, config)
            recal = lambda p, s: late.recalibrate(loss, p, s, batches)
            model_state = jax.vmap(recal)(params, model_state)
        params, model_state = jax.vmap(late.average)(params, model_state)
    else:
        train_loss = _ghost_bn_loss(loss, config.members) if arm == "sgd_ghost_bn" else loss
        step = ws.training.make_train_step(train_loss, tx, mode=config.mode, seed_axis=True)
        state, hist = ws.training.fit(state, step, ds, apply_fn=model.apply, **kw)
        params, model_state = state.params, state.model_state
        if uses_swa:
            params, batches = swa_params(state.opt_state), _recalibration_batches(ds, config)
            recal = lambda p, s: recompute_batch_stats(loss, p, s, batches)
            model_state = jax.vmap(recal)(params, model_state)
    variables = {"params": params, **model_state}
    final = ws.training.evaluate(model.apply, variables, ds.x_test, ds.y_test, seed_axis=True)
    correct = ws.training.correct_predictions(
        model.apply, variables, ds.x_test, ds.y_test, seed_axis=True
    )
    return [
        {
            "test_accuracy": final["accuracy"][i],
            "test_nll": final["loss"][i],
            "test_correct": common.pack_correct(correct[i]),
            "curve": [{"step": r["step"], "test_accuracy": r["test_accuracy"][i]} for r in hist],
        }
        for i in range(len(seeds))
    ]


# ----------------------------------------------------------------------------- NQP


class _NQPStream:
    """Batches ``{"x": c}``, ``c ~ N(1, diag(h))``, stacked over seeds (each seed its own
    stream); every ``iter()`` restarts."""

    def __init__(self, h: np.ndarray, batch_size: int, seeds: list[int]):
        self.h, self.batch_size, self.seeds = h, batch_size, seeds

    def __iter__(self):
        rngs = [np.random.default_rng(s) for s in self.seeds]
        shape = (self.batch_size, len(self.h))
        while True:
            noise = np.stack([rng.normal(size=shape) for rng in rngs])
            yield {"x": (1.0 + np.sqrt(self.h) * noise).astype(np.float32)}


def nqp_arm(config, arm: str, seeds: list[int]) -> list[dict]:
    """One NQP arm for all seeds at once: the excess loss of its output network over the run."""
    steps, t0, dim = config.nqp_steps, int(config.t0_frac * config.nqp_steps), config.nqp_dim
    h = (1.0 / np.arange(1, dim + 1)).astype(np.float32)

    def loss_fn(params, model_state, batch, key):
        w = params["theta"] * params["gain"]
        value = 0.5 * jnp.mean(jnp.sum(h * (w - batch["x"]) ** 2, axis=-1))
        return value, (model_state, {})

    # E_c l(w; c) - min_w E_c l(w; c) = 1/2 sum_i h_i (w_i - 1)^2, per seed
    excess = jax.jit(jax.vmap(lambda p: 0.5 * jnp.sum(h * (p["theta"] * p["gain"] - 1.0) ** 2)))
    divisor = config.members if arm == "sgd_lr_over_K" else 1
    lr = optax.join_schedules(
        [optax.constant_schedule(config.nqp_lr), optax.constant_schedule(config.nqp_lr / divisor)],
        [t0],
    )
    tx = optax.sgd(lr)

    def init(key):
        params = {"theta": jnp.zeros(dim), "gain": jnp.ones(dim)}
        return ws.training.TrainState(
            step=jnp.zeros((), jnp.int32), params=params, model_state={},
            opt_state=tx.init(params), key=key,
        )  # fmt: skip

    state = jax.vmap(init)(jnp.stack([jax.random.PRNGKey(s) for s in seeds]))
    data = _NQPStream(h, config.nqp_batch_size, seeds)
    kw = dict(num_steps=steps, eval_fn=lambda s: {"excess_loss": excess(s.params)},
              eval_every=config.nqp_eval_every, progress=False, seed=seeds)  # fmt: skip
    if arm in _LATE:
        state, hist = _late(config, arm, _NQP_SELECT).fit(state, loss_fn, tx, data, t0=t0, **kw)
    else:
        step = ws.training.make_train_step(loss_fn, tx, seed_axis=True)
        state, hist = ws.training.fit(state, step, data, **kw)
    out = []
    for i in range(len(seeds)):
        curve = [{"step": r["step"], "excess_loss": r["excess_loss"][i]} for r in hist]
        tail = [r["excess_loss"] for r in curve if r["step"] > 0.75 * steps]
        out.append({"excess_loss": float(np.mean(tail)), "curve": curve})
    return out


# ----------------------------------------------------------------------------- run


def _classify_claims(per_arm, config) -> list[dict]:
    k, t0 = config.members, int(config.t0_frac * config.steps)
    specs = [  # (text, metric, arm, baseline, higher_is_better)
        (f"Late-phase weights (K={k}, cycle, T0={config.t0_frac:.0%}) beat SGD in test "
         "accuracy", "test_accuracy", "late", "sgd", True),
        (f"Late-phase weights (K={k}) have lower test NLL than SGD", "test_nll", "late", "sgd",
         False),
        (f"Starting the late phase at T0={config.t0_frac:.0%} beats T0=0 (the paper's "
         f"ablation) in test accuracy, at equal minibatches (shared-weight steps: "
         f"{t0 + (config.steps - t0) // k} vs {config.steps // k})", "test_accuracy", "late",
         "late_t0_0", True),
        ("Late-phase weights from T0=0 beat SGD in test accuracy (the paper: no)",
         "test_accuracy", "late_t0_0", "sgd", True),
        ("Late-phase with a random member per step (shared weights every step) beats SGD in "
         "test accuracy", "test_accuracy", "late_random", "sgd", True),
        ("Parallel late-phase (all members on B/K-example slices, the previous library "
         "algorithm) beats SGD in test accuracy", "test_accuracy", "late_parallel", "sgd", True),
        ("Late-phase + SWA beats SWA in test accuracy", "test_accuracy", "late_swa", "swa", True),
        ("Parallel late-phase beats SGD with the same ghost BatchNorm (statistics over B/K "
         "examples) in test accuracy", "test_accuracy", "late_parallel", "sgd_ghost_bn", True),
    ]  # fmt: skip
    return [
        common.compare(text, metric, arm, base, per_arm, higher_is_better=hib)
        for text, metric, arm, base, hib in specs
        if arm in per_arm and base in per_arm
    ]


def _nqp_claims(nqp) -> list[dict]:
    specs = [
        ("late", "Late-phase (cycle, shared step per K minibatches with the sum)", "sgd"),
        ("late_random", "Late-phase (random member, shared step every minibatch)", "sgd"),
        ("late_mean", "Late-phase (cycle, shared step per K minibatches with the mean)", "sgd"),
    ]
    claims = [
        common.compare(f"NQP: {what} reaches a lower excess loss than SGD", "excess_loss",
                       f"nqp_{arm}", f"nqp_{base}", nqp, higher_is_better=False)
        for arm, what, base in specs
        if f"nqp_{arm}" in nqp
    ]  # fmt: skip
    if "nqp_late_mean" in nqp and "nqp_sgd_lr_over_K" in nqp:
        claims.append(
            common.compare(
                "NQP: Late-phase (cycle, mean) beats SGD whose learning rate drops to lr/K "
                "at T0 (the learning-rate confound)",
                "excess_loss",
                "nqp_late_mean",
                "nqp_sgd_lr_over_K",
                nqp,
                higher_is_better=False,
            )  # fmt: skip
        )
    return claims


def run(config, workdir: str) -> dict:
    """Runs the configured parts and arms (all seeds of an arm at once); writes results.json
    and figures."""
    validate(config)
    if "classify" in config.parts:
        ds = common.load_dataset(config)
        width = {"channels": tuple(config.channels)} if config.model == "convnet" else {}
        model = ws.models.create(config.model, ds.num_classes, **width)
        _check_select(config, model, ds.x_train[:1])
    common.start(config, workdir)
    claims, tables, figures = [], {}, []
    notes = [
        "late = the paper's algorithm (schedule 'cycle': one member per minibatch, the whole "
        "minibatch; shared weights step once per K minibatches with the summed gradient; "
        f"member optimizer state at T0: {config.member_opt_state}).",
        "Runs are on CPU; seeds pair the arms (same initialisation and data order per seed).",
    ]
    if "classify" in config.parts:
        loss, txs = ws.training.classification_loss(model.apply), _optimizers(config)
        arms = {
            a: (lambda seeds, a=a: classify_arm(config, ds, model, loss, txs, a, seeds))
            for a in config.classify_arms
        }
        per_arm = common.run_arms(workdir, config, arms)
        claims += _classify_claims(per_arm, config)
        tables["ConvNet on mnist1d: final test metrics by arm"] = common.summarize(
            per_arm, ["test_accuracy", "test_nll"]
        )
        figures.append(_plot_classify(per_arm, workdir, config))
        t0, k = int(config.t0_frac * config.steps), config.members
        notes.append(
            f"{config.model} {tuple(config.channels)}: {config.steps} steps of batch "
            f"{config.batch_size}, T0 = {t0}: the late "
            f"phase covers {config.steps - t0} minibatches, {(config.steps - t0) // k} per "
            f"member and {(config.steps - t0) // k} shared-weight steps (cycle + sum); from "
            f"T0 = 0 the shared weights take {config.steps // k} steps in all."
        )
    if "nqp" in config.parts:
        arms = {f"nqp_{a}": (lambda seeds, a=a: nqp_arm(config, a, seeds)) for a in config.nqp_arms}
        nqp = common.run_arms(workdir, config, arms)
        claims += _nqp_claims(nqp)
        tables["Noisy quadratic problem: steady-state excess loss by arm"] = common.summarize(
            nqp, ["excess_loss"]
        )
        figures.append(_plot_nqp(nqp, workdir, config))
        notes.append(
            f"NQP: d = {config.nqp_dim}, batch {config.nqp_batch_size}, lr {config.nqp_lr}, "
            f"{config.nqp_steps} steps, T0 = {config.t0_frac:.0%}; cycle + sum steps theta "
            "with K x the mean gradient, so it diverges where K lr h_max > 2 (e.g. lr 0.5)."
        )
    return common.save_results(
        workdir, config, "late_phase", claims=claims, tables=tables, figures=figures, notes=notes
    )


def _plot_classify(per_arm, workdir, config) -> str:
    import matplotlib.pyplot as plt

    fig, (ax, ax_d) = plt.subplots(1, 2, figsize=(11, 4))
    for arm, rs in per_arm.items():
        steps = [r["step"] for r in rs[0]["curve"]]
        accs = np.array([[r["test_accuracy"] for r in x["curve"]] for x in rs])
        common.plot_mean_ci(ax, steps, accs, style=".-", label=arm)
    ax.set(
        xlabel="step",
        ylabel="test accuracy (late arms: averaged network)",
        title=f"mean and 95% interval over {config.num_seeds} seeds",
    )
    ax.legend()
    base = np.array([r["test_accuracy"] for r in per_arm["sgd"]])
    others = [a for a in per_arm if a != "sgd"]
    for i, arm in enumerate(others):  # paired by seed: one dot per seed, mean and 95% CI
        d = 100 * (np.array([r["test_accuracy"] for r in per_arm[arm]]) - base)
        color = f"C{list(per_arm).index(arm)}"  # the arm's colour on the left
        ax_d.plot(np.full(len(d), i), d, "o", alpha=0.5, color=color)
        if len(d) > 1:
            mean, lo, hi = common.paired_interval(d, np.zeros_like(d))
            ax_d.errorbar(i + 0.15, mean, yerr=[[mean - lo], [hi - mean]], fmt="ks", capsize=4)
    ax_d.axhline(0, color="gray", lw=1)
    ax_d.set_xticks(range(len(others)), others, rotation=20)
    ax_d.set(ylabel="final test accuracy - SGD (points), per seed", title="paired by seed")
    fig.suptitle(f"late-phase weights: {config.model} on {config.dataset}")
    return common.savefig(fig, workdir, "accuracy.png", config)


def _plot_nqp(per_arm, workdir, config) -> str:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for arm, rs in per_arm.items():
        steps = [r["step"] for r in rs[0]["curve"]]
        values = [[r["excess_loss"] for r in x["curve"]] for x in rs]
        common.plot_mean_ci(ax, steps, values, label=arm)
    ax.axvline(int(config.t0_frac * config.nqp_steps), color="gray", ls=":", label="T0")
    ax.set(
        xlabel="step",
        ylabel="excess loss of the output network",
        yscale="log",
        title="noisy quadratic problem (mean, 95% interval over seeds)",
    )
    ax.legend()
    return common.savefig(fig, workdir, "nqp.png", config)


if __name__ == "__main__":
    cli.main(run, "late_phase")
