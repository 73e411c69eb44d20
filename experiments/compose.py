r"""The methods compose: a lottery ticket retrained with late-phase weights and by ULR.

  python -m experiments.compose --workdir=runs/compose
  python -m experiments.compose --config=experiments/configs/compose.py:quick --workdir=/tmp/c

Per seed (its own initialisation and data order; an MLP of ``hidden`` widths, inputs
standardised, Adam at ``lr`` for every arm, ``steps`` steps each; every arm trains all its
seeds as one program, each seed's masks bound in its optimizer state):

* ``dense``: the dense network trained by backprop (the lottery chain with an all-true
  mask). Its kernels are pruned once by global magnitude to ``sparsity`` (the output
  layer at ``head_sparsity``) and the survivors are rewound to their initial values:
  the ticket (Frankle & Carbin 2019, `wspace.lottery.start_state`).
* ``ticket``: the ticket retrained by backprop through the lottery chain
  (``mask_gradients``, Adam, ``keep_masked``; the seed's masks bound in the chain's state).
* ``ticket_late``: the same ticket and chain, plainly up to ``late_start * steps``, then
  late-phase weights (`wspace.late_phase.LatePhase`: ``num_members`` members of
  ``late_select`` weights, ``late_schedule``) with the bound masks laid out over the
  members (`LatePhase.expand_state`); evaluated as the weight-averaged network.
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

import jax
import numpy as np
import optax

import wspace as ws
from experiments import cli, common
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
    try:
        _late(config, combine="every")  # the ticket_late_every arm
    except ValueError as e:
        raise ValueError(
            f"config.late_schedule={config.late_schedule!r} cannot run arm ticket_late_every: {e}"
        ) from None
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


def _chain(config, masks) -> optax.GradientTransformation:
    """The lottery chain with ``masks`` bound (its state holds them: one chain, any masks)."""
    return optax.chain(
        ws.pruning.mask_gradients(masks), optax.adam(config.lr), ws.pruning.keep_masked(masks)
    )


def _pruned_nonzero(params, masks) -> float:
    """Pruned weights that are not exactly zero (every arm must report 0)."""
    pairs = zip(jax.tree.leaves(params), jax.tree.leaves(masks), strict=True)
    return float(sum(int(np.count_nonzero(np.asarray(p)[~np.asarray(m)])) for p, m in pairs))


def _stack(trees: list):
    return jax.tree.map(lambda *xs: np.stack(xs), *trees)


class _Run:
    """The run's model, chain, losses and estimators (built once: arms share compiled steps),
    and the dense runs the ticket arms start from."""

    def __init__(self, config, ds):
        self.config, self.ds = config, ds
        self.model = ws.models.MLP(features=tuple(config.hidden), num_classes=ds.num_classes)
        shapes = jax.eval_shape(lambda: self.model.init(jax.random.PRNGKey(0), ds.x_train[:1]))
        self.tx = _chain(config, jax.tree.map(lambda s: np.ones(s.shape, bool), shapes["params"]))
        self.loss = ws.training.classification_loss(self.model.apply)
        self.per_example = ws.training.classification_loss(self.model.apply, per_example=True)
        self.ulr = _ulr(config)
        self.t0 = max(1, int(round(config.late_start * config.steps)))
        self._dense = {}  # seeds -> (initial states, ticket masks, dense metrics)

    def fit_kwargs(self, seeds) -> dict:
        c = self.config
        return dict(apply_fn=self.model.apply, num_steps=c.steps, batch_size=c.batch_size,
                    seed=seeds, mode=c.mode, eval_every=c.steps, progress=False)  # fmt: skip

    def train(self, state, seeds, estimator=jax.value_and_grad):
        """Trains every seed through the chain (masks from the state); per-seed metrics."""
        loss = self.loss if estimator is jax.value_and_grad else self.per_example
        step = ws.training.make_train_step(
            loss, self.tx, estimator=estimator, mode=self.config.mode, seed_axis=True
        )
        state, history = ws.training.fit(state, step, self.ds, **self.fit_kwargs(seeds))
        return state, _seed_metrics(history[-1], len(seeds))

    def start(self, state0, masks):
        """Each seed's masked initial weights with the chain's state holding its masks."""
        params = jax.vmap(ws.pruning.apply_masks)(state0.params, masks)
        opt_state = jax.vmap(lambda p, m: _chain(self.config, m).init(p))(params, masks)
        return state0.replace(params=params, opt_state=opt_state)

    def dense(self, seeds):
        """``(initial states, ticket masks, dense metrics)`` of ``seeds`` (computed once)."""
        if tuple(seeds) not in self._dense:
            c = self.config
            state0 = ws.training.init_states(self.model, self.tx, self.ds.x_train[:1], seeds)
            dense, metrics = self.train(state0, seeds)
            masks = _stack([
                ws.pruning.magnitude_masks(ws.training.seed_slice(dense.params, i), c.sparsity,
                                           layer_sparsity={"head": c.head_sparsity})
                for i in range(len(seeds))
            ])  # fmt: skip
            self._dense[tuple(seeds)] = state0, masks, metrics
        return self._dense[tuple(seeds)]

    def arm(self, name: str, seeds: list[int]) -> list[dict]:
        state0, masks, dense_metrics = self.dense(seeds)
        if name == "dense":
            return [{**m, "pruned_nonzero": 0.0, "density": 1.0} for m in dense_metrics]
        if name == "dense_ulr":
            _, metrics = self.train(state0, seeds, self.ulr)
            return [{**m, "pruned_nonzero": 0.0, "density": 1.0} for m in metrics]
        if name == "random_ulr":
            keys = [jax.random.fold_in(jax.random.PRNGKey(s), 0x5EED) for s in seeds]
            masks = _stack([
                ws.pruning.shuffle_masks(ws.training.seed_slice(masks, i), key=k)
                for i, k in enumerate(keys)
            ])  # fmt: skip
        start, extra = self.start(state0, masks), [{} for _ in seeds]
        if name in ("ticket", "ticket_ulr", "random_ulr"):
            estimator = jax.value_and_grad if name == "ticket" else self.ulr
            state, metrics = self.train(start, seeds, estimator)
            params = state.params
        else:  # ticket_late, ticket_late_every: plain to t0, then late-phase members
            late = _late(self.config, "every" if name == "ticket_late_every" else None)
            # the members' initial noise (config.late_noise > 0) draws from it, split per seed
            key = jax.random.PRNGKey(seeds[0]) if self.config.late_noise > 0 else None
            state, history = late.fit(start, self.loss, self.tx, self.ds, t0=self.t0,
                                      masks=masks, key=key, **self.fit_kwargs(seeds))  # fmt: skip
            metrics = _seed_metrics(history[-1], len(seeds))
            params = jax.vmap(late.average)(state.params, state.model_state)[0]
            late_masks = jax.vmap(late.expand_masks)(masks)
            extra = [
                {"pruned_nonzero_members": _pruned_nonzero(*_slice((state.params, late_masks), i))}
                for i in range(len(seeds))
            ]
        return [
            {**metrics[i], **extra[i],
             "pruned_nonzero": _pruned_nonzero(*_slice((params, masks), i)),
             "density": float(ws.pruning.sparsity(_slice(masks, i))["density"])}
            for i in range(len(seeds))
        ]  # fmt: skip


def _slice(tree, i):
    return ws.training.seed_slice(tree, i)


def _seed_metrics(record: dict, num_seeds: int) -> list[dict]:
    """Each seed's evaluation values of a seed-axis `fit` record."""
    keep = {k: v for k, v in record.items() if k not in ("step", "time", "phase")}
    keep = {k: v for k, v in keep.items() if "batch_" not in k}
    return [{k: v[i] for k, v in keep.items()} for i in range(num_seeds)]


def run(config, workdir: str) -> dict:
    """Runs every arm for every seed; returns (and writes) results.json."""
    validate(config)
    common.start(config, workdir)
    ds = common.load_dataset(config)
    setup = _Run(config, ds)
    per_arm = common.run_arms(
        workdir, config, {n: (lambda seeds, n=n: setup.arm(n, seeds)) for n in ARMS}
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
        f"(combine {_late(config).combine}) over {config.num_members} {config.late_select} "
        "members; "
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
    cli.main(run, "compose")
