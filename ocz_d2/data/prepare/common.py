"""Shared machinery of the real-dataset prepare scripts (``datasets/prepare_*.py``).

Every script turns a raw download into the project's layout::

    <out>/images/<split>/<id>.jpg     links to (or copies of) the raw images
    <out>/labels/<split>/<id>.png     uint8 class indices in the native order, 255 = ignore
    <out>/prepare_complete.json       written last: counts and per-class pixel counts

Inputs are checked before any work: a missing folder is named, a folder found at another depth
is reported as a wrong layout (with the path to pass instead), and listed files that are absent
are reported as a partial download (how many, which). Outputs are written atomically (a
temporary name, then ``os.replace``), so an interrupted run leaves no half-written file and a
re-run skips the finished ones; every label, new or reused, is read back and its values checked.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from ...constants import IGNORE_LABEL
from ...utils.io import atomic_write, atomic_write_json, is_temporary_name
from ...utils.parallel import process_map
from ..split_file import load_split_file

__all__ = [
    "PrepareError",
    "Item",
    "PrepareResult",
    "SPLITS_DIR",
    "split_classes",
    "require_dir",
    "require_file",
    "read_id_list",
    "check_listed_files",
    "check_count",
    "build_lut",
    "run_items",
    "format_summary",
]

logger = logging.getLogger(__name__)

SPLITS_DIR = Path(__file__).resolve().parents[1] / "splits"
# Temporary names of earlier versions, still removed when an interrupted run left them.
_OLD_TMP_TAG = ".ocz-tmp"
_MARKER = "prepare_complete.json"


class PrepareError(RuntimeError):
    """A raw input or a produced output is not what the prepare script expects."""


@dataclass(frozen=True)
class Item:
    """One image and label to produce.

    Attributes:
        image_src / label_src: raw files.
        image_dst / label_dst: outputs (``.jpg`` link or copy, ``.png`` label).
        reader: how to read ``label_src``: ``"png"``, ``"sbd_mat"`` or ``"context_mat"``.
    """

    image_src: str
    label_src: str
    image_dst: str
    label_dst: str
    reader: str = "png"


@dataclass
class PrepareResult:
    """What a prepare run produced.

    Attributes:
        out: the output folder.
        counts: split -> number of images.
        written: labels written by this run (the others were reused).
        pixel_counts: int64 [K]: pixels of each class over all splits; ``ignored``: 255 pixels.
        classes: the K class names.
    """

    out: Path
    counts: dict[str, int]
    written: int
    pixel_counts: np.ndarray
    ignored: int
    classes: list[str]


def split_classes(split_file: str) -> tuple[list[str], list]:
    """``(classes, unseen)`` of a package split file (``ocz_d2/data/splits/<split_file>``)."""
    data = load_split_file(SPLITS_DIR / split_file)
    return [str(c) for c in data["classes"]], list(data["unseen"])


def _find_elsewhere(root: Path, name: str, max_depth: int = 3) -> list[Path]:
    """Folders called ``name`` under ``root`` (or its parent) up to ``max_depth`` levels deep."""
    found = []
    for base in (root, root.parent):
        if not base.is_dir():
            continue
        base_depth = len(base.parts)
        for dirpath, dirnames, _ in os.walk(base):
            depth = len(Path(dirpath).parts) - base_depth
            if depth >= max_depth:
                dirnames[:] = []
            if name in dirnames:
                found.append(Path(dirpath) / name)
        if found:
            break
    return found


def require_dir(root: Path, rel: str, what: str, flag: str) -> Path:
    """``root / rel``, which must be a folder.

    Raises:
        PrepareError: ``root`` missing ("missing folder"), or ``rel`` missing with a folder of
            the same name elsewhere ("wrong layout", naming it), or missing altogether.
    """
    root = Path(root)
    if not root.is_dir():
        raise PrepareError(
            f"missing folder: {root} ({what}) does not exist; download and extract it (see "
            f"datasets/README.md) or pass its location with {flag}."
        )
    path = root / rel
    if path.is_dir():
        return path
    leaf = Path(rel).name
    elsewhere = [p for p in _find_elsewhere(root, leaf) if p != path]
    if elsewhere:
        suggestion = elsewhere[0].parent
        for _ in Path(rel).parts[:-1]:
            suggestion = suggestion.parent
        raise PrepareError(
            f"wrong layout: {path} does not exist but {elsewhere[0]} does; {flag} must name the "
            f"folder that holds {rel!r} (try {flag} {suggestion})."
        )
    raise PrepareError(
        f"missing folder: {path} ({what}) does not exist under {flag} {root}; the download is "
        "incomplete or not extracted (see datasets/README.md)."
    )


def require_file(path: Path, what: str) -> Path:
    """``path``, which must be a file (else a :class:`PrepareError` naming it)."""
    if not Path(path).is_file():
        raise PrepareError(f"missing file: {path} ({what}) does not exist.")
    return Path(path)


def read_id_list(path: Path) -> list[str]:
    """Image ids of a list file, one per line (first token; blank lines skipped)."""
    require_file(path, "image list")
    with open(path, encoding="utf-8") as f:
        ids = [line.split()[0] for line in f if line.strip()]
    if len(set(ids)) != len(ids):
        raise PrepareError(f"{path} lists some ids twice.")
    return ids


def check_listed_files(paths: Sequence[str], what: str, folder: Path) -> None:
    """Raise a "partial download" error if some of ``paths`` are missing."""
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        names = ", ".join(os.path.basename(p) for p in missing[:5])
        raise PrepareError(
            f"partial download: {len(missing)} of {len(paths)} {what} are missing from {folder} "
            f"(e.g. {names}); download or extract the archive again."
        )


def check_count(found: int, expected: int | None, what: str) -> None:
    """Raise a "wrong count" error when ``expected`` is set and differs from ``found``."""
    if expected is not None and found != expected:
        raise PrepareError(
            f"wrong count: {what} has {found} images, the protocol expects {expected} (a wrong "
            "or partial list, or another release); pass --no-count-check to accept it."
        )


def build_lut(size: int, mapping: dict[int, int]) -> np.ndarray:
    """uint8 lookup table [size]: ``mapping`` where given, 255 elsewhere."""
    lut = np.full(size, IGNORE_LABEL, dtype=np.uint8)
    for raw, new in mapping.items():
        lut[raw] = new
    return lut


def _read_raw(path: str, reader: str) -> np.ndarray:
    if reader == "png":
        with Image.open(path) as im:
            if im.mode not in ("L", "P"):
                raise PrepareError(f"{path}: label PNG must be mode L or P, got {im.mode}.")
            return np.asarray(im)
    from scipy.io import loadmat

    mat = loadmat(path, squeeze_me=True, struct_as_record=False)
    if reader == "sbd_mat":
        if "GTcls" not in mat:
            raise PrepareError(f"{path}: not an SBD class label file (no GTcls).")
        return np.asarray(mat["GTcls"].Segmentation)
    if reader == "context_mat":
        if "LabelMap" not in mat:
            raise PrepareError(f"{path}: not a PASCAL-Context label file (no LabelMap).")
        return np.asarray(mat["LabelMap"])
    raise ValueError(f"unknown reader {reader!r}")


def _atomic_save_png(array: np.ndarray, dst: str) -> None:
    atomic_write(dst, lambda f: Image.fromarray(array, mode="L").save(f, format="PNG"))


def _copy_into(src: str, f) -> None:
    with open(src, "rb") as s:
        shutil.copyfileobj(s, f)


def _place_image(src: str, dst: str, mode: str) -> None:
    if os.path.lexists(dst):
        return
    # A link is created whole or not at all; a copy goes through a temporary file.
    if mode == "symlink":
        os.symlink(os.path.abspath(src), dst)
    elif mode == "hardlink":
        os.link(src, dst)
    else:
        atomic_write(dst, partial(_copy_into, src))


def _process(item: Item, *, lut: np.ndarray, num_classes: int, image_mode: str):
    """Produce one item; returns ``(label histogram [256], written?)``."""
    written = False
    if not os.path.isfile(item.label_dst):
        raw = _read_raw(item.label_src, item.reader)
        if raw.ndim != 2:
            raise PrepareError(f"{item.label_src}: label must be 2-D, got shape {raw.shape}.")
        if raw.size and (raw.min() < 0 or raw.max() >= len(lut)):
            raise PrepareError(
                f"{item.label_src}: raw label values {int(raw.min())}..{int(raw.max())} are "
                f"outside the raw format's range 0..{len(lut) - 1}."
            )
        with Image.open(item.image_src) as im:
            size = im.size
        if (raw.shape[1], raw.shape[0]) != size:
            raise PrepareError(
                f"{item.label_src}: label is {raw.shape[1]}x{raw.shape[0]} but its image "
                f"{item.image_src} is {size[0]}x{size[1]}."
            )
        _atomic_save_png(lut[raw.astype(np.int64)], item.label_dst)
        written = True
    _place_image(item.image_src, item.image_dst, image_mode)
    with Image.open(item.label_dst) as im:
        label = np.asarray(im)
    hist = np.bincount(label.ravel(), minlength=256).astype(np.int64)
    bad = np.flatnonzero(hist[num_classes:IGNORE_LABEL])
    if bad.size:
        raise PrepareError(
            f"{item.label_dst}: values {(bad + num_classes).tolist()} are out of range "
            f"(0..{num_classes - 1} or {IGNORE_LABEL}); delete it and run again."
        )
    return hist, written


def _remove_temporaries(out: Path) -> None:
    """Delete the temporary files an interrupted run left behind."""
    for dirpath, _, filenames in os.walk(out):
        for name in filenames:
            if is_temporary_name(name) or _OLD_TMP_TAG in name:
                os.remove(os.path.join(dirpath, name))


def run_items(
    out: Path,
    splits: dict[str, list[Item]],
    *,
    classes: Sequence[str],
    lut: np.ndarray,
    workers: int = 1,
    image_mode: str = "symlink",
    progress: bool = True,
    extra_record: dict | None = None,
) -> PrepareResult:
    """Produce every item (in ``workers`` processes, with a progress bar) and check outputs.

    Args:
        out: output folder (``images/``, ``labels/`` and the completion record go there).
        splits: split name -> items.
        classes: the K class names (outputs must hold ``0..K-1`` or 255).
        lut: raw value -> output value.
        workers: processes; 1 runs in this process.
        image_mode: ``"symlink"``, ``"hardlink"`` or ``"copy"`` for the images.
        progress: show a progress bar.
        extra_record: more fields of ``prepare_complete.json``.

    Returns:
        A :class:`PrepareResult`.
    """
    if image_mode not in ("symlink", "hardlink", "copy"):
        raise ValueError(f"image_mode must be symlink, hardlink or copy, got {image_mode!r}")
    out = Path(out)
    marker = out / _MARKER
    if marker.exists():
        marker.unlink()  # re-validated below; written again when everything is done
    if out.is_dir():
        _remove_temporaries(out)
    for split in splits:
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        (out / "labels" / split).mkdir(parents=True, exist_ok=True)
    items = [item for split_items in splits.values() for item in split_items]
    fn = partial(_process, lut=lut, num_classes=len(classes), image_mode=image_mode)
    hist = np.zeros(256, dtype=np.int64)
    written = 0
    bar = tqdm(total=len(items), desc=f"prepare {out.name}", disable=not progress, mininterval=1)
    for h, w in process_map(fn, items, workers=workers):
        hist += h
        written += w
        bar.update()
    bar.close()
    result = PrepareResult(
        out=out,
        counts={split: len(v) for split, v in splits.items()},
        written=written,
        pixel_counts=hist[: len(classes)].copy(),
        ignored=int(hist[IGNORE_LABEL]),
        classes=list(classes),
    )
    record = {
        "counts": result.counts,
        "classes": result.classes,
        "pixel_counts": result.pixel_counts.tolist(),
        "ignored_pixels": result.ignored,
        **(extra_record or {}),
    }
    atomic_write_json(marker, record, indent=1)
    logger.info("%s: %d images, %d labels written", out, len(items), written)
    return result


def format_summary(result: PrepareResult) -> str:
    """A human-readable table: images per split, then pixels per class (share of labelled)."""
    total = int(result.pixel_counts.sum())
    lines = [f"Prepared {result.out}"]
    lines += [f"  {split}: {n} images" for split, n in result.counts.items()]
    lines.append(f"  labels written now: {result.written} (others reused)")
    lines.append(f"  ignored (255) pixels: {result.ignored}")
    lines.append("  per-class pixel counts:")
    for i, (name, n) in enumerate(zip(result.classes, result.pixel_counts)):
        share = 100.0 * n / total if total else 0.0
        lines.append(f"    {i:3d} {name:<24s} {int(n):>14d}  {share:6.2f}%")
    absent = [c for c, n in zip(result.classes, result.pixel_counts) if n == 0]
    if absent:
        lines.append(f"  classes with no pixel: {absent}")
    return "\n".join(lines)
