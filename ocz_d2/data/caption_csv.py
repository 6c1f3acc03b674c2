"""Image-caption CSV files in open_clip's format: one read for every user.

open_clip's training script reads a CSV (or TSV) with an image-path column (``filepath``) and a
caption column (``caption``); image paths are relative to the CSV's folder, or absolute. The tiny
CLIP's pretraining (:mod:`ocz_d2.miniature.clip_pretrain`) and the caption datasets that SimZSS
trains on (:mod:`ocz_d2.data.captions`) both read them here.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path

__all__ = ["read_caption_csv", "read_csv_rows", "resolve_csv_images"]


def read_csv_rows(
    path: str | os.PathLike, columns: Sequence[str], separator: str = ","
) -> list[dict[str, str]]:
    """The rows of a CSV file as dicts, after checking that it has ``columns``.

    Raises:
        FileNotFoundError: the file is missing.
        ValueError: a column is missing (the message lists the file's columns).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CSV file {path} does not exist.")
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter=separator)
        header = reader.fieldnames or []
        missing = [c for c in columns if c not in header]
        if missing:
            raise ValueError(
                f"{path} has no column(s) {missing}; its columns are {header}. Name the right "
                "ones (--img-key / --caption-key, or img_key / caption_key in a caption split "
                "file) or fix the separator."
            )
        return list(reader)


def resolve_csv_images(
    path: str | os.PathLike,
    rows: list[dict[str, str]],
    img_key: str,
    *,
    check: bool = True,
    image_root: str | os.PathLike | None = None,
) -> list[Path]:
    """The image files of ``rows``, relative to ``image_root`` (default: the CSV's folder);
    absolute paths stay.

    Args:
        check: raise when a listed image does not exist.
        image_root: the folder relative image paths start from (None: the CSV's folder).

    Raises:
        FileNotFoundError: naming how many are missing and a few of them.
    """
    path = Path(path)
    base = Path(image_root) if image_root is not None else path.parent
    files = [(base / r[img_key]).resolve() for r in rows]
    if check:
        absent = [str(f) for f in files if not f.is_file()]
        if absent:
            where = "the CSV's folder" if image_root is None else f"image_root {base}"
            raise FileNotFoundError(
                f"{len(absent)} image(s) listed in {path} do not exist (paths are relative to "
                f"{where}), e.g. {absent[:3]}."
            )
    return files


def read_caption_csv(
    path: str | os.PathLike,
    *,
    img_key: str = "filepath",
    caption_key: str = "caption",
    separator: str = ",",
    check_images: bool = True,
    image_root: str | os.PathLike | None = None,
) -> tuple[list[Path], list[str]]:
    """The image files and captions of an open_clip image-caption CSV.

    Args:
        path: the CSV file.
        img_key, caption_key: column names of the image path and the caption.
        separator: the column separator ("," or "\\t").
        check_images: raise when a listed image does not exist.
        image_root: the folder relative image paths start from (None: the CSV's folder, as
            open_clip reads them).

    Returns:
        (image files, captions), in the file's order; captions are stripped.

    Raises:
        FileNotFoundError: the CSV or a listed image is missing.
        ValueError: a column is missing, the file lists no pair, or a caption is empty.
    """
    rows = read_csv_rows(path, (img_key, caption_key), separator)
    if not rows:
        raise ValueError(f"{path} lists no image-caption pairs.")
    captions = [(r[caption_key] or "").strip() for r in rows]
    empty = [i + 2 for i, c in enumerate(captions) if not c]  # +2: header, 1-based lines
    if empty:
        raise ValueError(f"{path} has empty captions on line(s) {empty[:10]}: fix or drop them.")
    files = resolve_csv_images(path, rows, img_key, check=check_images, image_root=image_root)
    return files, captions
