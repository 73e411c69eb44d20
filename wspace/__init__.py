"""wspace: a JAX library for weight-space research.

Import it flat: ``import wspace as ws; ws.training.make_train_step(...)``.
"""

from wspace import data, late_phase, models, training

__all__ = ["data", "models", "training", "late_phase"]
__version__ = "0.1.0"
