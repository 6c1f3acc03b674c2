from .checkpoint import AtomicCheckpointer
from .optimizer import build_lr_scheduler, build_optimizer, build_param_groups

__all__ = ["AtomicCheckpointer", "build_lr_scheduler", "build_optimizer", "build_param_groups"]
