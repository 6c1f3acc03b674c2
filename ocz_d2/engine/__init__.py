from .checkpoint import AtomicCheckpointer
from .optimizer import build_lr_scheduler, build_optimizer, build_param_groups
from .predictor import SegmentationResult, ZeroShotPredictor, load_image
from .trainer import ZeroShotTrainer, ZeroShotTrainerBase

__all__ = [
    "AtomicCheckpointer",
    "SegmentationResult",
    "ZeroShotPredictor",
    "ZeroShotTrainer",
    "ZeroShotTrainerBase",
    "build_lr_scheduler",
    "build_optimizer",
    "build_param_groups",
    "load_image",
]
