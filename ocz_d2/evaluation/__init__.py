"""Evaluation of zero-shot semantic segmentation (seen / unseen / harmonic mIoU).

The evaluator is imported here. Two submodules build on the engine (which imports this package)
and are imported by name: :mod:`ocz_d2.evaluation.protocol` (test-time choices tuned on
validation data, numbers on test) and :mod:`ocz_d2.evaluation.report` (multi-seed reports with
paired differences).
"""

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
