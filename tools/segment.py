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
from detectron2.data.detection_utils import read_image
from detectron2.modeling import build_model
from PIL import Image

import ocz_d2
from ocz_d2.config import ConfigError, load_config
from ocz_d2.data import ZeroShotSemSegDatasetMapper
from ocz_d2.engine import AtomicCheckpointer
from ocz_d2.utils.checkout import check_same_checkout
from ocz_d2.utils.visualize import overlay_with_legend


def parse_classes(text: str) -> list[str]:
    names = [c.strip() for c in text.split(",") if c.strip()]
    if not names:
        raise SystemExit("--classes is empty: give comma-separated names, e.g. 'cat, dog, sky'")
    if len(set(names)) != len(names):
        raise SystemExit(f"--classes lists a name twice: {names}")
    return names


def segment(model, mapper: ZeroShotSemSegDatasetMapper, path: str, names: list[str]):
    """Labels [H, W] (int64, indices into ``names``) of the image file ``path``, at its size.

    The mapper applies the test-time resize of the config, as in evaluation.
    """
    sample = mapper({"file_name": path, "class_names": names})
    with torch.no_grad():
        scores = model([sample])[0]["sem_seg"]
    return scores.argmax(0).cpu().numpy()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--input", nargs="+", required=True, help="image files")
    parser.add_argument("--classes", required=True, help="comma-separated class names")
    parser.add_argument("--output", default="output/segment", help="output folder")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE")
    args = parser.parse_args(argv)
    check_same_checkout(__file__, ocz_d2.__file__)

    names = parse_classes(args.classes)
    try:
        cfg = load_config(args.config_file, args.opts)
    except ConfigError as e:
        raise SystemExit(f"config error: {e}") from None
    if not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cpu"
    if not cfg.MODEL.WEIGHTS:
        print("warning: MODEL.WEIGHTS is empty: the heads are untrained", file=sys.stderr)
    model = build_model(cfg)
    AtomicCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    model.eval()
    mapper = ZeroShotSemSegDatasetMapper(cfg, False)

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    for path in args.input:
        try:
            image = read_image(path, format="RGB")
        except (OSError, ValueError) as e:
            raise SystemExit(f"cannot read image {path}: {e}") from None
        labels = segment(model, mapper, path, names)
        stem = Path(path).stem
        Image.fromarray(labels.astype(np.uint8)).save(out / f"{stem}_seg.png")
        overlay_with_legend(image, labels, names).save(out / f"{stem}_vis.png")
        print(f"{path} -> {out / (stem + '_seg.png')}, {out / (stem + '_vis.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
