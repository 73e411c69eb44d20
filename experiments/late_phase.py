r"""Late-phase weights vs SGD: a BatchNorm ConvNet on mnist1d, and the noisy quadratic problem.

  python -m experiments.late_phase --workdir=runs/late_phase        # small: the demo size
  python -m experiments.late_phase --config=experiments/configs/late_phase.py:quick
  python -m experiments.late_phase --config=experiments/configs/late_phase.py:paper

Late-phase arms train plainly up to T0 and then as `wspace.late_phase.LatePhase` (K members
of the BatchNorm affine + head weights, averaged in weight space at the end). Every arm has
the same steps, batch and learning-rate schedule.

Classification arms (SGD + momentum 0.9, cosine learning rate; ``config.classify_arms``):
  sgd            plain training (the baseline);
  late           the paper's algorithm: schedule "cycle" (member t mod K takes the whole
                 minibatch), shared weights step once per K minibatches with the sum of
                 their gradients (official CIFAR code), T0 = 60% of the steps;
  late_t0_0      the same from step 0 (the paper's ablation: no gain expected);
  late_random    a member drawn per step, shared weights every step (the code's other path);
  late_parallel  a different algorithm: all K members per step on slices of B/K examples;
  sgd_ghost_bn   control for late_parallel: plain SGD with BatchNorm statistics per slice
                 of B/K examples ("ghost BatchNorm"), no members;
  swa            SWA: cosine decay to swa_lr at T0, then constant, average every swa_every
                 steps, BatchNorm statistics recomputed for the average;
  late_swa       late-phase on the SWA schedule, SWA of the late-phase params, per-member
                 statistics recomputed, then members averaged.

NQP arms (plain SGD, ``config.nqp_arms``): l(w; c) = 1/2 sum_i h_i (w_i - c_i)^2 with a fresh
minimum c ~ N(1, diag(h)) per example, h_i = 1/i; the model is w = theta * gain (elementwise,
the analogue of a layer followed by a BatchNorm scale): every arm trains both vectors; the
late-phase arms replicate ``gain`` into K members. Arms: sgd, late (cycle + sum), late_random
(random + every), late_mean (cycle, mean: the ImageNet script's lr / K), late_parallel,
sgd_lr_over_K (plain SGD with lr / K from T0: the learning-rate confound). Metric: the excess
loss E_c l(w) - min_w E_c l(w) of each arm's output network, averaged over the last quarter
of the run.

Claims (paired by seed, 95% t-interval of the difference, verdict): late beats sgd in test
accuracy and NLL; T0 = 60% beats T0 = 0; T0 = 0 beats sgd (the paper: it does not); each
other late arm beats its baseline (late_random, late_parallel vs sgd; late_swa vs swa;
late_parallel vs sgd_ghost_bn); on the NQP, late, late_random and late_mean reach a lower
excess loss than sgd, and late_mean beats sgd_lr_over_K.

Reference: von Oswald, Kobayashi, Meulemans, Henning, Grewe, Sacramento, "Neural networks with
late-phase weights", ICLR 2021, arXiv 2007.12927; Izmailov et al. 2018 (SWA), arXiv 1803.05407.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

import wspace as ws
from experiments import common
from wspace.averaging import recompute_batch_stats, swa, swa_params
from wspace.late_phase import LatePhase

CLASSIFY_ARMS = (
    "sgd",
    "late",
    "late_t0_0",
    "late_random",
    "late_parallel",
    "sgd_ghost_bn",
    "swa",
    "late_swa",
)
NQP_ARMS = ("sgd", "late", "late_random", "late_mean", "sgd_lr_over_K", "late_parallel")
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
    LatePhase(config.members, config.select, noise=config.noise)  # raises on a bad select/noise


# ----------------------------------------------------------------------------- classification


@functools.cache
def _model(name: str, num_classes: int):
    """One model object per process: compiled steps and evaluations are reused across seeds."""
    return ws.models.create(name, num_classes)


@functools.cache
def _setup(arm: str, num_classes: int, model_name: str, members: int, steps: int, t0: int,
           lr: float, swa_lr: float, swa_every: int, mode: str):  # fmt: skip
    """Model, loss, optimizer and plain step of one arm, built once and shared by its seeds."""
    model = _model(model_name, num_classes)
    loss = _loss(model)
    tx = _optimizer(arm in ("swa", "late_swa"), steps, t0, lr, swa_lr, swa_every)
    train_loss = _ghost_bn_loss(loss, members) if arm == "sgd_ghost_bn" else loss
    return model, loss, tx, ws.training.make_train_step(train_loss, tx, mode=mode)


@functools.cache
def _loss(model):
    return ws.training.classification_loss(model.apply)


@functools.cache
def _optimizer(uses_swa: bool, steps: int, t0: int, lr: float, swa_lr: float, swa_every: int):
    """SGD + momentum 0.9 on a cosine schedule, or (SWA arms) cosine to swa_lr at T0, then
    constant, averaging from T0; one object per setting, so arms share compiled steps."""
    if not uses_swa:
        return optax.sgd(optax.cosine_decay_schedule(lr, steps), momentum=0.9)
    decay = optax.cosine_decay_schedule(lr, max(t0, 1), alpha=swa_lr / lr)
    schedule = optax.join_schedules([decay, optax.constant_schedule(swa_lr)], [t0])
    return optax.chain(optax.sgd(schedule, momentum=0.9), swa(start=t0, every=swa_every))


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


def _late(config, arm: str) -> LatePhase:
    schedule, combine = _LATE[arm]
    return LatePhase(config.members, config.select, schedule, combine, config.noise)


def _recalibration_batches(ds, config, num_batches: int = 50):
    """Training batches for recomputing BatchNorm statistics (momentum 0.9: 0.9^50 ~ 5e-3)."""
    stream = ws.data.batches(ds.x_train, ds.y_train, config.batch_size, seed=12345, epochs=None)
    return [next(stream) for _ in range(num_batches)]


def classify_arm(config, ds, arm: str, seed: int) -> dict:
    """Trains one arm with one seed; returns the final test metrics and the test curve."""
    t0 = int(config.t0_frac * config.steps)
    model, loss, tx, step = _setup(
        arm, ds.num_classes, config.model, config.members, config.steps, t0, config.lr,
        config.swa_lr, config.swa_every, config.mode,
    )  # fmt: skip
    state = ws.training.init_state(model, tx, ds.x_train[:1], jax.random.PRNGKey(seed))
    kw = dict(
        num_steps=config.steps,
        batch_size=config.batch_size,
        seed=seed,
        mode=config.mode,
        eval_every=config.eval_every,
        train_eval_examples=0,
        progress=config.progress,
    )
    if arm in _LATE:
        late = _late(config, arm)
        t0 = 0 if arm == "late_t0_0" else t0
        state, hist = late.fit(state, loss, tx, ds, apply_fn=model.apply, t0=t0, **kw)
        params, model_state = state.params, state.model_state
        if arm == "late_swa":
            params = swa_params(state.opt_state)
            model_state = _recalibrate_members(late, loss, params, model_state, ds, config)
        params, model_state = late.average(params, model_state)
    else:
        state, hist = ws.training.fit(state, step, ds, apply_fn=model.apply, **kw)
        params, model_state = state.params, state.model_state
        if arm == "swa":
            params = swa_params(state.opt_state)
            batches = _recalibration_batches(ds, config)
            model_state = recompute_batch_stats(loss, params, model_state, batches)
    final = ws.training.evaluate(
        model.apply, {"params": params, **model_state}, ds.x_test, ds.y_test
    )
    return {
        "test_accuracy": final["accuracy"],
        "test_nll": final["loss"],
        "curve": [{"step": r["step"], "test_accuracy": r["test_accuracy"]} for r in hist],
    }


def _recalibrate_members(late, loss, params, model_state, ds, config):
    """Per-member BatchNorm statistics for SWA-averaged late-phase params (official bn_update:
    a pass over training data for each member)."""
    batches = _recalibration_batches(ds, config)
    for k in range(late.num_members):
        fn = functools.partial(_member_k, late.member_loss(loss), k)
        model_state = recompute_batch_stats(fn, params, model_state, batches)
    return model_state


def _member_k(member_loss, k, params, model_state, batch, key):
    return member_loss(params, model_state, batch, key, k)


# ----------------------------------------------------------------------------- NQP


class _NQPStream:
    """Batches ``{"x": c}`` with ``c ~ N(1, diag(h))``; every ``iter()`` restarts the stream."""

    def __init__(self, h: np.ndarray, batch_size: int, seed: int):
        self.h, self.batch_size, self.seed = h, batch_size, seed

    def __iter__(self):
        rng = np.random.default_rng(self.seed)
        while True:
            noise = rng.normal(size=(self.batch_size, len(self.h)))
            yield {"x": (1.0 + np.sqrt(self.h) * noise).astype(np.float32)}


@functools.cache
def _nqp_setup(dim: int, lr: float, t0: int, lr_divisor: int):
    """Loss, excess-loss function, SGD and its plain step (lr / lr_divisor from T0 on)."""
    h = (1.0 / np.arange(1, dim + 1)).astype(np.float32)

    def loss_fn(params, model_state, batch, key):
        w = params["theta"] * params["gain"]
        value = 0.5 * jnp.mean(jnp.sum(h * (w - batch["x"]) ** 2, axis=-1))
        return value, (model_state, {})

    @jax.jit
    def excess(params):  # E_c l(w; c) - min_w E_c l(w; c) = 1/2 sum_i h_i (w_i - 1)^2
        w = params["theta"] * params["gain"]
        return 0.5 * jnp.sum(h * (w - 1.0) ** 2)

    lr_t = optax.join_schedules(
        [optax.constant_schedule(lr), optax.constant_schedule(lr / lr_divisor)], [t0]
    )
    tx = optax.sgd(lr_t)
    return h, loss_fn, excess, tx, ws.training.make_train_step(loss_fn, tx)


def nqp_arm(config, arm: str, seed: int) -> dict:
    """One NQP arm: the excess loss of its output network over the run."""
    steps, t0 = config.nqp_steps, int(config.t0_frac * config.nqp_steps)
    divisor = config.members if arm == "sgd_lr_over_K" else 1
    h, loss_fn, excess, tx, step = _nqp_setup(config.nqp_dim, config.nqp_lr, t0, divisor)
    dim = config.nqp_dim
    params = {"theta": jnp.zeros(dim), "gain": jnp.ones(dim)}
    state = ws.training.TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        model_state={},
        opt_state=tx.init(params),
        key=jax.random.PRNGKey(seed),
    )
    data = _NQPStream(h, config.nqp_batch_size, seed)
    eval_fn = lambda s: {"excess_loss": excess(s.params)}
    kw = dict(num_steps=steps, eval_fn=eval_fn, eval_every=config.nqp_eval_every, progress=False)
    if arm in _LATE:
        late = LatePhase(config.members, _NQP_SELECT, *_LATE[arm])
        state, hist = late.fit(state, loss_fn, tx, data, t0=t0, **kw)
    else:
        state, hist = ws.training.fit(state, step, data, **kw)
    curve = [{"step": r["step"], "excess_loss": r["excess_loss"]} for r in hist]
    tail = [r["excess_loss"] for r in curve if r["step"] > 0.75 * steps]
    return {"excess_loss": float(np.mean(tail)), "curve": curve}


_NQP_SELECT = ws.late_phase.selection(lambda path: path[-1] == "gain")


# ----------------------------------------------------------------------------- run


def run(config, workdir: str) -> dict:
    """Runs the configured parts and arms over seeds; writes results.json and figures."""
    validate(config)
    common.start(config, workdir)
    claims, tables, figures, notes = [], {}, [], []
    if "classify" in config.parts:
        ds = common.load_dataset(config)
        arms = {a: functools.partial(classify_arm, config, ds, a) for a in config.classify_arms}
        per_arm = common.run_arms(workdir, config, {a: common.per_seed(f) for a, f in arms.items()})
        k = config.members
        if "late" in per_arm:
            claims.append(
                common.compare(
                    f"Late-phase weights (K={k}, cycle, T0={config.t0_frac:.0%}) beat SGD in "
                    "test accuracy",
                    "test_accuracy",
                    "late",
                    "sgd",
                    per_arm,
                )
            )
            claims.append(
                common.compare(
                    f"Late-phase weights (K={k}) have lower test NLL than SGD",
                    "test_nll",
                    "late",
                    "sgd",
                    per_arm,
                    higher_is_better=False,
                )
            )
        if "late" in per_arm and "late_t0_0" in per_arm:
            claims.append(
                common.compare(
                    f"Starting the late phase at T0={config.t0_frac:.0%} beats T0=0 (the "
                    "paper's ablation) in test accuracy",
                    "test_accuracy",
                    "late",
                    "late_t0_0",
                    per_arm,
                )
            )
        if "late_t0_0" in per_arm:
            claims.append(
                common.compare(
                    "Late-phase weights from T0=0 beat SGD in test accuracy (the paper: no)",
                    "test_accuracy",
                    "late_t0_0",
                    "sgd",
                    per_arm,
                )
            )
        for arm, base, what in (
            ("late_random", "sgd", "Late-phase with a random member per step (shared weights "
             "every step) beats SGD"),
            ("late_parallel", "sgd", "Parallel late-phase (all members on B/K-example slices, "
             "the previous library algorithm) beats SGD"),
            ("late_swa", "swa", "Late-phase + SWA beats SWA"),
            ("late_parallel", "sgd_ghost_bn", "Parallel late-phase beats SGD with the same "
             "ghost BatchNorm (statistics over B/K examples)"),
        ):  # fmt: skip
            if arm in per_arm and base in per_arm:
                claims.append(
                    common.compare(f"{what} in test accuracy", "test_accuracy", arm, base, per_arm)
                )
        tables["ConvNet on mnist1d: final test metrics by arm"] = common.summarize(
            per_arm, ["test_accuracy", "test_nll"]
        )
        figures.append(_plot_classify(per_arm, workdir, config))
    if "nqp" in config.parts:
        arms = {a: functools.partial(nqp_arm, config, a) for a in config.nqp_arms}
        nqp = common.run_arms(
            workdir, config, {f"nqp_{a}": common.per_seed(f) for a, f in arms.items()}
        )
        for arm, what in (
            ("late", "Late-phase (cycle, shared step per K minibatches with the sum)"),
            ("late_random", "Late-phase (random member, shared step every minibatch)"),
            ("late_mean", "Late-phase (cycle, shared step per K minibatches with the mean)"),
        ):
            if f"nqp_{arm}" in nqp:
                claims.append(
                    common.compare(
                        f"NQP: {what} reaches a lower excess loss than SGD",
                        "excess_loss",
                        f"nqp_{arm}",
                        "nqp_sgd",
                        nqp,
                        higher_is_better=False,
                    )
                )
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
                )
            )
        tables["Noisy quadratic problem: steady-state excess loss by arm"] = common.summarize(
            nqp, ["excess_loss"]
        )
        figures.append(_plot_nqp(nqp, workdir, config))
    notes.append(
        "late = the paper's algorithm (schedule 'cycle': one member per minibatch, the whole "
        "minibatch; shared weights step once per K minibatches with the summed gradient)."
    )
    notes.append(
        "Runs are on CPU; seeds pair the arms (same initialisation and data order per seed)."
    )
    if "classify" in config.parts:
        t0, k = int(config.t0_frac * config.steps), config.members
        notes.append(
            f"ConvNet: {config.steps} steps of batch {config.batch_size}, T0 = {t0}: the late "
            f"phase covers {config.steps - t0} minibatches, {(config.steps - t0) // k} per "
            f"member and {(config.steps - t0) // k} shared-weight steps (cycle + sum); from "
            f"T0 = 0 the shared weights take {config.steps // k} steps in all."
        )
    if "nqp" in config.parts:
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
    common.main(run, "late_phase")
