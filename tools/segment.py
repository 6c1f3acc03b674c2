#!/usr/bin/env python
"""Open-vocabulary inference: segment images with any list of class names.

    python tools/segment.py --config-file configs/... --input a.jpg b.png \
        --classes "cat, dog, grass" --output out/ [MODEL.WEIGHTS model.pth KEY VALUE ...]

Class names go through the CLIP text encoder of the model (or MODEL.OCZ.TEXT.EMBEDDINGS_FILE
when that file holds every name). For each input it writes ``<name>_seg.png`` (label indices,
0..K-1 in the order given) and ``<name>_vis.png`` (colours, with a legend). No calibration is
applied: nothing is "seen" in an arbitrary vocabulary.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from detectron2.config import get_cfg
from detectron2.data import transforms as T
from detectron2.data.detection_utils import read_image
from detectron2.modeling import build_model
from PIL import Image, ImageDraw

from ocz_d2 import add_ocz_config
from ocz_d2.engine import AtomicCheckpointer
from ocz_d2.utils.visualize import class_palette, colorize


def parse_classes(text: str) -> list[str]:
    names = [c.strip() for c in text.split(",") if c.strip()]
    if not names:
        raise SystemExit("--classes is empty: give comma-separated names, e.g. 'cat, dog, sky'")
    if len(set(names)) != len(names):
        raise SystemExit(f"--classes lists a name twice: {names}")
    return names


def segment(model, image: np.ndarray, names: list[str], min_size: int, max_size: int):
    """[H, W, 3] uint8 RGB -> [H, W] int64 labels over ``names``."""
    height, width = image.shape[:2]
    resized = T.ResizeShortestEdge(min_size, max_size).get_transform(image).apply_image(image)
    tensor = torch.as_tensor(np.ascontiguousarray(resized.transpose(2, 0, 1)))
    sample = {"image": tensor, "height": height, "width": width, "class_names": names}
    with torch.no_grad():
        scores = model([sample])[0]["sem_seg"]
    return scores.argmax(0).cpu().numpy()


def legend_picture(image: np.ndarray, labels: np.ndarray, names: list[str]) -> Image.Image:
    palette = class_palette(len(names))
    blend = (0.4 * image + 0.6 * colorize(labels, palette)).astype(np.uint8)
    canvas = Image.new("RGB", (blend.shape[1], blend.shape[0] + 14 * len(names) + 4), "white")
    canvas.paste(Image.fromarray(blend), (0, 0))
    draw = ImageDraw.Draw(canvas)
    for k, name in enumerate(names):
        y = blend.shape[0] + 2 + 14 * k
        draw.rectangle([4, y + 2, 14, y + 12], fill=tuple(int(c) for c in palette[k]))
        draw.text((18, y), name, fill=(0, 0, 0))
    return canvas


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--input", nargs="+", required=True, help="image files")
    parser.add_argument("--classes", required=True, help="comma-separated class names")
    parser.add_argument("--output", default="output/segment", help="output folder")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE")
    args = parser.parse_args(argv)

    names = parse_classes(args.classes)
    cfg = get_cfg()
    add_ocz_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    if not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cpu"
    if not cfg.MODEL.WEIGHTS:
        print("warning: MODEL.WEIGHTS is empty: the heads are untrained", file=sys.stderr)
    model = build_model(cfg)
    AtomicCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    model.eval()

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    for path in args.input:
        try:
            image = read_image(path, format="RGB")
        except (OSError, ValueError) as e:
            raise SystemExit(f"cannot read image {path}: {e}") from None
        labels = segment(model, image, names, cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)
        stem = Path(path).stem
        Image.fromarray(labels.astype(np.uint8)).save(out / f"{stem}_seg.png")
        legend_picture(image, labels, names).save(out / f"{stem}_vis.png")
        print(f"{path} -> {out / (stem + '_seg.png')}, {out / (stem + '_vis.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
