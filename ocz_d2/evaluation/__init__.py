"""Evaluation of zero-shot semantic segmentation (seen / unseen / harmonic mIoU)."""

from .zero_shot_evaluation import (
    CONFUSION_FILE_NAME,
    METRICS_FILE_NAME,
    ZeroShotSemSegEvaluator,
    accumulate_confusion,
    build_zero_shot_evaluator,
    class_map,
    compute_zero_shot_metrics,
    format_zero_shot_tables,
    harmonic_mean,
)

__all__ = [
    "CONFUSION_FILE_NAME",
    "METRICS_FILE_NAME",
    "ZeroShotSemSegEvaluator",
    "accumulate_confusion",
    "build_zero_shot_evaluator",
    "class_map",
    "compute_zero_shot_metrics",
    "format_zero_shot_tables",
    "harmonic_mean",
]
