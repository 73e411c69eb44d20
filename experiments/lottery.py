r"""Lottery tickets by iterative magnitude pruning, its controls, and the geometry of each level.

  python -m experiments.lottery --workdir=runs/lottery                     # small (the demo)
  python -m experiments.lottery --workdir=/tmp/q --config=experiments/configs/lottery.py:quick
  python -m experiments.lottery --workdir=runs/lottery_paper \
      --config=experiments/configs/lottery.py:paper --config.mode=sharded

An MLP (LeNet-300-100) on standardized mnist1d, SGD with momentum 0.9 on a
cosine schedule, ``steps`` per level. Each level prunes ``rate`` (20%) of the
surviving weights of every layer (``head_rate`` = 10% for the output layer) by
magnitude and retrains. All seeds of an arm train as one program (a seed axis,
`wspace.lottery`). Arms (``config.arms``), all sharing one dense run per seed:

* ``ticket``: IMP, survivors rewound to step ``k = rewind_step`` with a fresh
  optimizer state and the schedule at ``k`` (open_lth; Frankle et al. 2020).
* ``ticket_restore``: the same with the whole step-``k`` state restored
  (momentum buffers included), the variant the library used to run.
* ``ticket_init``: IMP rewound to the initialisation (Frankle & Carbin 2019).
* ``reinit``: the ticket's masks, fresh random weights, trained from step 0.
* ``random``: random masks with the ticket's per-layer counts, rewound weights.
* ``oneshot``: the dense solution pruned in one shot to each level's sparsity.

Per level and arm: test accuracy and density; for ``geometry_arms``, on 1,000
training examples and the surviving weights only: the top Hessian eigenvalue
(sharpness), the Hessian trace summed and **per surviving weight**; the test
error barrier to the previous level; and for ``instability_arms`` the
instability (Frankle et al. 2020): a second copy from the level's start with
another data order, the test-error barrier between the two.

Claims (paired by seed, 95% t-intervals, at the deepest level):
the ticket matches dense within ``match_margin``; it beats random
re-initialisation and random pruning; it is stable to SGD noise (instability
below 2 points); after the same training steps it is flatter per weight than
random re-initialisation (Paul et al. 2023, arXiv 2210.03044; Saleem et al. 2024,
arXiv 2403.15022; equal steps, not matched training loss: re-init fits worse);
restoring the optimizer instead of a fresh one changes accuracy by less than the
margin. Each seed's result stores ``test_correct`` per level (`common.pack_correct`).
Levels resume from ``workdir/train/<arm>/seeds_<a>-<b>`` (all seeds in one
checkpoint per level); finished arms and seeds from ``workdir/arms``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

import wspace as ws
from experiments import cli, common
from wspace import landscape, lottery, pruning

ALL_ARMS = ("ticket", "ticket_restore", "ticket_init", "reinit", "random", "oneshot")
OPTIMIZERS = ("sgd", "adam")
STABLE = 0.02  # Frankle et al. 2020: "stable" = error barrier below 2%
GEOMETRY = (
    ("sharpness", "top Hessian eigenvalue (surviving weights)"),
    ("trace", "Hessian trace, summed over surviving weights"),
    ("trace_per_weight", "Hessian trace per surviving weight"),
    ("instability_error", "instability: test-error barrier, two data orders"),
    ("barrier_prev_error", "test-error barrier to the previous level"),
)
COLORS = {arm: f"C{i}" for i, arm in enumerate(ALL_ARMS)}  # one colour per arm in every panel
LABELS = {
    "ticket": "IMP ticket (rewind to k, fresh optimizer)",
    "ticket_restore": "IMP ticket (rewind to k, restored optimizer)",
    "ticket_init": "IMP ticket (rewind to init)",
    "reinit": "random re-init (ticket masks)",
    "random": "random pruning (ticket's layer counts)",
    "oneshot": "one-shot magnitude pruning",
}


def _names(text: str) -> list[str]:
    return [a.strip() for a in text.split(",") if a.strip()]


def validate(config) -> None:
    """Rejects bad fields before any work or file write."""
    arms = _names(config.arms)
    for field, names in (
        ("arms", arms),
        ("geometry_arms", _names(config.geometry_arms)),
        ("instability_arms", _names(config.instability_arms)),
    ):
        bad = [a for a in names if a not in ALL_ARMS]
        if bad:
            raise ValueError(f"config.{field} has unknown arms {bad}; use a subset of {ALL_ARMS}")
        if field != "arms" and any(a not in arms for a in names):
            raise ValueError(f"config.{field}={names} must be a subset of config.arms={arms}")
    if "ticket" not in arms:
        raise ValueError(f"config.arms={arms} must include 'ticket' (the controls use its masks)")
    if config.optimizer not in OPTIMIZERS:
        raise ValueError(f"config.optimizer={config.optimizer!r}; use one of {OPTIMIZERS}")
    if config.rewind not in lottery.REWINDS:
        raise ValueError(f"config.rewind={config.rewind!r}; use one of {lottery.REWINDS}")
    if config.scope not in pruning.SCOPES:
        raise ValueError(f"config.scope={config.scope!r}; use one of {pruning.SCOPES}")
    if not config.hidden or any(int(w) < 1 for w in config.hidden):
        raise ValueError(f"config.hidden={config.hidden!r}; give positive layer widths")
    common.require_at_least_one(
        config, "steps", "batch_size", "levels", "geometry_examples", "lanczos_iters",
        "trace_samples",
    )  # fmt: skip
    if config.path_points < 2:
        raise ValueError(f"config.path_points={config.path_points}; must be >= 2")
    if not 0 <= config.rewind_step < config.steps:
        raise ValueError(
            f"config.rewind_step={config.rewind_step}; must be in [0, steps={config.steps})"
        )
    for field in ("rate", "head_rate"):
        if not 0.0 <= config[field] < 1.0:
            raise ValueError(f"config.{field}={config[field]}; must be in [0, 1)")
    if not config.lr > 0 or config.lr == float("inf"):
        raise ValueError(f"config.lr={config.lr}; must be finite and > 0")
    if not 0.0 <= config.match_margin < 1.0:
        raise ValueError(f"config.match_margin={config.match_margin}; must be in [0, 1)")


def run(config, workdir: str) -> dict:
    """Runs every arm for all seeds at once (resuming), writes results.json and the figures."""
    validate(config)
    common.start(config, workdir)
    ds = common.load_dataset(config)
    levels, model = _imp(config, ds, workdir)

    def arm_fn(arm):
        return lambda seeds: _seed_results(levels(arm, tuple(seeds)), model, ds)

    per_arm = common.run_arms(workdir, config, {a: arm_fn(a) for a in _names(config.arms)})
    return _results(config, workdir, per_arm)


def _imp(config, ds, workdir):
    """``(levels(arm, seeds) -> [lottery.Level], model)``: an arm's IMP levels, all seeds at
    once (a seed axis), resumable under ``workdir/train``; the dense run and the ticket are
    computed once per seed set and shared by the arms."""
    c = config
    model = ws.models.create("mlp", ds.num_classes, features=tuple(c.hidden))
    schedule = optax.cosine_decay_schedule(c.lr, c.steps)
    base = optax.sgd(schedule, momentum=0.9) if c.optimizer == "sgd" else optax.adam(schedule)
    tx = optax.chain(pruning.mask_gradients(), base, pruning.keep_masked())
    loss = ws.training.classification_loss(model.apply)
    init_fn = jax.jit(lambda k: model.init(k, ds.x_train[:1])["params"])
    measure = _make_measure(c, ds, model)
    test_error = landscape.classification_objective(
        model.apply, {}, ds.x_test, ds.y_test, metric="all"
    )

    @functools.cache
    def dense(seeds):
        train = lottery.Trainer(
            loss, tx, ds, model.apply, c.batch_size, seed=list(seeds), mode=c.mode
        )
        state = ws.training.init_states(model, tx, ds.x_train[:1], list(seeds))
        where = common.seeds_workdir(workdir, "dense", seeds)
        run = lottery.train_dense(
            state, train, num_steps=c.steps, rewind_step=c.rewind_step, workdir=where
        )
        return train, run

    @functools.cache
    def levels(arm, seeds):
        train, run = dense(seeds)
        if arm in ("ticket_init", "reinit"):
            run = run.rewound_to(0)
        salt = 1000 + ALL_ARMS.index(arm)  # one key per seed and arm
        keys = jnp.stack([jax.random.fold_in(jax.random.PRNGKey(s), salt) for s in seeds])
        kind = {"reinit": "reinit", "random": "random", "oneshot": "oneshot"}.get(arm, "rewind")
        stable = arm in _names(c.instability_arms)
        return lottery.run_arm(
            kind,
            run,
            train,
            levels=c.levels,
            rate=c.rate,
            layer_rates={"head": c.head_rate},
            scope=c.scope,
            reference=levels("ticket", seeds) if kind in ("reinit", "random") else None,
            key=keys,
            init_fn=init_fn,
            rewind="restore" if arm == "ticket_restore" else c.rewind,
            measure=measure if arm in _names(c.geometry_arms) else None,
            instability_eval=test_error if stable else None,
            instability_seed=[s + 10_000 for s in seeds] if stable else None,
            instability_points=c.path_points,
            workdir=common.seeds_workdir(workdir, arm, seeds),
        )

    return levels, model


def _seed_results(levels, model, ds) -> list[dict]:
    """One result per seed: each metric per level, and ``test_correct`` (`common.pack_correct`)."""
    keys = ["density", "test_accuracy", "train_accuracy", "test_loss", "train_loss"]
    keys += [g for g, _ in GEOMETRY if g in levels[-1].metrics]
    correct = [
        ws.training.correct_predictions(
            model.apply, {"params": lv.params}, ds.x_test, ds.y_test, seed_axis=True
        )
        for lv in levels
    ]
    return [
        {k: [_value(lv.metrics.get(k), i) for lv in levels] for k in keys}
        | {"test_correct": [common.pack_correct(c[i]) for c in correct]}
        for i in range(len(correct[0]))
    ]


def _value(per_seed, i):
    """Seed ``i``'s value as a float, or None (JSON null) where it was not measured (e.g.
    the barrier to the previous level at level 0)."""
    return None if per_seed is None else float(per_seed[i])


def _make_measure(config, ds, model):
    """Geometry of each level, per seed, on fixed subsets (see the module docstring)."""
    n = min(config.geometry_examples, len(ds.x_train))
    x, y = ds.x_train[:n], ds.y_train[:n]

    @jax.jit
    @jax.vmap
    def curvature(params, masks, key):
        f = landscape.classification_objective(model.apply, {}, x, y)
        f_masked = lambda p: f(jax.tree.map(lambda a, m: a * m, p, masks))
        k1, k2 = jax.random.split(key)
        top = landscape.top_hessian_eigenvalues(
            f_masked, params, k=1, num_iters=config.lanczos_iters, key=k1
        )[0]
        per_weight = landscape.hessian_trace(
            f, params, num_samples=config.trace_samples, key=k2, mask=masks, per_weight=True
        )
        surviving = sum(m.sum() for m in jax.tree.leaves(masks))
        return {"sharpness": top, "trace": per_weight * surviving, "trace_per_weight": per_weight}

    @jax.jit
    @jax.vmap
    def path(params, previous):
        g = landscape.classification_objective(model.apply, {}, ds.x_test, ds.y_test, metric="all")
        barrier = landscape.linear_barrier(g, previous, params, num_points=config.path_points)
        return {"barrier_prev_error": barrier["barrier"]["error"]}

    def measure(level, previous, dense):
        keys = jax.vmap(lambda k: jax.random.fold_in(k, level.level))(dense.init.key)
        out = curvature(level.params, level.masks, keys)  # per seed and level
        if previous is not None:
            out.update(path(level.params, previous.params))
        return {k: np.asarray(v, np.float64).tolist() for k, v in out.items()}

    return measure


def _at(per_arm, level: int) -> dict:
    """``{arm: [{metric: value at level} per seed]}`` for `common.compare`."""
    return {
        arm: [{k: v[level] for k, v in r.items()} for r in results]
        for arm, results in per_arm.items()
    }


def _results(config, workdir, per_arm) -> dict:
    arms = list(per_arm)
    last = _at(per_arm, config.levels)
    last["dense"] = _at(per_arm, 0)["ticket"]
    density = float(np.mean([r["density"] for r in last["ticket"]]))
    at = f"{100 * density:.1f}% of the weights"
    margin = config.match_margin
    # a one-sample interval for stability: the paired "baseline" is Frankle et al.'s threshold
    last["threshold"] = [{"instability_error": STABLE} for _ in last["ticket"]]
    claim = functools.partial(common.compare, per_arm=last)
    claims = [
        claim(f"A rewound IMP ticket at {at} matches the dense network (within "
              f"{100 * margin:g} point of test accuracy)", "test_accuracy", "ticket", "dense",
              margin=margin)
    ]  # fmt: skip
    for control, what in (("reinit", "random re-initialisation"), ("random", "random pruning")):
        if control in per_arm:
            claims.append(claim(f"The IMP ticket beats {what} at {at}", "test_accuracy",
                                "ticket", control))  # fmt: skip
    if "ticket" in _names(config.instability_arms):
        claims.append(claim(
            f"The IMP ticket at {at} is stable to SGD noise (test-error barrier between two "
            f"data orders below {100 * STABLE:g} points; Frankle et al. 2020)",
            "instability_error", "ticket", "threshold", higher_is_better=False,
        ))  # fmt: skip
    if "reinit" in _names(config.geometry_arms):
        # restated (issue 19): re-init ends at a higher training loss than the ticket, so
        # this compares curvature after equal training steps, not at matched training loss
        claims.append(claim(
            f"After the same training steps, the IMP ticket at {at} is flatter than random "
            "re-initialisation (Hessian trace per surviving weight; equal steps, not matched "
            "training loss: see the training loss column)",
            "trace_per_weight", "ticket", "reinit", higher_is_better=False,
        ))  # fmt: skip
    if "ticket_restore" in per_arm:
        claims.append(claim(
            "Restoring the step-k optimizer state instead of a fresh one (open_lth) costs no "
            f"more than {100 * margin:g} point at {at}", "test_accuracy", "ticket_restore",
            "ticket", margin=margin,
        ))  # fmt: skip
    tables = {
        f"Test accuracy by arm at {at} (level {config.levels})": common.summarize(
            {"dense": last["dense"], **{a: last[a] for a in arms}},
            ["test_accuracy", "train_accuracy", "train_loss"],
        )
    }
    for arm in arms:
        metrics = [g for g, _ in GEOMETRY if g in per_arm[arm][0]]
        if metrics:
            tables[f"Geometry per level: {arm}"] = _level_table(
                {g: (per_arm[arm], g) for g in metrics}
            )
    tables["Test accuracy per level"] = _level_table(
        {a: (per_arm[a], "test_accuracy") for a in arms}
    )
    figures = [_plot_accuracy(per_arm, workdir, config), _plot_geometry(per_arm, workdir, config)]
    figures = [f for f in figures if f is not None]
    notes = [
        f"MLP {tuple(config.hidden)} on {config.dataset}, {config.optimizer} lr {config.lr} "
        f"(cosine), {config.steps} steps per level, batch {config.batch_size}; "
        f"{100 * config.rate:g}% of the surviving weights pruned per level "
        f"({100 * config.head_rate:g}% for head), {config.scope}; rewind to step "
        f"{config.rewind_step} with a {config.rewind} optimizer state.",
        "Trace per weight divides the Hutchinson trace over the surviving weights by their "
        "number: the summed trace shrinks with the number of weights even at constant "
        "curvature (the previous README's 222 -> 51 was mostly that).",
        "The flatness claim compares ticket and re-initialisation after the same number of "
        "steps, not at matched training loss (the previous claim's confound, issue 19): "
        + _losses_text(last, config.levels),
        "Instability: the level's own run and a second copy from the same start with another "
        "data order; test-error barrier on "
        f"{config.path_points} points (Frankle et al. 2020 use 30).",
    ]
    return common.save_results(
        workdir,
        config,
        "lottery",
        claims=claims,
        tables=tables,
        figures=figures,
        notes=notes,
        extra={"density_per_level": per_arm["ticket"][0]["density"]},
    )


def _losses_text(last, level) -> str:
    """The training losses the flatness claim compares at (mean over seeds)."""
    if "reinit" not in last:
        return "no re-initialisation arm in this run."
    mean = {a: np.mean([r["train_loss"] for r in last[a]]) for a in ("ticket", "reinit")}
    return (
        f"at level {level} the ticket's training loss is {mean['ticket']:.3g} and the "
        f"re-initialised networks' {mean['reinit']:.3g}."
    )


def _by_level(results, metric):
    """Per level: the level, weights left (%), mean and 95% half-width over seeds
    (`common.summarize`); levels where ``metric`` was not measured (null) are dropped."""
    levels = range(len(results[0]["density"]))
    kept = [lv for lv in levels if all(r[metric][lv] is not None for r in results)]
    per_level = {str(lv): [{"m": r[metric][lv]} for r in results] for lv in kept}
    rows = common.summarize(per_level, ["m"])["rows"] if kept else []
    density = 100 * np.mean([[r["density"][lv] for lv in kept] for r in results], axis=0)
    mean = np.array([row[1][0] for row in rows])
    half = np.nan_to_num(np.array([row[1][1] for row in rows]))  # one seed: no interval
    return kept, density, mean, half


def _level_table(columns: dict) -> dict:
    """Rows = levels; one column per ``name -> (results, metric)``; cells [mean, half-width]."""
    first_results = next(iter(columns.values()))[0]
    n = len(first_results[0]["density"])
    rows = [
        [lv, 100 * float(np.mean([r["density"][lv] for r in first_results]))] for lv in range(n)
    ]
    for results, metric in columns.values():
        kept, _, mean, half = _by_level(results, metric)
        cells = {lv: [float(m), float(h)] for lv, m, h in zip(kept, mean, half, strict=True)}
        for row in rows:
            row.append(cells.get(row[0], "–"))
    return {"columns": ["level", "weights left (%)", *columns], "rows": rows}


def _density_axis(ax, density) -> None:
    ax.set_xscale("log")
    ticks = [t for t in (100, 50, 20, 10, 5, 2, 1) if t >= 0.9 * np.min(density)]
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.minorticks_off()
    ax.set_xlim(110, 0.9 * np.min(density))
    ax.set_xlabel("weights remaining (%)")


def _plot_levels(ax, per_arm, metric, labels) -> bool:
    """Mean and 95% band over seeds of ``metric`` per level, one line per arm that has it;
    returns whether any arm had it (else the panel says so)."""
    density = 100 * np.mean([r["density"] for r in per_arm["ticket"]], axis=0)
    arms = [a for a, results in per_arm.items() if metric in results[0]]
    for arm in arms:
        _, d, mean, half = _by_level(per_arm[arm], metric)
        ax.plot(d, mean, marker="o", ms=3, color=COLORS[arm], label=labels[arm])
        ax.fill_between(d, mean - half, mean + half, color=COLORS[arm], alpha=0.2)
    if not arms:
        ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
    _density_axis(ax, density)
    return bool(arms)


def _plot_accuracy(per_arm, workdir, config) -> str:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    _plot_levels(ax, per_arm, "test_accuracy", LABELS)
    dense = np.mean([r["test_accuracy"][0] for r in per_arm["ticket"]])
    ax.axhline(dense - config.match_margin, color="gray", ls="--", lw=0.8, label="dense - margin")
    ax.set(ylabel="test accuracy (mean, 95% CI)")
    ax.set_title(f"lottery tickets, {len(per_arm['ticket'])} seeds")
    ax.legend(fontsize=7)
    return common.savefig(fig, workdir, "lth.png", config)


def _plot_geometry(per_arm, workdir, config) -> str | None:
    """The geometry panels (None: no arm measured any geometry, no figure)."""
    import matplotlib.pyplot as plt

    if not any(g in per_arm[a][0] for a in per_arm for g, _ in GEOMETRY):
        return None
    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    panels = [("test_accuracy", "test accuracy"), *GEOMETRY]
    for ax, (g, label) in zip(axes.ravel(), panels, strict=True):
        _plot_levels(ax, per_arm, g, {a: a for a in per_arm})
        ax.set_title(label, fontsize=10)
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(f"geometry per IMP level (mean and 95% CI over {len(per_arm['ticket'])} seeds)")
    fig.tight_layout()
    return common.savefig(fig, workdir, "geometry.png", config)


if __name__ == "__main__":
    cli.main(run, "lottery")
