"""wspace: a JAX library for weight-space research.

Import it flat: ``import wspace as ws; ws.training.make_train_step(...)``.
"""

from wspace import data, invariant_path, landscape, models, pruning, training

__all__ = ["data", "models", "training", "landscape", "pruning", "invariant_path"]
__version__ = "0.1.0"
