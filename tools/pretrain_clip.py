#!/usr/bin/env python
"""Pretrain both towers of a (tiny) open_clip model contrastively on an image-caption CSV, on CPU.

    python tools/prepare_synthetic.py --no-clip --pretraining-set   # writes the CSVs below
    python tools/pretrain_clip.py --csv datasets/ocz_synthetic/pretrain/captions.csv \\
        --output output/tiny_clip/weights.pt \\
        --eval-csv datasets/ocz_synthetic/zeroshot/labels.csv \\
        --unseen "orange striped" "green checkered" "blue plain" "magenta dotted"

The CSV is open_clip's format: an image-path column (--img-key, paths relative to the CSV) and a
caption column (--caption-key). Training is deterministic given --seed and resumes from the state
in --work-dir (default: beside --output). The weights file is a plain state dict: use it as
MODEL.OCZ.CLIP.WEIGHTS (with MODEL.OCZ.CLIP.MODEL_NAME = --model). With --eval-csv (image path and
class-name columns) it prints zero-shot classification accuracy per class, seen and unseen apart.
For the synthetic benchmark, tools/prepare_synthetic.py runs this with a cache.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# torch, open_clip and ocz_d2 are imported after the arguments are parsed: --help is instant.

#: The defaults of ``ocz_d2.miniature.clip_pretrain.ClipPretrainConfig`` (a test keeps them equal),
#: written out so that --help needs no heavy import.
DEFAULTS = {
    "model_name": "OCZ-Tiny-ViT",
    "steps": 1000,
    "batch_size": 64,
    "lr": 1e-3,
    "weight_decay": 0.1,
    "warmup_steps": 25,
    "seed": 0,
    "positives": "identical",
    "checkpoint_period": 100,
    "patch_dropout": 0.0,
}


def parse_args(argv=None) -> argparse.Namespace:
    d = argparse.Namespace(**DEFAULTS)
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--csv", required=True, help="image-caption CSV")
    parser.add_argument("--img-key", default="filepath", help="image path column")
    parser.add_argument("--caption-key", default="caption", help="caption column")
    parser.add_argument("--separator", default=",", help="column separator (use $'\\t' for TSV)")
    parser.add_argument(
        "--model", default=d.model_name, help=f"open_clip model name (default: {d.model_name})"
    )
    parser.add_argument(
        "--steps", type=int, default=d.steps, help=f"optimizer steps (default: {d.steps})"
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=d.batch_size,
        help=f"image-caption pairs per step, >= 2 (default: {d.batch_size})",
    )
    parser.add_argument(
        "--lr", type=float, default=d.lr, help=f"peak AdamW learning rate (default: {d.lr:g})"
    )
    parser.add_argument(
        "--weight-decay",
        type=float,
        default=d.weight_decay,
        help=f"AdamW weight decay (default: {d.weight_decay:g})",
    )
    parser.add_argument(
        "--warmup-steps",
        type=int,
        default=d.warmup_steps,
        help=f"linear warmup steps before the cosine decay (default: {d.warmup_steps})",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=d.seed,
        help=f"seed of the weights and the batches (default: {d.seed})",
    )
    parser.add_argument(
        "--positives",
        choices=("identical", "none"),
        default=d.positives,
        help="identical: identical captions in a batch are positives; none: open_clip's InfoNCE "
        f"(default: {d.positives})",
    )
    parser.add_argument(
        "--checkpoint-period",
        type=int,
        default=d.checkpoint_period,
        help=f"steps between saves of the training state (default: {d.checkpoint_period})",
    )
    parser.add_argument(
        "--patch-dropout",
        type=float,
        default=d.patch_dropout,
        help="fraction of image patches dropped in each training forward (FLIP); cheaper steps, "
        f"but on the synthetic set it cost zero-shot accuracy (default: {d.patch_dropout})",
    )
    parser.add_argument("--output", required=True, help="weights file to write (a state dict)")
    parser.add_argument("--work-dir", help="training state folder (default: beside --output)")
    parser.add_argument("--no-resume", action="store_true", help="ignore a saved training state")
    parser.add_argument("--eval-csv", help="labelled images for the zero-shot check")
    parser.add_argument("--eval-label-key", default="label", help="class-name column of it")
    parser.add_argument("--unseen", nargs="*", default=[], help="classes reported as unseen")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import open_clip
    import torch

    from ocz_d2.miniature.clip_pretrain import (
        ClipPretrainConfig,
        load_image_caption_csv,
        load_labelled_images,
        pretrain_clip,
        save_atomic,
        zero_shot_accuracy,
    )
    from ocz_d2.modeling.backbone.clip_prompt import register_tiny_clip_configs

    register_tiny_clip_configs()
    try:
        cfg = ClipPretrainConfig(
            model_name=args.model,
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            weight_decay=args.weight_decay,
            warmup_steps=args.warmup_steps,
            seed=args.seed,
            positives=args.positives,
            checkpoint_period=args.checkpoint_period,
            patch_dropout=args.patch_dropout,
        )
        size = open_clip.get_model_config(args.model)["vision_cfg"]["image_size"]
        data = load_image_caption_csv(
            args.csv,
            size,
            img_key=args.img_key,
            caption_key=args.caption_key,
            separator=args.separator,
        )
        evaluation = None
        if args.eval_csv:
            evaluation = load_labelled_images(
                args.eval_csv, size, label_key=args.eval_label_key, separator=args.separator
            )
    except (OSError, ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    output = Path(args.output)
    work_dir = Path(args.work_dir) if args.work_dir else output.parent / (output.stem + "_state")
    print(f"{len(data.captions)} image-caption pairs; training {cfg.steps} steps", flush=True)
    model = pretrain_clip(data, cfg, work_dir, resume=not args.no_resume)
    output.parent.mkdir(parents=True, exist_ok=True)
    save_atomic(model.state_dict(), output)
    print(
        f"Wrote {output} (MODEL.OCZ.CLIP.MODEL_NAME {args.model} MODEL.OCZ.CLIP.WEIGHTS {output})"
    )
    if evaluation is not None:
        images, labels = evaluation
        classes = sorted(set(labels))
        with torch.no_grad():
            acc = zero_shot_accuracy(model, args.model, images, labels, classes, unseen=args.unseen)
        print("Zero-shot classification accuracy (%):")
        for group in ("seen", "unseen"):
            names = [c for c in classes if (c in args.unseen) == (group == "unseen")]
            per_class = ", ".join(f"{c} {acc['per_class'][c]:.0f}" for c in names)
            print(f"  {group:6s} {acc[group]:5.1f}  ({per_class})")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    sys.exit(main())
