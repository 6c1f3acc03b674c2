"""PASCAL VOC 2012 with the SBD augmentation: 10,582 train / 1,449 val images, 20 classes.

Raw inputs: ``VOCdevkit/VOC2012`` (``JPEGImages``, ``SegmentationClass`` palette PNGs,
``ImageSets/Segmentation/{train,val}.txt``) and SBD's ``benchmark_RELEASE/dataset`` (``cls/*.mat``
whose ``GTcls.Segmentation`` holds 0..20, ``train.txt``, ``val.txt``). Train = (VOC train + SBD
train + SBD val) minus VOC val; a VOC PNG is used where one exists, else the SBD label. Labels:
background (0) and boundaries (255) become 255, class k becomes k - 1.
"""

from __future__ import annotations

from pathlib import Path

from ...utils.io import datasets_root
from .cli import base_parser, run_cli
from .common import (
    Item,
    PrepareResult,
    build_lut,
    check_count,
    check_listed_files,
    read_id_list,
    require_dir,
    run_items,
    split_classes,
)

__all__ = ["VOC_COUNTS", "prepare_voc", "cli"]

#: Images per split in the protocol.
VOC_COUNTS = {"train": 10582, "val": 1449}


def prepare_voc(
    voc_root: str | Path,
    sbd_root: str | Path,
    out: str | Path,
    *,
    workers: int = 1,
    image_mode: str = "symlink",
    check_counts: bool = True,
    progress: bool = True,
) -> PrepareResult:
    """Write ``out/{images,labels}/{train,val}`` (see the module docstring).

    Args:
        voc_root: ``.../VOCdevkit/VOC2012``.
        sbd_root: ``.../benchmark_RELEASE/dataset``.
        out: output folder (``$DETECTRON2_DATASETS/ocz_voc2012`` for the split file).
        workers, image_mode, progress: see :func:`~ocz_d2.data.prepare.common.run_items`.
        check_counts: require the protocol's 10,582 / 1,449 images.

    Raises:
        PrepareError: on missing, misplaced, partial or malformed inputs or outputs.
    """
    voc_root, sbd_root = Path(voc_root), Path(sbd_root)
    jpeg = require_dir(voc_root, "JPEGImages", "VOC 2012 images", "--voc")
    seg = require_dir(voc_root, "SegmentationClass", "VOC 2012 palette labels", "--voc")
    lists = require_dir(voc_root, "ImageSets/Segmentation", "VOC 2012 split lists", "--voc")
    cls = require_dir(sbd_root, "cls", "SBD .mat labels", "--sbd")
    voc_train = read_id_list(lists / "train.txt")
    voc_val = read_id_list(lists / "val.txt")
    sbd_ids = read_id_list(sbd_root / "train.txt") + read_id_list(sbd_root / "val.txt")
    val_set = set(voc_val)
    train = sorted((set(voc_train) | set(sbd_ids)) - val_set)
    voc_labelled = {p.stem for p in seg.glob("*.png")}
    check_listed_files([str(seg / f"{i}.png") for i in voc_train + voc_val], "VOC labels", seg)
    check_listed_files(
        [str(cls / f"{i}.mat") for i in train if i not in voc_labelled], "SBD labels", cls
    )
    check_listed_files([str(jpeg / f"{i}.jpg") for i in train + voc_val], "images", jpeg)
    if check_counts:
        check_count(len(train), VOC_COUNTS["train"], "train (VOC train + SBD - VOC val)")
        check_count(len(voc_val), VOC_COUNTS["val"], "val (ImageSets/Segmentation/val.txt)")
    classes, _ = split_classes("voc.yaml")
    lut = build_lut(256, {k: k - 1 for k in range(1, len(classes) + 1)})
    out = Path(out)

    def item(split: str, i: str) -> Item:
        if i in voc_labelled:
            label, reader = seg / f"{i}.png", "png"
        else:
            label, reader = cls / f"{i}.mat", "sbd_mat"
        return Item(
            image_src=str(jpeg / f"{i}.jpg"),
            label_src=str(label),
            image_dst=str(out / "images" / split / f"{i}.jpg"),
            label_dst=str(out / "labels" / split / f"{i}.png"),
            reader=reader,
        )

    splits = {"train": [item("train", i) for i in train], "val": [item("val", i) for i in voc_val]}
    return run_items(
        out,
        splits,
        classes=classes,
        lut=lut,
        workers=workers,
        image_mode=image_mode,
        progress=progress,
        extra_record={"dataset": "voc", "split_file": "ocz_d2/data/splits/voc.yaml"},
    )


def cli(argv: list[str] | None = None) -> tuple[int, str]:
    """The command line of ``datasets/prepare_voc.py``: ``(exit code, text to print)``
    (see :func:`~ocz_d2.data.prepare.cli.run_cli`)."""
    parser = base_parser(__doc__.splitlines()[0], "ocz_voc2012")
    parser.add_argument(
        "--voc",
        default=str(Path(datasets_root()) / "VOCdevkit" / "VOC2012"),
        help="VOC 2012 folder (JPEGImages, SegmentationClass, ImageSets/Segmentation)",
    )
    parser.add_argument(
        "--sbd",
        default=str(Path(datasets_root()) / "benchmark_RELEASE" / "dataset"),
        help="SBD folder (cls/*.mat, train.txt, val.txt)",
    )
    args = parser.parse_args(argv)
    return run_cli(prepare_voc, args, voc_root=args.voc, sbd_root=args.sbd)
