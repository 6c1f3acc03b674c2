"""The batched test loader (TEST.IMS_PER_BATCH): every image once, and the metrics of one image
per model call."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from detectron2.evaluation import inference_on_dataset
from detectron2.modeling import build_model

from ocz_d2.config import load_config
from ocz_d2.data import build_zero_shot_test_loader
from ocz_d2.engine import AtomicCheckpointer
from ocz_d2.evaluation import ZeroShotSemSegEvaluator


def _cfg(spread_checkpoint, batch):
    config, opts, weights = spread_checkpoint
    return load_config(config, [*opts, "TEST.IMS_PER_BATCH", batch]), weights


def test_batches_cover_every_image_once(spread_checkpoint, synthetic_benchmark):
    cfg, _ = _cfg(spread_checkpoint, 3)
    loader = build_zero_shot_test_loader(cfg, synthetic_benchmark.val_name)
    batches = list(loader)
    assert [len(b) for b in batches] == [3, 1]  # 4 val images
    names = [s["file_name"] for b in batches for s in b]
    assert len(set(names)) == 4 and all(s["image"].shape[0] == 3 for b in batches for s in b)


def test_a_batch_scores_as_single_images_do(spread_checkpoint, synthetic_benchmark):
    confusion = {}
    for batch in (1, 4):
        cfg, weights = _cfg(spread_checkpoint, batch)
        torch.manual_seed(0)
        model = build_model(cfg)
        AtomicCheckpointer(model).load(weights)
        evaluator = ZeroShotSemSegEvaluator(synthetic_benchmark.val_name, distributed=False)
        loader = build_zero_shot_test_loader(cfg, synthetic_benchmark.val_name)
        inference_on_dataset(model, loader, evaluator)
        confusion[batch] = evaluator.confusion_matrix
    # The same pixels counted, and the same prediction for each (conf[pred, gt]; several
    # classes predicted).
    assert confusion[1].sum() == confusion[4].sum() > 0
    assert np.array_equal(confusion[1], confusion[4])
    assert (confusion[1].sum(axis=1) > 0).sum() >= 3


@pytest.mark.parametrize("batch", [0, -2])
def test_a_batch_below_one_is_refused(spread_checkpoint, synthetic_benchmark, batch):
    cfg, _ = _cfg(spread_checkpoint, batch)
    with pytest.raises(ValueError, match="TEST.IMS_PER_BATCH must be an integer >= 1, got"):
        build_zero_shot_test_loader(cfg, synthetic_benchmark.val_name)
