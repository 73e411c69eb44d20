r"""Functionally invariant paths (Raghavan & Thomson, arXiv 2205.00334) at small scale.

  python -m experiments.invariant_path --config=experiments/configs/invariant_path.py:quick

An MLP on ``config.dataset``; every arm trains all seeds as one program (a seed axis).
(a) ``continual``: task 1 = the first half of the classes, then task 2 with one head by
naive fine-tuning, replay of a ``buffer_size`` buffer, the FIP metric step (softmax-Fisher
``fip`` or Euclidean ``fip_jacobian`` metric, the buffer as anchors, steps of length
``fip_lr``), the official code's penalty form (CE + Bhattacharyya distance to the task-1
network on the buffer) or EWC. (b) ``sparsity``: one-shot magnitude pruning against a FIP
path towards the pruned weights, each then fine-tuned. (c) ``robustness``: the dense network
moved towards PGD robustness by adversarial fine-tuning, the FIP path or the penalty form.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax

import wspace as ws
from experiments import cli, common
from experiments.claims import Claim, judge
from wspace import invariant_path as ip

PARTS = ("continual", "sparsity", "robustness")
CONTINUAL_ARMS = ("naive", "replay", "fip", "fip_jacobian", "penalty", "ewc")
TABLES = {  # part -> (title, metrics): mean and 95% interval over seeds, per arm
    "continual": ("Continual: test accuracy by arm", ["task1_accuracy", "task2_accuracy",
                  "all_accuracy", "buffer_distance", "distance_moved"]),
    "sparsity": ("Sparsity: test accuracy by arm",
                 ["pruned_accuracy", "ft_accuracy", "equal_budget_accuracy"]),
    "robustness": ("Robustness: test accuracy by arm",
                   ["clean_accuracy", "robust_accuracy", "output_distance"]),
}  # fmt: skip


def claims(config) -> list[Claim]:
    """The claims, paired by seed and test example (those of arms not run are skipped)."""
    level, steps = f"{config.claim_sparsity:g}", config.path_steps + config.ft_steps
    continual = [
        ("fip", "naive", "FIP (metric step) forgets less than naive fine-tuning"),
        ("fip", "replay", "FIP (metric step) beats replay of the same buffer"),
        ("penalty", "naive", "The official FIP code's penalty form beats naive fine-tuning"),
        ("penalty", "replay", "The official FIP code's penalty form beats replay"),
        ("fip", "fip_jacobian",
         "The Fisher (Bhattacharyya) metric beats the Euclidean one at equal step length"),
    ]  # fmt: skip
    return [
        *(Claim(f"{text} (all-class test accuracy)", "all_accuracy", arm, base,
                per_example="all_correct") for arm, base, text in continual),
        Claim(f"The FIP path keeps more accuracy than one-shot pruning at {level} sparsity "
              "(no fine-tuning)", "pruned_accuracy", f"path@{level}", f"oneshot@{level}",
              per_example="pruned_correct"),
        Claim(f"The FIP path + fine-tuning beats one-shot pruning fine-tuned for as many steps "
              f"({steps}) at {level} sparsity", "equal_budget_accuracy", f"path@{level}",
              f"oneshot@{level}", per_example="equal_budget_correct"),
        Claim("Moving along the FIP towards PGD robustness raises robust accuracy",
              "robust_accuracy", "robust_fip", "robust_base", per_example="robust_correct"),
        Claim("The FIP keeps more clean accuracy than adversarial fine-tuning", "clean_accuracy",
              "robust_fip", "robust_adv_ft", per_example="clean_correct"),
    ]  # fmt: skip


def validate(config) -> None:
    """Rejects bad fields before any work or file write."""
    lists = (("parts", PARTS), ("continual_arms", CONTINUAL_ARMS))
    common.check(
        config, subsets={k: v for k, v in lists if config[k]}, widths=("hidden",),
        counts=("base_steps", "task2_steps", "buffer_size", "batch_size", "anchor_batch",
                "maxiter"),
        nonnegative=("path_steps", "ft_steps", "robust_steps", "attack_steps", "eval_attack_steps",
                     "damping", "jacobian_damping", "tol", "penalty_weight", "ewc_weight",
                     "robust_penalty_weight"),
        positive=("lr", "fip_lr", "path_lr", "robust_path_lr", "max_norm", "eps"),
    )  # fmt: skip
    if not all(0 <= s < 1 for s in config.sparsities):
        raise ValueError(f"config.sparsities={tuple(config.sparsities)}; levels must be in [0, 1)")
    if "sparsity" in config.parts and config.claim_sparsity not in config.sparsities:
        raise ValueError(f"config.claim_sparsity={config.claim_sparsity} is not in "
                         f"config.sparsities={tuple(config.sparsities)}")  # fmt: skip
    n = jax.device_count()  # sharded: the seeds (with their buffers) split over devices
    if config.mode == "pmap" or (config.mode == "sharded" and config.num_seeds % n):
        raise ValueError(f"config.mode={config.mode!r} with num_seeds={config.num_seeds}: "
                         f"seeds are an axis; use 'jit', or 'sharded' with num_seeds divisible "
                         f"by {n}")  # fmt: skip


def _per_seed(correct=None, state=None, **values) -> list[dict]:
    """One result per seed from ``[S]`` values, ``correct={name: [S, N] bools}`` (as
    ``<name>_accuracy`` and ``<name>_correct``) and a FIP ``state``'s solve statistics."""
    if state is not None:
        pre = state.opt_state[0]
        values.update(final_residual=pre.residual, unconverged_steps=pre.num_unconverged)
    rows = zip(*values.values(), strict=True)
    out = [{k: np.asarray(v).item() for k, v in zip(values, row, strict=True)} for row in rows]
    for name, bits in (correct or {}).items():
        for o, b in zip(out, np.asarray(bits), strict=True):
            o.update({f"{name}_accuracy": float(b.mean()),
                      f"{name}_correct": ws.stats.pack_correct(b)})  # fmt: skip
    return out


class _Run:
    """What the arms share: config, workdir, data, the MLP and each seed's trained networks."""

    def __init__(self, config, workdir):
        self.config, self.workdir, self.ds = config, workdir, common.load_dataset(config)
        self.model = ws.models.MLP(features=tuple(config.hidden), num_classes=self.ds.num_classes)
        self.ce = ws.training.classification_loss(self.model.apply)
        self.f = lambda params, x: self.model.apply({"params": params}, x)
        self.logits = jax.jit(jax.vmap(self.f))  # per seed: params and inputs
        self.old = self.ds.y_train < self.ds.num_classes // 2  # task 1's training examples
        self.memo: dict = {}

    def correct(self, params) -> np.ndarray:  # [S, N]: per seed and test example
        x, y = self.ds.x_test, self.ds.y_test
        apply = self.model.apply
        return ws.training.correct_predictions(apply, {"params": params}, x, y, seed_axis=True)

    def batches(self, seeds, keep=slice(None), size=None, **per_seed):
        """`ws.data.seed_batches` of the training examples ``keep``."""
        x, y = self.ds.x_train[keep], self.ds.y_train[keep]
        size = min(size or self.config.batch_size, len(x))
        return ws.data.seed_batches(x, y, size, seeds, **jax.tree.map(np.asarray, per_seed))

    def train(self, name, loss, tx, params, batches, steps, seeds, opt_state=None, anchors=None):
        """``steps`` steps from ``params`` (a seed axis); FIP ``anchors``: a batch entry."""
        state = ws.training.TrainState(
            step=jnp.zeros(len(seeds), jnp.int32), params=params, model_state={},
            opt_state=jax.vmap(tx.init)(params) if opt_state is None else opt_state,
            key=jnp.stack([jax.random.PRNGKey(s) for s in seeds]),
        )  # fmt: skip
        if steps == 0:
            return state
        return common.fit_seeds(
            self.config, self.workdir, name, seeds, state, loss, tx, batches, num_steps=steps,
            eval_fn=lambda s: {}, eval_every=steps, progress=False, seed_tx_args=bool(anchors),
            tx_args=(lambda b: {"anchors": b[anchors]}) if anchors else None,
        )[0]  # fmt: skip

    def trained(self, seeds, task1=False):
        """Each seed's network trained by Adam for ``base_steps`` on task 1 or on all classes."""
        if (task1, *seeds) not in self.memo:
            keys = jnp.stack([jax.random.PRNGKey(s) for s in seeds])
            init = jax.vmap(lambda k: self.model.init(k, self.ds.x_train[:1])["params"])(keys)
            batches = self.batches(seeds, self.old if task1 else slice(None))
            state = self.train("task1" if task1 else "dense", self.ce, optax.adam(self.config.lr),
                               init, batches, self.config.base_steps, seeds)  # fmt: skip
            self.memo[task1, *seeds] = state.params
        return self.memo[task1, *seeds]

    def fip_tx(self, lr, metric="fisher", unit_steps=False):
        """The metric step, at most ``lr * max_norm`` long, or exactly ``lr`` (``unit_steps``)."""
        c = self.config
        pre = ip.scale_by_invariant_metric(
            self.f, metric=metric, damping=c.damping if metric == "fisher" else c.jacobian_damping,
            tol=c.tol, maxiter=c.maxiter, max_norm=None if unit_steps else c.max_norm,
        )  # fmt: skip
        unit = [optax.normalize_by_update_norm()] if unit_steps else []
        return optax.chain(pre, *unit, optax.scale_by_learning_rate(lr))


def continual_arms(run: _Run) -> dict:
    """Arm name -> ``fn(seeds) -> [metrics per seed]`` for the continual part."""
    c, x1, y1 = run.config, run.ds.x_train[run.old], run.ds.y_train[run.old]
    old_test = run.ds.y_test < run.ds.num_classes // 2

    def evaluate(params, p1, buf_x, state=None) -> list[dict]:
        k, moved = run.correct(params), jax.tree.map(jnp.subtract, params, p1)
        dist = jax.vmap(ip.output_distance)(run.logits(params, buf_x), run.logits(p1, buf_x))
        return _per_seed({"all": k}, state, task1_accuracy=k[:, old_test].mean(1),
                         task2_accuracy=k[:, ~old_test].mean(1), buffer_distance=dist,
                         distance_moved=jax.vmap(optax.tree.norm)(moved))  # fmt: skip

    def replay(params, model_state, batch, key):
        new, (_, metrics) = run.ce(params, model_state, batch, key)
        old, _ = run.ce(params, model_state, {"x": batch["buf_x"], "y": batch["buf_y"]}, key)
        return new + old, (model_state, metrics)

    def ewc(params, model_state, batch, key):  # each seed's w0 and Fisher in its batch
        loss = ip.ewc_loss(run.ce, batch["w0"], batch["fisher"], weight=c.ewc_weight)
        return loss(params, model_state, batch, key)

    penalty = ip.penalty_loss(run.ce, run.f, None, weight=c.penalty_weight, anchor_key="buf_x")
    losses = {"replay": replay, "ewc": ewc, "penalty": penalty}  # penalty: anchor_logits per seed
    fip = {"fip": run.fip_tx(c.fip_lr, "fisher", True),
           "fip_jacobian": run.fip_tx(c.fip_lr, "jacobian", True)}  # fmt: skip
    adam = optax.adam(c.lr)

    def arm(kind, seeds):
        p1, n = run.trained(seeds, task1=True), min(c.buffer_size, len(x1))
        buf = np.stack([np.random.default_rng(s).choice(len(x1), n, replace=False) for s in seeds])
        per_seed = {"buf_x": x1[buf], "buf_y": y1[buf], "anchor_logits": run.logits(p1, x1[buf])}
        if kind == "after_task1":
            return evaluate(p1, p1, x1[buf])
        if kind == "ewc":  # each seed's task-1 weights and diagonal Fisher
            fisher = jax.vmap(lambda p: ip.diagonal_fisher(run.f, p, jnp.asarray(x1)))(p1)
            per_seed.update(w0=p1, fisher=fisher)
        batches = run.batches([s + 1 for s in seeds], ~run.old, **per_seed)
        loss, tx = losses.get(kind, run.ce), fip.get(kind, adam)
        anchors = "buf_x" if kind in fip else None  # the metric step's anchors: the buffer
        state = run.train(kind, loss, tx, p1, batches, c.task2_steps, seeds, anchors=anchors)
        return evaluate(state.params, p1, x1[buf], state if kind in fip else None)

    return {k: partial(arm, k) for k in ("after_task1", *c.continual_arms)}


def sparsity_arms(run: _Run) -> dict:
    """``<kind>@<level>`` -> ``fn(seeds) -> [metrics per seed]``, kinds oneshot and path."""
    c = run.config
    masked = lambda masks=None: optax.chain(optax.adam(c.lr), ws.pruning.keep_masked(masks))  # noqa: E731
    finetune_tx, path_tx = masked(), run.fip_tx(c.path_lr)  # keep_masked(None): masks in state

    def level_loss(params, model_state, batch, key):  # the level is data: one compile
        return ip.sparsity_loss(batch["sparsity"][0])(params, model_state, batch, key)

    def pruned(name, params, level, seeds, *ft_steps):
        """``params`` pruned to ``level``, its sparsity and its test correctness after no
        fine-tuning and after each of ``ft_steps`` steps of masked fine-tuning."""
        masks = jax.vmap(lambda p: ws.pruning.magnitude_masks(p, level))(params)
        params = ws.pruning.apply_masks(params, masks)
        opt = jax.vmap(lambda p, m: masked(m).init(p))(params, masks)  # each seed its masks
        fine = [run.train(f"{name}/finetune_{n}", run.ce, finetune_tx, params,
                          run.batches([s + 20 for s in seeds]), n, seeds, opt).params
                for n in ft_steps]  # fmt: skip
        sparsity = [ws.pruning.sparsity(ws.training.seed_slice(masks, i))["overall"]
                    for i in range(len(seeds))]  # fmt: skip
        dense = run.correct(run.trained(seeds)).mean(1)
        return sparsity, dense, [run.correct(p) for p in (params, *fine)]

    def oneshot(level, seeds):
        sparsity, dense, (k, ft, matched) = pruned(
            f"oneshot@{level:g}", run.trained(seeds), level, seeds, c.ft_steps,
            c.path_steps + c.ft_steps,
        )  # fmt: skip
        return _per_seed({"pruned": k, "equal_budget": matched}, sparsity=sparsity,
                         dense_accuracy=dense, ft_accuracy=ft.mean(1))  # fmt: skip

    def path(level, seeds):
        p0, name = run.trained(seeds), f"path@{level:g}"
        batches = ({"x": b["x"], "sparsity": np.full(b["y"].shape, level, np.float32)}
                   for b in run.batches([s + 10 for s in seeds], size=c.anchor_batch))  # fmt: skip
        state = run.train(name, level_loss, path_tx, p0, batches, c.path_steps, seeds, anchors="x")
        sparsity, dense, (k, ft) = pruned(name, state.params, level, seeds, c.ft_steps)
        distance = jax.vmap(lambda p: ip.projection_distance(p, level))
        return _per_seed(
            {"pruned": k, "equal_budget": ft}, state, sparsity=sparsity, dense_accuracy=dense,
            ft_accuracy=ft.mean(1), unpruned_accuracy=run.correct(state.params).mean(1),
            distance_before=distance(p0), distance_after=distance(state.params),
        )  # fmt: skip

    kinds = {"oneshot": oneshot, "path": path}
    return {f"{k}@{s:g}": partial(fn, s) for s in c.sparsities for k, fn in kinds.items()}


def robustness_arms(run: _Run) -> dict:
    """``robust_<kind>`` -> ``fn(seeds)``: the dense network moved towards PGD robustness."""
    c, x, y = run.config, jnp.asarray(run.ds.x_test), jnp.asarray(run.ds.y_test)
    adv = ip.adversarial_loss(run.ce, eps=c.eps, method="pgd", steps=c.attack_steps)
    penalty = ip.penalty_loss(adv, run.f, None, weight=c.robust_penalty_weight, anchor_key="x")
    fip_tx, adam = run.fip_tx(c.robust_path_lr), optax.adam(c.lr)

    @jax.jit
    @jax.vmap
    def robust(params, key):  # [S, N]: correct on PGD inputs against each seed's network
        loss = lambda z: optax.softmax_cross_entropy_with_integer_labels(run.f(params, z), y)  # noqa: E731
        x_adv = ip.pgd(lambda z: loss(z).mean(), x, key, eps=c.eps, steps=c.eval_attack_steps)
        return jnp.argmax(run.f(params, x_adv), -1) == y

    def arm(kind, seeds):
        p0 = params = run.trained(seeds)
        state = None  # base: the dense network itself
        if kind != "base":
            batches = ({**b, "anchor_logits": run.logits(p0, b["x"])}
                       for b in run.batches([s + 30 for s in seeds]))  # fmt: skip
            loss, tx = penalty if kind == "penalty" else adv, fip_tx if kind == "fip" else adam
            state = run.train(f"robust_{kind}", loss, tx, p0, batches, c.robust_steps, seeds,
                              anchors="x" if kind == "fip" else None)  # fmt: skip
            params = state.params
        keys = jnp.stack([jax.random.PRNGKey(s + 99) for s in seeds])
        dist = jax.vmap(lambda p, q: ip.output_distance(run.f(p, x), run.f(q, x)))(params, p0)
        return _per_seed({"clean": run.correct(params), "robust": robust(params, keys)},
                         state if kind == "fip" else None, output_distance=dist)  # fmt: skip

    return {f"robust_{k}": partial(arm, k) for k in ("base", "adv_ft", "fip", "penalty")}


PART_ARMS = {"continual": continual_arms, "sparsity": sparsity_arms, "robustness": robustness_arms}


def run(config, workdir: str) -> dict:
    """Runs the parts of ``config.parts``; writes results.json and figures into ``workdir``."""
    validate(config)
    common.start(config, workdir)
    shared, per_arm, tables, figures = _Run(config, workdir), {}, {}, []
    for part in (p for p in PARTS if p in config.parts):
        arms = common.run_arms(workdir, config, PART_ARMS[part](shared))
        title, metrics = TABLES[part]
        per_arm, tables[title] = {**per_arm, **arms}, common.summarize(arms, metrics)
        if part != "robustness":
            figures.append(_plot(part, arms, workdir, config))
    fip = {k: v for k, v in per_arm.items() if "unconverged_steps" in v[0]}
    if fip:
        tables["FIP solves"] = common.summarize(fip, ["final_residual", "unconverged_steps"])
    counts = ", ".join(f"{k} {sum(r['unconverged_steps'] for r in v):g}" for k, v in fip.items())
    notes = [
        "fip: the paper's metric step, softmax-Fisher metric (4x the Hessian of the official "
        "code's Bhattacharyya distance); fip_jacobian: Euclidean J^T J on the logits; both "
        f"move exactly fip_lr={config.fip_lr:g} per step. penalty: what the official code runs "
        "(CE + Bhattacharyya distillation on the buffer, summed as there).",
        f"{config.dataset}, MLP {tuple(config.hidden)}; FIP solves that ended above "
        f"tol={config.tol:g}, summed over seeds: {counts or 'none run'}.",
    ]
    return common.save_results(
        workdir, config, "invariant_path", claims=judge(claims(config), per_arm, skip_missing=True),
        tables=tables, figures=figures, notes=notes,
    )  # fmt: skip


def _plot(part, per_arm, workdir, config) -> str:
    """continual.png (accuracy by arm and task) or sparsity.png (accuracy by level)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5) if part == "continual" else (5.5, 3.5))
    if part == "continual":
        series = {"task1_accuracy": "task 1", "task2_accuracy": "task 2", "all_accuracy": "all"}
        common.plot_by_arm(ax, per_arm, series, rotation=30)
        ax.set(ylim=(0, 1), title=f"Continual learning, {config.dataset}")
    else:
        levels = list(config.sparsities)
        for kind, key, style, label in (
            ("oneshot", "pruned_accuracy", "o-", "one-shot"),
            ("oneshot", "equal_budget_accuracy", "o--", "one-shot + step-matched fine-tune"),
            ("path", "pruned_accuracy", "s-", "FIP path"),
            ("path", "ft_accuracy", "s--", "FIP path + fine-tune"),
        ):  # fmt: skip
            values = common.seeds_by_arm(per_arm, [f"{kind}@{s:g}" for s in levels], key)
            common.plot_mean_ci(ax, levels, values, style=style, label=label, bars=True)
        dense = np.mean([r["dense_accuracy"] for r in per_arm[f"oneshot@{levels[0]:g}"]])
        ax.axhline(dense, color="k", ls=":", label="dense")
        ax.set(xlabel="sparsity", title=f"Sparsification, {config.dataset}")
    ax.set(ylabel="test accuracy (mean, 95% interval over seeds)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return common.savefig(fig, workdir, f"{part}.png", config)


if __name__ == "__main__":
    cli.main(run, "invariant_path")
