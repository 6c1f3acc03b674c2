#!/usr/bin/env python
"""How well the frozen CLIP classifies a split's ground-truth segments, per segment route.

    python tools/segment_clip_accuracy.py --config-file configs/synthetic/ocz_tiny.yaml \\
        --dataset ocz_synthetic_val [--max-images 100] [--per-class] [--output acc.json] \\
        [KEY VALUE ...]

Before switching on the test-time segment classification (MODEL.OCZ.SEGMENT_CLIP, ZegFormer's
ensemble), check which route and STYLE suits your data: every class present in an image (its
pixels in the label map) is one segment, classified by the model's frozen CLIP alone (the region
route, and the crop route with each STYLE) against the dataset's class embeddings. Prints top-1
accuracy over all, seen and unseen segments (--per-class: also per class, which shows the
classes CLIP cannot tell apart); --output writes them, with every prediction, as JSON. No
trained weights are needed: only the frozen CLIP and the text side are used.
"""

from __future__ import annotations

import argparse
import os
import sys

# torch, Detectron2 and ocz_d2 are imported after the arguments are parsed: --help is instant.


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config-file", required=True, help="the model's config")
    parser.add_argument(
        "--dataset", help="a registered split with label maps (default: the first DATASETS.VAL)"
    )
    parser.add_argument("--max-images", type=int, help="the first N images only")
    parser.add_argument(
        "--per-class", action="store_true", help="also print the accuracy of each class"
    )
    parser.add_argument("--output", help="write the accuracies and predictions as JSON here")
    parser.add_argument(
        "--debug", action="store_true", help="show tracebacks of config and data errors"
    )
    parser.add_argument(
        "opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE, after every flag"
    )
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import ocz_d2  # first: it keeps fvcore's and Detectron2's import-time warnings quiet
    from ocz_d2.engine.cli import run_tool
    from ocz_d2.utils.checkout import check_same_checkout

    check_same_checkout(__file__, ocz_d2.__file__)
    return run_tool(run, args, debug=args.debug)


def run(args) -> int:
    from detectron2.modeling import build_model

    from ocz_d2.config import load_config
    from ocz_d2.data.split_file import register_split_files_from_config
    from ocz_d2.engine.cli import check_overrides
    from ocz_d2.evaluation.segment_accuracy import ground_truth_segment_accuracy
    from ocz_d2.utils.errors import ArgumentError

    check_overrides(args.opts, "segment_clip_accuracy.py")
    if args.max_images is not None and args.max_images < 1:
        raise ArgumentError(f"--max-images {args.max_images}: give at least 1.")
    cfg = load_config(args.config_file, args.opts)
    register_split_files_from_config(cfg)
    dataset = args.dataset or (cfg.DATASETS.VAL[0] if cfg.DATASETS.VAL else None)
    if dataset is None:
        raise ArgumentError("No --dataset and no DATASETS.VAL in the config: name a split.")
    model = build_model(cfg).eval()
    results = ground_truth_segment_accuracy(model, dataset, cfg.INPUT.FORMAT, args.max_images)
    print(f"CLIP top-1 accuracy on the ground-truth segments of {dataset}:")
    print("| route | all | seen | unseen | segments (seen / unseen) |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        counts = f"{r['segments']} ({r['seen_segments']} / {r['unseen_segments']})"
        print(f"| {name} | {r['all']:.1f} | {r['seen']:.1f} | {r['unseen']:.1f} | {counts} |")
    if args.per_class:
        print_per_class(results, dataset)
    if args.output:
        from ocz_d2.utils.io import atomic_write_json

        atomic_write_json(args.output, {"dataset": dataset, "variants": results}, indent=2)
        print(f"Written to {args.output}")
    return 0


def print_per_class(results: dict, dataset: str) -> None:
    """A class x route table of accuracies (%), each class with its group and segment count."""
    from detectron2.data import MetadataCatalog

    meta = MetadataCatalog.get(dataset)
    unseen = {meta.stuff_classes[k] for k in meta.get("unseen_classes", [])}
    names = list(results)
    first = results[names[0]]["per_class"]
    print(f"\nPer class (top-1 %, {dataset}):")
    print("| class | group | segments | " + " | ".join(names) + " |")
    print("|---|---|---|" + "---|" * len(names))
    for cls, entry in first.items():
        cells = " | ".join(f"{results[n]['per_class'][cls]['accuracy']:.1f}" for n in names)
        group = "unseen" if cls in unseen else "seen"
        print(f"| {cls} | {group} | {entry['segments']} | {cells} |")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    sys.exit(main())
