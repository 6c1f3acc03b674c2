"""The test loader: Detectron2's, with ``TEST.IMS_PER_BATCH`` images per model call.

Detectron2 v0.6 evaluates one image per call. The zero-shot models run the images of one size in
one forward, each at its own size (no padding to a common size), so a batch changes a prediction
only by float rounding. On a CPU a batch pays: the miniature's tuned protocol took 0.76x the time
in batches of ten with one thread, 0.64x with two (RESULTS.md).
"""

from __future__ import annotations

import torch.utils.data as torchdata
from detectron2.data import DatasetFromList, MapDataset, get_detection_dataset_dicts
from detectron2.data.build import trivial_batch_collator
from detectron2.data.samplers import InferenceSampler

from .dataset_mapper import ZeroShotSemSegDatasetMapper

__all__ = ["build_zero_shot_test_loader"]


def build_zero_shot_test_loader(cfg, dataset_name: str) -> torchdata.DataLoader:
    """Batches of ``cfg.TEST.IMS_PER_BATCH`` mapped test samples of ``dataset_name`` (lists of
    dicts), every image once over all processes (Detectron2's ``InferenceSampler``: process ``r``
    of ``W`` takes a contiguous share).

    Raises:
        ValueError: ``TEST.IMS_PER_BATCH`` below 1.
    """
    batch = cfg.TEST.IMS_PER_BATCH
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"TEST.IMS_PER_BATCH must be an integer >= 1, got {batch!r}.")
    dicts = get_detection_dataset_dicts([dataset_name], filter_empty=False)
    dataset = MapDataset(
        DatasetFromList(dicts, copy=False), ZeroShotSemSegDatasetMapper(cfg, False)
    )
    return torchdata.DataLoader(
        dataset,
        batch_size=batch,
        sampler=InferenceSampler(len(dataset)),
        num_workers=cfg.DATALOADER.NUM_WORKERS,
        collate_fn=trivial_batch_collator,
    )
