"""Throughput of the data side: the config's train loader (on the dataset's files, or on
stand-in files in its formats, :mod:`ocz_d2.benchmark.stand_in`) and the evaluator.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Sequence

import numpy as np
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog, build_detection_train_loader

from ..constants import OBJECT_MAP_KEY
from ..data.dataset_mapper import ZeroShotSemSegDatasetMapper
from ..data.object_maps import guide_record
from ..data.register_zero_shot import ignore_label_of, unregister_zero_shot_split
from ..evaluation import ZeroShotSemSegEvaluator, accumulate_confusion, class_map
from .measure import BenchmarkSettings, time_runs
from .stand_in import register_stand_in_split, stand_in_format, write_stand_in_split

__all__ = ["evaluator_throughput", "loader_throughput"]

logger = logging.getLogger(__name__)


def loader_throughput(
    cfg,
    batches: int,
    *,
    stand_in: int = 0,
    stand_in_size: tuple[int, int] = (500, 375),
    seed: int = 0,
) -> dict:
    """Images/s of the config's train loader (as the trainer builds it) over ``batches``
    batches after the first, and per loader worker (``images_per_s / max(1, NUM_WORKERS)``).

    When the first train dataset's files are missing: {"available": False, "reason"}, or, with
    ``stand_in`` > 0, the loader timed on ``stand_in`` stand-in pairs of ``stand_in_size``
    (width, height) in the dataset's formats (:func:`_stand_in_loader`, ``"stand_in": True``).
    """
    name = cfg.DATASETS.TRAIN[0]
    try:
        DatasetCatalog.get(name)
    except FileNotFoundError as e:
        if stand_in <= 0:
            return {"available": False, "reason": str(e)}
        return _stand_in_loader(cfg, batches, stand_in, stand_in_size, seed, missing=str(e))
    return {"available": True, "stand_in": False, **_time_loader(cfg, batches)}


def _time_loader(cfg, batches: int) -> dict:
    """Time the train loader of ``cfg`` as the trainer builds it (:func:`loader_throughput`)."""
    loader = build_detection_train_loader(cfg, mapper=ZeroShotSemSegDatasetMapper(cfg, True))
    batches_iter = iter(loader)
    start = time.perf_counter()
    next(batches_iter)  # worker start-up
    first = time.perf_counter() - start
    images = 0
    start = time.perf_counter()
    for _ in range(batches):
        images += len(next(batches_iter))
    seconds = time.perf_counter() - start
    del batches_iter, loader  # stops the workers
    workers = int(cfg.DATALOADER.NUM_WORKERS)
    return {
        "dataset": cfg.DATASETS.TRAIN[0],
        "num_workers": workers,
        "batch": cfg.SOLVER.IMS_PER_BATCH,
        "first_batch_s": first,
        "images_per_s": images / seconds,
        "images_per_s_per_worker": images / seconds / max(1, workers),
    }


def _uses_object_maps(cfg, dataset_name: str) -> int:
    """n_o of the object maps a stand-in of ``dataset_name`` carries (0: none): the dataset's
    own maps, or, for a model with object prompts, the precomputed maps that train without the
    online guide (``tools/precompute_object_maps.py``)."""
    objects = cfg.MODEL.OCZ.OBJECTS
    num = int(objects.NUM) if objects.PROMPTS else 0
    roots = MetadataCatalog.get(dataset_name).get("extra_label_roots", None) or {}
    if OBJECT_MAP_KEY in roots:
        return max(num, 1)
    return num


def _stand_in_loader(
    cfg, batches: int, num_images: int, size: tuple[int, int], seed: int, *, missing: str
) -> dict:
    """:func:`_time_loader` on stand-in files of the first train dataset, written to a
    temporary folder, registered with its metadata as ``<name>_stand_in`` and removed after."""
    real = cfg.DATASETS.TRAIN[0]
    num_objects = _uses_object_maps(cfg, real)
    record = None
    if num_objects:
        try:
            record = guide_record(cfg)  # the record the model checks maps against
        except (OSError, ValueError) as e:
            logger.warning("stand-in object maps: no guide record (%s)", e)
    image_ext, label_ext = stand_in_format(real)
    root = tempfile.mkdtemp(prefix="ocz_loader_stand_in_")
    name = None
    try:
        files = write_stand_in_split(
            os.path.join(root, real),
            num_images,
            num_classes=len(MetadataCatalog.get(real).stuff_classes),
            size=size,
            image_ext=image_ext,
            label_ext=label_ext,
            num_objects=num_objects,
            object_map_record=record,
            seed=seed,
        )
        logger.info(
            "%s is missing: %d stand-in images of %dx%d (%.0f KB each%s) written in %.1f s",
            real,
            num_images,
            *files.size,
            files.mean_image_kb,
            f", object maps of {num_objects} regions" if num_objects else "",
            files.seconds,
        )
        name = register_stand_in_split(f"{real}_stand_in", real, files)
        stand_in_cfg = cfg.clone()
        stand_in_cfg.defrost()
        stand_in_cfg.DATASETS.TRAIN = (name,)
        stand_in_cfg.freeze()
        timing = _time_loader(stand_in_cfg, batches)
    finally:
        if name is not None:
            unregister_zero_shot_split(name)
        shutil.rmtree(root, ignore_errors=True)
    return {
        "available": True,
        "stand_in": True,
        **timing,
        "stands_in_for": real,
        "missing": missing,
        "stand_in_images": num_images,
        "stand_in_size": list(files.size),
        "stand_in_image_format": files.image_ext,
        "stand_in_mean_image_kb": files.mean_image_kb,
        "stand_in_object_maps": num_objects,
        "stand_in_root": root,
    }


def evaluator_throughput(dataset_name: str, settings: BenchmarkSettings) -> dict:
    """Pixels/s of :class:`ZeroShotSemSegEvaluator`'s ``process`` on random [K, H, W] scores
    (label checks, per-pixel argmax, confusion counting), of the argmax alone
    (:func:`class_map`), and of the counting alone (:func:`accumulate_confusion` on the argmax),
    each the median over ``repeats`` batches."""
    num_classes = len(MetadataCatalog.get(dataset_name).stuff_classes)
    ignore = ignore_label_of(dataset_name)
    g = torch.Generator().manual_seed(settings.seed)
    shape = (settings.batch, settings.size, settings.size)
    labels = torch.randint(0, num_classes, shape, generator=g)
    labels[:, ::7] = ignore
    scores = [torch.rand((num_classes, *shape[1:]), generator=g) for _ in range(len(labels))]
    evaluator = ZeroShotSemSegEvaluator(dataset_name, distributed=False)
    evaluator.reset()
    inputs = [{"sem_seg": label} for label in labels]
    outputs = [{"sem_seg": s} for s in scores]
    cpu = torch.device("cpu")
    process = time_runs(lambda: evaluator.process(inputs, outputs), settings, cpu)
    argmax = time_runs(lambda: [class_map(s) for s in scores], settings, cpu)
    pairs = [(class_map(s).numpy(), label.numpy()) for s, label in zip(scores, labels)]
    conf = np.zeros((num_classes + 1, num_classes + 1), dtype=np.int64)

    def accumulate():
        for pred, gt in pairs:
            accumulate_confusion(pred, gt, num_classes=num_classes, ignore_label=ignore, out=conf)

    counting = time_runs(accumulate, settings, cpu)
    pixels = math.prod(shape)

    def rate(seconds: Sequence[float]) -> float:
        return pixels / float(np.median(seconds)) / 1e6

    return {
        "dataset": dataset_name,
        "num_classes": num_classes,
        "mpixels_per_s": rate(process),
        "argmax_mpixels_per_s": rate(argmax),
        "accumulate_mpixels_per_s": rate(counting),
    }
