r"""The methods compose: a lottery ticket retrained with late-phase weights and by ULR.

  python -m experiments.compose --workdir=runs/compose
  python -m experiments.compose --config=experiments/configs/compose.py:quick --workdir=/tmp/c

Per seed (its own initialisation and data order; an MLP of ``hidden`` widths, inputs
standardised, Adam at ``lr`` for every arm, ``steps`` steps each):

* ``dense``: the dense network trained by backprop (the lottery chain with an all-true
  mask). Its kernels are pruned once by global magnitude to ``sparsity`` (the output
  layer at ``head_sparsity``) and the survivors are rewound to their initial values:
  the ticket (Frankle & Carbin 2019, `wspace.lottery.start_state`).
* ``ticket``: the ticket retrained by backprop through the lottery chain
  (``mask_gradients``, Adam, ``keep_masked``; masks as the step's extra argument).
* ``ticket_late``: the same ticket and chain, plainly up to ``late_start * steps``, then
  late-phase weights (`wspace.late_phase.LatePhase`: ``num_members`` members of
  ``late_select`` weights, ``late_schedule``) with the masks laid out over the members
  (`LatePhase.expand_masks`); evaluated as the weight-averaged network.
* ``ticket_late_every``: a named variant, the same with ``combine="every"``: the shared
  weights take a step on every minibatch (with the paper's ``"sum"`` under ``cycle`` they
  take one step per K minibatches with the summed gradient, which Adam's normalisation
  turns into K times fewer steps of the same size).
* ``ticket_ulr``: the ticket retrained by ULR (`wspace.likelihood_ratio`, forward passes
  only) through the same chain.
* ``random_ulr``: ULR on a random mask with the ticket's per-layer counts
  (`wspace.pruning.shuffle_masks`), same initial weights: sparsity without the ticket's
  information from the backprop-trained dense network.
* ``dense_ulr``: the dense network from the same initialisation trained by ULR.

Every arm records how many pruned weights are non-zero at the end (must be 0).

Claims (paired by seed, 95% t-intervals): late-phase retraining beats plain retraining of
the same ticket in test accuracy; ULR retrains the ticket to within ``margin`` of
backprop at equal steps; ULR trains the ticket better than the dense network at equal
steps; and (the control that separates sparsity from the ticket's mask, which was found
by backprop) ULR trains a random mask of the ticket's per-layer sparsity better than the
dense network.

References: Frankle & Carbin 2019 (arXiv 1803.03635); von Oswald et al. 2021 (arXiv
2007.12927); Wen et al. 2020 (arXiv 2002.06715, rank-1 members); Jiang et al. 2024
(arXiv 2305.08960, ULR).
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import optax

import wspace as ws
from experiments import common
from wspace import late_phase as lp
from wspace import likelihood_ratio as lr

ARMS = (
    "dense",
    "ticket",
    "ticket_late",
    "ticket_late_every",
    "ticket_ulr",
    "random_ulr",
    "dense_ulr",
)


def validate(config) -> None:
    """Rejects bad fields before any work or file write."""
    for field in ("steps", "batch_size", "num_members", "ulr_copies"):
        if not isinstance(config[field], int) or config[field] < 1:
            raise ValueError(f"config.{field}={config[field]!r}; must be an int >= 1")
    for field in ("sparsity", "head_sparsity"):
        if not 0 <= config[field] < 1:
            raise ValueError(f"config.{field}={config[field]}; must be in [0, 1)")
    if not 0 < config.late_start < 1:
        raise ValueError(f"config.late_start={config.late_start}; must be in (0, 1)")
    for field in ("lr", "ulr_sigma"):
        if not 0 < config[field] < float("inf"):
            raise ValueError(f"config.{field}={config[field]}; must be finite and > 0")
    for field in ("late_noise", "margin"):
        if not 0 <= config[field] < float("inf"):
            raise ValueError(f"config.{field}={config[field]}; must be finite and >= 0")
    if not config.hidden or min(config.hidden) < 1:
        raise ValueError(f"config.hidden={config.hidden}; give positive layer widths")
    # the libraries validate their own options (preset names, schedules, ULR options)
    _late(config)
    _ulr(config)


def _late(config, combine: str | None = None) -> lp.LatePhase:
    return lp.LatePhase(
        config.num_members,
        select=config.late_select,
        schedule=config.late_schedule,
        combine=combine,
        noise=config.late_noise,
    )


def _ulr(config) -> lr.ULR:
    return lr.ulr(
        num_copies=config.ulr_copies,
        sigma=config.ulr_sigma,
        baseline=config.ulr_baseline,
        antithetic=config.ulr_antithetic,
    )


def _pruned_nonzero(params, masks) -> float:
    """Pruned weights that are not exactly zero (every arm must report 0)."""
    pairs = zip(jax.tree.leaves(params), jax.tree.leaves(masks), strict=True)
    return float(sum(int(np.count_nonzero(np.asarray(p)[~np.asarray(m)])) for p, m in pairs))


class _Setup:
    """Everything built once per run: model, losses, chains, compiled steps, the late config."""

    def __init__(self, config, ds):
        self.config, self.ds = config, ds
        self.model = ws.models.MLP(features=tuple(config.hidden), num_classes=ds.num_classes)
        self.tx = optax.chain(
            ws.pruning.mask_gradients(), optax.adam(config.lr), ws.pruning.keep_masked()
        )
        loss = ws.training.classification_loss(self.model.apply)
        per_example = ws.training.classification_loss(self.model.apply, per_example=True)
        kw = dict(dataset=ds, apply_fn=self.model.apply, batch_size=config.batch_size)
        kw.update(mode=config.mode)
        self.backprop = ws.lottery.Trainer(loss, self.tx, **kw)
        self.ulr = ws.lottery.Trainer(per_example, self.tx, estimator=_ulr(config), **kw)
        self.lates = {}  # arm -> (LatePhase, its compiled step, the averaged network's apply)
        for arm, combine in (("ticket_late", None), ("ticket_late_every", "every")):
            late = _late(config, combine)
            step = late.make_train_step(loss, self.tx, mode=config.mode)
            self.lates[arm] = (late, step, late.averaged_apply(self.model.apply))
        self.late = self.lates["ticket_late"][0]
        self.t0 = max(1, int(round(config.late_start * config.steps)))
        self._tickets = {}  # seed -> the dense run and its ticket, shared by the arms

    def init(self, seed):
        key = jax.random.PRNGKey(seed)
        return ws.training.init_state(self.model, self.tx, self.ds.x_train[:1], key)

    def ticket(self, seed):
        """``(initial state, ticket masks, dense params, dense metrics)`` of one seed (cached)."""
        if seed not in self._tickets:
            self._tickets[seed] = self._ticket(seed)
        return self._tickets[seed]

    def _ticket(self, seed):
        state0 = self.init(seed)
        dense_masks = ws.lottery.all_true(state0.params)
        dense, metrics = self.backprop(state0, dense_masks, self.config.steps, seed=seed)
        masks = ws.pruning.magnitude_masks(
            dense.params, self.config.sparsity, layer_sparsity={"head": self.config.head_sparsity}
        )
        return state0, masks, dense.params, metrics

    def arm(self, name: str, seed: int) -> dict:
        c = self.config
        state0, masks, _, dense_metrics = self.ticket(seed)
        if name == "dense":
            return {**dense_metrics, "pruned_nonzero": 0.0, "density": 1.0}
        density = float(ws.pruning.sparsity(masks)["density"])  # of the prunable kernels
        if name == "dense_ulr":
            state, metrics = self.ulr(
                state0, ws.lottery.all_true(state0.params), c.steps, seed=seed
            )
            return {**metrics, "pruned_nonzero": 0.0, "density": 1.0}
        start = ws.lottery.start_state(state0, masks)
        if name == "ticket":
            state, metrics = self.backprop(start, masks, c.steps, seed=seed)
            params = state.params
        elif name == "ticket_ulr":
            state, metrics = self.ulr(start, masks, c.steps, seed=seed)
            params = state.params
        elif name == "random_ulr":
            key = jax.random.fold_in(jax.random.PRNGKey(seed), 0x5EED)
            masks = ws.pruning.shuffle_masks(masks, key=key)
            start = ws.lottery.start_state(state0, masks)
            state, metrics = self.ulr(start, masks, c.steps, seed=seed)
            params = state.params
        else:  # ticket_late, ticket_late_every
            late, late_step, late_apply = self.lates[name]
            state, _ = self.backprop(start, masks, self.t0, seed=seed)
            late_state = late.expand_state(state, self.tx, masks=masks)
            late_masks = late.expand_masks(masks)
            late_state, history = ws.training.fit(
                late_state,
                late_step,
                self.ds,
                apply_fn=late_apply,
                num_steps=c.steps,
                batch_size=c.batch_size,
                seed=seed,
                mode=c.mode,
                eval_every=c.steps,
                tx_args={"masks": late_masks},
                progress=False,
            )
            metrics = {k: v for k, v in history[-1].items() if k not in ("step", "time")}
            params, _ = late.average(late_state.params, late_state.model_state)
            metrics["pruned_nonzero_members"] = _pruned_nonzero(late_state.params, late_masks)
        return {**metrics, "pruned_nonzero": _pruned_nonzero(params, masks), "density": density}


def run(config, workdir: str) -> dict:
    """Runs every arm for every seed; returns (and writes) results.json."""
    validate(config)
    common.start(config, workdir)
    ds = common.load_dataset(config)
    setup = _Setup(config, ds)
    per_arm = common.run_arms(
        workdir, config, {n: common.per_seed(functools.partial(setup.arm, n)) for n in ARMS}
    )
    m = config.margin
    claims = [
        common.compare(
            f"A lottery ticket ({config.sparsity:.0%} sparse) retrained with late-phase weights "
            f"(K={config.num_members} {config.late_select} members) beats the same ticket "
            "retrained plainly",
            "test_accuracy",
            "ticket_late",
            "ticket",
            per_arm,
        ),
        common.compare(
            "The same with combine='every' (a named variant: the shared weights step on every "
            "minibatch) beats plain retraining of the ticket",
            "test_accuracy",
            "ticket_late_every",
            "ticket",
            per_arm,
        ),
        common.compare(
            f"ULR (forward passes only, N={config.ulr_copies}) retrains the ticket to within "
            f"{m:g} of backprop's test accuracy at equal steps",
            "test_accuracy",
            "ticket_ulr",
            "ticket",
            per_arm,
            margin=m,
        ),
        common.compare(
            "Forward-only training of the ticket beats forward-only training of the dense "
            "network (ULR, equal steps)",
            "test_accuracy",
            "ticket_ulr",
            "dense_ulr",
            per_arm,
        ),
        common.compare(
            "Sparsity alone helps forward-only training: ULR on a random mask with the "
            "ticket's per-layer sparsity beats ULR on the dense network",
            "test_accuracy",
            "random_ulr",
            "dense_ulr",
            per_arm,
        ),
    ]
    metrics = ["test_accuracy", "test_loss", "train_accuracy", "pruned_nonzero", "density"]
    tables = {"Test accuracy by arm": common.summarize(per_arm, metrics)}
    figures = [_plot(per_arm, workdir, config)]
    notes = [
        f"MLP {tuple(config.hidden)} on {config.dataset}, Adam {config.lr:g}, "
        f"{config.steps} steps per arm, batch {config.batch_size}; the ticket: one-shot global "
        f"magnitude pruning of the dense kernels ({config.sparsity:g}, head "
        f"{config.head_sparsity:g}), rewound to initialisation.",
        f"Late-phase: plain to step {setup.t0}, then {config.late_schedule} schedule "
        f"(combine {setup.late.combine}) over {config.num_members} {config.late_select} members; "
        "with combine='sum' the shared weights take one Adam step per K minibatches "
        "(ticket_late_every: one per minibatch).",
        "pruned_nonzero counts pruned weights that are not exactly zero at the end (0 expected "
        "in every arm; for ticket_late also in every member).",
    ]
    return common.save_results(
        workdir, config, "compose", claims=claims, tables=tables, figures=figures, notes=notes
    )


def _plot(per_arm, workdir, config) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
    panels = [
        ("late-phase x lottery ticket", ("dense", "ticket", "ticket_late", "ticket_late_every")),
        ("ULR x pruning (forward-only)", ("ticket", "ticket_ulr", "random_ulr", "dense_ulr")),
    ]
    for ax, (title, arms) in zip(axes, panels, strict=True):
        values = np.array([[r["test_accuracy"] for r in per_arm[a]] for a in arms])
        for seed_values in values.T:  # one line per seed: the comparison is paired
            ax.plot(range(len(arms)), seed_values, color="0.7", lw=1, marker="o", ms=3)
        common.plot_mean_ci(
            ax, range(len(arms)), values.T, style="s-", color="C3", bars=True,
            label="mean, 95% interval over seeds",
        )  # fmt: skip
        ax.set_xticks(range(len(arms)), arms)
        ax.set_title(title)
        ax.set_ylabel("test accuracy")
        ax.legend(loc="lower left", fontsize=8)
    fig.suptitle(f"{config.dataset}, {config.sparsity:.0%}-sparse ticket, {config.steps} steps")
    fig.tight_layout()
    return common.savefig(fig, workdir, "compose.png", config)


if __name__ == "__main__":
    common.main(run, "compose")
