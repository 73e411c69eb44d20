r"""Lottery tickets by iterative magnitude pruning, its controls, and the geometry of each level.

  python -m experiments.lottery --workdir=runs/lottery                 # LeNet-300-100, mnist1d
  python -m experiments.lottery --workdir=runs/lottery --num_seeds=3
  python -m experiments.lottery --workdir=runs/quick --quick
  python -m experiments.lottery --workdir=runs/cnn --model=convnet --scope=global

Arms (each ``--levels`` levels after the shared dense level 0, 20% of the
surviving weights pruned per level, 10% for ``head``):

* ``rewind_init``: IMP, survivors rewound to the initialisation (Frankle & Carbin 2019).
* ``rewind_k``: IMP, survivors rewound to step ``--rewind_step`` (Frankle et al. 2020).
* ``reinit``: the ``rewind_init`` ticket's masks with fresh random weights.
* ``random``: random masks with the ticket's per-layer counts, original init.
* ``oneshot``: the dense solution pruned in one shot to each level's sparsity, original init.

Per level: test accuracy, sparsity, and geometry (``--geometry``) of the
sparse network's training loss restricted to its surviving weights: top
Hessian eigenvalue (sharpness), Hessian trace (Hutchinson), loss and error
barrier on the line to the previous level's solution, L2 distance and cosine
to the previous level and to the initialisation, Jaccard overlap of the masks.
Writes config.json, per-level files under seed_S/ARM/level_XX/, results.json
(the table and a summary) and lth.png, geometry.png; a rerun resumes at the
first unfinished level.
"""

from __future__ import annotations

import os
import time

import jax
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from absl import app, flags  # noqa: E402

import wspace as ws  # noqa: E402
from experiments import common  # noqa: E402
from wspace import landscape, lottery, pruning  # noqa: E402

ALL_ARMS = ("rewind_init", "rewind_k", "reinit", "random", "oneshot")

common.define_common_flags("runs/lottery")
flags.DEFINE_string("model", "lenet_300_100", f"One of {sorted(ws.models.MODELS)}.")
flags.DEFINE_bool("standardize", True, "Standardise inputs with the train mean/std.")
flags.DEFINE_enum("optimizer", "sgd", ["sgd", "adam"], "sgd (momentum 0.9) or adam.")
flags.DEFINE_float("lr", 0.05, "Peak learning rate (cosine decay over --steps).")
flags.DEFINE_integer("steps", 1000, "Training steps per level (T).")
flags.DEFINE_integer("batch_size", 128, "Batch size.")
flags.DEFINE_integer("levels", 15, "Pruning levels after the dense level 0.")
flags.DEFINE_float("rate", 0.2, "Fraction of surviving weights pruned per level.")
flags.DEFINE_float("head_rate", 0.1, "Per-level rate of the output layer `head`.")
flags.DEFINE_enum("scope", "layerwise", list(pruning.SCOPES), "Magnitude ranking scope.")
flags.DEFINE_integer("rewind_step", 100, "k of the rewind_k arm, in [0, steps).")
flags.DEFINE_list("arms", list(ALL_ARMS), f"Subset of {ALL_ARMS}.")
flags.DEFINE_integer("num_seeds", 1, "Seeds seed, seed+1, ...; the table reports mean and std.")
flags.DEFINE_bool("geometry", True, "Measure sharpness, trace, barriers and distances per level.")
flags.DEFINE_integer("geometry_examples", 1000, "Train examples for the Hessian measures.")
flags.DEFINE_integer("lanczos_iters", 20, "Lanczos steps for the top Hessian eigenvalue.")
flags.DEFINE_integer("trace_samples", 20, "Hutchinson probes for the Hessian trace.")
flags.DEFINE_integer("path_points", 11, "Points on the line to the previous level.")
FLAGS = flags.FLAGS

_KEYS = (
    "dataset",
    "data_dir",
    "seed",
    "quick",
    "model",
    "standardize",
    "optimizer",
    "lr",
    "steps",
    "batch_size",
    "levels",
    "rate",
    "head_rate",
    "scope",
    "rewind_step",
    "arms",
    "num_seeds",
    "geometry",
    "geometry_examples",
    "lanczos_iters",
    "trace_samples",
    "path_points",
)
GEOMETRY = (
    ("sharpness", "top Hessian eigenvalue"),
    ("hessian_trace", "Hessian trace"),
    ("barrier_loss", "loss barrier to prev. level"),
    ("barrier_error", "test-error barrier to prev. level"),
    ("dist_prev", "L2 distance to prev. level"),
    ("cos_prev", "cosine to prev. level"),
    ("dist_init", "L2 distance to init"),
    ("cos_init", "cosine to init"),
    ("mask_overlap_prev", "mask Jaccard to prev. level"),
)


def get_config() -> dict:
    """The run's settings from the flags, shrunk by --quick."""
    cfg = {k: getattr(FLAGS, k) for k in _KEYS}
    cfg["arms"] = list(cfg["arms"])
    bad = [a for a in cfg["arms"] if a not in ALL_ARMS]
    if bad:
        raise ValueError(f"unknown arms {bad}; use a subset of {ALL_ARMS}")
    if cfg["quick"]:
        cfg.update(
            steps=20,
            rewind_step=5,
            levels=2,
            batch_size=32,
            geometry_examples=64,
            lanczos_iters=3,
            trace_samples=2,
            path_points=3,
        )
    return cfg


def run(workdir: str, cfg: dict, progress: bool = True) -> dict:
    """Runs every seed and arm (resuming), writes results.json and the plots; returns results."""
    common.start(workdir, cfg)
    ds = ws.data.load(cfg["dataset"], data_dir=cfg["data_dir"])
    if cfg["standardize"]:
        ds = ws.data.standardize(ds)
    model = ws.models.create(cfg["model"], ds.num_classes)
    schedule = optax.cosine_decay_schedule(cfg["lr"], cfg["steps"])
    base = optax.sgd(schedule, momentum=0.9) if cfg["optimizer"] == "sgd" else optax.adam(schedule)
    tx = optax.chain(base, pruning.keep_masked())
    step = ws.training.make_train_step(ws.training.classification_loss(model.apply), tx)
    rows, timing = [], {}
    for s in range(cfg["num_seeds"]):
        seed = cfg["seed"] + s
        levels, seconds = _run_seed(
            os.path.join(workdir, f"seed_{seed}"), cfg, ds, model, tx, step, seed, progress
        )
        timing[seed] = seconds
        rows += [
            {**lv.metrics, "method": lv.metrics["arm"], "arm": arm, "seed": seed}
            for arm in levels
            for lv in levels[arm]
        ]
    results = _summarise(rows, cfg, timing)
    common.save_results(workdir, results)
    _plot(results, workdir)
    return results


def _run_seed(where, cfg, ds, model, tx, step, seed, progress):
    train = lottery.Trainer(
        ws.training.classification_loss(model.apply),
        tx,
        ds,
        apply_fn=model.apply,
        batch_size=cfg["batch_size"],
        seed=seed,
    )
    key = jax.random.PRNGKey(seed)
    # one compiled init instead of many eager ops (bit-identical values on CPU)
    state = jax.jit(lambda k: ws.training.init_state(model, tx, ds.x_train[:1], k))(key)
    t0 = time.time()
    dense = lottery.train_dense(
        state,
        train,
        num_steps=cfg["steps"],
        rewind_step=cfg["rewind_step"],
        workdir=os.path.join(where, "dense"),
    )
    dense_time = time.time() - t0
    measure = _make_measure(cfg, ds, model, seed) if cfg["geometry"] else None
    init_fn = jax.jit(lambda k: model.init(k, ds.x_train[:1], train=False)["params"])
    common_kw = dict(
        levels=cfg["levels"],
        rate=cfg["rate"],
        layer_rates={"head": cfg["head_rate"]},
        scope=cfg["scope"],
        measure=measure,
    )
    plan = [
        ("rewind_init", "rewind", dense.rewound_to(0)),
        ("rewind_k", "rewind", dense),
        ("reinit", "reinit", dense.rewound_to(0)),
        ("random", "random", dense.rewound_to(0)),
        ("oneshot", "oneshot", dense.rewound_to(0)),
    ]
    if cfg["rewind_step"] == 0:
        plan = [p for p in plan if p[0] != "rewind_k"]
    out, seconds = {}, {"dense": dense_time}
    for name, arm, run_from in plan:
        needs_ticket = name in ("reinit", "random")
        if name not in cfg["arms"] and not (
            name == "rewind_init" and any(a in cfg["arms"] for a in ("reinit", "random"))
        ):
            continue
        t0 = time.time()
        report = _reporter(name, seed) if progress else None
        out[name] = lottery.run_arm(
            arm,
            run_from,
            train,
            **common_kw,
            workdir=os.path.join(where, name),
            reference=out.get("rewind_init") if needs_ticket else None,
            key=jax.random.fold_in(key, 1000 + ALL_ARMS.index(name)),
            init_fn=init_fn,
            callback=report,
        )
        seconds[name] = time.time() - t0
    return {k: v for k, v in out.items() if k in cfg["arms"]}, seconds


def _reporter(name, seed):
    def report(level):
        m = level.metrics
        print(
            f"seed {seed} {name:12s} level {level.level:2d} density {m['density']:.3f} "
            f"test acc {m['test_accuracy']:.3f}",
            flush=True,
        )

    return report


def _make_measure(cfg, ds, model, seed):
    """Geometry of each level, on fixed train/test subsets.

    The `wspace.landscape` calls run inside two functions jitted here, so each
    is compiled once per run rather than once per level.
    """
    n = min(cfg["geometry_examples"], len(ds.x_train))
    x, y = ds.x_train[:n], ds.y_train[:n]
    key = jax.random.PRNGKey(10_000 + seed)

    @jax.jit
    def curvature(params, masks, model_state, init, key, x, y):
        f = landscape.classification_objective(model.apply, model_state, x, y)
        f_masked = lambda p: f(jax.tree.map(lambda a, m: a * m, p, masks))
        k1, k2 = jax.random.split(key)
        return {
            "sharpness": landscape.top_hessian_eigenvalues(
                f_masked, params, k=1, num_iters=cfg["lanczos_iters"], key=k1
            )[0],
            "hessian_trace": landscape.hessian_trace(
                f_masked, params, num_samples=cfg["trace_samples"], key=k2
            ),
            "dist_init": landscape.l2_distance(params, init),
            "cos_init": landscape.cosine_similarity(params, init),
        }

    @jax.jit
    def path(params, masks, previous, previous_masks, model_state, x, y):
        g = landscape.classification_objective(model.apply, model_state, x, y, metric="all")
        barrier = landscape.linear_barrier(g, previous, params, num_points=cfg["path_points"])[
            "barrier"
        ]
        return {
            "barrier_loss": barrier["loss"],
            "barrier_error": barrier["error"],
            "dist_prev": landscape.l2_distance(params, previous),
            "cos_prev": landscape.cosine_similarity(params, previous),
            "mask_overlap_prev": landscape.mask_overlap(masks, previous_masks),
        }

    cache = {}

    def measure(level, previous, dense):
        if level.level == 0 and "dense" in cache:  # level 0 is the same dense net in every arm
            return cache["dense"]
        out = curvature(
            level.params,
            level.masks,
            level.model_state,
            dense.init.params,
            jax.random.fold_in(key, level.level),
            x,
            y,
        )
        if previous is not None:
            out.update(
                path(
                    level.params,
                    level.masks,
                    previous.params,
                    previous.masks,
                    level.model_state,
                    ds.x_test,
                    ds.y_test,
                )
            )
        out = {k: float(v) for k, v in out.items()}
        if level.level == 0:
            cache["dense"] = out
        return out

    return measure


def _summarise(rows, cfg, timing) -> dict:
    """Mean/std over seeds per (arm, level) and the headline numbers."""
    table = []
    names = [a for a in ALL_ARMS if a in cfg["arms"]]
    by = {}
    for r in rows:
        by.setdefault((r["arm"], r["level"]), []).append(r)
    measures = ["test_accuracy", "train_accuracy", "test_loss", "density", "train_time"]
    measures += [g for g, _ in GEOMETRY]
    for name in names:
        for level in range(cfg["levels"] + 1):
            group = by.get((name, level), [])
            if not group:
                continue
            row = {"arm": name, "level": level, "seeds": len(group)}
            for m in measures:
                vals = [g[m] for g in group if g.get(m) is not None]
                if vals:
                    row[m] = float(np.mean(vals))
                    row[m + "_std"] = float(np.std(vals))
            table.append(row)
    return {"table": table, "summary": _headline(table, cfg, timing), "timing_s": timing}


def _headline(table, cfg, timing) -> dict:
    get = {(r["arm"], r["level"]): r for r in table}
    dense = get.get((cfg["arms"][0], 0), {}).get("test_accuracy")
    summary = {"dense_test_accuracy": dense}
    for name in ("rewind_init", "rewind_k", "oneshot", "random", "reinit"):
        levels = [get[(name, lv)] for lv in range(cfg["levels"] + 1) if (name, lv) in get]
        if not levels or dense is None:
            continue
        within = None
        for r in levels:  # lowest density with this and all denser levels within 1 point
            if r["test_accuracy"] < dense - 0.01:
                break
            within = r["density"]
        summary[f"{name}_within_1pt_min_density"] = within
        summary[f"{name}_final_density"] = levels[-1]["density"]
        summary[f"{name}_final_test_accuracy"] = levels[-1]["test_accuracy"]
        for g in ("sharpness", "barrier_error"):
            if g in levels[-1]:
                first = levels[0].get(g, levels[1].get(g) if len(levels) > 1 else None)
                summary[f"{name}_{g}_first_last"] = [first, levels[-1][g]]
    for ticket in ("rewind_init", "rewind_k"):
        for control in ("reinit", "random"):
            beats = [
                get[(ticket, lv)]["density"]
                for lv in range(1, cfg["levels"] + 1)
                if (ticket, lv) in get
                and (control, lv) in get
                and get[(ticket, lv)]["test_accuracy"] > get[(control, lv)]["test_accuracy"]
            ]
            if (ticket, 1) in get and (control, 1) in get:
                summary[f"{ticket}_beats_{control}_at_densities"] = beats
    seeds = list(timing.values())
    if seeds and "rewind_init" in seeds[0]:  # wall time incl. geometry and saving; 0 if resumed
        summary["imp_seconds_with_geometry"] = float(
            np.mean([t["dense"] + t["rewind_init"] for t in seeds])
        )
        summary["imp_train_seconds"] = float(
            sum(
                get[("rewind_init", lv)].get("train_time", 0.0)
                for lv in range(cfg["levels"] + 1)
                if ("rewind_init", lv) in get
            )
        )
    return summary


def _plot(results, workdir) -> None:
    table = results["table"]
    names = [a for a in ALL_ARMS if any(r["arm"] == a for r in table)]
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in names:
        rows = [r for r in table if r["arm"] == name]
        d = np.array([r["density"] for r in rows]) * 100
        acc = np.array([r["test_accuracy"] for r in rows])
        std = np.array([r.get("test_accuracy_std", 0.0) for r in rows])
        ax.plot(d, acc, marker="o", ms=3, label=name)
        ax.fill_between(d, acc - std, acc + std, alpha=0.2)
    dense = results["summary"].get("dense_test_accuracy")
    if dense is not None:
        ax.axhline(dense - 0.01, color="gray", ls="--", lw=0.8, label="dense - 1 point")
    ax.set_xscale("log")
    lowest = min(r["density"] for r in table) * 100
    ticks = [t for t in (100, 50, 20, 10, 5, 2, 1, 0.5) if t >= 0.9 * lowest]
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.minorticks_off()
    ax.invert_xaxis()
    ax.set(xlabel="weights remaining (%)", ylabel="test accuracy", title="lottery tickets")
    ax.legend()
    common.savefig(fig, workdir, "lth.png")

    fig, axes = plt.subplots(3, 3, figsize=(12, 9))
    for ax, (g, label) in zip(axes.ravel(), GEOMETRY, strict=True):
        for name in names:
            rows = [r for r in table if r["arm"] == name and g in r]
            ax.plot([r["level"] for r in rows], [r[g] for r in rows], marker="o", ms=3, label=name)
        ax.set(xlabel="level", title=label)
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    common.savefig(fig, workdir, "geometry.png")


def main(argv):
    del argv
    results = run(FLAGS.workdir, get_config(), progress=FLAGS.progress)
    print({k: v for k, v in results["summary"].items()})


if __name__ == "__main__":
    app.run(main)
