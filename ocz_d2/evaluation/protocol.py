"""The honest evaluation protocol: test-time choices tuned on validation data, numbers on test.

The calibration gamma (subtracted from seen-class scores) trades seen against unseen accuracy, and
the best value differs between models. :func:`tuned_test` picks it on ``DATASETS.VAL`` from
``MODEL.OCZ.TEST.CALIBRATION_GRID`` (highest hIoU; ties go to the smaller gamma) and evaluates
``DATASETS.TEST`` once with it, through the same evaluator as ``train_net.py --eval-only``. A
transductive model is evaluated without calibration (gamma 0, nothing tuned).

It runs in the processes of a run (``train_net.py --tuned-test``, after training or with
``--eval-only``): with several, each evaluates its share of the images and the main process
gathers the counts, chooses, and tells the others.

A SimZSS model has no calibration (its training saw no mask, seen or unseen: gamma stays 0); with
the background rule "threshold" (``MODEL.SIMZSS.TEST.BACKGROUND``) and a validation split that
has the background class, its threshold is chosen on val instead, from
``MODEL.SIMZSS.TEST.BACKGROUND_THRESHOLD_GRID`` (highest val mIoU; ties go to the smaller one).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from contextlib import contextmanager

import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import inference_context, inference_on_dataset
from detectron2.utils import comm

from ..data.test_loader import build_zero_shot_test_loader
from ..modeling.meta_arch.zero_shot_segmentor import calibrate
from ..utils.errors import ArgumentError
from ..utils.io import atomic_write_json
from .zero_shot_evaluation import ZeroShotSemSegEvaluator, build_zero_shot_evaluator

__all__ = [
    "TUNED_RESULTS_FILE",
    "calibration_sweep",
    "chance_metrics",
    "check_tuned_protocol",
    "pick_calibration",
    "read_tuned_results",
    "tune_background_threshold",
    "tuned_test",
]

logger = logging.getLogger(__name__)

#: Written by :func:`tuned_test` into its output folder.
TUNED_RESULTS_FILE = "tuned_results.json"


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


def _shared(value):
    """``value`` of the main process, in every process of the run."""
    return comm.all_gather(value)[0] if comm.get_world_size() > 1 else value


def _evaluators(dataset_name: str, keys) -> dict:
    """One reset evaluator per key, gathering over the run's processes."""
    distributed = comm.get_world_size() > 1
    evaluators = {k: ZeroShotSemSegEvaluator(dataset_name, distributed=distributed) for k in keys}
    for evaluator in evaluators.values():
        evaluator.reset()
    return evaluators


def _metrics(evaluators: dict) -> dict:
    """``{key: metrics}`` of every evaluator, in every process."""
    with _quiet_evaluator():
        results = {k: e.evaluate() for k, e in evaluators.items()}
    return _shared(
        {k: dict(r["sem_seg"]) for k, r in results.items()} if comm.is_main_process() else None
    )


@torch.no_grad()
def calibration_sweep(cfg, model, dataset_name: str, grid) -> dict[float, dict]:
    """Metrics of ``dataset_name`` for every calibration gamma in ``grid``, from one forward pass.

    The model runs once per image with calibration 0; each gamma is then subtracted from the
    seen-class scores (:func:`calibrate`, the model's own step: a constant shift commutes with
    the bilinear resize that follows it) and scored by its own evaluator. In a run of several
    processes each takes its share of the images, and every process gets the gathered metrics.

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
    evaluators = _evaluators(dataset_name, grid)
    saved = model.calibration
    model.calibration = 0.0
    try:
        with inference_context(model):
            for inputs in build_zero_shot_test_loader(cfg, dataset_name):
                outputs = model(inputs)
                for gamma, evaluator in evaluators.items():
                    shifted = [
                        {"sem_seg": calibrate(o["sem_seg"], seen.to(o["sem_seg"].device), gamma)}
                        for o in outputs
                    ]
                    evaluator.process(inputs, shifted)
    finally:
        model.calibration = saved
    return _metrics(evaluators)


def pick_calibration(sweep: dict[float, dict]) -> float:
    """The gamma with the highest hIoU (NaN counts as lowest); ties go to the smaller gamma."""

    def score(gamma: float) -> tuple[float, float]:
        h = sweep[gamma].get("hIoU", float("nan"))
        return (-math.inf if math.isnan(h) else h, -gamma)

    return max(sweep, key=score)


def check_tuned_protocol(cfg) -> None:
    """Raise unless ``cfg`` names the splits of :func:`tuned_test`: one ``DATASETS.VAL`` to tune
    on, at least one ``DATASETS.TEST`` to report.

    Raises:
        ArgumentError: what is missing, with an example.
    """
    if len(cfg.DATASETS.VAL) != 1:
        raise ArgumentError(
            f"DATASETS.VAL must name exactly one split to tune the calibration on, got "
            f"{tuple(cfg.DATASETS.VAL)}: set it, e.g. DATASETS.VAL \"('ocz_synthetic_val',)\"."
        )
    if not cfg.DATASETS.TEST:
        raise ArgumentError("DATASETS.TEST is empty: name the split(s) to report.")


def tuned_test(cfg, model, output_dir: str | os.PathLike) -> dict:
    """Tune the calibration on ``cfg.DATASETS.VAL``, then evaluate ``cfg.DATASETS.TEST``.

    Called in every process of a run of several (each evaluates its share of the images); all
    get the same result, and the main process writes the files.

    Args:
        cfg: a config with ``DATASETS.VAL`` (exactly one split) and ``DATASETS.TEST``.
        model: the trained model (not wrapped in DistributedDataParallel).
        output_dir: test metrics go to ``<output_dir>/inference/<test>/`` (as with
            ``train_net.py --eval-only``), the summary to ``<output_dir>/tuned_results.json``.

    Returns:
        ``{"calibration": gamma, "val": {dataset: {gamma: metrics}}, "test": {dataset: metrics},
        "seconds": wall-clock seconds}``; and ``"background_threshold"`` where one was tuned.
    """
    check_tuned_protocol(cfg)
    start = time.perf_counter()
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
        folder = os.path.join(output_dir, "inference", name)
        evaluator = build_zero_shot_evaluator(name, folder)
        loader = build_zero_shot_test_loader(cfg, name)
        metrics = inference_on_dataset(model, loader, evaluator).get("sem_seg")
        test[name] = _shared(dict(metrics) if comm.is_main_process() else None)
    result = {
        "calibration": gamma,
        "val": {val: {str(g): m for g, m in sweep.items()}},
        "test": test,
        "seconds": time.perf_counter() - start,
    }
    if threshold is not None:
        result["background_threshold"] = threshold
    if comm.is_main_process():
        path = os.path.join(output_dir, TUNED_RESULTS_FILE)
        atomic_write_json(path, _finite(result), indent=2, allow_nan=False)  # evaluator order
    comm.synchronize()  # the file exists when any process returns
    return result


def read_tuned_results(output_dir: str | os.PathLike) -> dict:
    """The :func:`tuned_test` result written in ``output_dir``, with NaN for the metrics that
    JSON holds as null (a mean over no class)."""
    path = os.path.join(output_dir, TUNED_RESULTS_FILE)
    with open(path, encoding="utf-8") as f:
        result = json.load(f)

    def nan(metrics: dict) -> dict:
        return {k: float("nan") if v is None else v for k, v in metrics.items()}

    result["val"] = {d: {g: nan(m) for g, m in s.items()} for d, s in result["val"].items()}
    result["test"] = {d: nan(m) for d, m in result["test"].items()}
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
    evaluators = _evaluators(dataset_name, grid)
    with inference_context(model):
        for inputs in build_zero_shot_test_loader(cfg, dataset_name):
            outputs = model(inputs)
            for t, evaluator in evaluators.items():
                shifted = []
                for o in outputs:
                    scores = o["sem_seg"].clone()
                    scores[k] = t
                    shifted.append({"sem_seg": scores})
                evaluator.process(inputs, shifted)
    sweep = _metrics(evaluators)
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
