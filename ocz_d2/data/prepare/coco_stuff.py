"""COCO-Stuff 164k: 118,287 train / 5,000 val images, 171 classes.

Raw inputs: the COCO 2017 images (``train2017/``, ``val2017/``) and
``stuffthingmaps_trainval2017/{train2017,val2017}/*.png`` whose value is the COCO category id
minus 1 (0..181) and 255 = unlabeled. The 171 used ids map to 0..170 in order; the 11 unused
thing ids (11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90) and everything else become 255.
"""

from __future__ import annotations

from pathlib import Path

from ...utils.io import datasets_root
from .cli import base_parser, run_cli
from .common import (
    Item,
    PrepareError,
    PrepareResult,
    build_lut,
    check_count,
    check_listed_files,
    require_dir,
    run_items,
    split_classes,
)

__all__ = ["COCO_STUFF_COUNTS", "UNUSED_IDS", "USED_IDS", "prepare_coco_stuff", "cli"]

COCO_STUFF_COUNTS = {"train": 118287, "val": 5000}
#: Raw values (COCO category id - 1) that no class uses.
UNUSED_IDS = (11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90)
#: Raw value of each of the 171 classes, in class order.
USED_IDS = tuple(i for i in range(182) if i not in UNUSED_IDS)
_RAW_SPLITS = {"train": "train2017", "val": "val2017"}


def prepare_coco_stuff(
    coco_root: str | Path,
    out: str | Path,
    *,
    stuffthingmaps: str | Path | None = None,
    workers: int = 1,
    image_mode: str = "symlink",
    check_counts: bool = True,
    progress: bool = True,
) -> PrepareResult:
    """Write ``out/{images,labels}/{train,val}`` (see the module docstring).

    Args:
        coco_root: folder with ``train2017/`` and ``val2017/`` images.
        out: output folder (``$DETECTRON2_DATASETS/ocz_coco_stuff`` for the split file).
        stuffthingmaps: folder with ``train2017/`` and ``val2017/`` label PNGs; default
            ``coco_root/stuffthingmaps_trainval2017``.
        workers, image_mode, progress: see :func:`~ocz_d2.data.prepare.common.run_items`.
        check_counts: require the protocol's 118,287 / 5,000 images.
    """
    coco_root = Path(coco_root)
    maps = Path(stuffthingmaps) if stuffthingmaps else coco_root / "stuffthingmaps_trainval2017"
    classes, _ = split_classes("coco_stuff.yaml")
    if len(classes) != len(USED_IDS):
        raise AssertionError("coco_stuff.yaml and USED_IDS disagree")
    out = Path(out)
    splits = {}
    for split, raw in _RAW_SPLITS.items():
        images = require_dir(coco_root, raw, f"COCO 2017 {split} images", "--coco")
        labels = require_dir(maps, raw, f"stuffthingmaps {split} labels", "--stuffthingmaps")
        ids = sorted(p.stem for p in labels.glob("*.png"))
        check_listed_files([str(images / f"{i}.jpg") for i in ids], "images", images)
        n_images = sum(1 for _ in images.glob("*.jpg"))
        if n_images > len(ids):
            raise PrepareError(
                f"partial download: {labels} holds {len(ids)} label PNGs for {n_images} "
                "images; extract stuffthingmaps_trainval2017.zip again."
            )
        if check_counts:
            check_count(len(ids), COCO_STUFF_COUNTS[split], f"{split} ({labels})")
        splits[split] = [
            Item(
                image_src=str(images / f"{i}.jpg"),
                label_src=str(labels / f"{i}.png"),
                image_dst=str(out / "images" / split / f"{i}.jpg"),
                label_dst=str(out / "labels" / split / f"{i}.png"),
            )
            for i in ids
        ]
    lut = build_lut(256, {raw: k for k, raw in enumerate(USED_IDS)})
    return run_items(
        out,
        splits,
        classes=classes,
        lut=lut,
        workers=workers,
        image_mode=image_mode,
        progress=progress,
        extra_record={"dataset": "coco_stuff", "split_file": "ocz_d2/data/splits/coco_stuff.yaml"},
    )


def cli(argv: list[str] | None = None) -> tuple[int, str]:
    """The command line of ``datasets/prepare_coco_stuff.py``: ``(exit code, text to print)``
    (see :func:`~ocz_d2.data.prepare.cli.run_cli`)."""
    parser = base_parser(__doc__.splitlines()[0], "ocz_coco_stuff")
    parser.add_argument(
        "--coco",
        default=str(Path(datasets_root()) / "coco"),
        help="folder with the COCO 2017 train2017/ and val2017/ images",
    )
    parser.add_argument(
        "--stuffthingmaps",
        default=None,
        help="folder with train2017/ and val2017/ label PNGs "
        "(default: <--coco>/stuffthingmaps_trainval2017)",
    )
    args = parser.parse_args(argv)
    return run_cli(
        prepare_coco_stuff, args, coco_root=args.coco, stuffthingmaps=args.stuffthingmaps
    )
