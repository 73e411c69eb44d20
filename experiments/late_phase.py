"""Late-phase weights vs SGD: a BatchNorm ConvNet on mnist1d and the noisy quadratic problem.

  python -m experiments.late_phase --workdir=runs/late_phase      # small: the demo size
  python -m experiments.late_phase --config=experiments/configs/late_phase.py:paper \\
      --config.tensorboard=True                                   # every arm; TensorBoard logs

Each arm trains all its seeds as one program on the same minibatches and lr schedule; late
arms run `wspace.late_phase.LatePhase` from T0 and are averaged in weight space. The config
module describes the arms and the NQP (metric: the excess loss over the last quarter of the
run); `claims` pairs each arm with its baseline by seed.

Reference: von Oswald et al., "Neural networks with late-phase weights", ICLR 2021, arXiv
2007.12927; Izmailov et al. 2018 (SWA), arXiv 1803.05407.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

import wspace as ws
from experiments import cli, common
from experiments.claims import Claim, judge
from experiments.configs.late_phase import CLASSIFY_ARMS, NQP_ARMS, PARTS
from wspace.averaging import recompute_batch_stats, swa, swa_params
from wspace.late_phase import LatePhase

# arm -> (schedule, combine) of its LatePhase; the other arms train plainly
LATE = {"late": ("cycle", None), "late_t0_0": ("cycle", None), "late_random": ("random", None),
        "late_mean": ("cycle", "mean"), "late_parallel": ("parallel", None),
        "late_swa": ("cycle", None)}  # fmt: skip
NQP_SELECT = ws.late_phase.selection(lambda path: path[-1] == "gain")


def claims(config) -> list[Claim]:
    """The claims as data: texts name K and T0; NQP arms are stored as ``nqp_<arm>``."""
    k, frac, steps, t0 = config.members, f"{config.t0_frac:.0%}", config.steps, _t0(config)
    acc = functools.partial(Claim, metric="test_accuracy", per_example="test_correct")
    nqp = lambda text, arm, base: Claim(f"NQP: {text}", "excess_loss", f"nqp_{arm}",
                                        f"nqp_{base}", higher_is_better=False)  # fmt: skip
    return [
        acc(f"Late-phase weights (K={k}, cycle, T0={frac}) beat SGD in test accuracy",
            arm="late", baseline="sgd"),
        Claim(f"Late-phase weights (K={k}) have lower test NLL than SGD", "test_nll", "late",
              "sgd", higher_is_better=False),
        acc(f"Starting the late phase at T0={frac} beats T0=0 (the paper's ablation) in test "
            f"accuracy, at equal minibatches (shared-weight steps: {t0 + (steps - t0) // k} vs "
            f"{steps // k})", arm="late", baseline="late_t0_0"),
        acc("Late-phase weights from T0=0 beat SGD in test accuracy (the paper: no)",
            arm="late_t0_0", baseline="sgd"),
        acc("Late-phase with a random member per step (shared weights every step) beats SGD in "
            "test accuracy", arm="late_random", baseline="sgd"),
        acc("Parallel late-phase (all members on B/K-example slices, the previous library "
            "algorithm) beats SGD in test accuracy", arm="late_parallel", baseline="sgd"),
        acc("Late-phase + SWA beats SWA in test accuracy", arm="late_swa", baseline="swa"),
        acc("Parallel late-phase beats SGD with the same ghost BatchNorm (statistics over B/K "
            "examples) in test accuracy", arm="late_parallel", baseline="sgd_ghost_bn"),
        *[nqp(f"Late-phase ({what}) reaches a lower excess loss than SGD", arm, "sgd")
          for arm, what in (("late", "cycle, shared step per K minibatches with the sum"),
                            ("late_random", "random member, shared step every minibatch"),
                            ("late_mean", "cycle, shared step per K minibatches with the mean"))],
        nqp("Late-phase (cycle, mean) beats SGD whose learning rate drops to lr/K at T0 (the "
            "learning-rate confound)", "late_mean", "sgd_lr_over_K"),
    ]  # fmt: skip


def validate(config) -> None:
    """Rejects bad fields before any work or file write."""
    counts = ("members", "steps", "batch_size", "eval_every", "swa_every", "nqp_dim", "nqp_steps",
              "nqp_batch_size", "nqp_eval_every")  # fmt: skip
    arms = {"parts": PARTS, "classify_arms": CLASSIFY_ARMS, "nqp_arms": NQP_ARMS}
    common.check(config, arms, choices={"model": sorted(ws.models.MODELS)}, counts=counts,
                 positive=("lr", "nqp_lr", "swa_lr"), open_fractions=("t0_frac",))  # fmt: skip
    for field in ("classify_arms", "nqp_arms"):
        if "sgd" not in config[field]:
            raise ValueError(f"config.{field}={list(config[field])!r}; arms must include 'sgd'")
    if config.batch_size % config.members or config.nqp_batch_size % config.members:
        raise ValueError(
            f"config.batch_size={config.batch_size} and nqp_batch_size={config.nqp_batch_size} "
            f"must be divisible by members={config.members} (parallel arms and ghost BatchNorm)"
        )
    _late(config, "late")  # raises on a bad select, noise or member_opt_state


def _t0(config, steps: int | None = None) -> int:
    return int(config.t0_frac * (steps or config.steps))


def _late(config, arm: str, select=None) -> LatePhase | None:
    return LatePhase(config.members, select or config.select, *LATE[arm], config.noise,
                     member_opt_state=config.member_opt_state) if arm in LATE else None  # fmt: skip


def _check_select(config, model, sample_x) -> None:
    """Refuses a ``config.select`` that picks no weight of ``config.model`` (shapes only)."""
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0), sample_x)["params"]
    try:  # the key of the noise (config.noise > 0); only shapes are computed
        jax.eval_shape(lambda p: _late(config, "late").expand(p, key=jax.random.PRNGKey(0)), params)
    except ValueError as e:
        raise ValueError(f"config.select={config.select!r} does not fit config.model="
                         f"{config.model!r}: {str(e).splitlines()[0]}") from None  # fmt: skip


def fit_arm(config, workdir, arm, late, state, loss, tx, data, seeds, *, t0, masks=None,
            estimator=jax.value_and_grad, **kw):  # fmt: skip
    """All seeds of an arm as one program: plain `wspace.training.fit` (``late`` None) or
    ``late.fit`` from ``t0`` with ``masks`` (the members' initial noise keyed by the first
    seed); TensorBoard logs in the arm's seeds workdir when ``config.tensorboard``."""
    if late is None:
        return common.fit_seeds(config, workdir, arm, list(seeds), state, loss, tx, data,
                                mode=kw.pop("mode", "jit"), estimator=estimator, **kw)  # fmt: skip
    with common.metric_writer(config, common.seeds_workdir(workdir, arm, seeds)) as writer:
        key = jax.random.PRNGKey(seeds[0]) if late.noise > 0 else None
        return late.fit(state, loss, tx, data, t0=t0, key=key, masks=masks, estimator=estimator,
                        seed=list(seeds), writer=writer, **kw)  # fmt: skip


def _ghost_bn_loss(loss_fn, num_slices: int):
    """The plain loss with BatchNorm statistics per slice of the batch; shared running stats."""

    def wrapped(params, model_state, batch, key):
        sliced = jax.tree.map(lambda x: x.reshape((num_slices, -1) + x.shape[1:]), batch)
        losses, rest = jax.vmap(loss_fn, (None, None, 0, None))(params, model_state, sliced, key)
        return jnp.mean(losses), jax.tree.map(lambda x: jnp.mean(x, axis=0), rest)

    return wrapped


def _optimizers(config) -> dict:
    """SGD + momentum 0.9 on a cosine schedule; for SWA cosine to swa_lr at T0, then constant,
    averaging from T0. Built once per run: the arms share compiled plain steps."""
    t0, lr = _t0(config), config.lr
    decay = optax.cosine_decay_schedule(lr, max(t0, 1), alpha=config.swa_lr / lr)
    swa_lr = optax.join_schedules([decay, optax.constant_schedule(config.swa_lr)], [t0])
    return {
        "sgd": optax.sgd(optax.cosine_decay_schedule(lr, config.steps), momentum=0.9),
        "swa": optax.chain(optax.sgd(swa_lr, momentum=0.9), swa(start=t0, every=config.swa_every)),
    }


def _fit_kwargs(config, model) -> dict:
    return dict(batch_size=config.batch_size, mode=config.mode, eval_every=config.eval_every,
                train_eval_examples=0, progress=config.progress, apply_fn=model.apply)  # fmt: skip


def _plain_to_t0(config, workdir, ds, model, loss, txs):
    """``prefix(optimizer, seeds) -> (state at T0, history)``: plain training to T0, run once
    and shared by every arm that starts its late phase (or goes on plainly) from there."""

    @functools.cache
    def prefix(opt: str, seeds: tuple[int, ...]):
        state = ws.training.init_states(model, txs[opt], ds.x_train[:1], list(seeds))
        return fit_arm(config, workdir, f"{opt}_to_t0", None, state, loss, txs[opt], ds, seeds,
                       t0=0, num_steps=_t0(config), **_fit_kwargs(config, model))  # fmt: skip

    return prefix


def classify_arm(config, workdir, ds, model, loss, txs, prefix, arm, seeds) -> list[dict]:
    """One arm for all seeds at once; per seed: final test metrics, per-example correctness
    and the test-accuracy curve. Arms with plain training to T0 continue from ``prefix``'s."""
    uses_swa, late = arm in ("swa", "late_swa"), _late(config, arm)
    opt = "swa" if uses_swa else "sgd"
    t0 = 0 if arm == "late_t0_0" else _t0(config)
    if arm == "sgd_ghost_bn" or t0 == 0:
        state, before = ws.training.init_states(model, txs[opt], ds.x_train[:1], seeds), []
    else:  # the same steps the arm would take to T0, bit for bit (same step, data, seeds)
        state, before = prefix(opt, tuple(seeds))
    train_loss = _ghost_bn_loss(loss, config.members) if arm == "sgd_ghost_bn" else loss
    state, hist = fit_arm(config, workdir, arm, late, state, train_loss, txs[opt], ds, seeds,
                          t0=t0, num_steps=config.steps, **_fit_kwargs(config, model))  # fmt: skip
    hist = before + hist
    params, model_state = state.params, state.model_state
    if uses_swa:  # statistics of the averaged weights (of every member for late_swa)
        params = swa_params(state.opt_state)
        stream = ws.data.batches(ds.x_train, ds.y_train, config.batch_size, seed=12345, epochs=None)
        batches = [next(stream) for _ in range(50)]  # BatchNorm momentum 0.9: 0.9^50 ~ 5e-3
        recal = late.recalibrate if late else recompute_batch_stats
        model_state = jax.vmap(lambda p, s: recal(loss, p, s, batches))(params, model_state)
    if late:
        params, model_state = jax.vmap(late.average)(params, model_state)
    variables, test = {"params": params, **model_state}, (ds.x_test, ds.y_test)
    final = ws.training.evaluate(model.apply, variables, *test, seed_axis=True)
    correct = ws.training.correct_predictions(model.apply, variables, *test, seed_axis=True)
    curves = common.seed_curves(hist, ["test_accuracy"])
    return [{"test_accuracy": final["accuracy"][i], "test_nll": final["loss"][i],
             "test_correct": ws.stats.pack_correct(correct[i]), "curve": curves[i]}
            for i in range(len(seeds))]  # fmt: skip


def nqp_arm(config, workdir, arm: str, seeds: list[int]) -> list[dict]:
    """One NQP arm for all seeds at once: the excess loss of its output network over the run."""
    steps, t0, dim = config.nqp_steps, _t0(config, config.nqp_steps), config.nqp_dim
    h = (1.0 / np.arange(1, dim + 1)).astype(np.float32)
    w = lambda p: p["theta"] * p["gain"]

    def loss(params, model_state, batch, key):
        return 0.5 * jnp.mean(jnp.sum(h * (w(params) - batch["x"]) ** 2, -1)), (model_state, {})

    # E_c l(w; c) - min_w E_c l(w; c) = 1/2 sum_i h_i (w_i - 1)^2, per seed
    excess = jax.jit(jax.vmap(lambda p: 0.5 * jnp.sum(h * (w(p) - 1.0) ** 2)))
    late_lr = config.nqp_lr / (config.members if arm == "sgd_lr_over_K" else 1)
    lr = optax.join_schedules([optax.constant_schedule(v) for v in (config.nqp_lr, late_lr)], [t0])
    tx = optax.sgd(lr)

    def init(key):
        params = {"theta": jnp.zeros(dim), "gain": jnp.ones(dim)}
        return ws.training.TrainState(jnp.zeros((), jnp.int32), params, {}, tx.init(params), key)

    state = jax.vmap(init)(jnp.stack([jax.random.PRNGKey(s) for s in seeds]))
    data = ws.data.GaussianBatches(1.0, np.sqrt(h), config.nqp_batch_size, seeds)
    _, hist = fit_arm(config, workdir, f"nqp_{arm}", _late(config, arm, NQP_SELECT), state, loss,
                      tx, data, seeds, t0=t0, num_steps=steps, eval_every=config.nqp_eval_every,
                      eval_fn=lambda s: {"excess_loss": excess(s.params)},
                      progress=False)  # fmt: skip
    curves = common.seed_curves(hist, ["excess_loss"])
    tail = lambda c: float(np.mean([r["excess_loss"] for r in c if r["step"] > 0.75 * steps]))
    return [{"excess_loss": tail(c), "curve": c} for c in curves]


def run(config, workdir: str) -> dict:
    """Runs the configured parts and arms (all seeds of an arm at once); writes results.json
    and figures."""
    validate(config)
    arms, tables, figures, notes = {}, {}, [], [
        "late = the paper's algorithm (schedule 'cycle': one member per minibatch, the whole "
        "minibatch; shared weights step once per K minibatches with the summed gradient; "
        f"member optimizer state at T0: {config.member_opt_state}).",
        "Seeds pair the arms (same initialisation and data order per seed); arms that train "
        "plainly to T0 share that training (computed once).",
    ]  # fmt: skip
    if "classify" in config.parts:
        ds = common.load_dataset(config)
        width = {"channels": tuple(config.channels)} if config.model == "convnet" else {}
        model = ws.models.create(config.model, ds.num_classes, **width)
        _check_select(config, model, ds.x_train[:1])
        loss, txs = ws.training.classification_loss(model.apply), _optimizers(config)
        prefix = _plain_to_t0(config, workdir, ds, model, loss, txs)
        arm = functools.partial(classify_arm, config, workdir, ds, model, loss, txs, prefix)
        arms = {a: functools.partial(arm, a) for a in config.classify_arms}
        t0, k, late = _t0(config), config.members, config.steps - _t0(config)
        notes.append(
            f"{config.model} {tuple(config.channels)}: {config.steps} steps of batch "
            f"{config.batch_size}, T0 = {t0}: the late phase covers {late} minibatches, "
            f"{late // k} per member and {late // k} shared-weight steps (cycle + sum); from "
            f"T0 = 0 the shared weights take {config.steps // k} steps in all."
        )
    if "nqp" in config.parts:
        arms |= {f"nqp_{a}": functools.partial(nqp_arm, config, workdir, a)
                 for a in config.nqp_arms}  # fmt: skip
        notes.append(
            f"NQP: d = {config.nqp_dim}, batch {config.nqp_batch_size}, lr {config.nqp_lr}, "
            f"{config.nqp_steps} steps, T0 = {config.t0_frac:.0%}; cycle + sum steps theta "
            "with K x the mean gradient, so it diverges where K lr h_max > 2 (e.g. lr 0.5)."
        )
    common.start(config, workdir)
    per_arm = common.run_arms(workdir, config, arms)
    for part, title, metrics, plot in (
        ("classify", "ConvNet on mnist1d: final test metrics by arm",
         ["test_accuracy", "test_nll"], _plot_classify),
        ("nqp", "Noisy quadratic problem: steady-state excess loss by arm", ["excess_loss"],
         _plot_nqp),
    ):  # fmt: skip
        results = {a: r for a, r in per_arm.items() if a.startswith("nqp_") == (part == "nqp")}
        if part in config.parts:
            tables[title] = common.summarize(results, metrics)
            figures.append(plot(results, workdir, config))
    return common.save_results(
        workdir, config, "late_phase", claims=judge(claims(config), per_arm, skip_missing=True),
        tables=tables, figures=figures, notes=notes,
    )  # fmt: skip


def _plot_classify(per_arm, workdir, config) -> str:
    import matplotlib.pyplot as plt

    fig, (ax, ax_d) = plt.subplots(1, 2, figsize=(11, 4))
    common.plot_curves(ax, per_arm, "test_accuracy", style=".-")
    ax.legend()
    ax.set(xlabel="step", ylabel="test accuracy (late arms: averaged network)",
           title=f"mean and 95% interval over {config.num_seeds} seeds")  # fmt: skip
    acc = {a: 100 * np.array([r["test_accuracy"] for r in rs]) for a, rs in per_arm.items()}
    others = [a for a in per_arm if a != "sgd"]
    for i, arm in enumerate(others):  # paired by seed: one dot per seed, mean and 95% interval
        d = acc[arm] - acc["sgd"]
        ax_d.plot(np.full(len(d), i), d, "o", alpha=0.5, color=f"C{list(per_arm).index(arm)}")
        common.plot_mean_ci(ax_d, [i + 0.15], d[:, None], style="ks", bars=True)
    ax_d.axhline(0, color="gray", lw=1)
    ax_d.set_xticks(range(len(others)), others, rotation=20)
    ax_d.set(ylabel="final test accuracy - SGD (points), per seed", title="paired by seed")
    fig.suptitle(f"late-phase weights: {config.model} on {config.dataset}")
    return common.savefig(fig, workdir, "accuracy.png", config)


def _plot_nqp(per_arm, workdir, config) -> str:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.axvline(_t0(config, config.nqp_steps), color="gray", ls=":", label="T0")
    common.plot_curves(ax, per_arm, "excess_loss")
    ax.legend()
    ax.set(xlabel="step", ylabel="excess loss of the output network", yscale="log",
           title="noisy quadratic problem (mean, 95% interval over seeds)")  # fmt: skip
    return common.savefig(fig, workdir, "nqp.png", config)


if __name__ == "__main__":
    cli.main(run, "late_phase")
