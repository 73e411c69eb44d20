"""Claims as data (judged with wspace.stats, tested in test_stats.py): pairing, margins, Holm
over a file, per-example claims, provenance, --verify."""

import json
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats

from experiments import common, report
from tests.helpers import ROOT, _env
from wspace import stats as ws_stats


def _per_arm(n_seeds=10, n_examples=400, seed=0):
    """Two arms on one shared test set; ``new`` redraws 10% of ``old``'s answers at 90% right."""
    rng = np.random.default_rng(seed)
    per_arm = {"new": [], "old": []}
    for _ in range(n_seeds):
        old = rng.random(n_examples) < 0.8
        new = old.copy()
        flip = rng.choice(n_examples, int(n_examples * 0.1), replace=False)
        new[flip] = rng.random(len(flip)) < 0.9  # old is 80% right: new wins on net
        for arm, bits in (("new", new), ("old", old)):
            per_arm[arm].append(
                {"acc": float(bits.mean()), "loss": float(rng.normal(1.0 - bits.mean(), 0.01)),
                 "correct": ws_stats.pack_correct(bits)}
            )  # fmt: skip
    return per_arm


CLAIMS = [
    common.Claim("new beats old in accuracy", "acc", "new", "old", per_example="correct"),
    common.Claim("new has lower loss", "loss", "new", "old", higher_is_better=False),
    common.Claim("old is within 0.5 of new", "acc", "old", "new", margin=0.5),
]


def test_paired_t_matches_scipy_ttest_rel_with_the_margin_shift():
    rng = np.random.default_rng(1)
    a, b = rng.normal(0.9, 0.02, 10), rng.normal(0.91, 0.02, 10)
    per_arm = {"a": [{"m": x} for x in a], "b": [{"m": x} for x in b]}
    (c,) = common.judge([common.Claim("a within 0.03 of b", "m", "a", "b", margin=0.03)], per_arm)
    ref = stats.ttest_rel(a + 0.03, b)  # H0: mean(a - b) = -margin
    ci = stats.ttest_rel(a, b).confidence_interval(0.95)
    assert c["arm_values"] == a.tolist() and c["baseline_values"] == b.tolist()
    np.testing.assert_allclose(c["p_value"], ref.pvalue, rtol=1e-10)
    np.testing.assert_allclose(c["ci95"], [ci.low, ci.high], rtol=1e-10)
    assert c["p_holm"] == c["p_value"]  # one claim: Holm changes nothing
    expected = "holds" if ref.pvalue < 0.05 and np.mean(a - b) > -0.03 else "inconclusive"
    assert c["verdict"] == c["verdict_unadjusted"] == expected


def test_holm_turns_three_marginal_wins_inconclusive():
    rng = np.random.default_rng(3)
    base = rng.normal(0, 1, 10)
    per_arm = {"b": [{"m": x} for x in base]}
    found = []
    for i in range(3):  # each arm beats b with p around 0.02-0.04
        noise = rng.normal(0, 1, 10)
        noise = (noise - noise.mean()) / noise.std(ddof=1)
        per_arm[f"a{i}"] = [{"m": x} for x in base + 0.75 + noise]
        found.append(common.Claim(f"a{i} beats b", "m", f"a{i}", "b"))
    judged = common.judge(found, per_arm)
    assert all(0.01 < c["p_value"] < 0.05 for c in judged)
    assert all(c["verdict_unadjusted"] == "holds" for c in judged)
    assert all(c["verdict"] == "inconclusive" for c in judged)


def test_accuracy_claims_add_test_set_sampling_and_count_disagreements():
    per_arm = _per_arm()
    acc, loss, margin = common.judge(CLAIMS, per_arm)
    assert len(acc["disagreements"]) == 10 and all(0 < k <= 40 for k in acc["disagreements"])
    # 8-14 disagreements of 400 per seed: over seeds alone the gain looks clear, but a
    # new test set of 400 could well erase it
    assert acc["p_t"] < 0.05 < acc["p_bootstrap"] and acc["verdict"] == "inconclusive"
    assert acc["p_value"] == max(acc["p_t"], acc["p_bootstrap"])
    assert acc["ci95"][0] == min(acc["ci95_t"][0], acc["ci95_bootstrap"][0])
    assert acc["ci95"][1] == max(acc["ci95_t"][1], acc["ci95_bootstrap"][1])
    # the bootstrap's mean is the paired mean: wins - losses over N per seed
    ex = acc["examples"]
    counted = [(len(w) - len(lo)) / ex["n"] for w, lo in zip(ex["wins"], ex["losses"], strict=True)]
    np.testing.assert_allclose(np.mean(counted), acc["diff_mean"], atol=1e-12)
    np.testing.assert_allclose(
        [c["p_holm"] for c in (acc, loss, margin)],
        ws_stats.holm([c["p_value"] for c in (acc, loss, margin)]),
    )
    assert "examples" not in loss and margin["verdict"] == "holds"


def test_per_example_bits_must_match_the_metric():
    per_arm = _per_arm(n_seeds=3)
    per_arm["new"][1]["acc"] += 0.05
    with pytest.raises(ValueError, match="per_example 'correct' of the arm is 0.05"):
        common.judge(CLAIMS[:1], per_arm)
    del per_arm["old"][2]["correct"]
    with pytest.raises(ValueError, match="per_example 'correct' is missing"):
        common.judge(CLAIMS[:1], per_arm)


def test_claims_pair_by_seed():
    per_arm = {
        "new": [{"acc": 0.80}, {"acc": 0.60}, {"acc": 0.71}],
        "old": [{"acc": 0.78}, {"acc": 0.58}, {"acc": 0.70}],
    }
    # unpaired the spread of the seeds would swamp a 0.017 gain; paired it is clear
    better = common.Claim("new beats old", "acc", "new", "old")
    lower = common.Claim("new has lower acc", "acc", "new", "old", higher_is_better=False)
    c, c_lower = common.judge([better, lower], per_arm)
    assert c["verdict_unadjusted"] == "holds" and c["n"] == 3 and c["ci95"][0] > 0
    np.testing.assert_allclose(c["diff_mean"], 0.05 / 3)
    assert c_lower["verdict_unadjusted"] == "does not hold"


def test_bad_claims_and_missing_arms_are_named():
    with pytest.raises(ValueError, match="margin=-0.1"):
        common.Claim("x", "acc", "a", "b", margin=-0.1)
    with pytest.raises(ValueError, match="arm and baseline are both 'a'"):
        common.Claim("x", "acc", "a", "a")
    per_arm = {"a": [{"acc": 1.0}], "b": [{"acc": 0.5}]}
    missing = common.Claim("c beats a", "acc", "c", "a")
    with pytest.raises(ValueError, match=r"no arm \['c'\]; arms run: \['a', 'b'\]"):
        common.judge([missing], per_arm)
    assert common.judge([missing], per_arm, skip_missing=True) == []


def test_plot_mean_ci_draws_the_t_interval():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = np.random.default_rng(0).normal(size=(6, 4))
    ci = stats.ttest_1samp(values, 0.0).confidence_interval(0.95)
    fig, ax = plt.subplots()
    common.plot_mean_ci(ax, np.arange(4), values, label="a")
    band = ax.collections[0].get_paths()[0].vertices
    np.testing.assert_allclose(band[:, 1].min(), ci.low.min(), rtol=1e-6)
    plt.close(fig)


def _results_dir(tmp_path, per_arm=None):
    config = common.base_config("quick")
    config.num_seeds = 10
    judged = common.judge(CLAIMS, per_arm or _per_arm())
    results = common.save_results(str(tmp_path), config, "synthetic", claims=judged)
    out = tmp_path / "results"
    out.mkdir()
    (out / "synthetic.json").write_text(json.dumps(results))
    return out, results


def _claim(text, verdict):
    return {"claim": text, "arm": "a", "baseline": "b", "metric": "acc", "verdict": verdict,
            "diff_mean": 0.01, "ci95": [0.0, 0.02], "p_holm": 0.01,
            "arm_values": [0.5 + (verdict == "holds")], "baseline_values": [0.5]}  # fmt: skip


def test_compare_names_how_each_verdict_of_a_rerun_changed():
    verdicts = {"x": "holds", "y": "holds", "z": "does not hold", "w": "inconclusive"}
    published = {"m": {"claims": [_claim(text, v) for text, v in verdicts.items()]}}
    verdicts = {"x": "holds", "y": "inconclusive", "z": "holds"}  # w is missing
    claims = [_claim(text, v) for text, v in verdicts.items()]
    rerun = {"m": {"claims": claims, "provenance": {"xla_flags": "--f"}}}
    changes = [r["change"] for r in report.compare(published, rerun)]
    assert changes == ["same", "inconclusive", "flipped", "missing"]
    md = report.rerun_markdown("other", published, rerun)
    assert "of 4 published claims, 1 keep their verdict, 1 move" in md and "1 flip" in md
    assert "XLA_FLAGS=--f" in md and "| m | y |" in md and "| m | z |" in md
    assert "| m | x |" not in md  # unchanged claims are counted, not listed
    assert "values differ from the published ones in 2 claims (methods: m)" in md  # y, z


def _demo_workdir(path, new, old):
    """A report workdir with one method's (train's) results.json: "new beats old" judged
    from their 10 seeds' accuracies."""
    config = common.base_config("quick")
    config.num_seeds = 10
    (path / "train").mkdir(parents=True)
    per_arm = {"new": [{"acc": a} for a in new], "old": [{"acc": a} for a in old]}
    judged = common.judge([common.Claim("new beats old", "acc", "new", "old")], per_arm)
    common.save_results(str(path / "train"), config, "train", claims=judged)
    return str(path)


def test_a_published_rerun_is_verified_and_rendered_in_the_readme(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "RESULTS_DIR", str(tmp_path / "results"))
    monkeypatch.setattr(report, "RERUNS_DIR", str(tmp_path / "results" / "reruns"))
    readme = tmp_path / "README.md"
    blocks = [f"<!-- results:{n} -->\n<!-- /results:{n} -->" for n in ("train", "reruns")]
    readme.write_text("\n".join(blocks))
    better, worse = 0.9 + 0.01 * np.sin(np.arange(10)), 0.8 + 0.01 * np.cos(np.arange(10))
    report.publish(_demo_workdir(tmp_path / "demo", better, worse), str(readme))
    swapped = _demo_workdir(tmp_path / "swapped", worse, better)
    report.publish(swapped, str(readme), rerun="swapped")
    assert report.verify(report.RESULTS_DIR, str(readme)) == []
    assert "**swapped** (seeds 0-9, commit" in readme.read_text()
    rows = report.compare(report.published_results(), report._read_dir(swapped))
    assert rows[0]["change"] == "flipped"  # new beats old: holds, then does not hold
    cmd = [sys.executable, "-m", "experiments.report", f"--compare={swapped}",
           f"--results_dir={report.RESULTS_DIR}"]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=_env(), timeout=300)
    assert done.returncode == 1 and "1 flip between holds and does not hold" in done.stdout
    stored = tmp_path / "results" / "reruns" / "swapped" / "train.json"
    data = json.loads(stored.read_text())
    data["claims"][0]["p_holm"] *= 0.5
    stored.write_text(json.dumps(data))
    problems = report.verify(report.RESULTS_DIR, str(readme))
    assert any(p.startswith(str(stored)) and "p_holm stored" in p for p in problems), problems
    with pytest.raises(ValueError, match="rerun name '../x'"):
        report.publish(swapped, str(readme), rerun="../x")
    for args in (["--publish", "--rerun=../x"], ["--rerun=x"]):  # refused before any run
        cmd = [sys.executable, "-m", "experiments.report", f"--workdir={tmp_path / 'w'}", *args]
        kw = dict(cwd=ROOT, capture_output=True, text=True, env=_env(), timeout=300)
        done = subprocess.run(cmd, **kw)
        assert done.returncode == 1 and "rerun" in done.stderr.splitlines()[-1], done.stderr
        assert "Traceback" not in done.stderr and not (tmp_path / "w").exists()


def test_results_store_provenance_and_verify_passes(tmp_path):
    out, results = _results_dir(tmp_path)
    p = results["provenance"]
    assert p["versions"]["jax"] and p["versions"]["numpy"] and p["backend"] == "cpu"
    assert len(p["commit"]) == 40 and isinstance(p["dirty"], bool) and p["python"] and p["cpu"]
    assert report.verify(str(out), readme=None) == []
    readme = tmp_path / "README.md"
    block = "<!-- results:synthetic -->\nold\n<!-- /results:synthetic -->"
    readme.write_text(report.render_readme(block, {"synthetic": results}))
    assert report.verify(str(out), readme=str(readme)) == []
    readme.write_text(block)
    assert "result blocks differ" in report.verify(str(out), readme=str(readme))[0]


@pytest.mark.parametrize(
    "tamper,field",
    [
        (lambda c: c[1]["arm_values"].__setitem__(3, c[1]["arm_values"][3] + 0.01), "diff_mean"),
        (lambda c: c[0]["examples"]["wins"][0].pop(), "examples do not give its values"),
        (lambda c: c[2].__setitem__("verdict", "inconclusive"), "verdict stored"),
        (lambda c: c[1].__setitem__("p_holm", c[1]["p_holm"] * 0.5), "p_holm stored"),
    ],
)
def test_verify_names_a_tampered_value(tmp_path, tamper, field):
    out, results = _results_dir(tmp_path)
    if "examples do not" in field:  # a consistent tamper: drop a win and its count
        results["claims"][0]["examples"]["wins"][0].pop()
        results["claims"][0]["arm_values"][0] -= 1 / results["claims"][0]["examples"]["n"]
        field = "p_"
    else:
        tamper(results["claims"])
    (out / "synthetic.json").write_text(json.dumps(results))
    problems = report.verify(str(out), readme=None)
    assert problems and any(field in p for p in problems), problems


def test_verify_cli_exits_nonzero_naming_the_mismatch(tmp_path):
    out, results = _results_dir(tmp_path)
    results["claims"][0]["ci95"][0] -= 1e-6
    (out / "synthetic.json").write_text(json.dumps(results))
    cmd = [sys.executable, "-m", "experiments.report", "--verify", f"--results_dir={out}"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=_env(), timeout=300)
    assert done.returncode == 1, done.stderr[-2000:]
    assert "'new beats old in accuracy'): ci95 stored" in done.stdout


def test_stored_times_survive_a_rerun(tmp_path):
    config = common.base_config("quick")
    config.num_seeds = 2
    arm = {"a": lambda seeds: [{"v": 1.0} for _ in seeds]}  # all seeds at once
    common.run_arms(str(tmp_path), config, arm)
    stored = json.loads((tmp_path / "arms" / "seconds.json").read_text())
    assert sorted(stored) == ["a/seeds_0-1"]
    common.run_arms(str(tmp_path), config, arm)  # all read back
    assert json.loads((tmp_path / "arms" / "seconds.json").read_text()) == stored


def test_committed_results_verify_and_meet_the_bar():
    """``python -m experiments.report --verify`` on experiments/results/ and the README.

    Every claim re-derives from its stored values, has at least 10 seeds, and every file
    names its commit, versions and backend (issue 19's "done when").
    """
    cmd = [sys.executable, "-m", "experiments.report", "--verify"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=_env(), timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    published = report.published_results()
    assert published, "no results files in experiments/results/"
    for name, results in published.items():
        assert all(c["n"] >= 10 for c in results["claims"]), name
        p = results["provenance"]
        assert p["commit"] and p["versions"]["jax"] and p["backend"], name
