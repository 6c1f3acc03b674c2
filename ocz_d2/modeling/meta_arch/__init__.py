from .zero_shot_segmentor import OCZeroShotSegmentor, calibrate, semantic_inference, sliding_windows

__all__ = ["OCZeroShotSegmentor", "calibrate", "semantic_inference", "sliding_windows"]
