from .simzss import SimZSS
from .zero_shot_segmentor import OCZeroShotSegmentor, calibrate, semantic_inference, sliding_windows

__all__ = ["OCZeroShotSegmentor", "SimZSS", "calibrate", "semantic_inference", "sliding_windows"]
