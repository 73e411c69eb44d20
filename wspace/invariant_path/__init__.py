"""Functionally invariant paths: move weights towards a second goal without changing the function.

Raghavan & Thomson (2022/2024), "Engineering flexible machine learning systems
by traversing functionally invariant paths in weight space", arXiv 2205.00334.
Weight space is given the metric ``g(w) = J(w)^T J(w)`` pulled back from the
network's outputs on anchor inputs (the old task's inputs): a move ``dw``
changes those outputs by ``|J dw|^2 = <dw, g dw>`` to first order. Each path
step minimises ``<dw, g dw> - beta <grad L2, dw>`` over a bounded step, i.e.

    dw  proportional to  -(g + lambda I)^{-1} grad L2,

which follows a secondary objective ``L2`` (a new task, sparsity, adversarial
robustness) through the directions the anchor outputs are blind to.

This module gives both formulations:

* `scale_by_invariant_metric` -- the metric step as an optax preconditioner, and
  the alias `invariant_path(learning_rate, apply_fn, ...)` = that plus
  ``optax.scale_by_learning_rate``. It solves ``(g + lambda I) d = grad`` by
  `conjugate_gradients` (also under `jax.vmap`) to a stated tolerance with
  matrix-free products (`metric_matvec`: one `jax.linearize` per step at
  ``Precision.HIGHEST``, reused by every CG iteration, and its transpose), records
  the residual in its state and warns when a solve ends unconverged. The default
  metric is the softmax Fisher ``J^T (diag p - p p^T) J / N`` (4x the Hessian of the Bhattacharyya
  distance the official code uses); ``metric="jacobian"`` is the Euclidean
  ``J^T J / N`` on the logits. The anchor inputs come as the keyword extra
  argument ``anchors=``.
* `penalty_loss` -- the official code's formulation
  (Guruprasad93/FlexibleMachineLearning): add ``weight * D(f(w0; x_a), f(w; x_a))``
  (Bhattacharyya or KL between softmax outputs, `output_distance`) to any loss.
  This is what the official code runs for continual learning (replay of stored
  inputs with a Bhattacharyya distillation term, plain SGD); the metric step is
  the paper's stated algorithm, which that code does not run.

Secondary objectives: the new task's loss (`wspace.training.classification_loss`
on new-task batches), `sparsity_loss` (distance to the magnitude projection of
the weights, from `wspace.pruning`) and `adversarial_loss` (the loss on `fgsm`
or `pgd` inputs). For the continual-learning baseline the package also has the
EWC penalty of Kirkpatrick et al. (2017), arXiv 1612.00796: `diagonal_fisher`,
`ewc_loss`.

Layout: `_metric` (the path step and the penalty form), `_objectives` (the secondary
objectives and the EWC baseline, on `wspace.pruning`), `_checks` (argument checks).
Every public name is re-exported here: ``ws.invariant_path.fgsm`` etc.

The network is always given as a closure ``apply_fn(params, x) -> outputs``.
For a flax model without state: ``lambda p, x: model.apply({"params": p}, x)``.
For a BatchNorm model close over the statistics in eval mode:
``lambda p, x: model.apply({"params": p, **model_state}, x, train=False)``
(the metric then treats the running statistics as constants).
"""

from wspace.invariant_path._metric import (
    DISTANCES,
    METRICS,
    ScaleByInvariantMetricState,
    conjugate_gradients,
    invariant_path,
    metric_matvec,
    output_distance,
    penalty_loss,
    scale_by_invariant_metric,
)
from wspace.invariant_path._objectives import (
    ATTACKS,
    adversarial_loss,
    diagonal_fisher,
    ewc_loss,
    fgsm,
    pgd,
    projection_distance,
    sparsity_loss,
)

__all__ = [
    "ATTACKS",
    "DISTANCES",
    "METRICS",
    "ScaleByInvariantMetricState",
    "adversarial_loss",
    "conjugate_gradients",
    "diagonal_fisher",
    "ewc_loss",
    "fgsm",
    "invariant_path",
    "metric_matvec",
    "output_distance",
    "penalty_loss",
    "pgd",
    "projection_distance",
    "scale_by_invariant_metric",
    "sparsity_loss",
]
