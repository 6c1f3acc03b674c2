"""How well a guide's object maps follow the true objects: purity against reference maps.

OC-ZSS's object prompts are only as good as the guide's regions. Given a guide's precomputed
object maps (``tools/precompute_object_maps.py``) and reference maps of the same images (e.g. the
synthetic benchmark's true instance maps, ``object_maps/oracle``), this counts, image by image,
the pixels of each (guide region, true object) pair and reports:

- **purity**: the fraction of pixels whose guide region's majority object is their own object
  (1: no region straddles two objects; it rewards cutting objects into pieces);
- **inverse purity**: the fraction of pixels whose object's majority region is their own region
  (1: no object is split; it rewards one region for everything);
- their harmonic mean, **F**, which neither trick raises;
- **mean best overlap** (mBO, the object-discovery literature's measure): for each reference
  object other than the background, the IoU of the guide region that overlaps it best, averaged
  over objects, so that a small object counts as much as a large one. Pixel-weighted purity is
  dominated by the background wherever it covers most of the image; mBO is not.

Pixels that either map marks "no region" (255) are left out. Regions are matched within an image
only: region 3 of one image has nothing to do with region 3 of another.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from ..constants import IGNORE_LABEL
from ..utils.errors import DataError, unreadable_file_message

__all__ = ["MapAgreement", "majority_on_grid", "map_agreement", "object_map_folder_agreement"]


class MapAgreement:
    """Running sums over images: pixels, majority-object pixels, majority-region pixels, and the
    best IoU of each non-background reference object.

    Args:
        background: the reference value that is the background (left out of mBO; None: every
            reference region is an object).
        ignore: "no region", in either map.
    """

    def __init__(self, background: int | None = 0, ignore: int = IGNORE_LABEL):
        self.background = background
        self.ignore = ignore
        self.pixels = 0
        self.region_majority = 0
        self.object_majority = 0
        self.best_ious: list[float] = []
        self.images = 0

    def add(self, regions: np.ndarray, objects: np.ndarray) -> None:
        """Add one image: ``regions`` (the guide's map) and ``objects`` (the reference map), two
        integer arrays of one shape."""
        ignore = self.ignore
        if regions.shape != objects.shape:
            raise ValueError(
                f"an object map of shape {regions.shape} against a reference of shape "
                f"{objects.shape}: the two must be maps of the same image"
            )
        keep = (regions != ignore) & (objects != ignore)
        r = regions[keep].astype(np.int64)
        o = objects[keep].astype(np.int64)
        self.images += 1
        if r.size == 0:
            return
        # Contingency table of (region, object) pixel counts.
        _, r_idx = np.unique(r, return_inverse=True)
        object_ids, o_idx = np.unique(o, return_inverse=True)
        table = np.zeros((r_idx.max() + 1, o_idx.max() + 1), dtype=np.int64)
        np.add.at(table, (r_idx, o_idx), 1)
        self.pixels += int(r.size)
        self.region_majority += int(table.max(axis=1).sum())
        self.object_majority += int(table.max(axis=0).sum())
        union = table.sum(axis=1, keepdims=True) + table.sum(axis=0, keepdims=True) - table
        best = (table / union).max(axis=0)
        self.best_ious.extend(float(v) for v, k in zip(best, object_ids) if k != self.background)

    def result(self) -> dict[str, float | int | None]:
        """``{"purity", "inverse_purity", "f", "mbo", "objects", "pixels", "images"}``
        (fractions in 0..1; mbo None when no object was seen)."""
        if self.pixels == 0:
            raise ValueError("no pixel with both a region and an object: nothing was measured")
        purity = self.region_majority / self.pixels
        inverse = self.object_majority / self.pixels
        return {
            "purity": purity,
            "inverse_purity": inverse,
            "f": 2 * purity * inverse / (purity + inverse),
            "mbo": float(np.mean(self.best_ious)) if self.best_ious else None,
            "objects": len(self.best_ious),
            "pixels": self.pixels,
            "images": self.images,
        }


def map_agreement(regions, objects, background: int | None = 0) -> dict:
    """:meth:`MapAgreement.result` of one image."""
    counts = MapAgreement(background)
    counts.add(np.asarray(regions), np.asarray(objects))
    return counts.result()


def majority_on_grid(labels: np.ndarray, patch: int) -> np.ndarray:
    """Each ``patch`` x ``patch`` block of ``labels`` (the last ones may be smaller) set to its
    most frequent value (the smallest value on ties)."""
    out = np.empty_like(labels)
    height, width = labels.shape
    for y in range(0, height, patch):
        for x in range(0, width, patch):
            block = labels[y : y + patch, x : x + patch]
            values, counts = np.unique(block, return_counts=True)
            out[y : y + patch, x : x + patch] = values[counts.argmax()]
    return out


def _read_map(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as im:
            return np.asarray(im)
    except OSError as e:
        raise DataError(
            unreadable_file_message(f"cannot read the object map {path}", str(path), e)
        ) from e


def object_map_folder_agreement(
    folder: str | os.PathLike,
    reference: str | os.PathLike,
    *,
    background: int | None = 0,
    single_region: bool = False,
    reference_grid: int = 0,
    max_images: int | None = None,
) -> dict:
    """:class:`MapAgreement` of every map in ``folder`` with the map of the same name in
    ``reference``.

    Args:
        folder: a folder of object maps (``<stem>.png``).
        reference: the reference maps of the same images (every stem of ``folder`` must be
            there).
        background: the reference's background value (None: none).
        single_region: measure instead the trivial guide that gives each image one region
            (where ``folder``'s map has a region): purity's floor, inverse purity 1.
        reference_grid: measure instead the best a guide on a grid of ``reference_grid``-pixel
            patches can do: the reference map itself, each patch given its majority region.
        max_images: the first N maps (sorted by name) only.

    Raises:
        DataError: a missing or empty folder, a map without its reference, an unreadable file.
    """
    folder, reference = Path(folder), Path(reference)
    for f, what in ((folder, "object-map"), (reference, "reference")):
        if not f.is_dir():
            raise DataError(f"the {what} folder {f} does not exist")
    files: Sequence[Path] = sorted(folder.glob("*.png"))[:max_images]
    if not files:
        raise DataError(f"{folder} has no .png object maps")
    missing = [f.name for f in files if not (reference / f.name).is_file()]
    if missing:
        raise DataError(
            f"{len(missing)} maps of {folder} have no reference in {reference} (first: "
            f"{missing[0]}): give the reference maps of the same split"
        )
    counts = MapAgreement(background)
    for f in files:
        regions = _read_map(f)
        objects = _read_map(reference / f.name)
        if single_region:
            regions = np.where(regions == IGNORE_LABEL, IGNORE_LABEL, 0)
        elif reference_grid:
            regions = majority_on_grid(objects, reference_grid)
        counts.add(regions, objects)
    return counts.result()
