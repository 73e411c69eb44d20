"""Train state, train/eval steps (jit | sharded | pmap) and the generic `fit` loop.

The two kinds of pure functions meet here (see DESIGN.md):

* A **loss function** has the signature
  ``loss_fn(params, model_state, batch, key) -> (loss, (new_model_state, metrics))``
  where ``model_state`` holds the non-parameter collections (``{"batch_stats": ...}``
  for BatchNorm models, ``{}`` otherwise). `classification_loss` builds one for
  any flax classifier.
* A **gradient estimator** has the shape of `jax.value_and_grad`:
  ``estimator(loss_fn, has_aux=True) -> fn(params, model_state, batch, key)
  -> ((loss, aux), grads)``. Backprop is `jax.value_and_grad` itself; the
  method modules provide others. `make_train_step` takes the estimator as an
  argument, so every method trains through the same step.

Modes: ``jit`` (one device), ``sharded`` (a `jax.sharding.Mesh` over all
devices, batch split along ``data``, params replicated; multi-host after
``jax.distributed.initialize()``), ``pmap`` (the legacy idiom: state
replicated with a leading device axis, gradients ``pmean``-ed). In ``pmap``
mode, BatchNorm normalises with per-device batch statistics (flax's default
without ``axis_name``; the running averages are then ``pmean``-ed) and random
keys are folded with the device index.

Many hosts: start the same script once per host and call
``jax.distributed.initialize()`` before anything else (it reads Slurm's or a TPU pod's
environment; elsewhere pass ``coordinator_address``, ``num_processes``, ``process_id``),
then use ``mode="sharded"``: `fit` gives each process its slice of every global batch,
only process 0 writes the files written once, and orbax coordinates the checkpoints.
tests/test_multihost.py runs two such processes on one machine (gloo CPU collectives).

Layout (every public name is re-exported here, ``ws.training.X``):

* `_state`: `TrainState`, `init_state` and `init_states` (a leading seed axis),
  `seed_slice`, `classification_loss`, `check_learning_rate`, `num_params`.
* `_placement`: the modes (`MODES`, `default_mesh`) and where state and batches live:
  `place_state`, `place_batch`, `unplace_state`.
* `_step`: `make_train_step` (cached on its arguments; `SEED_LOOPS`: how a step covers a
  seed axis), `compile_step` for a custom step body, `TrainStep` (``step.scan`` fuses
  steps), `enable_compilation_cache`.
* `_evaluation`: `evaluate`, `correct_predictions`, `classification_eval` (the default
  ``eval_fn`` of `fit`).
* `_fit`: `fit` (over a `wspace.data.Dataset` or any iterable of batches; evaluation,
  metric writers and checkpoints through `wspace.io`) and `progress_bar`; `_guards`
  holds its argument and finiteness checks, `_workdir` a workdir's run identity and
  metric history on resume.
"""

from wspace.training._evaluation import classification_eval, correct_predictions, evaluate
from wspace.training._fit import fit, progress_bar
from wspace.training._placement import (
    MODES,
    default_mesh,
    place_batch,
    place_state,
    unplace_state,
)
from wspace.training._state import (
    TrainState,
    check_learning_rate,
    classification_loss,
    init_state,
    init_states,
    num_params,
    seed_slice,
)
from wspace.training._step import (
    SEED_LOOPS,
    TrainStep,
    compile_step,
    enable_compilation_cache,
    make_train_step,
)

__all__ = [
    "MODES",
    "SEED_LOOPS",
    "TrainState",
    "TrainStep",
    "check_learning_rate",
    "classification_eval",
    "classification_loss",
    "compile_step",
    "correct_predictions",
    "default_mesh",
    "enable_compilation_cache",
    "evaluate",
    "fit",
    "init_state",
    "init_states",
    "make_train_step",
    "num_params",
    "place_batch",
    "place_state",
    "progress_bar",
    "seed_slice",
    "unplace_state",
]
