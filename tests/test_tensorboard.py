"""Predictions in TensorBoard during training (TEST.VIS_PERIOD): a tiny training run in this
process, its event file read back with TensorBoard's own reader."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ocz_d2.config import load_config
from ocz_d2.engine import ZeroShotTrainer
from ocz_d2.engine.tensorboard import PredictionVisualizer, vis_tag
from ocz_d2.utils.visualize import draw_prediction_row

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "synthetic" / "ocz_tiny_attr.yaml"


def _train(data, out: Path, **extra) -> ZeroShotTrainer:
    cfg = load_config(CONFIG, data.tiny_run_overrides(OUTPUT_DIR=str(out), **extra))
    trainer = ZeroShotTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    return trainer


def _images(out: Path) -> dict[str, list]:
    (events,) = out.glob("events.out.tfevents.*")
    acc = EventAccumulator(str(events), size_guidance={"images": 0})
    acc.Reload()
    return {tag: acc.Images(tag) for tag in acc.Tags()["images"]}


def test_pictures_are_written_at_every_vis_period_th_evaluation(synthetic_benchmark, tmp_path):
    data = synthetic_benchmark
    out = tmp_path / "run"
    # evaluations after iterations 2, 4 and 6 (the last one at the end of training); every
    # second one is drawn: the one after iteration 4 (storage iteration 3)
    trainer = _train(
        data, out,
        **{"SOLVER.MAX_ITER": 6, "TEST.EVAL_PERIOD": 2, "TEST.VIS_PERIOD": 2,
           "TEST.VIS_NUM_IMAGES": 2},
    )  # fmt: skip
    assert trainer.prediction_visualizer.evaluations == 3
    images = _images(out)
    assert sorted(images) == [vis_tag(data.val_name, 0), vis_tag(data.val_name, 1)]
    for i in range(2):
        (event,) = images[vis_tag(data.val_name, i)]
        assert event.step == 3
        picture = np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB"))
        # input | ground truth | prediction; 64 px images enlarged 4x, gaps of 4 px
        size = data.image_size * 4
        assert picture.shape == (size, 3 * size + 8, 3)
        record = DatasetCatalog.get(data.val_name)[i]
        image = np.asarray(Image.open(record["file_name"]).convert("RGB"))
        assert np.array_equal(picture[:, :size], np.repeat(np.repeat(image, 4, 0), 4, 1))
        # the ground truth panel is the drawing of the label file
        gt = np.asarray(Image.open(record["sem_seg_file_name"])).astype(np.int64)
        meta = MetadataCatalog.get(data.val_name)
        drawn = draw_prediction_row(image, gt, gt, list(meta.stuff_classes), meta.unseen_classes)
        assert np.array_equal(
            picture[:, size + 4 : 2 * size + 4], drawn[:, size + 4 : 2 * size + 4]
        )


def test_off_by_default_and_on_in_the_miniature(synthetic_benchmark, tmp_path):
    data = synthetic_benchmark
    out = tmp_path / "run"
    trainer = _train(data, out, **{"SOLVER.MAX_ITER": 2, "TEST.VIS_PERIOD": 0})
    assert not hasattr(trainer, "prediction_visualizer") and _images(out) == {}
    assert load_config(REPO / "configs" / "Base-OCZ.yaml").TEST.VIS_PERIOD == 0
    for path in sorted((REPO / "configs" / "synthetic").glob("*.yaml")):
        assert load_config(path).TEST.VIS_PERIOD == 1, path.name


def test_unseen_classes_are_outlined():
    """A 2-class label map, class 1 unseen: its boundary is white in both label panels, and the
    name carries a star in the drawing's text (Visualizer draws it on the region)."""
    image = np.full((16, 16, 3), 100, dtype=np.uint8)
    gt = np.zeros((16, 16), dtype=np.int64)
    gt[4:12, 4:12] = 1
    pred = gt.copy()
    pred[0, 0] = 255  # ignore: not drawn
    row = draw_prediction_row(image, gt, pred, ["seen", "unseen"], [1], min_side=16)
    assert row.shape == (16, 3 * 16 + 8, 3)
    for panel in (row[:, 20:36], row[:, 40:56]):
        assert (panel[4, 4:12] == 255).all() and (panel[11, 4:12] == 255).all()  # outline
        assert not (panel[7, 7] == 255).all()  # the inside keeps its colour


def test_bad_settings_are_named(synthetic_benchmark):
    cfg = load_config(CONFIG, synthetic_benchmark.tiny_run_overrides(**{"TEST.VIS_PERIOD": -1}))
    with pytest.raises(ValueError, match="TEST.VIS_PERIOD must be >= 0"):
        PredictionVisualizer(cfg)


def test_nothing_is_drawn_without_test_datasets(synthetic_benchmark):
    # A report's training runs with DATASETS.TEST "()": its final evaluation draws nothing.
    opts = {"TEST.VIS_PERIOD": 1, "DATASETS.TEST": "()"}
    cfg = load_config(CONFIG, synthetic_benchmark.tiny_run_overrides(**opts))
    visualizer = PredictionVisualizer(cfg)
    assert visualizer.after_evaluation(model=None) is False and visualizer.evaluations == 1
