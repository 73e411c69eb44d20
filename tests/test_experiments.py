"""The experiment layer: configs and overrides, the arms x seeds runner, claims and verdicts."""

import importlib
import json
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from experiments import cli, common
from tests.helpers import ROOT, _env, run_experiment


def _config(**fields):
    c = common.base_config("quick")
    c.update(fields)
    return c


def test_run_arms_caches_and_resumes(tmp_path):
    calls = []

    def arm(seeds):  # all seeds at once, as a seed axis trains them
        calls.append(seeds)
        return [{"value": float(s)} for s in seeds]

    config = _config(num_seeds=3, seed=4)
    first = common.run_arms(str(tmp_path), config, {"a": arm})
    assert first == {"a": [{"value": 4.0}, {"value": 5.0}, {"value": 6.0}]} and calls == [[4, 5, 6]]
    os.remove(tmp_path / "arms" / "a" / "seed_5.json")  # as if killed before seed 5 was stored
    again = common.run_arms(str(tmp_path), config, {"a": arm})
    assert again == first and calls == [[4, 5, 6], [5]]


def test_run_arms_rejects_nan_metrics(tmp_path):
    with pytest.raises(FloatingPointError, match="arm 'a' seed 0: metric 'loss' is nan"):
        common.run_arms(str(tmp_path), _config(num_seeds=1), {"a": lambda s: [{"loss": np.nan}]})
    assert not (tmp_path / "arms" / "a" / "seed_0.json").exists()


def test_start_refuses_another_config_and_names_the_field(tmp_path):
    common.start(_config(), str(tmp_path))
    common.run_arms(str(tmp_path), _config(num_seeds=1), {"a": lambda s: [{"v": 1.0}]})
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


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("steps", 0, r"config.steps=0; must be an int >= 1"),
        ("lr", float("inf"), r"config.lr=inf; must be finite and > 0"),
        ("rate", 1.0, r"config.rate=1.0; must be in \[0, 1\)"),
        ("hidden", [], r"config.hidden=\[\]; must be a non-empty list of widths >= 1"),
        ("arms", ["b", "z"], r"config.arms=\['b', 'z'\] \(unknown \['z'\]\)"),
        ("arms", [], r"config.arms=\[\] \(empty\)"),
    ],
)
def test_check_names_the_bad_field(field, value, message):
    config = ml_collections.ConfigDict(dict(steps=3, lr=0.1, rate=0.2, hidden=[8], arms=["a"]))
    rules = dict(counts=("steps",), positive=("lr",), fractions=("rate",), widths=("hidden",))
    common.check(config, subsets={"arms": ("a", "b")}, **rules)  # the good config passes
    config[field] = value
    with pytest.raises(ValueError, match=message):
        common.check(config, subsets={"arms": ("a", "b")}, **rules)


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
    for name in ("config.json", "results.json", "curves.png", "train/mlp/seeds_0/metrics.jsonl"):
        assert (tmp_path / name).exists(), name
    assert results["smoke"] and results["dataset"] == "digits" and results["seeds"] == [0]
    ((_, acc, *_),) = results["tables"]["mlp on digits"]["rows"]
    assert 0.0 <= acc[0] <= 1.0
    with open(tmp_path / "results.json") as f:
        assert json.load(f) == json.loads(json.dumps(results))


def test_tensorboard_is_off_by_default():
    """Logs of every run when asked: `tests/test_config_space.py`."""
    with common.metric_writer(common.base_config("quick"), "unused") as off:
        assert off is None


def _cli(*args):
    cmd = [sys.executable, "-m", "experiments.train", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=_env(), timeout=300)


QUICK = "--config=experiments/configs/train.py:quick"


def _cli_in_process(capsys, *args, name="train"):
    """``cli.cli`` of ``experiments.<name>`` in this process: (exit code, stdout, stderr)."""
    run = importlib.import_module(f"experiments.{name}").run
    code = cli.cli(run, name, [name, *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_overrides_and_rejects_unknown_fields(tmp_path, capsys):
    code, _, err = _cli_in_process(
        capsys, f"--workdir={tmp_path / 'bad'}", QUICK, "--config.learning_rate=0.5"
    )
    assert code == 2 and err.count("\n") == 1, err
    assert "unknown config field 'learning_rate' (did you mean 'lr'?)" in err
    assert not (tmp_path / "bad").exists()
    code, _, err = _cli_in_process(capsys, QUICK, "--config.lr=abc")
    assert code == 2 and err.count("\n") == 1 and "--config.lr=abc" in err, err
    ok = [f"--workdir={tmp_path / 'ok'}", QUICK, "--config.dataset=digits", "--config.steps=4"]
    code, out, err = _cli_in_process(capsys, *ok, "--config.model=mlp")
    assert code == 0, err[-3000:]
    assert out.strip().splitlines()[-1] == f"results: {tmp_path / 'ok' / 'results.json'}"
    with open(tmp_path / "ok" / "config.json") as f:
        config = json.load(f)
    assert config["dataset"] == "digits" and config["steps"] == 4 and config["size"] == "quick"


def test_cli_errors_are_one_line_naming_the_cause(tmp_path, capsys):
    code, _, err = _cli_in_process(
        capsys, f"--workdir={tmp_path / 'foo'}", QUICK, "--config.dataset=foo"
    )
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) <= 10 and "'foo'" in lines[-1], err
    code, _, err = _cli_in_process(capsys, f"--workdir={tmp_path / 'm'}", QUICK, "--config.model=x")
    (line,) = err.strip().splitlines()
    assert code == 1 and line.startswith("train: error: config.model='x'; use one of ('convnet'")
    copied = tmp_path / "my_config.py"  # a copied config file with a misspelt field
    copied.write_text(
        "from experiments.configs import train\n\n\n"
        "def get_config(arg='small'):\n"
        "    c = train.get_config(arg)\n"
        "    c.learning_rate = 0.1\n"
        "    return c\n"
    )
    code, _, err = _cli_in_process(
        capsys, f"--workdir={tmp_path / 'c'}", f"--config={copied}:quick"
    )
    assert code == 2 and err.count("\n") == 1, err
    assert "adds fields this experiment does not have: 'learning_rate' (did you mean 'lr'?)" in err
    assert not (tmp_path / "c").exists()


def test_cli_help_lists_the_fields_with_defaults(capsys):
    code, out, _ = _cli_in_process(capsys, "--help")
    assert code == 0
    fields = dict(line.split(None, 1) for line in out.splitlines() if line.startswith("  "))
    assert fields["lr"] == "0.05" and fields["batch_size"] == "128" and "--workdir" in fields
    code, out, _ = _cli_in_process(capsys, QUICK, "--config.lr=0.5", "--help")
    fields = dict(line.split(None, 1) for line in out.splitlines() if line.startswith("  "))
    assert code == 0 and fields["lr"] == "0.5" and fields["batch_size"] == "32"


@pytest.mark.parametrize(
    "arg, field, expected",
    [
        ("--config.sbn_hidden=64,32", "sbn_hidden", [64, 32]),
        ("--config.hidden=(64,32)", "hidden", [64, 32]),
        ("--config.hidden=[16]", "hidden", [16]),
        ("--config.train_arms=(bin_st,act_st)", "train_arms", ["bin_st", "act_st"]),
        ("--config.sbn_budgets=4", "sbn_budgets", [4]),
    ],
)
def test_list_fields_can_be_overridden(arg, field, expected):
    _, config = cli._parse("straight_through", [arg])
    assert config[field] == expected and config.lr == 3e-3


def test_list_field_with_items_of_the_wrong_type_is_refused():
    with pytest.raises(cli._UsageError, match=r"--config.hidden='64,x': items must be ints"):
        cli._parse("straight_through", ["--config.hidden=64,x"])


def test_failing_checkpoint_write_is_the_last_line(tmp_path, capsys, monkeypatch):
    """A full disk: the run stops with the checkpoint error as the last line printed."""
    import errno

    import orbax.checkpoint as ocp

    def full_disk(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ocp.CheckpointManager, "save", full_disk)
    args = [f"--workdir={tmp_path}", QUICK, "--config.dataset=digits", "--config.model=mlp"]
    code, _, err = _cli_in_process(capsys, *args)
    last = err.strip().splitlines()[-1]
    assert code == 1 and last.startswith("train: error: saving checkpoint step 15 in"), err
    assert "No space left on device" in last


def test_rerun_with_another_lr_starts_over_and_matches_a_fresh_run(tmp_path, monkeypatch):
    """Killed after checkpoint 15 with lr 0.05, rerun in the same workdir with lr 0.1: the
    partial run is moved aside (never resumed) and the results are a fresh lr-0.1 run's."""
    import wspace as ws

    batches = ws.data.batches

    def killed_after_20(*args, **kwargs):
        for i, batch in enumerate(batches(*args, **kwargs)):
            if i == 20:
                raise KeyboardInterrupt
            yield batch

    fields = {"dataset": "digits", "model": "mlp"}
    with monkeypatch.context() as m:
        m.setattr(ws.data, "batches", killed_after_20)
        with pytest.raises(KeyboardInterrupt):
            run_experiment("train", tmp_path / "w", **fields)
    assert os.listdir(tmp_path / "w" / "train" / "mlp" / "seeds_0" / "checkpoints") == ["15"]
    with pytest.warns(
        UserWarning, match=r"\(lr: 0.05 -> 0.1\); its partial state moved to .*stale-"
    ):
        again = run_experiment("train", tmp_path / "w", lr=0.1, **fields)
    (stale,) = [n for n in os.listdir(tmp_path / "w") if n.startswith("stale-")]
    assert os.path.isdir(
        tmp_path / "w" / stale / "train" / "mlp" / "seeds_0" / "checkpoints" / "15"
    )
    fresh = run_experiment("train", tmp_path / "fresh", lr=0.1, **fields)
    assert again["tables"] == fresh["tables"]
    curves = [
        [{k: v for k, v in r.items() if k != "time"} for r in common.read_json(str(d))["curve"]]
        for d in (tmp_path / "w" / "arms" / "mlp" / "seed_0.json",
                  tmp_path / "fresh" / "arms" / "mlp" / "seed_0.json")
    ]  # fmt: skip
    assert curves[0] == curves[1]


def test_ctrl_c_stops_cleanly_and_the_same_command_resumes(tmp_path):
    """SIGINT during training: exit 130, no traceback, a last line saying how to resume;
    the same command then resumes and finishes."""
    import signal
    import time

    cmd = [
        sys.executable, "-m", "experiments.train", f"--workdir={tmp_path}", QUICK,
        "--config.dataset=digits", "--config.model=mlp", "--config.steps=8000",
        "--config.eval_every=400",
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    ckpts = tmp_path / "train" / "mlp" / "seeds_0" / "checkpoints"
    try:
        deadline = time.monotonic() + 240
        while proc.poll() is None and time.monotonic() < deadline:
            if ckpts.is_dir() and any(n.isdigit() for n in os.listdir(ckpts)):
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be interrupted"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines()[-1] == (
        f"interrupted; rerun the same command to resume from the last checkpoint in {tmp_path}"
    )
    again = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "replacing the config" not in again.stderr
    history = common.read_json(str(tmp_path / "arms" / "mlp" / "seed_0.json"))["curve"]
    assert [r["step"] for r in history] == list(range(400, 8001, 400))


def test_every_config_has_three_sizes_and_the_common_fields_and_validates():
    names = [f[:-3] for f in os.listdir(os.path.join(ROOT, "experiments", "configs"))]
    names = [n for n in names if not n.startswith("_") and n not in ("report", "base")]
    assert "train" in names
    for name in names:
        module = importlib.import_module(f"experiments.configs.{name}")
        for size in common.SIZES:
            config = module.get_config(size)
            assert isinstance(config, ml_collections.ConfigDict)
            assert config.size == size, name
            importlib.import_module(f"experiments.{name}").validate(config)  # every size runs
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
    config.jobs = 2  # the method in a child process, as `make demo` runs it: the same results
    child = report.run(config, str(tmp_path / "child"))["methods"]["train"]
    assert json.dumps(child["tables"]) == json.dumps(out["methods"]["train"]["tables"])  # NaNs
    assert (tmp_path / "child" / "train.log").exists()
    config.seed = 3  # a replication on fresh seeds: every method starts at seed 3
    for jobs in (1, 2):
        config.jobs = jobs
        replicated = report.run(config, str(tmp_path / f"seed3_{jobs}"))["methods"]["train"]
        assert replicated["seeds"] == [3]
    for field, bad in (("methods", "train,nonsense"), ("jobs", 0), ("seed", -1)):
        with pytest.raises(ValueError, match=field):
            report.run(
                ml_collections.ConfigDict(config.to_dict() | {field: bad}), str(tmp_path / "x")
            )
    assert not (tmp_path / "x").exists()


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


def test_seeds_by_arm_and_plot_by_arm_draw_each_series_by_arm():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_arm = {
        "a": [{"m": 1.0, "n": {"x": 2.0}}, {"m": 3.0, "n": {"x": 4.0}}],
        "b": [{"m": 5.0, "n": {"x": 6.0}}, {"m": 9.0, "n": {"x": 8.0}}],
    }
    np.testing.assert_array_equal(common.seeds_by_arm(per_arm, ["b", "a"], "m"), [[5, 1], [9, 3]])
    np.testing.assert_array_equal(common.seeds_by_arm(per_arm, ["a"], "n.x"), [[2], [4]])
    fig, ax = plt.subplots()
    common.plot_by_arm(ax, per_arm, {"m": "M", "n.x": "X"})
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a", "b"]
    lines = {c.get_label(): c.lines[0] for c in ax.containers}  # one errorbar set per series
    np.testing.assert_allclose(lines["M"].get_xdata(), [-0.1, 0.9])  # side by side, 0.2 apart
    np.testing.assert_allclose(lines["X"].get_xdata(), [0.1, 1.1])
    np.testing.assert_allclose(lines["M"].get_ydata(), [2.0, 7.0])  # the mean over seeds
    plt.close(fig)
