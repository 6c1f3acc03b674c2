from .checkpoint import AtomicCheckpointer
from .optimizer import build_lr_scheduler, build_optimizer, build_param_groups
from .trainer import ZeroShotTrainerBase

__all__ = [
    "AtomicCheckpointer",
    "ZeroShotTrainerBase",
    "build_lr_scheduler",
    "build_optimizer",
    "build_param_groups",
]
