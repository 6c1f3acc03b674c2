"""PASCAL Context-59: VOC2010 images with the Context labels, 4,998 train / 5,105 val, 59 classes.

Raw inputs: ``VOCdevkit/VOC2010`` (``JPEGImages``, ``ImageSets/Main/{train,val}.txt``: the
official Context split) and the Context release ``trainval.tar.gz`` extracted to one folder
holding ``trainval/<id>.mat`` (``LabelMap``: 1-based ids of the 459 full-set labels, 0 =
unlabeled) and ``labels.txt`` (``id: name``). The 59 classes are found in ``labels.txt`` by name
and mapped to the mmseg order of ``context59_zs3.yaml``; every other label becomes 255.
mmseg's lists (4,996 / 5,104, from the Detail API) can be passed with ``--train-list`` /
``--val-list`` (and ``--no-count-check``).

``--source mmseg`` starts instead from mmseg's converted Context (made with the Detail API):
``VOC2010/SegmentationClassContext/<id>.png`` (0 = background, 1..59 in the same order) and
``VOC2010/ImageSets/SegmentationContext/{train,val}.txt`` (4,996 / 5,104); 0 becomes 255, k
becomes k - 1. Both sources give the same labels for the same images.
"""

from __future__ import annotations

import re
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
    read_id_list,
    require_dir,
    require_file,
    run_items,
    split_classes,
)

__all__ = ["CONTEXT_COUNTS", "read_context_labels", "prepare_context", "cli"]

CONTEXT_COUNTS = {"train": 4998, "val": 5105}
#: Images per split in mmseg's lists.
MMSEG_COUNTS = {"train": 4996, "val": 5104}
SOURCES = ("mat", "mmseg")
_SPLIT_FILE = "ocz_d2/data/splits/context59_zs3.yaml"
_LINE = re.compile(r"^\s*(\d+)\s*:\s*(.+?)\s*$")


def read_context_labels(path: Path) -> dict[str, int]:
    """name -> raw id of a Context ``labels.txt`` (lines ``id: name``)."""
    names: dict[str, int] = {}
    with open(require_file(path, "Context label names"), encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            m = _LINE.match(line)
            if not m:
                raise PrepareError(f"{path}:{n}: expected 'id: name', got {line.strip()!r}.")
            names[m.group(2)] = int(m.group(1))
    return names


def prepare_context(
    voc2010_root: str | Path,
    context_root: str | Path,
    out: str | Path,
    *,
    train_list: str | Path | None = None,
    val_list: str | Path | None = None,
    source: str = "mat",
    workers: int = 1,
    image_mode: str = "symlink",
    check_counts: bool = True,
    progress: bool = True,
) -> PrepareResult:
    """Write ``out/{images,labels}/{train,val}`` (see the module docstring).

    Args:
        voc2010_root: ``.../VOCdevkit/VOC2010``.
        context_root: folder with ``trainval/*.mat`` and ``labels.txt`` (unused for mmseg).
        out: output folder (``$DETECTRON2_DATASETS/ocz_context59`` for the split files).
        train_list / val_list: id lists; default ``ImageSets/Main/{train,val}.txt`` (mat) or
            ``ImageSets/SegmentationContext/{train,val}.txt`` (mmseg).
        source: ``"mat"`` (the Context release) or ``"mmseg"`` (mmseg's converted PNGs).
        workers, image_mode, progress: see :func:`~ocz_d2.data.prepare.common.run_items`.
        check_counts: require 4,998 / 5,105 images (mmseg: 4,996 / 5,104).
    """
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    voc2010_root, context_root = Path(voc2010_root), Path(context_root)
    jpeg = require_dir(voc2010_root, "JPEGImages", "VOC2010 images", "--voc2010")
    classes, _ = split_classes("context59_zs3.yaml")
    if source == "mat":
        labels = require_dir(context_root, "trainval", "Context .mat labels", "--context")
        raw_ids = read_context_labels(context_root / "labels.txt")
        missing = [c for c in classes if c not in raw_ids]
        if missing:
            raise PrepareError(
                f"{context_root / 'labels.txt'} lacks the Context-59 classes {missing}: is it "
                "the 459-label list of the Context release?"
            )
        lut = build_lut(max(raw_ids.values()) + 1, {raw_ids[c]: k for k, c in enumerate(classes)})
        list_dir, counts, ext, reader = "ImageSets/Main", CONTEXT_COUNTS, ".mat", "context_mat"
    else:
        labels = require_dir(
            voc2010_root, "SegmentationClassContext", "mmseg Context PNGs", "--voc2010"
        )
        # Values above 59 are not in the format: the LUT stops at 59 so that they are reported.
        lut = build_lut(len(classes) + 1, {k: k - 1 for k in range(1, len(classes) + 1)})
        list_dir, counts, ext, reader = "ImageSets/SegmentationContext", MMSEG_COUNTS, ".png", "png"
    lists = {}
    for split, given in (("train", train_list), ("val", val_list)):
        if given is None:
            folder = require_dir(voc2010_root, list_dir, "Context split lists", "--voc2010")
            given = folder / f"{split}.txt"
        lists[split] = read_id_list(Path(given))
        if check_counts:
            check_count(len(lists[split]), counts[split], f"{split} list {given}")
    all_ids = lists["train"] + lists["val"]
    check_listed_files([str(jpeg / f"{i}.jpg") for i in all_ids], "images", jpeg)
    check_listed_files([str(labels / f"{i}{ext}") for i in all_ids], "Context labels", labels)
    out = Path(out)
    splits = {
        split: [
            Item(
                image_src=str(jpeg / f"{i}.jpg"),
                label_src=str(labels / f"{i}{ext}"),
                image_dst=str(out / "images" / split / f"{i}.jpg"),
                label_dst=str(out / "labels" / split / f"{i}.png"),
                reader=reader,
            )
            for i in ids
        ]
        for split, ids in lists.items()
    }
    return run_items(
        out,
        splits,
        classes=classes,
        lut=lut,
        workers=workers,
        image_mode=image_mode,
        progress=progress,
        extra_record={"dataset": "context59", "split_file": _SPLIT_FILE, "source": source},
    )


def cli(argv: list[str] | None = None) -> tuple[int, str]:
    """The command line of ``datasets/prepare_context.py``: ``(exit code, text to print)``
    (see :func:`~ocz_d2.data.prepare.cli.run_cli`)."""
    parser = base_parser(__doc__.splitlines()[0], "ocz_context59")
    parser.add_argument(
        "--voc2010",
        default=str(Path(datasets_root()) / "VOCdevkit" / "VOC2010"),
        help="VOC2010 folder (JPEGImages, ImageSets/Main)",
    )
    parser.add_argument(
        "--context",
        default=str(Path(datasets_root()) / "pascal_context"),
        help="folder of the extracted Context trainval.tar.gz (trainval/*.mat, labels.txt)",
    )
    parser.add_argument(
        "--source",
        choices=SOURCES,
        default="mat",
        help="mat: the Context release (trainval/*.mat, labels.txt); mmseg: mmseg's converted "
        "VOC2010/SegmentationClassContext PNGs and ImageSets/SegmentationContext lists",
    )
    parser.add_argument("--train-list", default=None, help="train id list (default VOC2010's)")
    parser.add_argument("--val-list", default=None, help="val id list (default VOC2010's)")
    args = parser.parse_args(argv)
    return run_cli(
        prepare_context,
        args,
        voc2010_root=args.voc2010,
        context_root=args.context,
        train_list=args.train_list,
        val_list=args.val_list,
        source=args.source,
    )
