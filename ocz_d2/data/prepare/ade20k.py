"""ADE20K-150 (ADEChallengeData2016): 20,210 train / 2,000 val images, 150 classes.

Raw inputs: ``ADEChallengeData2016/images/{training,validation}/*.jpg`` and
``annotations/{training,validation}/*.png`` (0 = other, 1..150 = classes). Label 0 becomes 255,
k becomes k - 1.
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

__all__ = ["ADE_COUNTS", "prepare_ade20k", "cli"]

ADE_COUNTS = {"train": 20210, "val": 2000}
_RAW_SPLITS = {"train": "training", "val": "validation"}


def prepare_ade20k(
    ade_root: str | Path,
    out: str | Path,
    *,
    workers: int = 1,
    image_mode: str = "symlink",
    check_counts: bool = True,
    progress: bool = True,
) -> PrepareResult:
    """Write ``out/{images,labels}/{train,val}`` (see the module docstring).

    Args:
        ade_root: the ``ADEChallengeData2016`` folder.
        out: output folder (``$DETECTRON2_DATASETS/ocz_ade150`` for the split file).
        workers, image_mode, progress: see :func:`~ocz_d2.data.prepare.common.run_items`.
        check_counts: require the protocol's 20,210 / 2,000 images.
    """
    ade_root = Path(ade_root)
    classes, _ = split_classes("ade150.yaml")
    out = Path(out)
    splits = {}
    for split, raw in _RAW_SPLITS.items():
        images = require_dir(ade_root, f"images/{raw}", f"ADE20K {split} images", "--ade")
        labels = require_dir(ade_root, f"annotations/{raw}", f"ADE20K {split} labels", "--ade")
        ids = sorted(p.stem for p in images.glob("*.jpg"))
        check_listed_files([str(labels / f"{i}.png") for i in ids], "labels", labels)
        n_labels = sum(1 for _ in labels.glob("*.png"))
        if n_labels > len(ids):
            raise PrepareError(
                f"partial download: {images} holds {len(ids)} images for {n_labels} labels; "
                "extract ADEChallengeData2016.zip again."
            )
        if check_counts:
            check_count(len(ids), ADE_COUNTS[split], f"{split} ({images})")
        splits[split] = [
            Item(
                image_src=str(images / f"{i}.jpg"),
                label_src=str(labels / f"{i}.png"),
                image_dst=str(out / "images" / split / f"{i}.jpg"),
                label_dst=str(out / "labels" / split / f"{i}.png"),
            )
            for i in ids
        ]
    # Values above 150 are not in the format: the LUT stops at 150 so that they are reported.
    lut = build_lut(len(classes) + 1, {k: k - 1 for k in range(1, len(classes) + 1)})
    return run_items(
        out,
        splits,
        classes=classes,
        lut=lut,
        workers=workers,
        image_mode=image_mode,
        progress=progress,
        extra_record={"dataset": "ade150", "split_file": "ocz_d2/data/splits/ade150.yaml"},
    )


def cli(argv: list[str] | None = None) -> tuple[int, str]:
    """The command line of ``datasets/prepare_ade20k.py``: ``(exit code, text to print)``
    (see :func:`~ocz_d2.data.prepare.cli.run_cli`)."""
    parser = base_parser(__doc__.splitlines()[0], "ocz_ade150")
    parser.add_argument(
        "--ade",
        default=str(Path(datasets_root()) / "ADEChallengeData2016"),
        help="the ADEChallengeData2016 folder (images/, annotations/)",
    )
    args = parser.parse_args(argv)
    return run_cli(prepare_ade20k, args, ade_root=args.ade)
