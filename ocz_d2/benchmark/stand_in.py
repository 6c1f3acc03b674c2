"""Stand-in files for a registered zero-shot split whose data is not on the machine.

:func:`write_stand_in_split` writes ``N`` image/label pairs in the on-disk formats of the real
split (datasets/README.md): images with the split's image extension (JPEG for the real
benchmarks, as ``datasets/prepare_*.py`` link them), single-channel ``L`` label PNGs of class
indices ``0 .. K-1`` with 255 for background and object boundaries (as VOC's labels after
``prepare_voc.py``), and, when asked, object maps as ``tools/precompute_object_maps.py`` stores
them: ``<dataset folder>/object_maps/<name>/<split>/<stem>.png`` (region ids ``0 .. n_o - 1`` on
the 16-pixel patch grid, compression level 1) with the folder's ``object_maps.json`` record.
:func:`register_stand_in_split` registers the files with the real split's metadata (classes,
unseen classes, ignore label, class-embedding file, split file), so that
:class:`~ocz_d2.data.ZeroShotSemSegDatasetMapper` does the same work on them as on the real data.

The content is natural-image-like enough for decoding to cost what a photograph's does: smooth
colour fields and mid-frequency texture plus mild noise, and 1 to 4 objects (ellipses and random
polygons of random classes, later ones occluding earlier ones) whose pixels differ in colour from
the background. Every file is a function of ``(seed, index)``.

Used by the benchmark (:func:`ocz_d2.benchmark.throughput.loader_throughput`) to time the train
loader at the paper recipe without the dataset; the numbers say nothing about accuracy.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from detectron2.data import MetadataCatalog
from PIL import Image, ImageDraw

from ..constants import IGNORE_LABEL, OBJECT_MAP_KEY
from ..data.object_maps import write_record
from ..data.register_zero_shot import register_zero_shot_split, registered_file_extensions

__all__ = [
    "STAND_IN_SIZE",
    "StandInSplit",
    "register_stand_in_split",
    "stand_in_format",
    "stand_in_object_map",
    "stand_in_sample",
    "write_stand_in_split",
]

#: (width, height) of the stand-in images: PASCAL VOC's most common size (landscape 500x375).
STAND_IN_SIZE = (500, 375)
#: JPEG quality of the stand-in images.
JPEG_QUALITY = 90
#: Width of the 255 band drawn on object outlines (VOC's boundaries are about 5 pixels wide).
BOUNDARY_WIDTH = 5
#: Side of the patch grid that object maps' regions live on (ViT-B/16, as precomputed).
OBJECT_MAP_PATCH = 16


@dataclass(frozen=True)
class StandInSplit:
    """Where :func:`write_stand_in_split` put its files, and what they are."""

    root: Path
    image_root: Path
    label_root: Path
    object_map_root: Path | None
    image_ext: str
    label_ext: str
    num_images: int
    size: tuple[int, int]  # (width, height)
    mean_image_kb: float
    seconds: float


def stand_in_format(dataset_name: str) -> tuple[str, str]:
    """(image extension, label extension) of a registered split: its own, or ``.jpg`` where it
    accepts any image extension (the real benchmarks' images are JPEGs)."""
    registered = registered_file_extensions(dataset_name)
    image_ext = registered[0] if registered is not None and registered[0] else ".jpg"
    label_ext = registered[1] if registered is not None else ".png"
    return image_ext, label_ext


def _smooth_field(rng: np.random.Generator, cells: tuple[int, int], size, amplitude, mode):
    """float32 [H, W, 3]: a random grid of ``cells`` (rows, cols) upsampled to ``size`` (w, h)."""
    grid = rng.normal(0.0, amplitude, (*cells, 3)).astype(np.float32)
    channels = [
        np.asarray(Image.fromarray(np.ascontiguousarray(grid[..., c])).resize(size, mode))
        for c in range(3)
    ]
    return np.stack(channels, axis=-1)


def _shape(rng: np.random.Generator, width: int, height: int) -> tuple[str, list]:
    """A random ellipse (bounding box) or polygon (vertices) inside the image."""
    cx, cy = rng.uniform(0.1, 0.9) * width, rng.uniform(0.1, 0.9) * height
    rx = rng.uniform(0.08, 0.4) * width
    ry = rx * rng.uniform(0.5, 1.6)
    if rng.random() < 0.4:
        return "ellipse", [cx - rx, cy - ry, cx + rx, cy + ry]
    n = int(rng.integers(5, 11))
    angles = np.sort(rng.uniform(0, 2 * np.pi, n))
    radii = rng.uniform(0.5, 1.0, n)
    return "polygon", [
        (float(cx + rx * r * np.cos(a)), float(cy + ry * r * np.sin(a)))
        for a, r in zip(angles, radii)
    ]


def _draw(draw: ImageDraw.ImageDraw, kind: str, xy: list, **kwargs) -> None:
    (draw.ellipse if kind == "ellipse" else draw.polygon)(xy, **kwargs)


def stand_in_sample(
    index: int, size: tuple[int, int], num_classes: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Image ``index`` of a stand-in split: (uint8 RGB [H, W, 3], uint8 label [H, W]).

    Labels: 255 (background, as VOC's background after preparation) with 1 to 4 objects of
    random classes ``0 .. num_classes - 1``, each outlined by a :data:`BOUNDARY_WIDTH` band of
    255. The image: a smooth colour field with mid-frequency texture, each object a colour
    field of its own, plus fine texture and mild pixel noise (about 60 KB per 500x375 JPEG).
    """
    width, height = size
    rng = np.random.default_rng([seed, index])
    image = 120.0 + _smooth_field(rng, (3, 4), size, 45.0, Image.BICUBIC)
    image += _smooth_field(rng, (height // 6, width // 6), size, 12.0, Image.BILINEAR)
    label = Image.new("L", size, IGNORE_LABEL)
    objects = Image.new("L", size, 0)  # 0: background, j + 1: object j (without boundaries)
    draw_label, draw_objects = ImageDraw.Draw(label), ImageDraw.Draw(objects)
    num_objects = int(rng.integers(1, 5))
    for j in range(num_objects):
        kind, xy = _shape(rng, width, height)
        class_id = int(rng.integers(0, num_classes))
        _draw(draw_label, kind, xy, fill=class_id, outline=IGNORE_LABEL, width=BOUNDARY_WIDTH)
        _draw(draw_objects, kind, xy, fill=j + 1)
    objects_arr = np.asarray(objects)
    for j in range(num_objects):
        mask = objects_arr == j + 1
        base = rng.uniform(20, 235, 3).astype(np.float32)
        field = base + _smooth_field(rng, (2, 3), size, 30.0, Image.BICUBIC)
        field += _smooth_field(rng, (height // 4, width // 4), size, 10.0, Image.BILINEAR)
        image[mask] = field[mask]
    # Fine texture (2-pixel cells) and pixel noise: the bits per pixel of a photograph's JPEG.
    image += _smooth_field(rng, (height // 2, width // 2), size, 10.0, Image.BILINEAR)
    image += rng.normal(0.0, 6.0, image.shape).astype(np.float32)
    return np.clip(image, 0, 255).astype(np.uint8), np.asarray(label).copy()


def stand_in_object_map(
    index: int, size: tuple[int, int], num_objects: int, seed: int = 0
) -> np.ndarray:
    """uint8 [H, W] object map of image ``index``: ``num_objects`` Voronoi regions of random
    seeds on the :data:`OBJECT_MAP_PATCH` grid, as the guide's clustering gives blocks of patches
    (``tools/precompute_object_maps.py`` repeats each patch's region over its pixels)."""
    width, height = size
    rng = np.random.default_rng([seed, index, 1])
    gh, gw = -(-height // OBJECT_MAP_PATCH), -(-width // OBJECT_MAP_PATCH)
    seeds = rng.uniform(0, 1, (num_objects, 2)) * (gh, gw)
    yy, xx = np.mgrid[0:gh, 0:gw]
    dist = (yy[None] + 0.5 - seeds[:, 0, None, None]) ** 2
    dist = dist + (xx[None] + 0.5 - seeds[:, 1, None, None]) ** 2
    grid = dist.argmin(0).astype(np.uint8)
    pixels = grid.repeat(OBJECT_MAP_PATCH, 0).repeat(OBJECT_MAP_PATCH, 1)
    return np.ascontiguousarray(pixels[:height, :width])


def write_stand_in_split(
    root: str | os.PathLike,
    num_images: int,
    *,
    num_classes: int,
    size: tuple[int, int] = STAND_IN_SIZE,
    image_ext: str = ".jpg",
    label_ext: str = ".png",
    num_objects: int = 0,
    object_map_record: dict | None = None,
    split: str = "train",
    seed: int = 0,
) -> StandInSplit:
    """Write ``num_images`` stand-in pairs (and object maps) under ``root``.

    Layout, as the real benchmarks' (datasets/README.md) and ``precompute_object_maps.py``'s::

        root/images/<split>/<NNNNNN><image_ext>      RGB, JPEG quality 90 for .jpg/.jpeg
        root/labels/<split>/<NNNNNN><label_ext>      mode L, classes 0..K-1, 255 = ignore
        root/object_maps/stand_in/<split>/<NNNNNN>.png and object_maps.json   (num_objects > 0)

    Args:
        root: the stand-in dataset folder (created).
        num_images: N >= 1.
        num_classes: K of the real split.
        size: (width, height) of every image.
        image_ext, label_ext: the real split's extensions (:func:`stand_in_format`).
        num_objects: n_o of the object maps (0: none).
        object_map_record: the maps' ``object_maps.json`` (default: ``{"num_objects": n_o}``);
            ``"stand_in": true`` is added.
        split: the split folder's name.
        seed: the files are a function of it.
    """
    if num_images < 1 or min(size) < 1 or not 0 < num_classes < IGNORE_LABEL:
        raise ValueError(
            f"need num_images >= 1, a positive size and 0 < num_classes < {IGNORE_LABEL}; got "
            f"{num_images}, {size}, {num_classes}"
        )
    start = time.perf_counter()
    root = Path(root)
    image_root, label_root = root / "images" / split, root / "labels" / split
    map_root = root / "object_maps" / "stand_in" / split if num_objects > 0 else None
    for folder in (image_root, label_root, map_root):
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
    size = (int(size[0]), int(size[1]))
    image_bytes = 0
    for i in range(num_images):
        image, label = stand_in_sample(i, size, num_classes, seed)
        stem = f"{i:06d}"
        image_path = image_root / f"{stem}{image_ext}"
        if image_ext.lower() in (".jpg", ".jpeg"):
            Image.fromarray(image).save(image_path, quality=JPEG_QUALITY)
        else:
            Image.fromarray(image).save(image_path)
        image_bytes += image_path.stat().st_size
        Image.fromarray(label).save(label_root / f"{stem}{label_ext}")
        if map_root is not None:
            regions = stand_in_object_map(i, size, num_objects, seed)
            Image.fromarray(regions).save(map_root / f"{stem}.png", compress_level=1)
    if map_root is not None:
        record = dict(object_map_record or {"num_objects": int(num_objects)})
        write_record(map_root, {**record, "stand_in": True})
    return StandInSplit(
        root=root,
        image_root=image_root,
        label_root=label_root,
        object_map_root=map_root,
        image_ext=image_ext,
        label_ext=label_ext,
        num_images=num_images,
        size=size,
        mean_image_kb=image_bytes / num_images / 1024,
        seconds=time.perf_counter() - start,
    )


def register_stand_in_split(name: str, like: str, files: StandInSplit) -> str:
    """Register ``files`` as the zero-shot split ``name`` with the metadata of the registered
    split ``like`` (classes, unseen classes, class-embedding file where it exists, split file);
    the object maps, if any, as its ``object_map`` extra label root. Returns the registered
    name (undo with :func:`~ocz_d2.data.unregister_zero_shot_split`)."""
    meta = MetadataCatalog.get(like)
    ignore = int(meta.get("ignore_label", IGNORE_LABEL))
    if ignore != IGNORE_LABEL:
        raise ValueError(
            f"{like} has ignore label {ignore}; stand-in splits are registered with "
            f"{IGNORE_LABEL}, as every split of register_zero_shot_split"
        )
    embeddings = meta.get("class_embeddings", None)
    extra = {OBJECT_MAP_KEY: str(files.object_map_root)} if files.object_map_root else None
    return register_zero_shot_split(
        name,
        image_root=str(files.image_root),
        label_root=str(files.label_root),
        classes=list(meta.stuff_classes),
        unseen=list(meta.get("unseen_classes", [])),
        class_embeddings=embeddings if embeddings and os.path.isfile(embeddings) else None,
        image_ext=files.image_ext,
        label_ext=files.label_ext,
        extra_label_roots=extra,
        split_file=meta.get("split_file", None),
    )
