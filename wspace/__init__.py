"""wspace: a JAX library for weight-space research.

Import it flat: ``import wspace as ws; ws.training.make_train_step(...)``.
"""

from wspace import data, models, training
from wspace import invariant_path

__all__ = ["data", "models", "training", "invariant_path"]
__version__ = "0.1.0"
