#!/usr/bin/env python
"""The embedded demo: zero-shot segmentation of unseen hue x texture combinations, on CPU.

1. generates the synthetic benchmark under $DETECTRON2_DATASETS/ocz_synthetic if absent;
2. pretrains the tiny CLIP on the benchmark's image-caption set, which covers all 16 classes
   (cached in ~/.cache/ocz_d2/tiny_clip, keyed by everything that changes the weights), and
   prints its zero-shot accuracy on single-object images;
3. trains the segmentation model on the masks of the seen classes only (tools/train_net.py);
4. tunes the calibration gamma on the val split, evaluates the test split over all classes and
   prints seen / unseen / harmonic mIoU next to the chance level;
5. writes a picture of a few test images (input, ground truth, prediction; unseen classes
   outlined) to the output folder;
6. fails (exit 1) when the unseen mIoU is below --min-unseen-ratio times the chance level.

    python tools/demo.py [--output-dir output/demo] [--config-file ...] [KEY VALUE ...]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

# torch, Detectron2 and ocz_d2 are imported after the arguments are parsed: --help is instant.

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "synthetic" / "ocz_tiny.yaml"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--config-file",
        default=str(DEFAULT_CONFIG),
        help="the model's config (default: this checkout's configs/synthetic/ocz_tiny.yaml)",
    )
    parser.add_argument(
        "--output-dir",
        default="output/demo",
        help="run folder: checkpoints, metrics and the picture; a finished run there is reused "
        "(default: output/demo)",
    )
    parser.add_argument("--seed", type=int, default=0, help="training seed (SEED; default: 0)")
    parser.add_argument(
        "--num-gpus",
        type=int,
        default=None,
        help="processes of the segmenter's training, sharing the CPU's threads (gloo; default: 2 "
        "on a machine with 2 or more cores, where they train faster than one process of two "
        "threads, else 1)",
    )
    parser.add_argument(
        "--min-unseen-ratio",
        type=float,
        default=3.0,
        help="fail unless the test unseen mIoU is at least this multiple of the chance level "
        "(default: 3)",
    )
    parser.add_argument(
        "--debug", action="store_true", help="show tracebacks of config errors (OCZ_D2_DEBUG=1)"
    )
    parser.add_argument(
        "opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE, after every flag"
    )
    return parser.parse_args(argv)


def prepare(log) -> str:
    """The benchmark and its pretrained tiny CLIP; returns the CLIP weights file."""
    from ocz_d2.miniature.clip_pretrain import ensure_synthetic_clip
    from ocz_d2.miniature.synthetic import ensure_synthetic_benchmark

    start = time.time()
    benchmark = ensure_synthetic_benchmark()
    log(f"synthetic benchmark at {benchmark.root} ({time.time() - start:.0f} s)")
    start = time.time()
    weights, record = ensure_synthetic_clip(benchmark)
    zs = record["zero_shot"]
    log(
        f"tiny CLIP {weights} ({time.time() - start:.0f} s): zero-shot accuracy on single-object "
        f"images, seen {zs['seen']:.1f}% / unseen {zs['unseen']:.1f}%"
    )
    return str(weights)


def demo_config(args, overrides: list[str]):
    from ocz_d2.config import load_config

    cfg = load_config(args.config_file, overrides)
    cfg.MODEL.DEVICE = "cpu"
    return cfg


def write_picture(cfg, weights: str, dataset_name: str, path: Path, num_images: int = 6) -> None:
    import numpy as np
    import torch
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.modeling import build_model
    from PIL import Image

    from ocz_d2.data import ZeroShotSemSegDatasetMapper
    from ocz_d2.engine import AtomicCheckpointer
    from ocz_d2.utils.visualize import prediction_panel

    model = build_model(cfg)
    AtomicCheckpointer(model).load(weights)
    model.eval()
    meta = MetadataCatalog.get(dataset_name)
    mapper = ZeroShotSemSegDatasetMapper(cfg, False)
    rows = []
    for d in DatasetCatalog.get(dataset_name)[:num_images]:
        with torch.no_grad():
            pred = model([mapper(d)])[0]["sem_seg"].argmax(0).cpu().numpy()
        image = np.asarray(Image.open(d["file_name"]).convert("RGB"))
        gt = np.asarray(Image.open(d["sem_seg_file_name"]))
        rows.append((image, gt, pred))
    prediction_panel(rows, list(meta.stuff_classes), list(meta.unseen_classes)).save(path)


def print_results(log, dataset: str, result: dict, chance: dict) -> None:
    log(
        f"zero-shot results on {dataset} (mIoU %, one prediction over all classes; calibration "
        f"gamma {result['calibration']:g} chosen on the val split)"
    )
    print(f"  {'':8s} {'seen':>7s} {'unseen':>7s} {'hIoU':>7s}")
    for label, m in (("model", result["test"]), ("chance", chance)):
        print(f"  {label:8s} {m['mIoU-seen']:7.1f} {m['mIoU-unseen']:7.1f} {m['hIoU']:7.1f}")


def main(argv=None) -> int:
    args = parse_args(argv)
    import ocz_d2  # first: it keeps fvcore's and Detectron2's import-time warnings quiet
    from ocz_d2.engine.cli import run_tool
    from ocz_d2.utils.checkout import check_same_checkout

    check_same_checkout(__file__, ocz_d2.__file__)
    return run_tool(run, args, debug=args.debug)


def run(args) -> int:
    import torch

    from ocz_d2.engine.cli import check_overrides
    from ocz_d2.evaluation.protocol import chance_metrics
    from ocz_d2.evaluation.report import ReportRow, pin_clip_weights, run_seed
    from ocz_d2.utils.parallel import default_workers

    def log(message: str) -> None:
        print(f"[demo] {message}", flush=True)

    check_overrides(args.opts, "demo.py")
    demo_config(args, args.opts)  # a config error stops the demo before any work
    start = time.time()
    clip_weights = prepare(log)
    row = pin_clip_weights(ReportRow("demo", args.config_file, tuple(args.opts)), clip_weights)
    overrides = list(row.opts)
    out = Path(args.output_dir)
    train_start = time.time()
    log(f"training and testing in {out} (a finished run there is reused; delete it to retrain)")
    # Two CPU processes of one thread each took 0.89-0.96x the time per iteration of one process
    # of two threads (RESULTS.md); the total batch, and the images in it, are the same. With CUDA
    # present, Detectron2's launcher would give each process a GPU: one process then.
    processes = args.num_gpus or (1 if torch.cuda.is_available() else min(2, default_workers()))
    result = run_seed(row, args.seed, out, num_gpus=processes, console=True)
    train_s = time.time() - train_start

    dataset = result["test_dataset"]
    chance = chance_metrics(dataset)
    cfg = demo_config(args, [*overrides, "MODEL.OCZ.TEST.CALIBRATION", str(result["calibration"])])
    picture = out / "demo_predictions.png"
    write_picture(cfg, str(out / "model_final.pth"), dataset, picture)
    print_results(log, dataset, result, chance)
    log(f"picture: {picture}")
    stages = result.get("seconds")
    if stages:  # a reused run reports the times of the run that wrote it
        log(
            f"training {stages['training']:.0f} s, tuning on val and testing "
            f"{stages['tuning_and_testing']:.0f} s"
        )
    log(f"total time {time.time() - start:.0f} s (training, tuning and testing {train_s:.0f} s)")
    ratio = result["test"]["mIoU-unseen"] / max(chance["mIoU-unseen"], 1e-9)
    if ratio < args.min_unseen_ratio:
        print(
            f"[demo] FAILED: unseen mIoU {result['test']['mIoU-unseen']:.1f} is {ratio:.1f}x "
            f"chance, below {args.min_unseen_ratio:g}x: the model does not transfer to unseen "
            "classes",
            file=sys.stderr,
        )
        return 1
    log(f"OK: unseen mIoU is {ratio:.1f}x the chance level")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    status = main()
    from ocz_d2.utils.parallel import exit_process

    exit_process(status)
