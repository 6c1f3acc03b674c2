"""Predictions in TensorBoard during training (``TEST.VIS_PERIOD``).

Every ``TEST.VIS_PERIOD``-th evaluation of a training run (Detectron2's ``EvalHook``: every
``TEST.EVAL_PERIOD`` iterations and at the end) also draws the first ``TEST.VIS_NUM_IMAGES``
images of each ``DATASETS.TEST`` split, input | ground truth | prediction with unseen classes
outlined (:func:`~ocz_d2.utils.visualize.draw_prediction_row`), into Detectron2's event storage
(``storage.put_image``), as Detectron2's own ``VIS_PERIOD`` does for detection; its TensorBoard
writer writes them under ``predictions/<dataset>/<i>`` at the evaluation's iteration.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import detection_utils as utils
from detectron2.evaluation.evaluator import inference_context
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage
from PIL import Image
from torch import nn

from ..data import ZeroShotSemSegDatasetMapper
from ..data.register_zero_shot import ignore_label_of
from ..utils.visualize import draw_prediction_row

__all__ = ["PredictionVisualizer", "vis_tag"]

logger = logging.getLogger(__name__)


def vis_tag(dataset_name: str, index: int) -> str:
    """The event-storage (TensorBoard) name of the ``index``-th picture of a dataset."""
    return f"predictions/{dataset_name}/{index}"


class PredictionVisualizer:
    """Counts a run's evaluations and draws predictions at every ``period``-th one.

    Call :meth:`after_evaluation` after each evaluation (:class:`ZeroShotTrainerBase` does, in
    its ``EvalHook``); only the main process draws.
    """

    def __init__(self, cfg):
        """
        Args:
            cfg: the run's config (``TEST.VIS_PERIOD``, ``TEST.VIS_NUM_IMAGES``,
                ``DATASETS.TEST``; the test mapper's keys).

        Raises:
            ValueError: a negative period or fewer than one image.
        """
        self.period = int(cfg.TEST.VIS_PERIOD)
        self.num_images = int(cfg.TEST.VIS_NUM_IMAGES)
        if self.period < 0 or self.num_images < 1:
            raise ValueError(
                f"TEST.VIS_PERIOD must be >= 0 and TEST.VIS_NUM_IMAGES >= 1, got "
                f"{self.period} and {self.num_images}"
            )
        self.datasets = list(cfg.DATASETS.TEST)
        self.cfg = cfg
        self.evaluations = 0
        self._mapper = None

    def after_evaluation(self, model: nn.Module) -> bool:
        """Count one evaluation; on every ``period``-th, draw (main process). Returns whether
        this evaluation was drawn (never without test datasets)."""
        self.evaluations += 1
        if not self.period or self.evaluations % self.period or not self.datasets:
            return False
        if comm.is_main_process():
            self.draw(model)
        return True

    @torch.no_grad()
    def draw(self, model: nn.Module) -> None:
        """Put the pictures of the current model into the current event storage."""
        model = getattr(model, "module", model)  # DDP: the model itself, on this process only
        if self._mapper is None:
            self._mapper = ZeroShotSemSegDatasetMapper(self.cfg, False)
        storage = get_event_storage()
        with inference_context(model):
            for name in self.datasets:
                meta = MetadataCatalog.get(name)
                unseen = list(meta.get("unseen_classes", []))
                ignore = ignore_label_of(name)
                for i, record in enumerate(DatasetCatalog.get(name)[: self.num_images]):
                    scores = model([self._mapper(record)])[0]["sem_seg"]
                    pred = scores.argmax(0).cpu().numpy()
                    image = utils.read_image(record["file_name"], format="RGB")
                    gt = np.asarray(Image.open(record["sem_seg_file_name"])).astype(np.int64)
                    row = draw_prediction_row(
                        image, gt, pred, list(meta.stuff_classes), unseen, ignore_label=ignore
                    )
                    storage.put_image(vis_tag(name, i), row.transpose(2, 0, 1))
        logger.info(
            "Wrote predictions of %d image(s) of %s to the event storage (evaluation %d)",
            self.num_images, ", ".join(self.datasets), self.evaluations,
        )  # fmt: skip
