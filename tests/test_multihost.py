"""Multi-host for real: two local processes joined by `jax.distributed.initialize`.

Each process has one CPU device; they talk through gloo CPU collectives on 127.0.0.1.
Each feeds its slice of the global batch to `wspace.training.fit` in ``sharded`` mode;
the parameters after N steps must match a single-process run, and an interrupted run
must resume from its (orbax, multi-process) checkpoint with metrics written once. Then
two seeds train on a seed axis split over the processes (one seed each), plain and
interrupted + resumed, and must match a single-process seed-axis run.

The workers are this file run as a script (`python tests/test_multihost.py ...`), each
with a timeout, so a hang fails the test instead of hanging CI.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np

from tests.helpers import FAST_COMPILE_FLAGS, _compilation_cache_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_STEPS, BATCH, EVAL_EVERY, DIE_AT = 12, 32, 4, 9
SEEDS = [0, 1]
TIMEOUT_S = 240


def _problem(ws, jax, optax):
    """The same tiny problem in every process: MLP on digits, SGD with momentum."""
    ds = ws.data.load("digits")
    model = ws.models.MLP(features=(16,))
    tx = optax.sgd(0.05, momentum=0.9)
    state = ws.training.init_state(model, tx, ds.x_train[:1], jax.random.PRNGKey(0))
    return ds, model, tx, state, ws.training.classification_loss(model.apply)


class _Interrupt(Exception):
    pass


def _worker(port: int, process_id: int, workdir: str, out: str) -> None:
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=process_id
    )
    import optax
    from jax.flatten_util import ravel_pytree

    import wspace as ws

    assert jax.process_count() == 2 and jax.device_count() == 2, jax.devices()
    ds, model, tx, state, loss_fn = _problem(ws, jax, optax)
    mesh = ws.training.default_mesh()
    step = ws.training.make_train_step(loss_fn, tx, mode="sharded", mesh=mesh)
    kw = dict(
        apply_fn=model.apply,
        num_steps=NUM_STEPS,
        batch_size=BATCH,
        eval_every=EVAL_EVERY,
        mode="sharded",
        mesh=mesh,
        progress=False,
    )
    plain, history = ws.training.fit(state, step, ds, **kw)

    calls = {"n": 0}

    def dies(s, batch, tx_args=None):  # both processes stop at the same step
        calls["n"] += 1
        if calls["n"] == DIE_AT:
            raise _Interrupt
        return step(s, batch, tx_args)

    try:
        ws.training.fit(state, dies, ds, workdir=workdir, **kw)
        raise AssertionError("the interrupted run did not stop")
    except _Interrupt:
        pass
    resumed, resumed_history = ws.training.fit(state, step, ds, workdir=workdir, **kw)
    from jax.experimental import multihost_utils

    with ws.io.workdir_lock(workdir):  # process 0 holds it; on process 1 it is a no-op
        multihost_utils.sync_global_devices("both inside the lock")
    seeded, seeded_resumed = _seed_axis_runs(ws, jax, ds, model, tx, loss_fn, mesh, kw, workdir)
    result = {
        "seeded": seeded,
        "seeded_resumed": seeded_resumed,
        "plain": ravel_pytree(jax.device_get(plain.params))[0].tolist(),
        "resumed": ravel_pytree(jax.device_get(resumed.params))[0].tolist(),
        "step": int(resumed.step),
        "history": history,
        "resumed_history": resumed_history,
    }
    with open(out, "w") as f:
        json.dump(result, f)


def _seed_axis_runs(ws, jax, ds, model, tx, loss_fn, mesh, kw, workdir):
    """Two seeds split over the two processes (one each): plain, then killed and resumed."""
    from jax.experimental import multihost_utils
    from jax.flatten_util import ravel_pytree

    states = ws.training.init_states(model, tx, ds.x_train[:1], SEEDS)
    step = ws.training.make_train_step(loss_fn, tx, mode="sharded", mesh=mesh, seed_axis=True)
    kw = dict(kw, seed=SEEDS)
    plain, _ = ws.training.fit(states, step, ds, **kw)
    assert not plain.params["Dense_0"]["kernel"].is_fully_addressable  # one seed per process

    class Dies:  # a seed-axis step that stops both processes at the same step
        seed_axis, calls = True, 0

        def __call__(self, s, batch, tx_args=None):
            Dies.calls += 1
            if Dies.calls == DIE_AT:
                raise _Interrupt
            return step(s, batch, tx_args)

    try:
        ws.training.fit(states, Dies(), ds, workdir=workdir + "_seeds", **kw)
        raise AssertionError("the interrupted run did not stop")
    except _Interrupt:
        pass
    resumed, _ = ws.training.fit(states, step, ds, workdir=workdir + "_seeds", **kw)

    def flat(params):
        full = multihost_utils.process_allgather(params, tiled=True)
        return [ravel_pytree(ws.training.seed_slice(full, i))[0].tolist() for i in range(2)]

    return flat(plain.params), flat(resumed.params)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_workers(tmp_path):
    port, workdir = _free_port(), str(tmp_path / "run")
    env = {
        **os.environ,
        "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=1 " + FAST_COMPILE_FLAGS,
        **_compilation_cache_env(),
    }
    procs = []
    for i in range(2):
        out = str(tmp_path / f"out{i}.json")
        log = open(tmp_path / f"log{i}.txt", "w")  # noqa: SIM115 -- closed below
        cmd = [sys.executable, __file__, str(port), str(i), workdir, out]
        procs.append((subprocess.Popen(cmd, env=env, stdout=log, stderr=log), out, log))
    try:
        for p, _, _ in procs:
            p.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pass
    finally:
        for p, _, log in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
            log.close()
    logs = [open(tmp_path / f"log{i}.txt").read()[-3000:] for i in range(2)]
    for (p, _, _), text in zip(procs, logs, strict=True):
        assert p.returncode == 0, (
            f"worker exited {p.returncode} (killed after {TIMEOUT_S} s if -9):\n{text}"
        )
    results = []
    for _, out, _ in procs:
        with open(out) as f:
            results.append(json.load(f))
    return results, workdir


def test_two_processes_match_one_and_resume(tmp_path):
    import jax
    import optax
    from jax.flatten_util import ravel_pytree

    import wspace as ws

    ds, model, tx, state, loss_fn = _problem(ws, jax, optax)
    step = ws.training.make_train_step(loss_fn, tx)
    reference, ref_history = ws.training.fit(
        state,
        step,
        ds,
        apply_fn=model.apply,
        num_steps=NUM_STEPS,
        batch_size=BATCH,
        eval_every=EVAL_EVERY,
        progress=False,
    )
    ref = np.asarray(ravel_pytree(reference.params)[0])
    assert np.max(np.abs(ref - np.asarray(ravel_pytree(state.params)[0]))) > 1e-2  # trained

    results, workdir = _run_workers(tmp_path)
    for r in results:
        np.testing.assert_allclose(r["plain"], ref, atol=1e-5)
        np.testing.assert_allclose(r["resumed"], ref, atol=1e-5)
        assert r["step"] == NUM_STEPS
        for got, want in zip(r["history"], ref_history, strict=True):
            assert got["step"] == want["step"]
            np.testing.assert_allclose(got["test_loss"], want["test_loss"], rtol=1e-5)
            np.testing.assert_allclose(got["train_accuracy"], want["train_accuracy"], atol=1e-6)
    assert results[0]["resumed"] == results[1]["resumed"]  # replicated: bit-identical
    steps = [r["step"] for r in ws.io.read_jsonl(os.path.join(workdir, "metrics.jsonl"))]
    assert steps == list(range(EVAL_EVERY, NUM_STEPS + 1, EVAL_EVERY))  # written once each
    assert [r["step"] for r in results[0]["resumed_history"]] == steps
    ckpt = ws.io.Checkpointer(os.path.join(workdir, "checkpoints"))
    assert ckpt.all_steps() == [8, 12]
    ckpt.close()

    seeded = ws.training.init_states(model, tx, ds.x_train[:1], SEEDS)
    seed_step = ws.training.make_train_step(loss_fn, tx, seed_axis=True)
    seeded, _ = ws.training.fit(
        seeded, seed_step, ds, apply_fn=model.apply, num_steps=NUM_STEPS, batch_size=BATCH,
        eval_every=EVAL_EVERY, seed=SEEDS, progress=False,
    )  # fmt: skip
    for i in range(len(SEEDS)):
        want = np.asarray(ravel_pytree(ws.training.seed_slice(seeded.params, i))[0])
        for r in results:
            np.testing.assert_allclose(r["seeded"][i], want, atol=1e-5)
            np.testing.assert_allclose(r["seeded_resumed"][i], want, atol=1e-5)


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
