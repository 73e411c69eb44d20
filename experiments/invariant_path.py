r"""Functionally invariant paths (Raghavan & Thomson, arXiv 2205.00334) at small scale.

  python -m experiments.invariant_path --workdir=runs/invariant_path
  python -m experiments.invariant_path --config=experiments/configs/invariant_path.py:quick \
      --workdir=/tmp/fip_quick
  python -m experiments.invariant_path --config.dataset=mnist1d --config.parts=continual

Two parts, each seed with its own initialisation, data order and buffer (MLP, inputs
standardised, ``config.dataset``):

(a) ``continual``: class-incremental learning, the first half of the classes then
    the second half, one head over all classes. After task 1 (Adam) every arm trains
    ``task2_steps`` steps on task 2:
    ``naive`` (fine-tuning, Adam), ``replay`` (task-2 CE + CE on a buffer of
    ``buffer_size`` stored task-1 examples with their labels), ``fip`` (the paper's
    metric step: the task-2 gradient through `scale_by_invariant_metric` with the
    buffer's inputs as anchors, softmax-Fisher metric = the Bhattacharyya metric of the
    official code up to a factor 8), ``fip_jacobian`` (the same with the Euclidean
    ``J^T J`` metric on the logits), ``penalty`` (what the official code runs: task-2
    CE + the Bhattacharyya distance to the task-1 network on the buffer inputs, summed
    over the buffer, Adam) and, at ``paper`` size, ``ewc`` (Kirkpatrick et al. 2017).
    Reported: test accuracy on each task's classes and on all classes (argmax over all
    classes), and the solve's residual and unconverged-step count for the FIP arms.
(b) ``sparsity``: a network trained on all classes is pruned to each of
    ``sparsities`` (global magnitude pruning of the kernels). ``oneshot``: prune, then
    masked fine-tuning for ``ft_steps`` and, step-matched, for ``path_steps +
    ft_steps``. ``path``: ``path_steps`` FIP steps towards the magnitude projection
    (secondary objective `sparsity_loss`, anchors = the training batch), then prune,
    then the same ``ft_steps`` of masked fine-tuning.
(c) ``robustness`` (``paper`` size): the same dense network moved towards PGD
    robustness for ``robust_steps``: PGD adversarial fine-tuning (``robust_adv_ft``),
    the FIP path with the PGD loss as secondary objective and the clean batch as
    anchors (``robust_fip``), and the penalty form (``robust_penalty``); evaluated on
    clean and PGD test inputs (``eval_attack_steps``, radius ``eps``).

Claims (paired by seed, 95% t-intervals): FIP beats naive fine-tuning and replay with
the same buffer in all-class accuracy; so does the official penalty form; the Fisher
metric beats the Euclidean one; the FIP path beats one-shot pruning at
``claim_sparsity`` without fine-tuning and after step-matched fine-tuning; (c) the FIP
raises robust accuracy over the base network and keeps more clean accuracy than
adversarial fine-tuning.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

import wspace as ws
from experiments import common
from wspace import invariant_path as ip

PARTS = ("continual", "sparsity", "robustness")
CONTINUAL_ARMS = ("naive", "replay", "fip", "fip_jacobian", "penalty", "ewc")


def validate(config) -> None:
    """Rejects bad fields before any work or file write."""
    for part in config.parts:
        if part not in PARTS:
            raise ValueError(f"config.parts has {part!r}; use a subset of {PARTS}")
    for arm in config.continual_arms:
        if arm not in CONTINUAL_ARMS:
            raise ValueError(f"config.continual_arms has {arm!r}; use a subset of {CONTINUAL_ARMS}")
    common.require_at_least_one(
        config, "base_steps", "task2_steps", "buffer_size", "batch_size", "maxiter"
    )
    for field in ("path_steps", "ft_steps", "robust_steps", "attack_steps", "eval_attack_steps"):
        if config[field] < 0:
            raise ValueError(f"config.{field}={config[field]}; must be >= 0")
    for field in ("lr", "fip_lr", "path_lr", "robust_path_lr", "max_norm", "eps"):
        if not 0 < config[field] < float("inf"):
            raise ValueError(f"config.{field}={config[field]}; must be finite and > 0")
    for field in (
        "damping", "jacobian_damping", "tol", "penalty_weight", "ewc_weight",
        "robust_penalty_weight",
    ):  # fmt: skip
        if not 0 <= config[field] < float("inf"):
            raise ValueError(f"config.{field}={config[field]}; must be finite and >= 0")
    if config.mode != "jit":  # batch entries (buffers included) are split over the devices
        n = jax.device_count()
        for field in ("batch_size", "buffer_size", "anchor_batch"):
            if config[field] % n:
                raise ValueError(
                    f"config.{field}={config[field]} must be a multiple of the {n} devices "
                    f"in mode={config.mode!r}"
                )
    if not config.hidden or min(config.hidden) < 1:
        raise ValueError(f"config.hidden={config.hidden}; give positive layer widths")
    for s in config.sparsities:
        if not 0 <= s < 1:
            raise ValueError(f"config.sparsities has {s}; levels must be in [0, 1)")
    if "sparsity" in config.parts and config.claim_sparsity not in config.sparsities:
        raise ValueError(
            f"config.claim_sparsity={config.claim_sparsity} is not in config.sparsities="
            f"{tuple(config.sparsities)}"
        )


# ----------------------------------------------------------------------------- plumbing


class _Net:
    """The MLP, its ``(params, x) -> logits`` closure, jitted logits and a cache of steps."""

    def __init__(self, config, ds):
        self.config, self.ds = config, ds
        self.model = ws.models.MLP(features=tuple(config.hidden), num_classes=ds.num_classes)
        self.ce = ws.training.classification_loss(self.model.apply)
        self.logits = jax.jit(self.f)
        self._steps, self._dense = {}, {}

    def f(self, params, x):
        return self.model.apply({"params": params}, x)

    def init(self, seed):
        x = jnp.zeros((1, *self.ds.input_shape))
        return self.model.init(jax.random.PRNGKey(seed), x)["params"]

    def dense(self, seed):
        """The network trained on all classes for ``base_steps`` (cached per seed)."""
        if seed not in self._dense:
            c, ds = self.config, self.ds
            self._dense[seed] = self.train(
                "dense", self.ce, optax.adam(c.lr), self.init(seed),
                _stream(ds.x_train, ds.y_train, c.batch_size, seed), c.base_steps, seed,
            ).params  # fmt: skip
        return self._dense[seed]

    def accuracy(self, params, x, y) -> float:
        return float(np.mean(np.asarray(self.logits(params, x)).argmax(-1) == y))

    def train(self, name, loss, tx, params, batches, steps, seed, tx_args=None):
        """``steps`` steps of a train step built once per ``name`` (compiled once for all
        seeds); returns the final state."""
        if name not in self._steps:
            self._steps[name] = (ws.training.make_train_step(loss, tx, mode=self.config.mode), tx)
        step, tx = self._steps[name]
        state = ws.training.TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            model_state={},
            opt_state=tx.init(params),
            key=jax.random.PRNGKey(seed),
        )
        state, _ = ws.training.fit(
            state,
            step,
            batches,
            num_steps=steps,
            eval_fn=lambda s: {},
            eval_every=max(steps, 1),
            tx_args=tx_args,
            mode=self.config.mode,
            progress=False,
        )
        return state


def _stream(x, y, batch_size, seed, **extra):
    """Endless shuffled batches of ``(x, y)`` with constant ``extra`` entries."""
    for batch in ws.data.batches(x, y, min(batch_size, len(x)), seed=seed, epochs=None):
        yield {**batch, **extra}


def _fip_tx(config, f, lr, metric):
    damping = config.damping if metric == "fisher" else config.jacobian_damping
    return ip.invariant_path(
        lr,
        f,
        metric=metric,
        damping=damping,
        tol=config.tol,
        maxiter=config.maxiter,
        max_norm=config.max_norm,
    )


def _solve_stats(state) -> dict:
    pre = state.opt_state[0]
    return {
        "final_residual": float(pre.residual),
        "unconverged_steps": int(pre.num_unconverged),
    }


# ----------------------------------------------------------------------------- (a) continual


def continual_arms(config, ds, net: _Net) -> dict:
    """Arm name -> ``fn(seed) -> metrics`` for the continual part."""
    half = ds.num_classes // 2
    old_tr, old_te = ds.y_train < half, ds.y_test < half
    x1, y1 = ds.x_train[old_tr], ds.y_train[old_tr]
    x2, y2 = ds.x_train[~old_tr], ds.y_train[~old_tr]
    bs, lr = config.batch_size, config.lr
    task1 = {}  # seed -> (task-1 params, buffer x, buffer y): shared by the arms of a seed

    def setup(seed):
        if seed not in task1:
            p1 = net.train(
                "base", net.ce, optax.adam(lr), net.init(seed), _stream(x1, y1, bs, seed),
                config.base_steps, seed,
            ).params  # fmt: skip
            rng = np.random.default_rng(seed)
            buf = rng.choice(len(x1), min(config.buffer_size, len(x1)), replace=False)
            task1[seed] = (p1, x1[buf], y1[buf])  # numpy: batch entries are host arrays
        return task1[seed]

    def evaluate(params, p1, buf_x):
        return {
            "task1_accuracy": net.accuracy(params, ds.x_test[old_te], ds.y_test[old_te]),
            "task2_accuracy": net.accuracy(params, ds.x_test[~old_te], ds.y_test[~old_te]),
            "all_accuracy": net.accuracy(params, ds.x_test, ds.y_test),
            "buffer_distance": float(ip.output_distance(net.f(params, buf_x), net.f(p1, buf_x))),
        }

    def replay_loss(params, model_state, batch, key):
        new, (_, metrics) = net.ce(params, model_state, batch, key)
        old, _ = net.ce(params, model_state, {"x": batch["buf_x"], "y": batch["buf_y"]}, key)
        return new + old, (model_state, metrics)

    def penalty_loss(params, model_state, batch, key):
        # ip.penalty_loss with the anchor logits carried in the batch (one compile, all seeds)
        new, (_, metrics) = net.ce(params, model_state, batch, key)
        dist = ip.output_distance(net.f(params, batch["buf_x"]), batch["anchor_logits"])
        return new + config.penalty_weight * dist, (model_state, metrics)

    def arm(kind):
        def fn(seed):
            p1, buf_x, buf_y = setup(seed)
            stream = _stream(x2, y2, bs, seed + 1)
            tx_args, loss, tx = None, net.ce, optax.adam(lr)
            if kind in ("fip", "fip_jacobian"):
                metric = "fisher" if kind == "fip" else "jacobian"
                tx, tx_args = _fip_tx(config, net.f, config.fip_lr, metric), {"anchors": buf_x}
            elif kind == "replay":
                loss, stream = replay_loss, _stream(x2, y2, bs, seed + 1, buf_x=buf_x, buf_y=buf_y)
            elif kind == "penalty":
                target = np.asarray(net.logits(p1, buf_x))
                stream = _stream(x2, y2, bs, seed + 1, buf_x=buf_x, anchor_logits=target)
                loss = penalty_loss
            elif kind == "ewc":
                fisher = ip.diagonal_fisher(net.f, p1, jnp.asarray(x1))
                loss = ip.ewc_loss(net.ce, p1, fisher, weight=config.ewc_weight)
            name = f"ewc{seed}" if kind == "ewc" else kind  # EWC closes over w0: per seed
            state = net.train(name, loss, tx, p1, stream, config.task2_steps, seed + 2, tx_args)
            out = evaluate(state.params, p1, buf_x)
            if kind.startswith("fip"):
                out.update(_solve_stats(state))
            return out

        return fn

    def after_task1(seed):
        p1, buf_x, _ = setup(seed)
        return evaluate(p1, p1, buf_x)

    return {"after_task1": after_task1, **{k: arm(k) for k in config.continual_arms}}


# ----------------------------------------------------------------------------- (b) sparsity


def sparsity_arms(config, ds, net: _Net) -> dict:
    """Arm name -> ``fn(seed) -> metrics`` for the sparsity part (``<kind>@<level>``)."""
    bs, lr = config.batch_size, config.lr
    finetune_tx = optax.chain(optax.adam(lr), ws.pruning.keep_masked())
    dense_params = net.dense

    def finetune(params, masks, seed, steps):
        if steps == 0:
            return params
        stream = _stream(ds.x_train, ds.y_train, bs, seed + 20)
        state = net.train(
            "finetune", net.ce, finetune_tx, params, stream, steps, seed, {"masks": masks}
        )
        return state.params

    def prune(params, level):
        masks = ws.pruning.magnitude_masks(params, level)
        return ws.pruning.apply_masks(params, masks), masks

    def level_loss(params, model_state, batch, key):
        # The level is data (one compile for all levels), one copy per example so that the
        # batch can be split over devices.
        return ip.sparsity_loss(batch["sparsity"][0])(params, model_state, batch, key)

    def acc(params):
        return net.accuracy(params, ds.x_test, ds.y_test)

    def oneshot(level):
        def fn(seed):
            p0 = dense_params(seed)
            pruned, masks = prune(p0, level)
            matched = config.path_steps + config.ft_steps
            out = {
                "dense_accuracy": acc(p0),
                "sparsity": ws.pruning.sparsity(masks)["overall"],
                "pruned_accuracy": acc(pruned),
                "ft_accuracy": acc(finetune(pruned, masks, seed, config.ft_steps)),
                "ft_matched_accuracy": acc(finetune(pruned, masks, seed, matched)),
            }
            out["equal_budget_accuracy"] = out["ft_matched_accuracy"]
            return out

        return fn

    def path(level):
        def fn(seed):
            p0 = dense_params(seed)
            stream = (
                {"x": b["x"], "sparsity": np.full(len(b["x"]), level, np.float32)}
                for b in _stream(ds.x_train, ds.y_train, config.anchor_batch, seed + 10)
            )
            tx = _fip_tx(config, net.f, config.path_lr, "fisher")
            state = net.train(
                "path", level_loss, tx, p0, stream, config.path_steps, seed,
                lambda b: {"anchors": b["x"]},
            )  # fmt: skip
            moved = state.params
            pruned, masks = prune(moved, level)
            out = {
                "dense_accuracy": acc(p0),
                "sparsity": ws.pruning.sparsity(masks)["overall"],
                "unpruned_accuracy": acc(moved),
                "distance_before": float(ip.projection_distance(p0, level)),
                "distance_after": float(ip.projection_distance(moved, level)),
                "pruned_accuracy": acc(pruned),
                "ft_accuracy": acc(finetune(pruned, masks, seed, config.ft_steps)),
                **_solve_stats(state),
            }
            out["equal_budget_accuracy"] = out["ft_accuracy"]  # path_steps + ft_steps steps
            return out

        return fn

    arms = {}
    for level in config.sparsities:
        arms[f"oneshot@{level:g}"] = oneshot(level)
        arms[f"path@{level:g}"] = path(level)
    return arms


# ----------------------------------------------------------------------------- (c) robustness


def robustness_arms(config, ds, net: _Net) -> dict:
    """Arm name -> ``fn(seed) -> metrics``: the dense network moved towards PGD robustness."""
    adv = ip.adversarial_loss(net.ce, eps=config.eps, method="pgd", steps=config.attack_steps)

    @jax.jit
    def attack(params, x, y, key):
        def loss_of_x(z):
            return optax.softmax_cross_entropy_with_integer_labels(net.f(params, z), y).mean()

        return ip.pgd(loss_of_x, x, key, eps=config.eps, steps=config.eval_attack_steps)

    def evaluate(params, p0, seed):
        x, y = jnp.asarray(ds.x_test), jnp.asarray(ds.y_test)
        x_adv = attack(params, x, y, jax.random.PRNGKey(seed + 99))
        return {
            "clean_accuracy": net.accuracy(params, ds.x_test, ds.y_test),
            "robust_accuracy": net.accuracy(params, x_adv, ds.y_test),
            "output_distance": float(ip.output_distance(net.f(params, x), net.f(p0, x))),
        }

    def penalty_loss(params, model_state, batch, key):
        value, (_, metrics) = adv(params, model_state, batch, key)
        dist = ip.output_distance(net.f(params, batch["x"]), batch["anchor_logits"])
        return value + config.robust_penalty_weight * dist, (model_state, metrics)

    def arm(kind):
        def fn(seed):
            p0 = net.dense(seed)
            if kind == "base":
                return evaluate(p0, p0, seed)
            stream = _stream(ds.x_train, ds.y_train, config.batch_size, seed + 30)
            tx, loss, tx_args = optax.adam(config.lr), adv, None
            if kind == "fip":
                tx = _fip_tx(config, net.f, config.robust_path_lr, "fisher")
                tx_args = lambda b: {"anchors": b["x"]}  # noqa: E731
            elif kind == "penalty":
                loss = penalty_loss
                stream = (
                    {**b, "anchor_logits": np.asarray(net.logits(p0, b["x"]))} for b in stream
                )
            name = f"robust_{kind}"
            state = net.train(name, loss, tx, p0, stream, config.robust_steps, seed + 3, tx_args)
            out = evaluate(state.params, p0, seed)
            if kind == "fip":
                out.update(_solve_stats(state))
            return out

        return fn

    return {f"robust_{k}": arm(k) for k in ("base", "adv_ft", "fip", "penalty")}


# ----------------------------------------------------------------------------- run


def run(config, workdir: str) -> dict:
    """Runs the parts of ``config.parts``; writes results.json and figures into ``workdir``."""
    validate(config)
    common.start(config, workdir)
    ds = common.load_dataset(config)
    net = _Net(config, ds)
    claims, tables, figures, notes = [], {}, [], []
    if "continual" in config.parts:
        per_arm = common.run_arms(
            workdir,
            config,
            {a: common.per_seed(fn) for a, fn in continual_arms(config, ds, net).items()},
        )
        claims += _continual_claims(config, per_arm)
        metrics = ["task1_accuracy", "task2_accuracy", "all_accuracy", "buffer_distance"]
        tables["Continual: test accuracy by arm"] = common.summarize(per_arm, metrics)
        fip = {k: v for k, v in per_arm.items() if k.startswith("fip")}
        if fip:
            tables["Continual: FIP solve"] = common.summarize(
                fip, ["final_residual", "unconverged_steps"]
            )
            notes.append(_unconverged_note(config, fip, config.task2_steps))
        figures.append(_plot_continual(per_arm, workdir, config))
    if "sparsity" in config.parts:
        per_arm = common.run_arms(
            workdir,
            config,
            {a: common.per_seed(fn) for a, fn in sparsity_arms(config, ds, net).items()},
        )
        claims += _sparsity_claims(config, per_arm)
        tables["Sparsity: test accuracy by arm"] = common.summarize(
            per_arm, ["pruned_accuracy", "ft_accuracy", "equal_budget_accuracy"]
        )
        path = {k: v for k, v in per_arm.items() if k.startswith("path")}
        notes.append(_unconverged_note(config, path, config.path_steps))
        figures.append(_plot_sparsity(per_arm, workdir, config))
    if "robustness" in config.parts:
        per_arm = common.run_arms(
            workdir,
            config,
            {a: common.per_seed(fn) for a, fn in robustness_arms(config, ds, net).items()},
        )
        claims += [
            common.compare(
                "Moving along the FIP towards PGD robustness raises robust accuracy",
                "robust_accuracy", "robust_fip", "robust_base", per_arm,
            ),
            common.compare(
                "The FIP keeps more clean accuracy than adversarial fine-tuning",
                "clean_accuracy", "robust_fip", "robust_adv_ft", per_arm,
            ),
        ]  # fmt: skip
        tables["Robustness: test accuracy by arm"] = common.summarize(
            per_arm, ["clean_accuracy", "robust_accuracy", "output_distance"]
        )
        notes.append(_unconverged_note(config, {"robust_fip": per_arm["robust_fip"]},
                                       config.robust_steps))  # fmt: skip
    notes += [
        "fip = the paper's metric step with the softmax-Fisher metric (the official code's "
        "Bhattacharyya distance, whose Hessian is Fisher/8); fip_jacobian = Euclidean J^T J on "
        "the logits; penalty = what the official code runs (CE + Bhattacharyya distillation "
        "on the buffer, summed as there).",
        f"{config.dataset}, MLP {tuple(config.hidden)}; continual: {config.task2_steps} task-2 "
        f"steps per arm, buffer {config.buffer_size}; sparsity: {config.path_steps} path "
        f"steps, {config.ft_steps} fine-tuning steps.",
    ]
    return common.save_results(
        workdir, config, "invariant_path", claims=claims, tables=tables, figures=figures,
        notes=notes,
    )  # fmt: skip


def _unconverged_note(config, per_arm, steps) -> str:
    counts = ", ".join(f"{k} {sum(r['unconverged_steps'] for r in v)}" for k, v in per_arm.items())
    return (
        f"FIP solves that ended above tol={config.tol:g} (of {steps * config.num_seeds} steps "
        f"per arm): {counts}"
    )


def _continual_claims(config, per_arm) -> list[dict]:
    claims = []
    pairs = [
        ("fip", "naive", "FIP (metric step) forgets less than naive fine-tuning"),
        ("fip", "replay", "FIP (metric step) beats replay of the same buffer"),
        ("penalty", "naive", "The official FIP code's penalty form beats naive fine-tuning"),
        ("penalty", "replay", "The official FIP code's penalty form beats replay"),
        ("fip", "fip_jacobian", "The Fisher (Bhattacharyya) metric beats the Euclidean one"),
    ]
    for arm, base, text in pairs:
        if arm in per_arm and base in per_arm:
            claims.append(
                common.compare(
                    f"{text} (all-class test accuracy)", "all_accuracy", arm, base, per_arm
                )  # fmt: skip
            )
    return claims


def _sparsity_claims(config, per_arm) -> list[dict]:
    level = f"{config.claim_sparsity:g}"
    path, oneshot = f"path@{level}", f"oneshot@{level}"
    return [
        common.compare(
            f"The FIP path keeps more accuracy than one-shot pruning at {level} sparsity "
            "(no fine-tuning)",
            "pruned_accuracy", path, oneshot, per_arm,
        ),
        common.compare(
            f"The FIP path + fine-tuning beats one-shot pruning fine-tuned for as many steps "
            f"({config.path_steps + config.ft_steps}) at {level} sparsity",
            "equal_budget_accuracy", path, oneshot, per_arm,
        ),
    ]  # fmt: skip


# ----------------------------------------------------------------------------- figures


def _plot_continual(per_arm, workdir, config) -> str:
    import matplotlib.pyplot as plt

    arms = list(per_arm)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    pos = np.arange(len(arms))
    keys = (("task1_accuracy", "task 1"), ("task2_accuracy", "task 2"), ("all_accuracy", "all"))
    for j, (key, label) in enumerate(keys):
        values = [np.array([r[key] for r in per_arm[a]]) for a in arms]
        ax.bar(pos + 0.27 * (j - 1), [v.mean() for v in values], 0.27, label=label)
        for i, v in enumerate(values):
            ax.plot(np.full(len(v), pos[i] + 0.27 * (j - 1)), v, "k.", ms=3)
    ax.set_xticks(pos, arms, rotation=30, ha="right")
    ax.set(ylabel="test accuracy", ylim=(0, 1), title=f"Continual learning, {config.dataset}")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return common.savefig(fig, workdir, "continual.png", config)


def _plot_sparsity(per_arm, workdir, config) -> str:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    levels = list(config.sparsities)
    series = [
        ("oneshot", "pruned_accuracy", "o-", "one-shot"),
        ("oneshot", "ft_matched_accuracy", "o--", "one-shot + step-matched fine-tune"),
        ("path", "pruned_accuracy", "s-", "FIP path"),
        ("path", "ft_accuracy", "s--", "FIP path + fine-tune"),
    ]
    for kind, key, style, label in series:
        values = np.array([[r[key] for r in per_arm[f"{kind}@{s:g}"]] for s in levels])
        common.plot_mean_ci(ax, levels, values.T, style=style, label=label, bars=True)
    dense = np.mean([r["dense_accuracy"] for r in per_arm[f"oneshot@{levels[0]:g}"]])
    ax.axhline(dense, color="k", ls=":", label="dense")
    ax.set(
        xlabel="sparsity",
        ylabel="test accuracy (mean, 95% interval over seeds)",
        title=f"Sparsification, {config.dataset}",
    )
    ax.legend(fontsize=7)
    return common.savefig(fig, workdir, "sparsity.png", config)


if __name__ == "__main__":
    common.main(run, "invariant_path")
