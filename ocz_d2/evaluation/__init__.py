"""Evaluation of zero-shot semantic segmentation (seen / unseen / harmonic mIoU)."""

from .zero_shot_evaluation import (
    ZeroShotSemSegEvaluator,
    compute_zero_shot_metrics,
    format_zero_shot_tables,
    harmonic_mean,
)

__all__ = [
    "ZeroShotSemSegEvaluator",
    "compute_zero_shot_metrics",
    "format_zero_shot_tables",
    "harmonic_mean",
]
