"""The honest evaluation protocol: test-time choices tuned on validation data, numbers on test.

The calibration gamma (subtracted from seen-class scores) trades seen against unseen accuracy, and
the best value differs between models. :func:`tuned_test` picks it on ``DATASETS.VAL`` from
``MODEL.OCZ.TEST.CALIBRATION_GRID`` (highest hIoU; ties go to the smaller gamma) and evaluates
``DATASETS.TEST`` once with it, through the same evaluator as ``train_net.py --eval-only``. A
transductive model is evaluated without calibration (gamma 0, nothing tuned).

A SimZSS model has no calibration (its training saw no mask, seen or unseen: gamma stays 0); with
the background rule "threshold" (``MODEL.SIMZSS.TEST.BACKGROUND``) and a validation split that
has the background class, its threshold is chosen on val instead, from
``MODEL.SIMZSS.TEST.BACKGROUND_THRESHOLD_GRID`` (highest val mIoU; ties go to the smaller one).
"""

from __future__ import annotations

import logging
import math
import os
from contextlib import contextmanager

import torch
from detectron2.data import DatasetCatalog, MetadataCatalog, build_detection_test_loader
from detectron2.evaluation import inference_context, inference_on_dataset
from detectron2.modeling import build_model

from ..data.dataset_mapper import ZeroShotSemSegDatasetMapper
from ..engine.checkpoint import AtomicCheckpointer
from ..modeling.meta_arch.zero_shot_segmentor import calibrate
from ..utils.io import atomic_write_json
from .zero_shot_evaluation import ZeroShotSemSegEvaluator, build_zero_shot_evaluator

__all__ = [
    "TUNED_RESULTS_FILE",
    "calibration_sweep",
    "chance_metrics",
    "pick_calibration",
    "tune_background_threshold",
    "tuned_test",
]

logger = logging.getLogger(__name__)

#: Written by :func:`tuned_test` into its output folder.
TUNED_RESULTS_FILE = "tuned_results.json"


def _test_loader(cfg, dataset_name: str):
    return build_detection_test_loader(
        cfg, dataset_name, mapper=ZeroShotSemSegDatasetMapper(cfg, False)
    )


@contextmanager
def _quiet_evaluator():
    # One results table per gamma would flood the log; the sweep's summary is logged instead.
    log = logging.getLogger("ocz_d2.evaluation.zero_shot_evaluation")
    level = log.level
    log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        log.setLevel(level)


@torch.no_grad()
def calibration_sweep(cfg, model, dataset_name: str, grid) -> dict[float, dict]:
    """Metrics of ``dataset_name`` for every calibration gamma in ``grid``, from one forward pass.

    The model runs once per image with calibration 0; each gamma is then subtracted from the
    seen-class scores (:func:`calibrate`, the model's own step: a constant shift commutes with
    the bilinear resize that follows it) and scored by its own evaluator.

    Args:
        cfg: the config (test loader settings).
        model: an :class:`OCZeroShotSegmentor` (its ``calibration`` is restored afterwards).
        dataset_name: a registered zero-shot split with seen/unseen classes.
        grid: the gammas to try.

    Returns:
        ``{gamma: metrics}`` (see :func:`~ocz_d2.evaluation.compute_zero_shot_metrics`).
    """
    grid = sorted({float(g) for g in grid})
    if not grid:
        raise ValueError("MODEL.OCZ.TEST.CALIBRATION_GRID is empty: give at least one gamma.")
    seen = torch.as_tensor(MetadataCatalog.get(dataset_name).seen_classes, dtype=torch.long)
    evaluators = {g: ZeroShotSemSegEvaluator(dataset_name, distributed=False) for g in grid}
    for evaluator in evaluators.values():
        evaluator.reset()
    saved = model.calibration
    model.calibration = 0.0
    try:
        with inference_context(model):
            for inputs in _test_loader(cfg, dataset_name):
                outputs = model(inputs)
                for gamma, evaluator in evaluators.items():
                    shifted = [
                        {"sem_seg": calibrate(o["sem_seg"], seen.to(o["sem_seg"].device), gamma)}
                        for o in outputs
                    ]
                    evaluator.process(inputs, shifted)
    finally:
        model.calibration = saved
    with _quiet_evaluator():
        return {g: dict(e.evaluate()["sem_seg"]) for g, e in evaluators.items()}


def pick_calibration(sweep: dict[float, dict]) -> float:
    """The gamma with the highest hIoU (NaN counts as lowest); ties go to the smaller gamma."""

    def score(gamma: float) -> tuple[float, float]:
        h = sweep[gamma].get("hIoU", float("nan"))
        return (-math.inf if math.isnan(h) else h, -gamma)

    return max(sweep, key=score)


def tuned_test(cfg, weights: str, output_dir: str | os.PathLike) -> dict:
    """Tune the calibration on ``cfg.DATASETS.VAL``, then evaluate ``cfg.DATASETS.TEST``.

    Args:
        cfg: a frozen config with ``DATASETS.VAL`` (exactly one split) and ``DATASETS.TEST``.
        weights: the trained model's checkpoint.
        output_dir: test metrics go to ``<output_dir>/inference/<test>/`` (as with
            ``train_net.py --eval-only``), the summary to ``<output_dir>/tuned_results.json``.

    Returns:
        ``{"calibration": gamma, "val": {dataset: {gamma: metrics}}, "test": {dataset: metrics}}``.
    """
    if len(cfg.DATASETS.VAL) != 1:
        raise ValueError(
            f"DATASETS.VAL must name exactly one split to tune the calibration on, got "
            f"{tuple(cfg.DATASETS.VAL)}: set it, e.g. DATASETS.VAL \"('ocz_synthetic_val',)\"."
        )
    if not cfg.DATASETS.TEST:
        raise ValueError("DATASETS.TEST is empty: name the split(s) to report.")
    model = build_model(cfg)
    AtomicCheckpointer(model).load(weights)
    val = cfg.DATASETS.VAL[0]
    # The transductive setting has no calibration at test time (docs/PROTOCOLS.md): no tuning.
    grid = cfg.MODEL.OCZ.TEST.CALIBRATION_GRID
    simzss = cfg.MODEL.META_ARCHITECTURE == "SimZSS"
    if cfg.INPUT.ZERO_SHOT_SETTING == "transductive" or simzss:
        grid = [0.0]
    threshold = None
    if simzss:
        threshold = tune_background_threshold(cfg, model, val)
    sweep = calibration_sweep(cfg, model, val, grid)
    gamma = pick_calibration(sweep)
    for g, m in sweep.items():
        logger.info("%s gamma %.2f: seen %.1f unseen %.1f hIoU %.1f", val, g,
                    m["mIoU-seen"], m["mIoU-unseen"], m["hIoU"])  # fmt: skip
    logger.info("Calibration gamma %.2f chosen on %s (highest hIoU).", gamma, val)
    model.calibration = gamma
    test = {}
    for name in cfg.DATASETS.TEST:
        evaluator = build_zero_shot_evaluator(name, os.path.join(output_dir, "inference", name))
        test[name] = dict(
            inference_on_dataset(model, _test_loader(cfg, name), evaluator)["sem_seg"]
        )
    result = {
        "calibration": gamma,
        "val": {val: {str(g): m for g, m in sweep.items()}},
        "test": test,
    }
    if threshold is not None:
        result["background_threshold"] = threshold
    path = os.path.join(output_dir, TUNED_RESULTS_FILE)
    atomic_write_json(path, _finite(result), indent=2, sort_keys=True, allow_nan=False)
    return result


@torch.no_grad()
def tune_background_threshold(cfg, model, dataset_name: str) -> float | None:
    """Choose a SimZSS model's background threshold on ``dataset_name`` and set it.

    Only with the rule "threshold" and a dataset holding the background class
    (``MODEL.SIMZSS.TEST.BACKGROUND_CLASS``); otherwise nothing is tuned. One forward pass per
    image: the background channel of the scores is the threshold itself, so each candidate just
    replaces it.

    Returns:
        The chosen threshold (highest mIoU; ties go to the smaller), or None when not tuned.
    """
    classes = list(MetadataCatalog.get(dataset_name).stuff_classes)
    if model.background != "threshold" or model.background_class not in classes:
        return None
    grid = sorted({float(t) for t in cfg.MODEL.SIMZSS.TEST.BACKGROUND_THRESHOLD_GRID})
    if not grid:
        raise ValueError("MODEL.SIMZSS.TEST.BACKGROUND_THRESHOLD_GRID is empty: give thresholds.")
    k = classes.index(model.background_class)
    evaluators = {t: ZeroShotSemSegEvaluator(dataset_name, distributed=False) for t in grid}
    for evaluator in evaluators.values():
        evaluator.reset()
    with inference_context(model):
        for inputs in _test_loader(cfg, dataset_name):
            outputs = model(inputs)
            for t, evaluator in evaluators.items():
                shifted = []
                for o in outputs:
                    scores = o["sem_seg"].clone()
                    scores[k] = t
                    shifted.append({"sem_seg": scores})
                evaluator.process(inputs, shifted)
    with _quiet_evaluator():
        sweep = {t: dict(e.evaluate()["sem_seg"]) for t, e in evaluators.items()}
    best = max(grid, key=lambda t: (_or_low(sweep[t].get("mIoU")), -t))
    for t, m in sweep.items():
        logger.info("%s background threshold %.2f: mIoU %.1f", dataset_name, t, m["mIoU"])
    logger.info("Background threshold %.2f chosen on %s (highest mIoU).", best, dataset_name)
    model.background_threshold = best
    return best


def _or_low(value) -> float:
    return -math.inf if value is None or math.isnan(value) else value


def _finite(obj):
    """JSON has no NaN: NaN (a mean over no class) becomes null."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, float) and math.isnan(obj):
        return None
    return obj


def chance_metrics(dataset_name: str, seed: int = 0) -> dict:
    """Metrics of a predictor that draws a uniform random class for every pixel.

    Scored by :class:`ZeroShotSemSegEvaluator` itself on random scores.
    """
    num_classes = len(MetadataCatalog.get(dataset_name).stuff_classes)
    gen = torch.Generator().manual_seed(seed)
    evaluator = ZeroShotSemSegEvaluator(dataset_name, distributed=False)
    evaluator.reset()
    for record in DatasetCatalog.get(dataset_name):
        height, width = record["height"], record["width"]
        scores = torch.rand((num_classes, height, width), generator=gen)
        evaluator.process([record], [{"sem_seg": scores}])
    with _quiet_evaluator():
        return dict(evaluator.evaluate()["sem_seg"])
