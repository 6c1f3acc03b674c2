#!/usr/bin/env python
"""Precompute object maps: each image's guide regions, stored once as a label PNG.

    python tools/precompute_object_maps.py --config-file configs/... \
        --split-file ocz_synthetic/split.yaml --name clip [--splits train val test] [KEY VALUE ...]

The config's guide (MODEL.OCZ.GUIDE: a timm SSL ViT, or CLIP's own features) clusters every image
of the split file's splits into MODEL.OCZ.OBJECTS.NUM regions, at the image's own size (no
augmentation: the dataset mapper augments the maps with the images in training). Maps go to
``<dataset folder>/object_maps/<name>/<split>/`` (the dataset folder is the common parent of the
split's image and label roots), each folder with a record ``object_maps.json`` of the guide, n_o
and input size. A split file ``<stem>_objects_<name>.yaml`` beside the given one registers the
same data with the maps (datasets ``ocz_<dataset>_objects_<name>_<split>``; for
``split.yaml`` the new file is ``split_objects_<name>.yaml``): put it in
DATASETS.SPLIT_FILES and train on those names. Models check the record against their config.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# torch, Detectron2 and ocz_d2 are imported after the arguments are parsed: --help is instant.
# The work is ocz_d2.data.object_maps.precompute_object_maps.


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--config-file", required=True, help="the model config whose guide makes the regions"
    )
    parser.add_argument("--split-file", required=True, help="the dataset's YAML split file")
    parser.add_argument("--name", required=True, help="name of this set of maps, e.g. dino")
    parser.add_argument("--splits", nargs="*", help="splits to do (default: all of the file's)")
    parser.add_argument(
        "--batch-size", type=int, default=16, help="images per guide call (default: 16)"
    )
    parser.add_argument(
        "--debug", action="store_true", help="show tracebacks of config and data errors"
    )
    parser.add_argument(
        "opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE, after every flag"
    )
    args = parser.parse_args(argv)
    import ocz_d2  # first: it keeps fvcore's and Detectron2's import-time warnings quiet
    from ocz_d2.engine.cli import run_tool
    from ocz_d2.utils.checkout import check_same_checkout

    check_same_checkout(__file__, ocz_d2.__file__)
    return run_tool(run, args, debug=args.debug)


def run(args) -> int:
    from ocz_d2.config import load_config
    from ocz_d2.data.object_maps import precompute_object_maps
    from ocz_d2.engine.cli import check_overrides

    check_overrides(args.opts, "precompute_object_maps.py")
    cfg = load_config(args.config_file, args.opts)

    def report(dataset_name: str, count: int, folder: Path, rate: float) -> None:
        print(f"{dataset_name}: {count} object maps in {folder} ({rate:.1f} images/s)")

    out = precompute_object_maps(
        cfg,
        args.split_file,
        args.name,
        splits=args.splits,
        batch_size=args.batch_size,
        on_split=report,
    )
    print(f"split file: {out} (put it in DATASETS.SPLIT_FILES)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
