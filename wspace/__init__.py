"""wspace: a JAX library for weight-space research.

Import it flat: ``import wspace as ws; ws.training.make_train_step(...)``.
"""

from wspace import data, landscape, lottery, models, pruning, training

__all__ = ["data", "models", "training", "landscape", "pruning", "lottery"]
__version__ = "0.1.0"
