#!/usr/bin/env python
"""Purity of guides' object maps against reference maps (the true objects).

    python tools/object_map_quality.py clip randvit ssl \\
        [--root $DETECTRON2_DATASETS/ocz_synthetic/object_maps] [--reference oracle] \\
        [--split test] [--output purity.json]

Each name is a set of object maps written by tools/precompute_object_maps.py (or
tools/prepare_synthetic.py --object-maps) under <root>/<name>/<split>/; the reference
(<root>/<reference>/<split>/, by default the synthetic benchmark's true instance maps) holds the
maps of the same images. Prints, per guide, in %: purity (no region straddles two objects),
inverse purity (no object is split over regions), their harmonic mean F, and the mean best
overlap (mBO: each non-background object's best IoU with a region, averaged over objects),
beside the trivial guide that gives each image a single region and, with --grid P, the best any
guide on a grid of P-pixel patches can do (the reference itself, each patch given its majority
object): guide maps made on a patch grid cannot follow boundaries finer than a patch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("names", nargs="+", help="object-map sets under --root to measure")
    parser.add_argument(
        "--root",
        help="folder of the object-map sets (default: $DETECTRON2_DATASETS/ocz_synthetic/"
        "object_maps)",
    )
    parser.add_argument("--reference", default="oracle", help="the reference set (default oracle)")
    parser.add_argument("--split", default="test", help="split folder (default test)")
    parser.add_argument(
        "--background",
        type=int,
        default=0,
        help="the reference's background value, left out of mBO (default 0, the synthetic "
        "benchmark's; -1: none)",
    )
    parser.add_argument(
        "--grid",
        type=int,
        default=0,
        help="add the reference on a grid of this many pixels (the guide's patch size, 16 for "
        "the miniature's guides)",
    )
    parser.add_argument("--max-images", type=int, help="the first N maps of each set only")
    parser.add_argument("--output", help="write the numbers as JSON here")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from ocz_d2.evaluation.object_map_quality import object_map_folder_agreement
    from ocz_d2.utils.errors import DataError
    from ocz_d2.utils.io import datasets_root

    if args.max_images is not None and args.max_images < 1:
        print(f"error: --max-images must be >= 1, got {args.max_images}", file=sys.stderr)
        return 2
    if args.grid < 0:
        print(f"error: --grid must be >= 0, got {args.grid}", file=sys.stderr)
        return 2
    root = args.root or os.path.join(datasets_root(), "ocz_synthetic", "object_maps")
    reference = os.path.join(root, args.reference, args.split)
    background = None if args.background < 0 else args.background
    rows = {}
    try:
        for name in args.names:
            folder = os.path.join(root, name, args.split)
            rows[name] = object_map_folder_agreement(
                folder, reference, background=background, max_images=args.max_images
            )
        rows["one region"] = object_map_folder_agreement(
            os.path.join(root, args.names[0], args.split),
            reference,
            background=background,
            single_region=True,
            max_images=args.max_images,
        )
        if args.grid:
            rows[f"reference on the {args.grid}-px grid"] = object_map_folder_agreement(
                reference,
                reference,
                background=background,
                reference_grid=args.grid,
                max_images=args.max_images,
            )
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"Object maps of {args.split} against {reference} (%):\n")
    print("| guide | purity | inverse purity | F | mBO | objects | images |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        mbo = "–" if r["mbo"] is None else f"{100 * r['mbo']:.1f}"
        print(
            f"| {name} | {100 * r['purity']:.1f} | {100 * r['inverse_purity']:.1f} | "
            f"{100 * r['f']:.1f} | {mbo} | {r['objects']} | {r['images']} |"
        )
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump({"reference": reference, "split": args.split, "guides": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
