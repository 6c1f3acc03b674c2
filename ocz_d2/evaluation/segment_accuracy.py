"""How well the frozen CLIP classifies a split's ground-truth segments, route by route.

The test-time segment classification (``MODEL.OCZ.SEGMENT_CLIP``, ZegFormer's ensemble) is only
as good as CLIP's view of a segment, and that depends on the data: crops resized to CLIP's
input suit natural objects, but change the scale of textures. This measures each route and
style on perfect segments (every class present in an image, from its label map), so the choice
rests on CLIP alone, not on a decoder's masks. Nothing is trained: only the model's frozen CLIP
and its class embeddings are used.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.detection_utils import read_image

from ..data.register_zero_shot import ignore_label_of
from ..modeling.segment_classifier import STYLES, SegmentCLIPClassifier

__all__ = ["VARIANTS", "ground_truth_segment_accuracy"]

#: The (route, style) pairs measured: the region route, and the crop route in every style.
VARIANTS = (("region", None), *(("crop", style) for style in STYLES))


def _variant_name(route: str, style: str | None) -> str:
    return route if style is None else f"{route}/{style}"


@torch.no_grad()
def ground_truth_segment_accuracy(
    model, dataset_name: str, input_format: str = "RGB", max_images: int | None = None
) -> dict[str, dict]:
    """Top-1 accuracy of CLIP's class for each ground-truth segment of ``dataset_name``.

    A segment is all pixels of one class in one image (ignore pixels excluded). Each is
    classified against the dataset's class embeddings (the model's ``text_embedder``), without
    the decoder and without calibration.

    Args:
        model: a built :class:`~ocz_d2.modeling.meta_arch.OCZeroShotSegmentor` (its frozen CLIP
            serves the routes).
        dataset_name: a registered zero-shot split with label maps.
        input_format: the model's image format (``cfg.INPUT.FORMAT``).
        max_images: the first N images only (None: all).

    Returns:
        ``{variant: {"all", "seen", "unseen": accuracy %, "segments", "seen_segments",
        "unseen_segments": counts, "per_class": {class name: {"accuracy", "segments"}} for the
        classes with a segment, "predictions": [(image index, true class, predicted)]}}`` for
        the variants ``region``, ``crop/cropmask``, ``crop/crop``, ``crop/mask`` (accuracy NaN
        over no segment).
    """
    meta = MetadataCatalog.get(dataset_name)
    classes = list(meta.stuff_classes)
    unseen = {int(k) for k in meta.get("unseen_classes", [])}
    ignore = ignore_label_of(dataset_name)
    text = model.text_embedder(classes, dataset_name)
    owner = model.clip_model_owner
    classifiers = {
        _variant_name(route, style): SegmentCLIPClassifier(route=route, style=style or "cropmask")
        for route, style in VARIANTS
    }
    for classifier in classifiers.values():
        classifier.check_backbone(owner, text.shape[1])
    predictions: dict[str, list[tuple[int, int, int]]] = {name: [] for name in classifiers}
    dicts = DatasetCatalog.get(dataset_name)
    for index, record in enumerate(itertools.islice(dicts, max_images)):
        label = np.asarray(read_image(record["sem_seg_file_name"]))
        present = [int(k) for k in np.unique(label) if k != ignore and k < len(classes)]
        if not present:
            continue
        image = torch.as_tensor(read_image(record["file_name"], format=input_format).copy())
        image = image.permute(2, 0, 1).float().to(model.device)[None]
        image = model.clip_normalized((image - model.pixel_mean) / model.pixel_std)
        masks = torch.stack([torch.as_tensor(label == k) for k in present])[None].to(image.device)
        keep = torch.ones(masks.shape[:2], dtype=torch.bool, device=image.device)
        for name, classifier in classifiers.items():
            if classifier.route == "region":
                embeds = classifier.region_embeddings(owner, image, masks)
            else:
                embeds = classifier.crop_embeddings(owner, image, masks, keep)
            predicted = (embeds[0].float() @ text.float().t()).argmax(-1).tolist()
            predictions[name] += [(index, k, p) for k, p in zip(present, predicted)]
    return {name: _accuracy(rows, unseen, classes) for name, rows in predictions.items()}


def _accuracy(rows: list[tuple[int, int, int]], unseen: set[int], classes: list[str]) -> dict:
    def percent(subset: list[tuple[int, int, int]]) -> float:
        return 100.0 * sum(t == p for _, t, p in subset) / len(subset) if subset else float("nan")

    seen_rows = [r for r in rows if r[1] not in unseen]
    unseen_rows = [r for r in rows if r[1] in unseen]
    by_class: dict[int, list[tuple[int, int, int]]] = {}
    for row in sorted(rows, key=lambda r: r[1]):  # one pass, classes in index order
        by_class.setdefault(row[1], []).append(row)
    return {
        "all": percent(rows),
        "seen": percent(seen_rows),
        "unseen": percent(unseen_rows),
        "segments": len(rows),
        "seen_segments": len(seen_rows),
        "unseen_segments": len(unseen_rows),
        "per_class": {
            classes[k]: {"accuracy": percent(r), "segments": len(r)} for k, r in by_class.items()
        },
        "predictions": rows,
    }
