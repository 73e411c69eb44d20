"""Runs that never lie: damaged checkpoints, torn or garbled files, raced workdirs, NaN states.

Each test damages files the way a crash, a disk or a second run would, then asserts the
outcome: a fallback to a verified state (bit-identical to an uninterrupted run), or a
one-line error naming the file; never a silent run with different numbers.
"""

import os
import shutil
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import wspace as ws
from tests.helpers import fresh_state

DIM, STEPS = 4096, 20


def _loss(params, model_state, batch, key):
    loss = 0.5 * jnp.sum((params["w"] - batch["b"]) ** 2)
    return loss, (model_state, {"loss": loss})


def _state(tx):
    params = {"w": jnp.zeros(DIM, jnp.float32)}
    return fresh_state(params, tx, jax.random.PRNGKey(0))


TARGETS = np.random.default_rng(0).normal(size=(STEPS, DIM)).astype(np.float32)
TX = optax.sgd(0.1, momentum=0.9)
STEP = ws.training.make_train_step(_loss, TX)


def _fit(workdir=None, data=None, step=STEP, tx=TX, **kw):
    kw = {"num_steps": STEPS, "eval_every": 5, "progress": False, **kw}
    data = ({"b": b} for b in TARGETS) if data is None else data
    return ws.training.fit(_state(tx), step, data, workdir=workdir, **kw)


@pytest.fixture(scope="module")
def reference():
    return _fit()


@pytest.fixture(scope="module")
def run_at_15(tmp_path_factory):
    """A workdir interrupted after step 15: checkpoints at 10 and 15 (max_to_keep=2)."""
    workdir = str(tmp_path_factory.mktemp("run15"))

    def dies():
        for i, b in enumerate(TARGETS):
            if i == 17:
                raise KeyboardInterrupt
            yield {"b": b}

    with pytest.raises(KeyboardInterrupt):
        _fit(workdir, dies())
    assert ws.io.Checkpointer(os.path.join(workdir, "checkpoints")).all_steps() == [10, 15]
    return workdir


def _copy(src, tmp_path):
    dst = str(tmp_path / "w")
    shutil.copytree(src, dst)
    return dst


def _data_files(workdir, step):
    root = os.path.join(workdir, "checkpoints", str(step), "state")
    files = [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs]
    return sorted(files, key=os.path.getsize, reverse=True)


def _resume_or_error(workdir, reference):
    """Resumes; returns "same" (bit-identical to reference), "fallback" or "error"."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            final, _ = _fit(workdir)
        except ws.io.CheckpointError as e:
            assert "\n" not in str(e) and workdir in str(e)
            return "error"
    np.testing.assert_array_equal(np.asarray(final.params["w"]), reference[0].params["w"])
    fell_back = [w for w in caught if "is damaged" in str(w.message)]
    if fell_back:
        assert os.path.join(workdir, "checkpoints", "15") in str(fell_back[0].message)
        return "fallback"
    return "same"


def _flip(path, pos, bit):
    raw = bytearray(open(path, "rb").read())
    raw[pos] ^= 1 << bit
    open(path, "wb").write(bytes(raw))


def test_bit_flips_in_newest_checkpoint_are_caught(run_at_15, reference, tmp_path):
    """Single-bit flips in the largest data file (the compressed array chunks, which orbax
    itself restores without complaint) are all caught by the SHA-256; flips anywhere in
    the state never go unnoticed with different numbers (unused bytes may restore the
    same state)."""
    rng = np.random.default_rng(1)
    in_data, anywhere = [], []
    for trial in range(10):
        workdir = _copy(run_at_15, tmp_path / str(trial))
        files = _data_files(workdir, 15)  # largest first
        path = files[0] if trial < 5 else files[rng.integers(len(files))]
        _flip(path, int(rng.integers(os.path.getsize(path))), int(rng.integers(8)))
        (in_data if trial < 5 else anywhere).append(_resume_or_error(workdir, reference))
    assert set(in_data) <= {"fallback", "error"}, in_data
    assert set(anywhere) <= {"same", "fallback", "error"}, anywhere


@pytest.mark.parametrize("damage", ["truncate", "garble", "delete_integrity"])
def test_damaged_newest_checkpoint_falls_back(run_at_15, reference, tmp_path, damage):
    workdir = _copy(run_at_15, tmp_path)
    step_dir = os.path.join(workdir, "checkpoints", "15")
    if damage == "delete_integrity":
        shutil.rmtree(os.path.join(step_dir, "integrity"))
    else:
        for path in _data_files(workdir, 15):
            size = os.path.getsize(path)
            with open(path, "r+b") as f:
                if damage == "truncate":
                    f.truncate(size // 2)
                else:
                    f.write(np.random.default_rng(0).bytes(size))
    assert _resume_or_error(workdir, reference) == "fallback"
    assert os.path.isdir(os.path.join(workdir, "checkpoints.damaged", "15"))


def test_no_valid_checkpoint_is_one_line_error_naming_the_path(run_at_15, tmp_path):
    workdir = _copy(run_at_15, tmp_path)
    for step in (10, 15):
        for path in _data_files(workdir, step):
            open(path, "wb").close()
    with pytest.raises(ws.io.CheckpointError) as e:
        _fit(workdir)
    assert "\n" not in str(e.value) and "no valid checkpoint in" in str(e.value)
    assert os.path.join(workdir, "checkpoints") in str(e.value)
    assert "delete the directory to start over" in str(e.value)
    shutil.rmtree(os.path.join(workdir, "checkpoints"))  # following the advice
    final, _ = _fit(workdir)
    assert int(final.step) == STEPS


def test_restore_into_another_tree_is_refused_and_keeps_checkpoints(run_at_15, tmp_path):
    workdir = _copy(run_at_15, tmp_path)
    ckpt = ws.io.Checkpointer(os.path.join(workdir, "checkpoints"))
    like = _state(TX).replace(params={"w": jnp.zeros(DIM + 1)})
    with pytest.raises(ValueError, match=rf"holds another tree: .*saved float32\[{DIM}\], given"):
        ckpt.restore(like)
    assert ckpt.all_steps() == [10, 15]
    ckpt.close()


def test_torn_last_metrics_line_is_dropped(run_at_15, reference, tmp_path):
    workdir = _copy(run_at_15, tmp_path)
    path = os.path.join(workdir, "metrics.jsonl")
    with open(path, "a") as f:
        f.write('{"step": 20, "time": 0.1, "batch_lo')  # a crash mid-append
    with pytest.warns(UserWarning, match="torn last line"):
        final, history = _fit(workdir)
    np.testing.assert_array_equal(np.asarray(final.params["w"]), reference[0].params["w"])
    assert [r["step"] for r in ws.io.read_jsonl(path)] == [5, 10, 15, 20]
    assert [r["batch_loss"] for r in history] == [r["batch_loss"] for r in reference[1]]


def test_deleted_metrics_file_resumes_with_a_warning(run_at_15, reference, tmp_path):
    workdir = _copy(run_at_15, tmp_path)
    os.remove(os.path.join(workdir, "metrics.jsonl"))
    with pytest.warns(UserWarning, match="metrics.jsonl is missing"):
        final, history = _fit(workdir)
    np.testing.assert_array_equal(np.asarray(final.params["w"]), reference[0].params["w"])
    assert [r["step"] for r in history] == [20]


def test_damaged_json_files_are_named(run_at_15, tmp_path):
    workdir = _copy(run_at_15, tmp_path)
    with open(os.path.join(workdir, "fit.json"), "w") as f:
        f.write('{"num_steps": 20, "se')
    with pytest.raises(ValueError, match=r"fit.json is not valid JSON \(line 1") as e:
        _fit(workdir)
    assert "\n" not in str(e.value) and "delete" in str(e.value)
    path = os.path.join(workdir, "metrics.jsonl")
    lines = open(path).read().splitlines()
    open(path, "w").write("\n".join([lines[0], "{garbage", *lines[1:]]) + "\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl line 2 is not valid JSON"):
        ws.io.read_jsonl(path)


def test_second_run_in_a_workdir_fails_at_once_and_stale_lock_is_taken_over(tmp_path):
    workdir = str(tmp_path / "w")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from wspace import io\n"
            f"with io.workdir_lock({workdir!r}):\n"
            "    print('locked', flush=True); time.sleep(120)",
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ws.io.WorkdirLockedError, match=f"{workdir} is in use by process"):
            _fit(workdir)
        assert not os.path.exists(os.path.join(workdir, "metrics.jsonl"))
    finally:
        holder.kill()  # dies holding the lock: its pid stays in the lock file
        holder.wait(timeout=30)
    with pytest.warns(UserWarning, match=f"took over the stale lock of process {holder.pid}"):
        _fit(workdir)
    steps = [r["step"] for r in ws.io.read_jsonl(os.path.join(workdir, "metrics.jsonl"))]
    assert steps == [5, 10, 15, 20]


def test_workdir_lock_is_reentrant_in_one_process(tmp_path):
    with ws.io.workdir_lock(str(tmp_path)), ws.io.workdir_lock(str(tmp_path)):
        pass
    assert open(tmp_path / ".lock").read() == ""  # released by the outermost exit
    with ws.io.workdir_lock(str(tmp_path)):
        assert open(tmp_path / ".lock").read().strip() == str(os.getpid())


def test_nan_input_at_first_step_says_there_is_no_good_checkpoint(tmp_path):
    data = ({"b": b * (np.nan if i == 0 else 1)} for i, b in enumerate(TARGETS))
    with pytest.raises(FloatingPointError, match="at step 1; .*there is no good checkpoint"):
        _fit(str(tmp_path), data)


@pytest.mark.parametrize("where", ["params", "opt_state"])
def test_nan_state_is_never_checkpointed(tmp_path, where):
    """Update 10 poisons the params (or only the optimizer state); its loss is finite."""

    def poison_state():
        def init(params):
            return {"count": jnp.zeros((), jnp.int32), "acc": jnp.zeros(())}

        def update(updates, state, params=None):
            bad = state["count"] == 9
            acc = jnp.where(bad & (where == "opt_state"), jnp.nan, 0.0)
            scale = jnp.where(bad & (where == "params"), jnp.nan, 1.0)
            updates = jax.tree.map(lambda u: u * scale, updates)
            return updates, {"count": state["count"] + 1, "acc": acc}

        return optax.GradientTransformation(init, update)

    tx = optax.chain(optax.sgd(0.1), poison_state())
    step = ws.training.make_train_step(_loss, tx)
    workdir = str(tmp_path)
    with pytest.raises(FloatingPointError, match="after step 10; not checkpointed.*step 5"):
        _fit(workdir, step=step, tx=tx)
    ckpt = ws.io.Checkpointer(os.path.join(workdir, "checkpoints"))
    assert ckpt.all_steps() == [5]
    restored = ckpt.restore(_state(tx))
    ckpt.close()
    leaves = jax.tree.leaves((restored.params, restored.opt_state))
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in leaves)


def test_checkpoints_path_that_is_a_file_fails_at_once(tmp_path):
    (tmp_path / "checkpoints").write_text("not a directory")
    with pytest.raises(ValueError, match=f"{tmp_path}/checkpoints exists and is not a dir"):
        _fit(str(tmp_path))


def test_files_are_0644_under_umask_022_and_stray_temps_are_removed(run_at_15, tmp_path):
    old = os.umask(0o022)
    try:
        workdir = _copy(run_at_15, tmp_path)
        dead = subprocess.run(
            [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
        ).stdout.strip()
        stray = os.path.join(workdir, f".metrics.jsonl.{dead}.abc123.wspace-tmp")
        alive = os.path.join(workdir, f".x.json.{os.getppid()}.abc123.wspace-tmp")
        open(stray, "w").close()
        open(alive, "w").close()
        _fit(workdir)  # rewrites metrics.jsonl atomically on resume
        assert not os.path.exists(stray) and os.path.exists(alive)
        ws.io.write_json(os.path.join(workdir, "x.json"), {"a": np.float32(1.5)})
        assert ws.io.read_json(os.path.join(workdir, "x.json")) == {"a": 1.5}
        with ws.data.atomic_open(os.path.join(workdir, "y.bin"), "wb") as f:
            f.write(b"1")
        fresh = str(tmp_path / "fresh")
        _fit(fresh)
        for d in (workdir, fresh):
            for name in ("metrics.jsonl", "fit.json", "x.json", "y.bin"):
                path = os.path.join(d, name)
                if os.path.exists(path):
                    assert oct(os.stat(path).st_mode & 0o777) == "0o644", path
        ckpt_files = [os.path.join(r, f) for r, _, fs in os.walk(fresh) for f in fs]
        assert {oct(os.stat(p).st_mode & 0o777) for p in ckpt_files} == {"0o644"}
    finally:
        os.umask(old)


def test_saving_an_existing_step_replaces_it(tmp_path):
    ckpt = ws.io.Checkpointer(str(tmp_path / "c"), max_to_keep=1)
    ckpt.save(0, {"a": jnp.zeros(3)})
    ckpt.save(0, {"a": jnp.arange(3.0)})
    np.testing.assert_array_equal(ckpt.restore({"a": jnp.zeros(3)})["a"], [0.0, 1.0, 2.0])
    ckpt.close()


def test_a_failed_first_attempt_does_not_lock_the_workdir_for_the_fix(tmp_path):
    """Typo, then fix: a run that wrote its identity but no checkpoint is replaced."""
    small = _state(TX).replace(params={"w": jnp.zeros(DIM - 1)})
    with pytest.raises(TypeError):  # the wrong shape fails inside the first step
        ws.training.fit(
            small,
            STEP,
            iter([{"b": TARGETS[0]}] * STEPS),
            num_steps=STEPS,
            workdir=str(tmp_path),
            progress=False,
        )
    with pytest.warns(UserWarning, match=r"held another run with no checkpoint \(params"):
        final, _ = _fit(str(tmp_path))
    assert int(final.step) == STEPS


def test_kill_9_mid_run_resumes_bit_identically(reference, tmp_path):
    """A real SIGKILL of a running fit: the rerun takes over the lock, resumes, matches."""
    import signal
    import time

    workdir = str(tmp_path / "killed")
    script = (
        "import time\n"
        "import tests.test_reliability as t\n"
        "def slow():\n"
        "    for b in t.TARGETS:\n"
        "        time.sleep(0.2)\n"
        "        yield {'b': b}\n"
        f"t._fit({workdir!r}, slow(), checkpoint_every=2)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.getcwd()}  # same XLA flags: same numbers
    proc = subprocess.Popen([sys.executable, "-c", script], env=env)
    metrics = os.path.join(workdir, "metrics.jsonl")
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if os.path.exists(metrics) and len(ws.io.read_jsonl(metrics)) >= 2:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    with pytest.warns(UserWarning, match="took over the stale lock"):
        final, history = _fit(workdir, checkpoint_every=2)
    np.testing.assert_array_equal(np.asarray(final.params["w"]), reference[0].params["w"])
    assert [r["batch_loss"] for r in history] == [r["batch_loss"] for r in reference[1]]
    assert not [n for n in os.listdir(workdir) if n.endswith(".wspace-tmp")]


# ----------------------------------------------------------------------------- issue 21


def _stops_after(n):
    """The targets as batches, then a KeyboardInterrupt before batch ``n`` (a kill)."""
    for i, b in enumerate(TARGETS):
        if i == n:
            raise KeyboardInterrupt
        yield {"b": b}


def test_identity_covers_what_the_caller_passes(tmp_path):
    """A run killed after checkpoint 15 with lr 0.1 is not resumed by a rerun with lr 0.2."""
    workdir = str(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        _fit(workdir, _stops_after(17), identity={"lr": 0.1, "hidden": (64, 32)})
    stored = ws.io.read_json(os.path.join(workdir, "fit.json"))["run"]
    assert stored == {"lr": 0.1, "hidden": [64, 32]}
    with pytest.raises(ValueError, match=r"holds another run \(run\.lr: stored 0\.1, given 0\.2"):
        _fit(workdir, identity={"lr": 0.2, "hidden": (64, 32)})
    final, _ = _fit(workdir, identity={"lr": 0.1, "hidden": [64, 32]})  # same: resumes
    assert int(final.step) == STEPS
    shutil.rmtree(workdir)  # following the refusal's advice
    final, _ = _fit(workdir, identity={"lr": 0.2, "hidden": (64, 32)})
    assert int(final.step) == STEPS


def test_divergence_advice_to_start_over_works(reference, tmp_path):
    """lr 1e6, checkpoint every 2 steps: the finite step-2 checkpoint already holds params
    near 1e6 * |b|, so resuming it is no restart; the advice (delete the checkpoints, lower
    the learning rate) is followed and gives exactly a fresh lr-0.1 run."""
    workdir = str(tmp_path)
    tx = optax.sgd(1e6, momentum=0.9)
    step = ws.training.make_train_step(_loss, tx)
    with pytest.raises(FloatingPointError) as e:
        _fit(workdir, step=step, tx=tx, checkpoint_every=2)
    ckpt_dir = os.path.join(workdir, "checkpoints")
    message = str(e.value)
    assert "step 2, is finite but may already be diverging" in message, message
    assert f"delete {ckpt_dir}" in message and "Lower the learning rate" in message
    shutil.rmtree(ckpt_dir)  # following the advice
    final, history = _fit(workdir, checkpoint_every=2)
    np.testing.assert_array_equal(np.asarray(final.params["w"]), reference[0].params["w"])
    assert [r["batch_loss"] for r in history] == [r["batch_loss"] for r in reference[1]]


def test_damaged_fit_json_advice_deletes_only_it_and_resumes(run_at_15, reference, tmp_path):
    workdir = _copy(run_at_15, tmp_path)
    path = os.path.join(workdir, "fit.json")
    with open(path, "w") as f:
        f.write('{"num_steps": 20, "se')
    with pytest.raises(ValueError, match=rf"delete only {path} \(the checkpoints stay valid\)"):
        _fit(workdir)
    os.remove(path)  # following the advice
    final, history = _fit(workdir)
    np.testing.assert_array_equal(np.asarray(final.params["w"]), reference[0].params["w"])
    assert [r["batch_loss"] for r in history] == [r["batch_loss"] for r in reference[1]]


def test_torn_record_of_the_checkpointed_step_is_written_again(run_at_15, reference, tmp_path):
    """Killed while writing step 15's record (checkpoint 15 saved): the resume rewrites it."""
    workdir = _copy(run_at_15, tmp_path)
    path = os.path.join(workdir, "metrics.jsonl")
    raw = open(path, "rb").read().rstrip(b"\n")
    last = raw.rfind(b"\n") + 1
    assert b'"step": 15' in raw[last:]
    open(path, "wb").write(raw[: last + (len(raw) - last) // 2])  # a torn step-15 line
    with pytest.warns(UserWarning, match="torn last line"):
        final, history = _fit(workdir)
    assert [r["step"] for r in history] == [5, 10, 15, 20]
    assert [r["batch_loss"] for r in history] == [r["batch_loss"] for r in reference[1]]
    assert [r["step"] for r in ws.io.read_jsonl(path)] == [5, 10, 15, 20]


def test_failing_checkpoint_write_is_the_error_raised(tmp_path, monkeypatch):
    """A full disk during orbax's save: the CheckpointError names the cause and the
    directory, and closing the checkpointer afterwards does not replace it."""
    import errno

    import orbax.checkpoint as ocp

    def full_disk(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ocp.CheckpointManager, "save", full_disk)
    with pytest.raises(ws.io.CheckpointError) as e:
        _fit(str(tmp_path))
    assert "\n" not in str(e.value)
    assert "saving checkpoint step 5 in" in str(e.value) and "No space left" in str(e.value)


def test_damaged_lottery_level_advice_is_to_delete_the_level(tmp_path):
    from tests.test_lottery import FakeTrainer, _state, _tree_equal

    fake = FakeTrainer()
    dense = ws.lottery.train_dense(_state(), fake, num_steps=6, rewind_step=2)
    arm = str(tmp_path / "arm")
    first = ws.lottery.run_arm("rewind", dense, fake, levels=2, workdir=arm)
    level = os.path.join(arm, "level_01")
    for root, _, files in os.walk(os.path.join(level, "state")):
        for name in files:
            open(os.path.join(root, name), "wb").close()
    for _ in range(2):  # damaged; then with only state/ deleted (the old advice)
        with pytest.raises(ws.io.CheckpointError, match=f"; delete {level} to recompute it"):
            ws.lottery.run_arm("rewind", dense, fake, levels=2, workdir=arm)
        shutil.rmtree(os.path.join(level, "state"), ignore_errors=True)
    shutil.rmtree(level)  # following the advice
    again = ws.lottery.run_arm("rewind", dense, fake, levels=2, workdir=arm)
    for a, b in zip(first, again, strict=True):
        assert _tree_equal(a.params, b.params) and _tree_equal(a.masks, b.masks)


def test_errors_name_the_real_cause(tmp_path):
    x = np.zeros((4, 3), np.float32)
    empty = {"x_train": x[:0], "y_train": np.zeros(0, int), "x_test": x, "y_test": np.arange(4)}
    np.savez(tmp_path / "empty.npz", **empty)
    with pytest.raises(ValueError, match="the train split is empty"):
        ws.data.load(f"npz:{tmp_path / 'empty.npz'}")
    big = np.full((8, 3), 3e38, np.float32) * np.array([1, -1] * 4, np.float32)[:, None]
    ds = ws.data.Dataset("big", big, np.arange(8) % 2, big, np.arange(8) % 2, 2)
    out = ws.data.standardize(ds)  # float32 sums overflow; standardised in float64
    np.testing.assert_allclose(out.x_train[:, 0], [1, -1] * 4, rtol=1e-6)
    with pytest.raises(ValueError, match="learning_rate must be finite and > 0.*-0.1"):
        ws.straight_through.mirror_descent(-0.1)
    with pytest.raises(ValueError, match="learning_rate must be finite and > 0"):
        ws.invariant_path.invariant_path(-0.1, lambda p, x: x)
