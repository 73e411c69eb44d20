"""The experiment layer: configs and overrides, the arms x seeds runner, claims and verdicts."""

import importlib
import json
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
from scipy import stats

from experiments import common
from tests.helpers import ROOT, _env, run_experiment


def _config(**fields):
    c = common.base_config("quick")
    c.update(fields)
    return c


def test_paired_interval_matches_t_test():
    rng = np.random.default_rng(0)
    a, b = rng.normal(1.0, 1.0, 7), rng.normal(0.0, 1.0, 7)
    mean, lo, hi = common.paired_interval(a, b)
    d = a - b
    ref = stats.ttest_1samp(d, 0.0).confidence_interval(0.95)
    np.testing.assert_allclose([mean, lo, hi], [d.mean(), ref.low, ref.high], rtol=1e-12)


@pytest.mark.parametrize(
    "lo,hi,higher,margin,expected",
    [
        (0.1, 0.5, True, 0.0, "holds"),
        (-0.5, -0.1, True, 0.0, "does not hold"),
        (-0.1, 0.5, True, 0.0, "inconclusive"),
        (-0.5, -0.1, False, 0.0, "holds"),  # lower is better: a negative difference wins
        (-0.008, 0.004, True, 0.01, "holds"),  # no worse than by more than the margin
        (-0.03, -0.02, True, 0.01, "does not hold"),
        (-0.02, 0.0, True, 0.01, "inconclusive"),
    ],
)
def test_verdict(lo, hi, higher, margin, expected):
    assert common.verdict(lo, hi, higher_is_better=higher, margin=margin) == expected


def test_compare_pairs_by_seed():
    per_arm = {
        "new": [{"acc": 0.80}, {"acc": 0.60}, {"acc": 0.71}],
        "old": [{"acc": 0.78}, {"acc": 0.58}, {"acc": 0.70}],
    }
    # unpaired the spread of the seeds would swamp a 0.017 gain; paired it is clear
    c = common.compare("new beats old", "acc", "new", "old", per_arm)
    assert c["verdict"] == "holds" and c["n"] == 3
    np.testing.assert_allclose(c["diff_mean"], 0.05 / 3)
    assert c["ci95"][0] > 0
    lower = common.compare("new has lower acc", "acc", "new", "old", per_arm, higher_is_better=0)
    assert lower["verdict"] == "does not hold"


def test_run_arms_caches_and_resumes(tmp_path):
    calls = []

    def arm(seed):
        calls.append(seed)
        return {"value": float(seed)}

    config = _config(num_seeds=3, seed=4)
    first = common.run_arms(str(tmp_path), config, {"a": arm})
    assert first == {"a": [{"value": 4.0}, {"value": 5.0}, {"value": 6.0}]} and calls == [4, 5, 6]
    os.remove(tmp_path / "arms" / "a" / "seed_5.json")  # as if killed before seed 5 finished
    again = common.run_arms(str(tmp_path), config, {"a": arm})
    assert again == first and calls == [4, 5, 6, 5]


def test_run_arms_rejects_nan_metrics(tmp_path):
    with pytest.raises(FloatingPointError, match="arm 'a' seed 0: metric 'loss' is nan"):
        common.run_arms(str(tmp_path), _config(num_seeds=1), {"a": lambda s: {"loss": np.nan}})
    assert not (tmp_path / "arms" / "a" / "seed_0.json").exists()


def test_start_refuses_another_config_and_names_the_field(tmp_path):
    common.start(_config(), str(tmp_path))
    common.run_arms(str(tmp_path), _config(num_seeds=1), {"a": lambda s: {"v": 1.0}})
    common.start(_config(progress=True), str(tmp_path))  # display-only fields may change
    with pytest.raises(ValueError, match="seed: 0 -> 3"):
        common.start(_config(seed=3), str(tmp_path))


def test_typo_then_fix_in_one_workdir(tmp_path):
    """A run that failed before storing any result leaves a workdir the fixed rerun can use."""
    with pytest.raises(ValueError, match="no such file"):
        run_experiment("train", tmp_path, dataset="npz:/no/such.npz")
    common.start(_config(dataset="digitz"), str(tmp_path))  # a typo found after start
    with pytest.warns(UserWarning, match="replacing the config of a run that stored no result"):
        common.start(_config(dataset="digits"), str(tmp_path))


def test_start_validates_before_writing(tmp_path):
    with pytest.raises(ValueError, match="config.mode='gpu'"):
        common.start(_config(mode="gpu"), str(tmp_path / "w"))
    assert not (tmp_path / "w").exists()


def test_damaged_json_is_named(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"seed": 0,')
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        common.start(_config(), str(tmp_path))


def test_train_experiment_in_process(tmp_path):
    results = run_experiment("train", tmp_path, dataset="digits", model="mlp")
    for name in ("config.json", "results.json", "curves.png", "seed_0/metrics.jsonl"):
        assert (tmp_path / name).exists(), name
    assert results["smoke"] and results["dataset"] == "digits" and results["seeds"] == [0]
    ((_, acc, *_),) = results["tables"]["mlp on digits"]["rows"]
    assert 0.0 <= acc[0] <= 1.0
    with open(tmp_path / "results.json") as f:
        assert json.load(f) == json.loads(json.dumps(results))


def test_train_experiment_writes_tensorboard_logs_when_asked(tmp_path):
    pytest.importorskip("tensorboardX")  # the `tensorboard` extra, in `dev`
    run_experiment("train", tmp_path, dataset="digits", model="mlp", tensorboard=True)
    (events,) = (tmp_path / "seed_0" / "tb").glob("events.out.tfevents.*")
    assert b"test_accuracy" in events.read_bytes()  # the evaluation records, as scalars
    assert common.metric_writer(common.base_config("quick"), str(tmp_path)) is None  # off


def _cli(*args):
    cmd = [sys.executable, "-m", "experiments.train", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=_env(), timeout=300)


def test_cli_overrides_and_rejects_unknown_fields(tmp_path):
    quick = "--config=experiments/configs/train.py:quick"
    bad = _cli(f"--workdir={tmp_path / 'bad'}", quick, "--config.learning_rate=0.5")
    assert bad.returncode != 0 and "learning_rate" in bad.stderr
    assert not (tmp_path / "bad").exists()
    ok = _cli(f"--workdir={tmp_path / 'ok'}", quick, "--config.dataset=digits", "--config.steps=4")
    assert ok.returncode == 0, ok.stderr[-3000:]
    with open(tmp_path / "ok" / "config.json") as f:
        config = json.load(f)
    assert config["dataset"] == "digits" and config["steps"] == 4 and config["size"] == "quick"


def test_every_config_has_three_sizes_and_the_common_fields():
    names = [f[:-3] for f in os.listdir(os.path.join(ROOT, "experiments", "configs"))]
    names = [n for n in names if not n.startswith("_") and n != "report"]
    assert "train" in names
    for name in names:
        module = importlib.import_module(f"experiments.configs.{name}")
        for size in common.SIZES:
            config = module.get_config(size)
            assert isinstance(config, ml_collections.ConfigDict)
            assert config.size == size, name
            common_fields = ("dataset", "data_dir", "seed", "num_seeds", "mode", "progress")
            for field in (*common_fields, "tensorboard"):
                assert field in config, (name, field)


def test_report_quick_writes_markdown_html_and_verdicts(tmp_path):
    from experiments import report

    config = importlib.import_module("experiments.configs.report").get_config("quick")
    config.methods = "train"
    out = report.run(config, str(tmp_path))
    md = (tmp_path / "report.md").read_text()
    assert common.SMOKE_STAMP in md and "## Baseline training" in md and "![curves.png]" in md
    assert "data:image/png;base64," in (tmp_path / "report.html").read_text()
    assert out["methods"]["train"]["smoke"]
    config.methods = "train,nonsense"
    with pytest.raises(ValueError, match="nonsense"):
        report.run(config, str(tmp_path / "x"))


def test_readme_results_are_generated_from_published_results():
    from experiments import report

    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    published = report.published_results()
    assert report.render_readme(text, published) == text, (
        "README result blocks differ from experiments/results/*.json; "
        "run `python -m experiments.report --publish`"
    )
    for name in published:
        assert f"<!-- results:{name} -->" in text, f"README has no block for {name}"


def test_second_run_in_a_locked_workdir_fails_at_once(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from experiments import common; "
         f"common.start(common.base_config('quick'), {str(tmp_path)!r}); "
         "print('locked', flush=True); time.sleep(60)"],
        cwd=ROOT, env=_env(), stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        second = _cli(f"--workdir={tmp_path}", "--config=experiments/configs/train.py:quick")
        assert second.returncode != 0
        assert f"workdir {os.path.realpath(tmp_path)} is in use by process" in second.stderr
        assert not (tmp_path / "arms").exists()
    finally:
        holder.kill()
        holder.wait()


def test_two_process_run_matches_one_process(tmp_path):
    """``--distributed`` with two local processes (gloo) gives the single-process numbers."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [
        "--config=experiments/configs/train.py:quick", "--config.dataset=digits",
        "--config.model=mlp", "--config.mode=sharded", "--config.steps=6",
    ]  # fmt: skip
    single = _cli(f"--workdir={tmp_path / 'one'}", *args)
    assert single.returncode == 0, single.stderr[-3000:]
    env = dict(_env(), JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
               JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo")  # fmt: skip
    cmd = [sys.executable, "-m", "experiments.train", "--distributed",
           f"--workdir={tmp_path / 'two'}", *args]  # fmt: skip
    procs = [
        subprocess.Popen(cmd, cwd=ROOT, env=dict(env, JAX_PROCESS_ID=str(i)),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)
    ]  # fmt: skip
    try:
        outs = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    one = common.read_json(str(tmp_path / "one" / "results.json"))
    two = common.read_json(str(tmp_path / "two" / "results.json"))
    (row_one,), (row_two,) = (r["tables"]["mlp on digits"]["rows"] for r in (one, two))
    np.testing.assert_allclose(
        [c[0] for c in row_two[1:]], [c[0] for c in row_one[1:]], rtol=1e-4, atol=1e-5
    )
