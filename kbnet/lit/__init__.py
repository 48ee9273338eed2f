"""Lightning side of KBNet: the shared training recipe, one module per task, schedules and callbacks."""

from kbnet.lit.base import NonFiniteGradientError, RestorationModule
from kbnet.lit.schedule import ProgressiveSchedule, cosine_restart_lr, lr_lambda, scaled_boundaries
from kbnet.lit.tasks import DeblurModule, DenoiseModule, DerainModule, GaussianDenoiseModule

__all__ = [
    "DeblurModule",
    "DenoiseModule",
    "DerainModule",
    "GaussianDenoiseModule",
    "NonFiniteGradientError",
    "ProgressiveSchedule",
    "RestorationModule",
    "cosine_restart_lr",
    "lr_lambda",
    "scaled_boundaries",
]
