#!/usr/bin/env python
"""The embedded demo: zero-shot segmentation of unseen hue x texture combinations, on CPU.

1. generates the synthetic benchmark under $DETECTRON2_DATASETS/ocz_synthetic if absent;
2. trains the tiny model on the seen classes only (tools/train_net.py, CPU);
3. evaluates on the validation split over all classes (seen + unseen) and prints seen / unseen /
   harmonic mIoU next to the chance level;
4. writes a picture of a few validation images (input, ground truth, prediction; unseen classes
   outlined) to the output folder;
5. fails (exit 1) when the unseen mIoU is below twice the chance level.

    python tools/demo.py [--output-dir output/demo] [--config-file ...] [KEY VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling import build_model
from PIL import Image

from ocz_d2 import add_ocz_config
from ocz_d2.data import ZeroShotSemSegDatasetMapper
from ocz_d2.data.synthetic import ensure_synthetic_benchmark
from ocz_d2.engine import AtomicCheckpointer
from ocz_d2.evaluation import compute_zero_shot_metrics
from ocz_d2.utils.visualize import prediction_panel

TOOLS = Path(__file__).resolve().parent
DEFAULT_CONFIG = TOOLS.parent / "configs" / "synthetic" / "ocz_tiny.yaml"
METRICS_FILE = "zero_shot_sem_seg_metrics.json"


def chance_metrics(dataset_name: str, seed: int = 0) -> dict:
    """Metrics of a predictor that draws a uniform random class for every pixel."""
    meta = MetadataCatalog.get(dataset_name)
    k = len(meta.stuff_classes)
    rng = np.random.default_rng(seed)
    conf = np.zeros((k + 1, k + 1), dtype=np.int64)
    for d in DatasetCatalog.get(dataset_name):
        gt = np.asarray(Image.open(d["sem_seg_file_name"]), dtype=np.int64)
        gt[gt == meta.ignore_label] = k
        pred = rng.integers(0, k, size=gt.shape)
        conf += np.bincount((k + 1) * pred.ravel() + gt.ravel(), minlength=(k + 1) ** 2).reshape(
            k + 1, k + 1
        )
    return compute_zero_shot_metrics(
        conf, meta.stuff_classes, seen_classes=meta.seen_classes, unseen_classes=meta.unseen_classes
    )


def write_picture(cfg, weights: str, dataset_name: str, path: Path, num_images: int = 6) -> None:
    model = build_model(cfg)
    AtomicCheckpointer(model).load(weights)
    model.eval()
    meta = MetadataCatalog.get(dataset_name)
    mapper = ZeroShotSemSegDatasetMapper(cfg, False)
    rows = []
    for d in DatasetCatalog.get(dataset_name)[:num_images]:
        sample = mapper(d)
        with torch.no_grad():
            pred = model([sample])[0]["sem_seg"].argmax(0).cpu().numpy()
        image = np.asarray(Image.open(d["file_name"]).convert("RGB"))
        gt = np.asarray(Image.open(d["sem_seg_file_name"]))
        rows.append((image, gt, pred))
    prediction_panel(rows, list(meta.stuff_classes), list(meta.unseen_classes)).save(path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", default=str(DEFAULT_CONFIG))
    parser.add_argument("--output-dir", default="output/demo")
    parser.add_argument("--num-gpus", type=int, default=1, help="processes (CPU: gloo)")
    parser.add_argument(
        "--min-unseen-ratio",
        type=float,
        default=2.0,
        help="fail unless unseen mIoU >= this multiple of the chance level",
    )
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE")
    args = parser.parse_args()

    out = Path(args.output_dir)
    start = time.time()
    root = ensure_synthetic_benchmark()
    data_s = time.time() - start
    print(f"[demo] synthetic benchmark at {root} ({data_s:.1f} s)", flush=True)

    train = [sys.executable, str(TOOLS / "train_net.py"), "--config-file", args.config_file]
    train += ["--num-gpus", str(args.num_gpus), "OUTPUT_DIR", str(out), *args.opts]
    print("[demo] training:", " ".join(train), flush=True)
    subprocess.run(train, check=True)
    train_s = time.time() - start - data_s

    cfg = get_cfg()
    add_ocz_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.MODEL.DEVICE = "cpu"
    dataset = cfg.DATASETS.TEST[0]
    metrics_path = out / "inference" / dataset / METRICS_FILE
    if not metrics_path.is_file():
        print(f"[demo] error: no evaluation results at {metrics_path}", file=sys.stderr)
        return 1
    res = json.loads(metrics_path.read_text())
    chance = chance_metrics(dataset)
    picture = out / "demo_predictions.png"
    write_picture(cfg, str(out / "model_final.pth"), dataset, picture)

    print("\n[demo] zero-shot results on", dataset, "(mIoU %, one prediction over all classes)")
    print(f"  {'':8s} {'seen':>7s} {'unseen':>7s} {'hIoU':>7s}")
    for label, m in (("model", res), ("chance", chance)):
        print(f"  {label:8s} {m['mIoU-seen']:7.1f} {m['mIoU-unseen']:7.1f} {m['hIoU']:7.1f}")
    print(f"[demo] picture: {picture}")
    print(
        f"[demo] total time {time.time() - start:.0f} s (data {data_s:.0f} s, training + "
        f"evaluation {train_s:.0f} s)"
    )
    needed = args.min_unseen_ratio * chance["mIoU-unseen"]
    if res["mIoU-unseen"] < needed:
        print(
            f"[demo] FAILED: unseen mIoU {res['mIoU-unseen']:.1f} < {args.min_unseen_ratio:g} x "
            f"chance ({needed:.1f}): the model does not transfer to unseen classes",
            file=sys.stderr,
        )
        return 1
    ratio = res["mIoU-unseen"] / max(chance["mIoU-unseen"], 1e-9)
    print(f"[demo] OK: unseen mIoU is {ratio:.1f}x the chance level")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    sys.exit(main())
