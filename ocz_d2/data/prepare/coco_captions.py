"""COCO Captions (2017) as open_clip image-caption CSVs: what ``coco_captions.yaml`` registers.

Input: a COCO folder with ``annotations/captions_{train,val}2017.json`` and the images in
``{train,val}2017/``. Output: ``<out>/{train,val}2017.csv`` (columns ``filepath``, ``caption``),
one row per caption (about 5 per image), image paths relative to the CSV's folder, in the
annotation file's order. The images are not copied.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
from pathlib import Path

from ...utils.io import atomic_write_text, datasets_root
from .common import PrepareError

__all__ = ["cli", "prepare_coco_captions"]

SPLITS = ("train2017", "val2017")


def prepare_coco_captions(
    coco: str | os.PathLike, out: str | os.PathLike, *, splits=SPLITS, check_images: bool = True
) -> dict[str, int]:
    """Write one CSV per split.

    Args:
        coco: the COCO folder (``annotations/`` and the image folders).
        out: output folder (``$DETECTRON2_DATASETS/ocz_coco_captions`` is what the split file
            expects).
        splits: COCO split names.
        check_images: fail when an annotated image file is missing.

    Returns:
        ``{split: rows written}``.

    Raises:
        PrepareError: a missing annotation file or image folder (named), a missing image, an
            annotation without caption.
    """
    coco, out = Path(coco), Path(out)
    counts = {}
    for split in splits:
        annotations = coco / "annotations" / f"captions_{split}.json"
        images = coco / split
        if not annotations.is_file():
            raise PrepareError(
                f"{annotations} does not exist: download COCO's captions annotations"
            )
        if not images.is_dir():
            raise PrepareError(f"{images} does not exist: download and unpack {split}.zip there")
        data = json.loads(annotations.read_text(encoding="utf-8"))
        files = {im["id"]: im["file_name"] for im in data.get("images", [])}
        rows = []
        for ann in data.get("annotations", []):
            caption = " ".join(str(ann.get("caption", "")).split())
            if ann.get("image_id") not in files or not caption:
                raise PrepareError(
                    f"{annotations}: annotation {ann.get('id')} has no image or caption"
                )
            rows.append((images / files[ann["image_id"]], caption))
        if check_images:
            absent = sorted({str(p) for p, _ in rows if not p.is_file()})
            if absent:
                raise PrepareError(
                    f"{len(absent)} image(s) of {split} are missing, e.g. {absent[:3]}"
                )
        out.mkdir(parents=True, exist_ok=True)
        text = io.StringIO()
        writer = csv.writer(text)
        writer.writerow(["filepath", "caption"])
        for path, caption in rows:
            writer.writerow([os.path.relpath(path, out), caption])
        atomic_write_text(out / f"{split}.csv", text.getvalue())
        counts[split] = len(rows)
    return counts


def cli(argv: list[str] | None = None) -> tuple[int, str]:
    """``datasets/prepare_coco_captions.py``: returns (exit code, text to print)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--coco", required=True, help="COCO folder (annotations/, train2017/...)")
    parser.add_argument(
        "--out",
        default=os.path.join(datasets_root(), "ocz_coco_captions"),
        help="output folder (default: $DETECTRON2_DATASETS/ocz_coco_captions)",
    )
    args = parser.parse_args(argv)
    try:
        counts = prepare_coco_captions(args.coco, args.out)
    except PrepareError as e:
        return 1, f"error: {e}"
    return 0, "\n".join(f"{split}: {n} image-caption pairs" for split, n in counts.items())
