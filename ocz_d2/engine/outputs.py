"""What a segmentation of one image is written as, shared by ``tools/segment.py`` and the web
page (``tools/web_demo.py``): the label PNG, the overlay with its legend, the JSON summary and
the per-class table.

    files = write_segmentation(folder, "photo", "photo.jpg", image, result, predictor)
    # folder/photo_labels.png, folder/photo_overlay.png, folder/photo.json
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..utils.visualize import class_palette, draw_segmentation
from .predictor import SegmentationResult, ZeroShotPredictor

__all__ = [
    "RenderedSegmentation",
    "class_table",
    "label_png_array",
    "render_segmentation",
    "segmentation_summary",
    "write_segmentation",
]


def label_png_array(result: SegmentationResult) -> np.ndarray:
    """The label map as written to ``<name>_labels.png``: [H, W] class indices, uint8 (uint16
    above 256 classes)."""
    dtype = np.uint8 if len(result.vocabulary) <= 256 else np.uint16
    return result.labels.astype(dtype)


def segmentation_summary(
    result: SegmentationResult,
    *,
    input_name: str,
    predictor: ZeroShotPredictor,
    legend: list[int],
    files: dict[str, str],
) -> dict:
    """The JSON summary of one image.

    Args:
        result: the image's segmentation.
        input_name: what the image was (segment.py: its absolute path; the web page: the
            uploaded file's name).
        predictor: the predictor that made ``result`` (weights, mode, calibration, ensemble).
        legend: the class indices listed in the overlay's legend.
        files: the written files, ``{"labels": ..., "overlay": ...}`` (names, not paths).

    Returns:
        ``{"input", "height", "width", "weights", "mode", "segment_clip", "calibration",
        "files", "classes", "legend"}``; per class its index, name, synonyms, pixels, fraction of
        the image, mean score over its pixels (None when absent) and whether it was calibrated.
    """
    total = int(result.labels.size)
    classes = []
    for k, synonyms in enumerate(result.vocabulary.classes):
        score = float(result.class_scores[k])
        classes.append(
            {
                "index": k,
                "name": synonyms[0],
                "synonyms": list(synonyms),
                "pixels": int(result.areas[k]),
                "fraction": int(result.areas[k]) / total,
                "mean_score": None if math.isnan(score) else score,
                "calibrated": bool(k in result.calibrated),
            }
        )
    return {
        "input": input_name,
        "height": int(result.labels.shape[0]),
        "width": int(result.labels.shape[1]),
        "weights": predictor.weights,
        "mode": predictor.mode,
        "segment_clip": predictor.segment_clip,
        "calibration": (
            {"dataset": predictor.calibration, "gamma": predictor.gamma}
            if predictor.calibration
            else None
        ),
        "files": files,
        "classes": classes,
        "legend": [result.vocabulary.names[k] for k in legend],
    }


@dataclass(frozen=True)
class RenderedSegmentation:
    """The pictures of one segmentation.

    Attributes:
        overlay: uint8 RGB, the image with the classes drawn by Detectron2's ``Visualizer`` and
            a legend of the classes present (:func:`~ocz_d2.utils.visualize.draw_segmentation`).
        legend: the class indices in the legend (the classes present, in vocabulary order).
        colors: [K, 3] uint8, each class's colour in the overlay.
    """

    overlay: np.ndarray
    legend: list[int]
    colors: np.ndarray


def render_segmentation(image: np.ndarray, result: SegmentationResult) -> RenderedSegmentation:
    """The overlay and legend of ``result`` on its RGB uint8 ``image`` [H, W, 3]."""
    names = list(result.vocabulary.names)
    overlay, legend = draw_segmentation(image, result.labels, names)
    return RenderedSegmentation(overlay=overlay, legend=legend, colors=class_palette(len(names)))


def class_table(result: SegmentationResult) -> list[tuple[str, float, float]]:
    """(class name, area share in %, mean score) of the classes present, largest first (ties
    in vocabulary order)."""
    total = result.labels.size
    rows = [
        (result.vocabulary.names[k], 100.0 * int(result.areas[k]) / total, result.class_scores[k])
        for k in result.present
    ]
    return sorted(rows, key=lambda row: -row[1])


def write_segmentation(
    folder: str | os.PathLike,
    name: str,
    input_name: str,
    image: np.ndarray,
    result: SegmentationResult,
    predictor: ZeroShotPredictor,
    rendered: RenderedSegmentation | None = None,
) -> dict[str, Path]:
    """Write ``<name>_labels.png``, ``<name>_overlay.png`` and ``<name>.json`` to ``folder``.

    Args:
        folder: an existing folder.
        name: the file-name stem.
        input_name: recorded as the JSON's ``"input"``.
        image: the RGB uint8 image [H, W, 3] that was segmented.
        result, predictor: the segmentation and the predictor that made it.
        rendered: the overlay, when already drawn (:func:`render_segmentation`).

    Returns:
        ``{"labels": path, "overlay": path, "json": path}``.
    """
    folder = Path(folder)
    rendered = rendered or render_segmentation(image, result)
    files = {"labels": f"{name}_labels.png", "overlay": f"{name}_overlay.png"}
    Image.fromarray(label_png_array(result)).save(folder / files["labels"])
    Image.fromarray(rendered.overlay).save(folder / files["overlay"])
    summary = segmentation_summary(
        result, input_name=input_name, predictor=predictor, legend=rendered.legend, files=files
    )
    with open(folder / f"{name}.json", "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    return {
        "labels": folder / files["labels"],
        "overlay": folder / files["overlay"],
        "json": folder / f"{name}.json",
    }
