r"""The methods compose: a lottery ticket retrained with late-phase weights and by ULR.

  python -m experiments.compose --workdir=runs/compose
  python -m experiments.compose --config=experiments/configs/compose.py:quick --workdir=/tmp/c

``dense`` (an MLP, Adam, ``steps``) is pruned once by magnitude to ``sparsity`` and rewound
to init: the ticket, retrained through the lottery chain (masks bound in its state) by
backprop (``ticket``), with late-phase members (``ticket_late``, ``ticket_late_every``) and
by ULR (``ticket_ulr``); ``random_ulr`` and ``dense_ulr`` are ULR controls (`ARMS`). Each
arm reports its non-zero pruned weights (must be 0). TensorBoard: ``workdir/train/<arm>/seeds_*``.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import optax

import wspace as ws
from experiments import cli, common
from experiments.claims import Claim, judge
from experiments.late_phase import fit_arm
from wspace import late_phase as lp
from wspace import likelihood_ratio as lr

# arm -> (its masks: dense | ticket | random, with the ticket's per-layer sparsity; gradients)
ARMS = {"dense": ("dense", "backprop"), "ticket": ("ticket", "backprop"),
        "ticket_late": ("ticket", "backprop"), "ticket_late_every": ("ticket", "backprop"),
        "ticket_ulr": ("ticket", "ulr"), "random_ulr": ("random", "ulr"),
        "dense_ulr": ("dense", "ulr")}  # fmt: skip
LATE = {"ticket_late": None, "ticket_late_every": "every"}  # arm -> combine of its LatePhase


def claims(config) -> list[Claim]:
    acc = functools.partial(Claim, metric="test_accuracy", per_example="test_correct")
    return [
        acc(f"A lottery ticket ({config.sparsity:.0%} sparse) retrained with late-phase weights "
            f"(K={config.num_members} {config.late_select} members) beats the same ticket "
            "retrained plainly", arm="ticket_late", baseline="ticket"),
        acc("The same with combine='every' (a named variant: the shared weights step on every "
            "minibatch) beats plain retraining of the ticket", arm="ticket_late_every",
            baseline="ticket"),
        acc(f"ULR (forward passes only, N={config.ulr_copies}) retrains the ticket to within "
            f"{config.margin:g} of backprop's test accuracy at equal steps", arm="ticket_ulr",
            baseline="ticket", margin=config.margin),
        acc("Forward-only training of the ticket beats forward-only training of the dense "
            "network (ULR, equal steps)", arm="ticket_ulr", baseline="dense_ulr"),
        acc("Sparsity alone helps forward-only training: ULR on a random mask with the "
            "ticket's per-layer sparsity beats ULR on the dense network", arm="random_ulr",
            baseline="dense_ulr"),
    ]  # fmt: skip


def validate(config) -> None:
    """Rejects bad fields before any work or file write (the libraries check their options)."""
    common.check(
        config, counts=("steps", "batch_size", "num_members", "ulr_copies"), widths=("hidden",),
        fractions=("sparsity", "head_sparsity"), open_fractions=("late_start",),
        positive=("lr", "ulr_sigma"), nonnegative=("late_noise", "margin"),
    )  # fmt: skip
    _late(config)
    try:
        _late(config, combine="every")  # the ticket_late_every arm
    except ValueError as e:
        raise ValueError(f"config.late_schedule={config.late_schedule!r} cannot run arm "
                         f"ticket_late_every: {e}") from None  # fmt: skip
    _ulr(config)


def _late(config, combine: str | None = None) -> lp.LatePhase:
    return lp.LatePhase(config.num_members, select=config.late_select, combine=combine,
                        schedule=config.late_schedule, noise=config.late_noise)  # fmt: skip


def _ulr(config) -> lr.ULR:
    return lr.ulr(num_copies=config.ulr_copies, sigma=config.ulr_sigma,
                  baseline=config.ulr_baseline, antithetic=config.ulr_antithetic)  # fmt: skip


def _chain(config, masks) -> optax.GradientTransformation:
    """The lottery chain with ``masks`` bound (its state holds them: one chain, any masks)."""
    return optax.chain(
        ws.pruning.mask_gradients(masks), optax.adam(config.lr), ws.pruning.keep_masked(masks)
    )


def _t0(config) -> int:
    return max(1, int(round(config.late_start * config.steps)))


def _pruned_nonzero(params, masks, i: int) -> float:
    """Seed ``i``'s pruned weights that are not exactly zero (every arm must report 0)."""
    pairs = zip(jax.tree.leaves(params), jax.tree.leaves(masks), strict=True)
    pairs = ((p[i], m[i]) for p, m in pairs)
    return float(sum(int(np.count_nonzero(np.asarray(p)[~np.asarray(m)])) for p, m in pairs))


def _arm_fns(config, ds, workdir) -> dict:
    """``{arm: fn(seeds) -> [result per seed]}``; the dense run is shared (once per seeds)."""
    c, slice_ = config, ws.training.seed_slice
    stack = lambda trees: jax.tree.map(lambda *leaves: np.stack(leaves), *trees)
    model = ws.models.MLP(features=tuple(c.hidden), num_classes=ds.num_classes)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), ds.x_train[:1]))
    tx = _chain(c, jax.tree.map(lambda s: np.ones(s.shape, bool), shapes["params"]))
    loss = ws.training.classification_loss  # ULR: the per-example losses
    grads = {"backprop": (loss(model.apply), jax.value_and_grad),
             "ulr": (loss(model.apply, per_example=True), _ulr(c))}  # fmt: skip
    fit_kw = dict(apply_fn=model.apply, num_steps=c.steps, batch_size=c.batch_size,
                  mode=c.mode, eval_every=c.steps, progress=False)  # fmt: skip

    def train(arm, state, seeds, masks):
        """``(state, result per seed)`` of ``arm`` trained through the chain (masks in its
        state), or plainly to t0 and with late-phase members after (evaluated averaged)."""
        late = _late(c, LATE[arm]) if arm in LATE else None
        loss_fn, estimator = grads[ARMS[arm][1]]
        state, history = fit_arm(c, workdir, arm, late, state, loss_fn, tx, ds, seeds, t0=_t0(c),
                                 masks=masks, estimator=estimator, **fit_kw)  # fmt: skip
        params, members = state.params, None
        if late is not None:
            params = jax.vmap(late.average)(state.params, state.model_state)[0]
            members = jax.vmap(late.expand_masks)(masks)
        correct = ws.training.correct_predictions(model.apply, {"params": params}, ds.x_test,
                                                  ds.y_test, seed_axis=True)  # fmt: skip
        record = {k: v for k, v in history[-1].items()
                  if k not in ("step", "time", "phase") and "batch_" not in k}  # fmt: skip
        return state, [
            {**{k: v[i] for k, v in record.items()},
             "pruned_nonzero": _pruned_nonzero(params, masks, i),
             **({} if late is None else
                {"pruned_nonzero_members": _pruned_nonzero(state.params, members, i)}),
             "density": float(ws.pruning.sparsity(slice_(masks, i))["density"]),
             "test_correct": ws.stats.pack_correct(correct[i])}
            for i in range(len(seeds))
        ]  # fmt: skip

    @functools.cache
    def dense(seeds):
        """``(initial states, {kind: masks}, dense results)`` of ``seeds``."""
        state0 = ws.training.init_states(model, tx, ds.x_train[:1], list(seeds))
        ones = jax.tree.map(lambda p: np.ones(p.shape, bool), state0.params)
        state, results = train("dense", state0, seeds, ones)
        ticket = [ws.pruning.magnitude_masks(slice_(state.params, i), c.sparsity,
                                             layer_sparsity={"head": c.head_sparsity})
                  for i in range(len(seeds))]  # fmt: skip
        keys = [jax.random.fold_in(jax.random.PRNGKey(s), 0x5EED) for s in seeds]
        shuffled = [ws.pruning.shuffle_masks(m, key=k) for m, k in zip(ticket, keys, strict=True)]
        return state0, {"dense": ones, "ticket": stack(ticket), "random": stack(shuffled)}, results

    def arm(name, seeds):
        state0, masks, dense_results = dense(tuple(seeds))
        if name == "dense":
            return dense_results
        masks = masks[ARMS[name][0]]
        params = jax.vmap(ws.pruning.apply_masks)(state0.params, masks)
        opt_state = jax.vmap(lambda p, m: _chain(c, m).init(p))(params, masks)
        start = state0.replace(params=params, opt_state=opt_state)  # masks in the chain's state
        return train(name, start, tuple(seeds), masks)[1]

    return {name: functools.partial(arm, name) for name in ARMS}


def run(config, workdir: str) -> dict:
    """Runs every arm for every seed; returns (and writes) results.json."""
    validate(config)
    common.start(config, workdir)
    per_arm = common.run_arms(workdir, config, _arm_fns(config, common.load_dataset(config),
                                                        workdir))  # fmt: skip
    metrics = ["test_accuracy", "test_loss", "train_accuracy", "pruned_nonzero", "density"]
    c = config
    notes = [
        f"MLP {tuple(c.hidden)} on {c.dataset}, Adam {c.lr:g}, {c.steps} steps per arm, batch "
        f"{c.batch_size}; the ticket: one-shot global magnitude pruning of the dense kernels "
        f"({c.sparsity:g}, head {c.head_sparsity:g}), rewound to initialisation.",
        f"Late-phase: plain to step {_t0(c)}, then {c.late_schedule} schedule (combine "
        f"{_late(c).combine}) over {c.num_members} {c.late_select} members; with combine='sum' "
        "the shared weights take one Adam step per K minibatches (ticket_late_every: one per "
        "minibatch).",
        "pruned_nonzero counts pruned weights that are not exactly zero at the end (0 expected "
        "in every arm; for ticket_late also in every member).",
    ]  # fmt: skip
    return common.save_results(
        workdir, config, "compose", claims=judge(claims(config), per_arm), notes=notes,
        tables={"Test accuracy by arm": common.summarize(per_arm, metrics)},
        figures=[_plot(per_arm, workdir, config)],
    )  # fmt: skip


def _plot(per_arm, workdir, config) -> str:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
    panels = [
        ("late-phase x lottery ticket", ("dense", "ticket", "ticket_late", "ticket_late_every")),
        ("ULR x pruning (forward-only)", ("ticket", "ticket_ulr", "random_ulr", "dense_ulr")),
    ]
    for ax, (title, arms) in zip(axes, panels, strict=True):
        values = np.array([[r["test_accuracy"] for r in per_arm[a]] for a in arms]).T
        ax.plot(range(len(arms)), values.T, color="0.7", lw=1, marker="o", ms=3)  # paired seeds
        common.plot_mean_ci(ax, range(len(arms)), values, style="s-", color="C3", bars=True,
                            label="mean, 95% interval over seeds")  # fmt: skip
        ax.set_xticks(range(len(arms)), arms)
        ax.set(title=title, ylabel="test accuracy")
        ax.legend(loc="lower left", fontsize=8)
    fig.suptitle(f"{config.dataset}, {config.sparsity:.0%}-sparse ticket, {config.steps} steps")
    fig.tight_layout()
    return common.savefig(fig, workdir, "compose.png", config)


if __name__ == "__main__":
    cli.main(run, "compose")
