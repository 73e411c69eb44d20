r"""Functionally invariant paths (Raghavan & Thomson, arXiv 2205.00334) at small scale.

  python -m experiments.invariant_path --workdir=runs/invariant_path
  python -m experiments.invariant_path --config=experiments/configs/invariant_path.py:quick \
      --workdir=/tmp/fip_quick
  python -m experiments.invariant_path --config.dataset=mnist1d --config.parts=continual

Each arm trains all seeds as one program (a seed axis), each seed with its own
initialisation, data order and buffer (MLP, inputs standardised, ``config.dataset``):

(a) ``continual``: class-incremental learning, the first half of the classes then
    the second half, one head over all classes. After task 1 (Adam) every arm trains
    ``task2_steps`` steps on task 2:
    ``naive`` (fine-tuning, Adam), ``replay`` (task-2 CE + CE on a buffer of
    ``buffer_size`` stored task-1 examples with their labels), ``fip`` (the paper's
    metric step: the task-2 gradient through `scale_by_invariant_metric` with the
    buffer's inputs as anchors; the softmax-Fisher metric is 4x the Hessian of the
    official code's Bhattacharyya distance), ``fip_jacobian`` (the same with the
    Euclidean ``J^T J`` metric on the logits; both FIP arms rescale the solved direction
    to norm 1, so every step moves exactly ``fip_lr``: the metrics are compared at equal
    step length, whatever their damping), ``penalty`` (what the official code runs: task-2
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
metric beats the Euclidean one at equal step length; the FIP path beats one-shot pruning at
``claim_sparsity`` without fine-tuning and after step-matched fine-tuning; (c) the FIP
raises robust accuracy over the base network and keeps more clean accuracy than
adversarial fine-tuning.
"""

from __future__ import annotations

import itertools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import wspace as ws
from experiments import cli, common
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
    n = jax.device_count()  # sharded: the seeds (with their buffers) split over devices
    if config.mode == "pmap" or (config.mode == "sharded" and config.num_seeds % n):
        raise ValueError(
            f"config.mode={config.mode!r} with num_seeds={config.num_seeds}: seeds are an axis "
            f"here; use 'jit', or 'sharded' with num_seeds a multiple of the {n} devices"
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


def _batches(x, y, batch_size, seeds, **per_seed):
    """Endless batches with a seed axis: each seed its own shuffle of ``(x, y)``, plus
    ``per_seed`` entries (``[S, ...]`` trees) that every batch carries unchanged."""
    per_seed = jax.tree.map(np.asarray, per_seed)
    size = min(batch_size, len(x))
    streams = [ws.data.batches(x, y, size, seed=s, epochs=None) for s in seeds]
    for batches in zip(*streams, strict=True):
        yield {**jax.tree.map(lambda *a: np.stack(a), *batches), **per_seed}


def _train(config, loss, tx, params, batches, steps, seeds, *, opt_state=None, anchors=None):
    """``steps`` steps of ``loss`` and ``tx`` from ``params`` (a seed axis); the final state.

    ``opt_state``: each seed's optimizer state (default: a fresh ``tx`` state). ``anchors``:
    the batch entry holding each seed's FIP anchors, passed as the step's ``tx_args``. Such
    steps (the metric solve) run one seed at a time, a loop with one compiled step: CG
    (`jax.scipy.sparse.linalg.cg`) vmapped over 9 or more copies of one task-1 network's
    system returned NaN where 1-8 copies and the single solve converge (XLA:CPU, measured).
    """
    state = ws.training.TrainState(
        step=jnp.zeros(len(seeds), jnp.int32), params=params, model_state={},
        opt_state=jax.vmap(tx.init)(params) if opt_state is None else opt_state,
        key=jnp.stack([jax.random.PRNGKey(s) for s in seeds]),
    )  # fmt: skip
    if steps == 0:
        return state
    if anchors and len(seeds) > 1:
        batches = list(itertools.islice(batches, steps))
        one = lambda tree, i: jax.tree.map(lambda a: a[i : i + 1], tree)  # noqa: E731
        states = [
            _train(config, loss, tx, one(params, i), [one(b, i) for b in batches], steps, [s],
                   opt_state=one(state.opt_state, i), anchors=anchors)
            for i, s in enumerate(seeds)
        ]  # fmt: skip
        return jax.tree.map(lambda *a: jnp.concatenate(a), *states)
    state, _ = ws.training.fit(
        state, ws.training.make_train_step(loss, tx, mode=config.mode, seed_axis=True), batches,
        num_steps=steps, eval_fn=lambda s: {}, eval_every=steps, seed=seeds, mode=config.mode,
        tx_args=(lambda b: {"anchors": b[anchors][0]}) if anchors else None, progress=False,
    )  # fmt: skip
    return state


def _fip_tx(config, f, lr, metric, *, unit_steps=False):
    """The FIP step: the metric solve, then the norm bound ``max_norm`` or, with
    ``unit_steps``, the solution rescaled to norm 1 so that every step moves exactly ``lr``
    (equal step lengths whatever the metric and damping)."""
    pre = ip.scale_by_invariant_metric(
        f, metric=metric, damping=config.damping if metric == "fisher" else config.jacobian_damping,
        tol=config.tol, maxiter=config.maxiter, max_norm=None if unit_steps else config.max_norm,
    )  # fmt: skip
    unit = [optax.normalize_by_update_norm()] if unit_steps else []
    return optax.chain(pre, *unit, optax.scale_by_learning_rate(lr))


def _add_solve_stats(out: list[dict], state) -> list[dict]:
    """Each seed's result with its FIP solve's last residual and unconverged-step count."""
    pre = state.opt_state[0]
    for o, r, n in zip(out, pre.residual, pre.num_unconverged, strict=True):
        o.update(final_residual=float(r), unconverged_steps=int(n))
    return out


class _Network(NamedTuple):
    """The MLP, its ``(params, x) -> logits`` closure and its training loss."""

    model: Any
    f: Any
    ce: Any

    def correct(self, params, x, y) -> np.ndarray:  # [S, N]: per seed and example
        return ws.training.correct_predictions(self.model.apply, {"params": params}, x, y,
                                               seed_axis=True)  # fmt: skip


def _pretrained(config, net, x, y):
    """``seeds -> params``: each seed's network trained from its own initialisation on
    ``(x, y)`` for ``base_steps`` (Adam); memoised, as every arm of a part starts there."""
    memo, adam = {}, optax.adam(config.lr)

    def params(seeds):
        if tuple(seeds) not in memo:
            keys = jnp.stack([jax.random.PRNGKey(s) for s in seeds])
            init = jax.vmap(lambda k: net.model.init(k, x[:1])["params"])(keys)
            batches, steps = _batches(x, y, config.batch_size, seeds), config.base_steps
            memo[tuple(seeds)] = _train(config, net.ce, adam, init, batches, steps, seeds)
        return memo[tuple(seeds)].params

    return params


# ----------------------------------------------------------------------------- (a) continual


def continual_arms(config, ds, net: _Network) -> dict:
    """Arm name -> ``fn(seeds) -> [metrics per seed]`` for the continual part."""
    half = ds.num_classes // 2
    old_tr, old_te = ds.y_train < half, ds.y_test < half
    x1, y1 = ds.x_train[old_tr], ds.y_train[old_tr]
    x2, y2 = ds.x_train[~old_tr], ds.y_train[~old_tr]
    task1 = _pretrained(config, net, x1, y1)
    logits = jax.jit(jax.vmap(net.f))  # per seed: params and inputs

    def setup(seeds):  # task-1 networks and each seed's buffer, shared by the arms
        n = min(config.buffer_size, len(x1))
        buf = np.stack([np.random.default_rng(s).choice(len(x1), n, replace=False) for s in seeds])
        return task1(seeds), x1[buf], y1[buf]

    def evaluate(params, p1, buf_x) -> list[dict]:
        correct = net.correct(params, ds.x_test, ds.y_test)
        dist = jax.vmap(ip.output_distance)(logits(params, buf_x), logits(p1, buf_x))
        moved = jax.vmap(lambda a, b: optax.tree.norm(jax.tree.map(jnp.subtract, a, b)))(params, p1)
        return [
            {"task1_accuracy": float(c[old_te].mean()), "task2_accuracy": float(c[~old_te].mean()),
             "all_accuracy": float(c.mean()), "all_correct": common.pack_correct(c),
             "buffer_distance": float(d), "distance_moved": float(m)}
            for c, d, m in zip(correct, dist, moved, strict=True)
        ]  # fmt: skip

    def replay_loss(params, model_state, batch, key):
        new, (_, metrics) = net.ce(params, model_state, batch, key)
        old, _ = net.ce(params, model_state, {"x": batch["buf_x"], "y": batch["buf_y"]}, key)
        return new + old, (model_state, metrics)

    def penalty_loss(params, model_state, batch, key):
        # ip.penalty_loss with each seed's anchor logits carried in its batch
        new, (_, metrics) = net.ce(params, model_state, batch, key)
        dist = ip.output_distance(net.f(params, batch["buf_x"]), batch["anchor_logits"])
        return new + config.penalty_weight * dist, (model_state, metrics)

    def ewc_loss(params, model_state, batch, key):  # each seed's w0 and Fisher in its batch
        loss = ip.ewc_loss(net.ce, batch["w0"], batch["fisher"], weight=config.ewc_weight)
        return loss(params, model_state, batch, key)

    def arm(kind):
        def fn(seeds):
            p1, buf_x, buf_y = setup(seeds)
            loss, tx, per_seed, anchors = net.ce, optax.adam(config.lr), {}, None
            if kind in ("fip", "fip_jacobian"):  # equal step lengths: every step moves fip_lr
                metric = "fisher" if kind == "fip" else "jacobian"
                tx = _fip_tx(config, net.f, config.fip_lr, metric, unit_steps=True)
                per_seed, anchors = {"buf_x": buf_x}, "buf_x"
            elif kind == "replay":
                loss, per_seed = replay_loss, {"buf_x": buf_x, "buf_y": buf_y}
            elif kind == "penalty":
                loss, per_seed = penalty_loss, {"buf_x": buf_x, "anchor_logits": logits(p1, buf_x)}
            elif kind == "ewc":
                fisher = jax.vmap(lambda p: ip.diagonal_fisher(net.f, p, jnp.asarray(x1)))(p1)
                loss, per_seed = ewc_loss, {"w0": p1, "fisher": fisher}
            batches = _batches(x2, y2, config.batch_size, [s + 1 for s in seeds], **per_seed)
            state = _train(
                config, loss, tx, p1, batches, config.task2_steps, seeds, anchors=anchors
            )
            out = evaluate(state.params, p1, buf_x)
            return _add_solve_stats(out, state) if kind.startswith("fip") else out

        return fn

    def after_task1(seeds):
        p1, buf_x, _ = setup(seeds)
        return evaluate(p1, p1, buf_x)

    return {"after_task1": after_task1, **{k: arm(k) for k in config.continual_arms}}


# ----------------------------------------------------------------------------- (b) sparsity


def _level_loss(params, model_state, batch, key):
    # The level is data (one compile for all levels), one copy per example so that the
    # batch can be split over devices.
    return ip.sparsity_loss(batch["sparsity"][0])(params, model_state, batch, key)


def sparsity_arms(config, ds, net: _Network, dense) -> dict:
    """Arm name -> ``fn(seeds) -> [metrics per seed]`` (``<kind>@<level>``)."""
    masked_adam = lambda masks=None: optax.chain(  # noqa: E731
        optax.adam(config.lr), ws.pruning.keep_masked(masks)
    )  # with masks=None, keep_masked updates with the masks its state holds
    finetune_tx, path_tx = masked_adam(), _fip_tx(config, net.f, config.path_lr, "fisher")

    def finetune(params, masks, seeds, steps):
        batches = _batches(ds.x_train, ds.y_train, config.batch_size, [s + 20 for s in seeds])
        opt_state = jax.vmap(lambda p, m: masked_adam(m).init(p))(params, masks)  # per seed
        state = _train(
            config, net.ce, finetune_tx, params, batches, steps, seeds, opt_state=opt_state
        )
        return state.params

    def correct(params):
        return net.correct(params, ds.x_test, ds.y_test)

    def pruned(params, level, seeds, ft_steps) -> tuple[list[dict], list[np.ndarray]]:
        """Magnitude-pruned ``params`` and their fine-tuning: per-seed metrics, and the
        correctness after the last of ``ft_steps``."""
        masks = jax.vmap(lambda p: ws.pruning.magnitude_masks(p, level))(params)
        params = ws.pruning.apply_masks(params, masks)
        c = correct(params)
        out = [
            {"dense_accuracy": float(d.mean()), "pruned_accuracy": float(p.mean()),
             "pruned_correct": common.pack_correct(p),
             "sparsity": ws.pruning.sparsity(ws.training.seed_slice(masks, i))["overall"]}
            for i, (d, p) in enumerate(zip(correct(dense(seeds)), c, strict=True))
        ]  # fmt: skip
        finetuned = [correct(finetune(params, masks, seeds, n)) for n in ft_steps]
        return out, finetuned

    def oneshot(level):
        def fn(seeds):
            matched = config.path_steps + config.ft_steps
            out, (ft, ft_matched) = pruned(dense(seeds), level, seeds, [config.ft_steps, matched])
            for o, a, b in zip(out, ft, ft_matched, strict=True):
                o.update(ft_accuracy=float(a.mean()), ft_matched_accuracy=float(b.mean()),
                         equal_budget_accuracy=float(b.mean()),
                         equal_budget_correct=common.pack_correct(b))  # fmt: skip
            return out

        return fn

    def path(level):
        def fn(seeds):
            p0 = dense(seeds)
            batches = (
                {"x": b["x"], "sparsity": np.full(b["y"].shape, level, np.float32)}
                for b in _batches(ds.x_train, ds.y_train, config.anchor_batch,
                                  [s + 10 for s in seeds])
            )  # fmt: skip
            state = _train(
                config, _level_loss, path_tx, p0, batches, config.path_steps, seeds, anchors="x"
            )
            out, (ft,) = pruned(state.params, level, seeds, [config.ft_steps])
            unpruned = correct(state.params)
            projection = jax.vmap(lambda p: ip.projection_distance(p, level))
            before, after = projection(p0), projection(state.params)
            for o, u, b, a, c in zip(out, unpruned, before, after, ft, strict=True):
                o.update(unpruned_accuracy=float(u.mean()), distance_before=float(b),
                         distance_after=float(a), ft_accuracy=float(c.mean()),
                         equal_budget_accuracy=float(c.mean()),  # path_steps + ft_steps steps
                         equal_budget_correct=common.pack_correct(c))  # fmt: skip
            return _add_solve_stats(out, state)

        return fn

    kinds = (("oneshot", oneshot), ("path", path))
    return {f"{k}@{level:g}": fn(level) for level in config.sparsities for k, fn in kinds}


# ----------------------------------------------------------------------------- (c) robustness


def robustness_arms(config, ds, net: _Network, dense) -> dict:
    """Arm name -> ``fn(seeds) -> [metrics per seed]``: the dense network moved towards PGD
    robustness."""
    adv = ip.adversarial_loss(net.ce, eps=config.eps, method="pgd", steps=config.attack_steps)
    x, y = jnp.asarray(ds.x_test), jnp.asarray(ds.y_test)
    logits = jax.jit(jax.vmap(net.f))

    @jax.jit
    @jax.vmap
    def attack(params, key):
        def loss_of_x(z):
            return optax.softmax_cross_entropy_with_integer_labels(net.f(params, z), y).mean()

        return ip.pgd(loss_of_x, x, key, eps=config.eps, steps=config.eval_attack_steps)

    def evaluate(params, p0, seeds) -> list[dict]:
        x_adv = attack(params, jnp.stack([jax.random.PRNGKey(s + 99) for s in seeds]))
        robust = np.asarray(jnp.argmax(logits(params, x_adv), -1) == y)
        clean = net.correct(params, ds.x_test, ds.y_test)
        dist = jax.vmap(lambda p, q: ip.output_distance(net.f(p, x), net.f(q, x)))(params, p0)
        return [
            {"clean_accuracy": float(c.mean()), "robust_accuracy": float(r.mean()),
             "clean_correct": common.pack_correct(c), "robust_correct": common.pack_correct(r),
             "output_distance": float(d)}
            for c, r, d in zip(clean, robust, dist, strict=True)
        ]  # fmt: skip

    def penalty_loss(params, model_state, batch, key):
        value, (_, metrics) = adv(params, model_state, batch, key)
        dist = ip.output_distance(net.f(params, batch["x"]), batch["anchor_logits"])
        return value + config.robust_penalty_weight * dist, (model_state, metrics)

    def arm(kind):
        def fn(seeds):
            p0 = dense(seeds)
            if kind == "base":
                return evaluate(p0, p0, seeds)
            batches = _batches(ds.x_train, ds.y_train, config.batch_size, [s + 30 for s in seeds])
            tx, loss, anchors = optax.adam(config.lr), adv, None
            if kind == "fip":
                tx, anchors = _fip_tx(config, net.f, config.robust_path_lr, "fisher"), "x"
            elif kind == "penalty":
                loss = penalty_loss
                batches = ({**b, "anchor_logits": np.asarray(logits(p0, b["x"]))} for b in batches)
            state = _train(
                config, loss, tx, p0, batches, config.robust_steps, seeds, anchors=anchors
            )
            out = evaluate(state.params, p0, seeds)
            return _add_solve_stats(out, state) if kind == "fip" else out

        return fn

    return {f"robust_{k}": arm(k) for k in ("base", "adv_ft", "fip", "penalty")}


# ----------------------------------------------------------------------------- run


def run(config, workdir: str) -> dict:
    """Runs the parts of ``config.parts``; writes results.json and figures into ``workdir``."""
    validate(config)
    common.start(config, workdir)
    ds = common.load_dataset(config)
    model = ws.models.MLP(features=tuple(config.hidden), num_classes=ds.num_classes)
    net = _Network(model, lambda p, x: model.apply({"params": p}, x),
               ws.training.classification_loss(model.apply))  # fmt: skip
    dense = _pretrained(config, net, ds.x_train, ds.y_train)
    claims, tables, figures, notes = [], {}, [], []
    if "continual" in config.parts:
        per_arm = common.run_arms(workdir, config, continual_arms(config, ds, net))
        claims += _continual_claims(config, per_arm)
        metrics = ["task1_accuracy", "task2_accuracy", "all_accuracy", "buffer_distance",
                   "distance_moved"]  # fmt: skip
        tables["Continual: test accuracy by arm"] = common.summarize(per_arm, metrics)
        fip = {k: v for k, v in per_arm.items() if k.startswith("fip")}
        if fip:
            tables["Continual: FIP solve"] = common.summarize(
                fip, ["final_residual", "unconverged_steps"]
            )
            notes.append(_unconverged_note(config, fip, config.task2_steps))
            notes.append(f"fip and fip_jacobian: every step moves exactly fip_lr={config.fip_lr:g} "
                         "(the solved direction rescaled to norm 1), so the metric claim compares "
                         "equal step lengths; distance_moved: from task-1 weights.")  # fmt: skip
        figures.append(_plot_continual(per_arm, workdir, config))
    if "sparsity" in config.parts:
        per_arm = common.run_arms(workdir, config, sparsity_arms(config, ds, net, dense))
        claims += _sparsity_claims(config, per_arm)
        tables["Sparsity: test accuracy by arm"] = common.summarize(
            per_arm, ["pruned_accuracy", "ft_accuracy", "equal_budget_accuracy"]
        )
        path = {k: v for k, v in per_arm.items() if k.startswith("path")}
        notes.append(_unconverged_note(config, path, config.path_steps))
        figures.append(_plot_sparsity(per_arm, workdir, config))
    if "robustness" in config.parts:
        per_arm = common.run_arms(workdir, config, robustness_arms(config, ds, net, dense))
        for text, metric, base in (
            ("Moving along the FIP towards PGD robustness raises robust accuracy",
             "robust_accuracy", "robust_base"),
            ("The FIP keeps more clean accuracy than adversarial fine-tuning", "clean_accuracy",
             "robust_adv_ft"),
        ):  # fmt: skip
            claims.append(common.compare(text, metric, "robust_fip", base, per_arm))
        tables["Robustness: test accuracy by arm"] = common.summarize(
            per_arm, ["clean_accuracy", "robust_accuracy", "output_distance"]
        )
        notes.append(_unconverged_note(config, {"robust_fip": per_arm["robust_fip"]},
                                       config.robust_steps))  # fmt: skip
    notes += [
        "fip = the paper's metric step with the softmax-Fisher metric (the official code's "
        "Bhattacharyya distance, whose Hessian is Fisher/4); fip_jacobian = Euclidean J^T J on "
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
    steps = steps * config.num_seeds
    return f"FIP solves that ended above tol={config.tol:g} (of {steps} steps per arm): {counts}"


def _continual_claims(config, per_arm) -> list[dict]:
    claims = []
    pairs = [
        ("fip", "naive", "FIP (metric step) forgets less than naive fine-tuning"),
        ("fip", "replay", "FIP (metric step) beats replay of the same buffer"),
        ("penalty", "naive", "The official FIP code's penalty form beats naive fine-tuning"),
        ("penalty", "replay", "The official FIP code's penalty form beats replay"),
        (
            "fip",
            "fip_jacobian",
            "The Fisher (Bhattacharyya) metric beats the Euclidean one at equal step length",
        ),
    ]
    for arm, base, text in pairs:
        if arm in per_arm and base in per_arm:
            text = f"{text} (all-class test accuracy)"
            claims.append(common.compare(text, "all_accuracy", arm, base, per_arm))
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
    cli.main(run, "invariant_path")
