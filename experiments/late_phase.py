r"""Late-phase weights vs SGD and SWA: a BatchNorm ConvNet on mnist1d, and the noisy quadratic.

  python -m experiments.late_phase --workdir=runs/late_phase            # ConvNet, 5 arms x 3 seeds
  python -m experiments.late_phase --workdir=runs/lp_nqp --problem=nqp  # noisy quadratic problem
  python -m experiments.late_phase --workdir=/tmp/lp --quick

Classification arms (same steps, batch, cosine learning-rate schedule, SGD + momentum 0.9):
  sgd          plain training;
  late         late-phase BatchNorm affine + head, K members from T0 = 60% of the steps;
  late_t0_0    the same from step 0;
  swa          SWA: cosine decay to swa_lr at 60%, then constant, average every swa_every
               steps, BatchNorm statistics recomputed for the average;
  late_swa     late-phase from 60% on the SWA schedule, SWA average of the late-phase
               params, per-member statistics recomputed, then members averaged;
  sgd_ghost_bn control: plain SGD whose BatchNorm batch statistics are computed per slice
               of B/K examples, as the late-phase members' are, but with no members
               ("ghost batch norm"): separates the effect of the members from that of the
               smaller normalisation batches.
Each arm/seed writes arms/<arm>_seed<s>.json (skipped on rerun); results.json holds the
mean and std over seeds of test accuracy and NLL; accuracy.png the test-accuracy curves.

NQP (--problem=nqp): loss l(w; c) = 1/2 sum_i h_i (w_i - c_i)^2 with a fresh noisy
minimum c ~ N(mu, diag(h)) per sample, h_i = 1/i, mu = 1. The model is w = theta * gain
(elementwise), the analogue of a layer followed by a BatchNorm scale: every arm trains
both vectors; the late-phase arms replicate ``gain`` into K members (w_k = theta * gain_k).
Arms at matched steps and batch: SGD at lr, SGD at lr/K, late-phase (from the middle of
the run), SWA (from the middle), late-phase + SWA. Reports the steady-state excess loss
E[l] - min E[l] of each arm's final network (mean over the last quarter of the run).

Reference: von Oswald et al., "Neural networks with late-phase weights", ICLR 2021,
arXiv 2007.12927; Izmailov et al. 2018 (SWA), arXiv 1803.05407.
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
from absl import app, flags  # noqa: E402

import wspace as ws  # noqa: E402
from experiments import common  # noqa: E402
from wspace import late_phase as lp  # noqa: E402

common.define_common_flags("runs/late_phase")
flags.DEFINE_enum("problem", "classify", ["classify", "nqp"], "classify (ConvNet) or nqp.")
flags.DEFINE_string("model", "convnet", f"One of {sorted(ws.models.MODELS)}.")
flags.DEFINE_string("select", "bn_head", f"Late-phase preset, one of {lp.PRESETS}.")
flags.DEFINE_integer("members", 10, "K, the number of late-phase members.")
flags.DEFINE_float("t0_frac", 0.6, "Late phase (and SWA) start as a fraction of the steps.")
flags.DEFINE_integer("steps", 1200, "Training steps per run.")
flags.DEFINE_integer("batch_size", 100, "Global batch size (divisible by --members).")
flags.DEFINE_float("lr", 0.05, "Peak learning rate.")
flags.DEFINE_float("swa_lr", 0.01, "Constant learning rate of the SWA phase.")
flags.DEFINE_integer("swa_every", 10, "SWA averaging period in steps.")
flags.DEFINE_enum("combine", "mean", list(lp.COMBINE), "How shared weights combine gradients.")
flags.DEFINE_float("noise", 0.0, "Std of the members' perturbation at T0.")
flags.DEFINE_integer("seeds", 3, "Number of seeds (seed, seed+1, ...).")
flags.DEFINE_integer("eval_every", 200, "Evaluate every N steps.")
flags.DEFINE_integer("nqp_dim", 50, "NQP dimension.")
FLAGS = flags.FLAGS

ARMS = ("sgd", "late", "late_t0_0", "swa", "late_swa", "sgd_ghost_bn")
QUICK_ARMS = ("sgd", "late", "late_swa", "sgd_ghost_bn")  # --quick: every code path once
NQP_ARMS = ("sgd", "sgd_lr_over_K", "late", "swa", "late_swa")
_KEYS = (
    "problem",
    "dataset",
    "data_dir",
    "seed",
    "quick",
    "model",
    "select",
    "members",
    "t0_frac",
    "steps",
    "batch_size",
    "lr",
    "swa_lr",
    "swa_every",
    "combine",
    "noise",
    "seeds",
    "eval_every",
    "nqp_dim",
)


def get_config() -> dict:
    """Flags, shrunk by --quick."""
    cfg = {k: getattr(FLAGS, k) for k in _KEYS}
    if cfg["quick"]:
        if cfg["problem"] == "nqp":
            cfg.update(steps=200, eval_every=20, seeds=1, nqp_dim=10)
        else:
            cfg.update(
                model="mlp", steps=12, eval_every=12, batch_size=8, members=2, seeds=1, swa_every=2
            )
    elif cfg["problem"] == "nqp" and FLAGS["steps"].using_default_value:
        cfg.update(steps=4000, eval_every=50, lr=0.5)
    return cfg


# ----------------------------------------------------------------------------- classification


def _schedules(cfg):
    steps, t_swa = cfg["steps"], int(cfg["t0_frac"] * cfg["steps"])
    cosine = optax.cosine_decay_schedule(cfg["lr"], max(steps, 1))
    to_swa = optax.join_schedules(
        [
            optax.cosine_decay_schedule(cfg["lr"], max(t_swa, 1), alpha=cfg["swa_lr"] / cfg["lr"]),
            optax.constant_schedule(cfg["swa_lr"]),
        ],
        [t_swa],
    )
    return cosine, to_swa, t_swa


def run_arm(arm: str, seed: int, cfg: dict, ds, progress: bool) -> dict:
    """Trains one arm with one seed; returns final test metrics and the evaluation history."""
    model = _model(cfg["model"], ds.num_classes)
    loss = ws.training.classification_loss(model.apply)
    cosine, to_swa, t_swa = _schedules(cfg)
    uses_swa = arm in ("swa", "late_swa")
    opt = optax.sgd(to_swa if uses_swa else cosine, momentum=0.9)
    tx = optax.chain(opt, lp.swa(start=t_swa, every=cfg["swa_every"])) if uses_swa else opt
    state = ws.training.init_state(model, tx, ds.x_train[:1], jax.random.PRNGKey(seed))
    common_kw = dict(
        apply_fn=model.apply,
        num_steps=cfg["steps"],
        batch_size=cfg["batch_size"],
        seed=seed,
        eval_every=cfg["eval_every"],
        progress=progress,
    )
    k, sel = cfg["members"], cfg["select"]
    if arm in ("sgd", "swa", "sgd_ghost_bn"):
        train_loss = _ghost_bn_loss(loss, k) if arm == "sgd_ghost_bn" else loss
        state, hist = ws.training.fit(
            state, ws.training.make_train_step(train_loss, tx), ds, **common_kw
        )
        params, model_state = state.params, state.model_state
        if arm == "swa":
            params = lp.swa_params(state.opt_state)
            model_state = lp.recompute_batch_stats(loss, params, model_state, _epoch(ds, cfg))
    else:
        t0 = 0 if arm == "late_t0_0" else t_swa
        state, hist = lp.fit(
            state,
            loss,
            tx,
            ds,
            num_members=k,
            t0=t0,
            select=sel,
            combine=cfg["combine"],
            noise=cfg["noise"],
            key=jax.random.PRNGKey(10_000 + seed),
            **common_kw,
        )
        params, model_state = state.params, state.model_state
        if arm == "late_swa":
            params = lp.swa_params(state.opt_state)
            late_loss = lp.late_phase_loss(loss, k, sel, combine=cfg["combine"])
            model_state = lp.recompute_batch_stats(late_loss, params, model_state, _epoch(ds, cfg))
        params, model_state = lp.average(params, model_state, sel)
    final = ws.training.evaluate(
        model.apply, {"params": params, **model_state}, ds.x_test, ds.y_test
    )
    return {
        "arm": arm,
        "seed": seed,
        "test_accuracy": final["accuracy"],
        "test_nll": final["loss"],
        "curve": [
            {"step": r["step"], "test_accuracy": r["test_accuracy"], "test_loss": r["test_loss"]}
            for r in hist
        ],
    }


@functools.cache
def _model(name: str, num_classes: int):
    """One model object per run, so compiled evaluation functions are reused across arms."""
    return ws.models.create(name, num_classes)


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


def _epoch(ds, cfg, num_batches: int = 80):
    """Training batches for recomputing BatchNorm statistics (momentum 0.9: 0.9^80 ~ 2e-4)."""
    stream = ws.data.batches(ds.x_train, ds.y_train, cfg["batch_size"], seed=12345, epochs=None)
    return [next(stream) for _ in range(num_batches)]


def run_classification(workdir: str, cfg: dict, progress: bool) -> dict:
    """All arms x seeds (resumable per arm/seed), the summary table and the plot."""
    ds = ws.data.standardize(ws.data.load(cfg["dataset"], data_dir=cfg["data_dir"]))
    runs = {}
    arms = QUICK_ARMS if cfg["quick"] else ARMS
    for seed in range(cfg["seed"], cfg["seed"] + cfg["seeds"]):
        for arm in arms:
            path = os.path.join(workdir, "arms", f"{arm}_seed{seed}.json")
            res = common.load_json(path)
            if res is None:
                res = run_arm(arm, seed, cfg, ds, progress)
                ws.training.write_json(path, res)
            runs.setdefault(arm, []).append(res)
    table = {}
    base = np.array([r["test_accuracy"] for r in runs["sgd"]])
    for arm, rs in runs.items():
        acc = np.array([r["test_accuracy"] for r in rs])
        nll = np.array([r["test_nll"] for r in rs])
        table[arm] = {
            "test_accuracy_mean": acc.mean(),
            "test_accuracy_std": acc.std(ddof=1) if len(acc) > 1 else 0.0,
            "test_nll_mean": nll.mean(),
            "test_nll_std": nll.std(ddof=1) if len(nll) > 1 else 0.0,
            "delta_accuracy_vs_sgd_mean": float((acc - base).mean()),
            "per_seed_accuracy": acc.tolist(),
        }
    results = {
        "problem": "classify",
        "dataset": cfg["dataset"],
        "model": cfg["model"],
        "select": cfg["select"],
        "members": cfg["members"],
        "steps": cfg["steps"],
        "seeds": cfg["seeds"],
        "arms": table,
    }
    common.save_results(workdir, results)
    _plot_curves(runs, workdir)
    return results


def _plot_curves(runs, workdir):
    fig, ax = plt.subplots(figsize=(6, 4))
    for arm, rs in runs.items():
        steps = [r["step"] for r in rs[0]["curve"]]
        accs = np.array([[r["test_accuracy"] for r in x["curve"]] for x in rs])
        ax.plot(steps, accs.mean(0), label=arm, marker=".")
        ax.fill_between(steps, accs.min(0), accs.max(0), alpha=0.15)
    ax.set(
        xlabel="step",
        ylabel="test accuracy (late arms: averaged net; SWA: iterate)",
        title="late-phase weights, mean and range over seeds",
    )
    ax.legend()
    common.savefig(fig, workdir, "accuracy.png")


# ----------------------------------------------------------------------------- NQP


_NQP_SELECT = lp.selection(lambda path: path[-1] == "gain")


def _nqp_problem(dim: int):
    h = 1.0 / np.arange(1, dim + 1, dtype=np.float32)
    mu = np.ones(dim, np.float32)

    def loss_fn(params, model_state, batch, key):
        w = params["theta"] * params["gain"]
        value = 0.5 * jnp.mean(jnp.sum(h * (w - batch["x"]) ** 2, axis=-1))
        return value, (model_state, {"loss": value})

    def excess(params):  # E_c l(w; c) - min_w E_c l(w; c)
        w = params["theta"] * params["gain"]
        return 0.5 * jnp.sum(h * (w - mu) ** 2)

    return h, mu, loss_fn, jax.jit(excess)


def run_nqp_arm(arm: str, seed: int, cfg: dict) -> dict:
    """One NQP arm: returns the excess loss of its output network over the run."""
    dim, k, steps, bsz = cfg["nqp_dim"], cfg["members"], cfg["steps"], cfg["batch_size"]
    h, mu, loss_fn, excess = _nqp_problem(dim)
    t0 = int(cfg["t0_frac"] * steps) if cfg["t0_frac"] < 1 else steps // 2
    lr = cfg["lr"] / k if arm == "sgd_lr_over_K" else cfg["lr"]
    uses_swa = arm in ("swa", "late_swa")
    tx = optax.sgd(lr)
    if uses_swa:
        tx = optax.chain(tx, lp.swa(start=t0, every=1))
    params = {"theta": jnp.zeros(dim), "gain": jnp.ones(dim)}
    state = ws.training.TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        model_state={},
        opt_state=tx.init(params),
        key=jax.random.PRNGKey(seed),
    )
    plain_step = ws.training.make_train_step(loss_fn, tx)
    late_step = ws.training.make_train_step(
        lp.late_phase_loss(loss_fn, k, _NQP_SELECT, combine=cfg["combine"]), tx
    )
    is_late = arm in ("late", "late_swa")
    rng = np.random.default_rng(seed)
    out = (
        jax.jit(lambda p, o: lp.average(swa_or(p, o), {}, _NQP_SELECT)[0])
        if is_late
        else jax.jit(lambda p, o: swa_or(p, o))
    )

    def swa_or(p, o):
        return lp.swa_params(o) if uses_swa else p

    curve = []
    for t in range(1, steps + 1):
        if is_late and t == t0 + 1:
            state = lp.expand_state(
                state, tx, _NQP_SELECT, k, key=jax.random.PRNGKey(seed), noise=cfg["noise"]
            )
        batch = {
            "x": (mu + np.sqrt(h) * rng.normal(size=(bsz, dim))).astype(np.float32),
            "y": np.zeros(bsz, np.int32),
        }
        step = late_step if is_late and t > t0 else plain_step
        state, _ = step(state, batch)
        if t % cfg["eval_every"] == 0 or t == steps:
            net = (
                out(state.params, state.opt_state)
                if t > t0 and (is_late or uses_swa)
                else state.params
            )  # before t0 every arm's output is its plain iterate
            curve.append({"step": t, "excess_loss": float(excess(net))})
    tail = [r["excess_loss"] for r in curve if r["step"] > 0.75 * steps]
    return {
        "arm": arm,
        "seed": seed,
        "steady_state_excess_loss": float(np.mean(tail)),
        "final_excess_loss": curve[-1]["excess_loss"],
        "curve": curve,
    }


def run_nqp(workdir: str, cfg: dict) -> dict:
    """All NQP arms x seeds, the table, the winner (by the numbers) and the plot."""
    runs = {}
    for seed in range(cfg["seed"], cfg["seed"] + cfg["seeds"]):
        for arm in NQP_ARMS:
            path = os.path.join(workdir, "arms", f"nqp_{arm}_seed{seed}.json")
            res = common.load_json(path)
            if res is None:
                res = run_nqp_arm(arm, seed, cfg)
                ws.training.write_json(path, res)
            runs.setdefault(arm, []).append(res)
    table = {}
    for arm, rs in runs.items():
        ss = np.array([r["steady_state_excess_loss"] for r in rs])
        table[arm] = {
            "steady_state_excess_loss_mean": ss.mean(),
            "steady_state_excess_loss_std": ss.std(ddof=1) if len(ss) > 1 else 0.0,
        }
    winner = min(table, key=lambda a: table[a]["steady_state_excess_loss_mean"])
    results = {
        "problem": "nqp",
        "dim": cfg["nqp_dim"],
        "members": cfg["members"],
        "steps": cfg["steps"],
        "batch_size": cfg["batch_size"],
        "lr": cfg["lr"],
        "seeds": cfg["seeds"],
        "arms": table,
        "winner": winner,
    }
    common.save_results(workdir, results)
    fig, ax = plt.subplots(figsize=(6, 4))
    for arm, rs in runs.items():
        steps = [r["step"] for r in rs[0]["curve"]]
        ax.plot(steps, np.mean([[r["excess_loss"] for r in x["curve"]] for x in rs], 0), label=arm)
    ax.set(
        xlabel="step",
        ylabel="excess loss of the output network",
        yscale="log",
        title="noisy quadratic problem",
    )
    ax.legend()
    common.savefig(fig, workdir, "nqp.png")
    return results


def main(argv):
    del argv
    cfg = get_config()
    common.start(FLAGS.workdir, cfg)
    if cfg["problem"] == "nqp":
        results = run_nqp(FLAGS.workdir, cfg)
    else:
        results = run_classification(FLAGS.workdir, cfg, FLAGS.progress)
    for arm, row in results["arms"].items():
        print(arm, {k: np.round(v, 4) for k, v in row.items() if not isinstance(v, list)})
    if "winner" in results:
        print("lowest steady-state excess loss:", results["winner"])


if __name__ == "__main__":
    app.run(main)
