"""Every valid configuration runs: a spread of quick configurations per experiment.

Each case either runs to ``results.json`` or is refused before any work with a one-line
ValueError naming the conflicting fields (and nothing written). The cases empty each
optional list, run each arm alone and try each named option once, on tiny sizes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from experiments.configs.late_phase import NQP_ARMS
from tests.helpers import ROOT, run_experiment

EXPERIMENTS = (
    "train", "late_phase", "likelihood_ratio", "straight_through", "lottery",
    "invariant_path", "compose",
)  # fmt: skip

TINY = {  # the cheapest sizes each experiment accepts, shared by all its cases
    "train": dict(num_seeds=1, steps=4, eval_every=2, model="mlp"),
    "late_phase": dict(num_seeds=1, steps=6, eval_every=6, nqp_steps=10, nqp_eval_every=10),
    "likelihood_ratio": dict(num_seeds=2, steps=4, eval_every=4),
    "straight_through": dict(num_seeds=2, steps=2),
    "lottery": dict(num_seeds=1, steps=6, levels=1, rewind_step=2),
    "invariant_path": dict(num_seeds=2, base_steps=8, task2_steps=2, path_steps=2, ft_steps=2),
    "compose": dict(num_seeds=2, steps=8),
}

# (experiment, id, overrides, refused fields: None when the configuration must run)
# fmt: off
CASES = [
    ("train", "default", {}, None),
    ("train", "adam-digits", dict(optimizer="adam", dataset="digits"), None),
    ("train", "bad-optimizer", dict(optimizer="lion"), ("optimizer",)),
    ("train", "unrolled-seeds", dict(num_seeds=2, seed_loop="unroll"), None),
    ("train", "bad-seed-loop", dict(seed_loop="pmap"), ("seed_loop",)),
    ("late_phase", "classify-only", dict(parts=("classify",)), None),
    ("late_phase", "nqp-only", dict(parts=("nqp",)), None),
    ("late_phase", "no-parts", dict(parts=()), ("parts",)),
    ("late_phase", "sgd-alone", dict(classify_arms=("sgd",), nqp_arms=("sgd",)), None),
    ("late_phase", "select-head", dict(parts=("classify",), select="head"), None),
    ("late_phase", "no-sgd", dict(classify_arms=("late",)), ("classify_arms",)),
    ("late_phase", "select-batchnorm-mlp", dict(parts=("classify",), select="batchnorm"),
     ("select", "model")),
    ("late_phase", "rank1-restart-noise", dict(parts=("classify",), select="rank1", noise=0.01,
                                               member_opt_state="copy"), None),
    ("late_phase", "nqp-all-arms", dict(parts=("nqp",), nqp_arms=NQP_ARMS), None),
    ("likelihood_ratio", "gaussian-digits", dict(noise_settings=("gaussian:0.1",)), None),
    ("likelihood_ratio", "logistic-es-only", dict(noise_settings=("logistic:0.5",),
                                                  quality_variants=("es",)), None),
    ("likelihood_ratio", "no-noise", dict(noise_settings=()), ("noise_settings",)),
    ("likelihood_ratio", "no-quality", dict(quality_variants=()), None),
    ("likelihood_ratio", "no-fgsm", dict(fgsm_eps=()), ("claim_eps", "fgsm_eps")),
    ("likelihood_ratio", "baseline-none", dict(baseline="none"), None),
    ("straight_through", "st-alone", dict(sbn_estimators=["st"], train_arms=["bin_st"]), None),
    ("straight_through", "no-train-arms", dict(train_arms=[]), None),
    ("straight_through", "bad-arm", dict(train_arms=["bin_xx"]), ("train_arms",)),
    ("straight_through", "no-sbn-estimators", dict(sbn_estimators=[]), None),
    ("straight_through", "act-arms", dict(train_arms=["act_st", "act_identity"]), None),
    ("lottery", "default", {}, None),
    ("lottery", "ticket-alone", dict(arms="ticket", geometry_arms="ticket",
                                     instability_arms="ticket"), None),
    ("lottery", "no-instability-global-restore-adam", dict(
        instability_arms="", scope="global", rewind="restore", optimizer="adam"), None),
    ("lottery", "no-geometry", dict(geometry_arms=""), None),  # the crash of issue 23
    ("lottery", "no-ticket", dict(arms="reinit", geometry_arms="", instability_arms=""),
     ("arms",)),
    ("invariant_path", "sparsity-only", dict(parts=("sparsity",)), None),
    ("invariant_path", "continual-fip-alone", dict(parts=("continual",),
                                                   continual_arms=("fip",)), None),
    ("invariant_path", "bad-part", dict(parts=("nope",)), ("parts",)),
    ("invariant_path", "no-continual-arms", dict(parts=("continual",), continual_arms=()), None),
    ("invariant_path", "no-sparsities", dict(parts=("sparsity",), sparsities=()),
     ("claim_sparsity", "sparsities")),
    ("invariant_path", "robustness-only", dict(parts=("robustness",)), None),
    ("invariant_path", "no-parts", dict(parts=()), None),
    ("compose", "default", {}, None),
    ("compose", "bn_head-random", dict(late_select="head", late_schedule="random"), None),
    ("compose", "head-noise", dict(late_select="head", late_noise=0.01), None),
    ("compose", "parallel", dict(late_schedule="parallel"), ("late_schedule",)),
    ("compose", "bad-late-start", dict(late_start=1.0), ("late_start",)),
]
# fmt: on


@pytest.mark.filterwarnings("error:No artists with labels")  # a legend over an empty panel
@pytest.mark.parametrize(
    "name,overrides,refused",
    [pytest.param(n, o, r, id=f"{n}-{i}") for n, i, o, r in CASES],
)
def test_configuration_runs_or_is_refused(tmp_path, name, overrides, refused):
    workdir = tmp_path / "w"
    fields = {**TINY[name], **overrides}
    if refused is None:
        tensorboard = name != "train"  # on for the methods; the train cases keep the default
        run_experiment(name, workdir, **fields, tensorboard=tensorboard)
        results = json.loads((workdir / "results.json").read_text())
        for figure in results["figures"]:
            assert (workdir / figure).exists(), figure
        _assert_tensorboard_logs(workdir, tensorboard)
        return
    with pytest.raises(ValueError) as info:
        run_experiment(name, workdir, **fields)
    message = str(info.value)
    assert "\n" not in message, message
    for field in refused:
        assert f"config.{field}" in message, message
    assert not workdir.exists() or not any(workdir.iterdir()), sorted(os.listdir(workdir))


def _assert_tensorboard_logs(workdir, on: bool) -> None:
    """With ``tensorboard`` every training run's workdir (``train/<arm>/seeds_*``) has its
    TensorBoard log of scalars; without it, no log anywhere."""
    runs = sorted(workdir.glob("train/*/seeds_*"))
    logs = {run: list(run.glob("tb/events.out.tfevents.*")) for run in runs}
    if not on:
        assert not list(workdir.rglob("events.out.tfevents.*"))
        return
    for run, found in logs.items():
        assert len(found) == 1 and b"loss" in found[0].read_bytes(), run
        if "-" in run.name or "_" in run.name[len("seeds_") :]:  # many seeds: one scalar each
            assert b"/seed_" in found[0].read_bytes(), run


def test_every_experiment_is_covered():
    assert {n for n, *_ in CASES} == set(EXPERIMENTS)


@pytest.mark.parametrize("name", [*EXPERIMENTS, "report"])
def test_config_imports_nothing_heavy(name):
    code = (
        f"import sys, experiments.configs.{name} as c; c.get_config('quick'); "
        "print(sorted(m for m in ('jax', 'flax', 'optax', 'wspace') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
