"""A synthetic compositional zero-shot segmentation benchmark, generated in seconds on a CPU.

Classes are the 16 combinations of 4 hues and 4 textures (``"orange striped"``, ...). Each image
shows a few textured objects (ellipses, rotated rectangles, star-shaped polygons) that occlude
each other on a textured, low-saturation background (label 255, like VOC's background). The
unseen classes form a Latin square: one per hue and one per texture, so every attribute value
also appears in three seen classes. Class embeddings are exactly factorised: orthonormal hue and
texture vectors, class vector = normalize(hue vector + texture vector), so a model that learns
the attributes from seen classes can recognise the unseen combinations.

Layout written under ``root`` (usually ``$DETECTRON2_DATASETS/ocz_synthetic``)::

    images/{train,val}/NNNNN.png   RGB uint8
    labels/{train,val}/NNNNN.png   uint8 class indices 0..15, 255 = background / ignore
    class_embeddings.npz           classes [16], embeddings float32 [16, D] (+ attribute vectors)
    split.yaml                     split file; paths relative to root's parent
    generation_complete.json       written last: a folder without it is regenerated

The paths in ``split.yaml`` start with the folder name of ``root``, so the file registers as is
when ``DETECTRON2_DATASETS`` is ``root``'s parent (or with ``register_split_file(path,
root=root.parent)``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import yaml
from PIL import Image

from .register_zero_shot import IGNORE_LABEL

__all__ = [
    "HUES",
    "TEXTURES",
    "SYNTHETIC_CLASSES",
    "SYNTHETIC_UNSEEN",
    "UNSEEN_CELLS",
    "SyntheticBenchmark",
    "default_synthetic_root",
    "ensure_synthetic_benchmark",
    "generate_synthetic_benchmark",
    "render_synthetic_sample",
    "synthetic_class_embeddings",
    "synthetic_split_config",
]

logger = logging.getLogger(__name__)

#: Hue names and their HSV hue in degrees: 90 degrees apart, so a photometric hue jitter of up
#: to +-36 degrees (the default distortion) cannot turn one hue into another.
HUES: dict[str, float] = {"orange": 30.0, "green": 120.0, "blue": 210.0, "magenta": 300.0}
#: Texture names: the pattern drawn inside an object (periods of 6-10 pixels).
TEXTURES: tuple[str, ...] = ("plain", "striped", "dotted", "checkered")
#: Class names in label order: index = 4 * hue index + texture index.
SYNTHETIC_CLASSES: tuple[str, ...] = tuple(f"{h} {t}" for h in HUES for t in TEXTURES)
#: Unseen (hue index, texture index) cells: a Latin square, one per row and one per column.
UNSEEN_CELLS: tuple[tuple[int, int], ...] = ((0, 1), (1, 3), (2, 0), (3, 2))
#: Unseen class names, sorted by class index.
SYNTHETIC_UNSEEN: tuple[str, ...] = tuple(
    SYNTHETIC_CLASSES[len(TEXTURES) * h + t] for h, t in sorted(UNSEEN_CELLS)
)

# Bump when the rendering changes, so that folders made by an older generator are regenerated.
_GENERATOR_VERSION = 2
_MARKER = "generation_complete.json"
_SPLITS = ("train", "val")
_HUE_JITTER = 6.0  # degrees, per object


@dataclass(frozen=True)
class SyntheticBenchmark:
    """What :func:`generate_synthetic_benchmark` made (or found complete)."""

    root: Path
    split_file: Path
    class_embeddings: Path
    dataset: str
    classes: tuple[str, ...]
    unseen: tuple[str, ...]
    num_train: int
    num_val: int
    image_size: int
    generated: bool


def synthetic_split_config(dataset: str = "synthetic", folder: str = "ocz_synthetic") -> dict:
    """The split-file contents of a synthetic benchmark stored in ``<datasets>/<folder>``.

    Args:
        dataset: the split file's ``dataset`` (registered names ``ocz_<dataset>_<split>``).
        folder: the benchmark's folder, relative to the datasets root.

    Returns:
        The mapping that :func:`~ocz_d2.data.split_file.load_split_file` reads.
    """
    return {
        "dataset": dataset,
        "classes": list(SYNTHETIC_CLASSES),
        "unseen": list(SYNTHETIC_UNSEEN),
        "class_embeddings": f"{folder}/class_embeddings.npz",
        "splits": {
            split: {
                "image_root": f"{folder}/images/{split}",
                "label_root": f"{folder}/labels/{split}",
                "image_ext": ".png",
            }
            for split in _SPLITS
        },
    }


def synthetic_class_embeddings(dim: int = 64, seed: int = 0) -> dict[str, np.ndarray]:
    """Factorised class embeddings of the synthetic classes.

    Args:
        dim: embedding dimension D (at least the number of attribute values, 8).
        seed: seed of the random orthonormal attribute basis.

    Returns:
        ``classes`` unicode [16]; ``embeddings`` float32 [16, D], row ``4 h + t`` equal to
        ``(hue_vectors[h] + texture_vectors[t]) / sqrt(2)``; ``hue_vectors`` and
        ``texture_vectors`` float32 [4, D], all 8 vectors orthonormal; ``hues`` and
        ``textures`` unicode [4].
    """
    n_attr = len(HUES) + len(TEXTURES)
    if dim < n_attr:
        raise ValueError(f"embedding_dim must be at least {n_attr} (orthonormal attributes).")
    rng = np.random.default_rng([seed, 0xE3B])
    basis, _ = np.linalg.qr(rng.standard_normal((dim, n_attr)))
    basis = basis.T  # [8, D], orthonormal rows
    hue_vecs, tex_vecs = basis[: len(HUES)], basis[len(HUES) :]
    emb = (hue_vecs[:, None, :] + tex_vecs[None, :, :]).reshape(-1, dim)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return {
        "classes": np.array(SYNTHETIC_CLASSES),
        "embeddings": emb.astype(np.float32),
        "hue_vectors": hue_vecs.astype(np.float32),
        "texture_vectors": tex_vecs.astype(np.float32),
        "hues": np.array(list(HUES)),
        "textures": np.array(TEXTURES),
    }


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """HSV (hue in degrees, s and v in [0, 1]) arrays [H, W] -> float RGB [H, W, 3] in [0, 255]."""
    hsv = np.stack(np.broadcast_arrays(h, s, v), axis=-1).astype(np.float32)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB) * 255.0


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A low-saturation image with blotchy low-frequency and fine noise: float RGB [S, S, 3]."""
    coarse = rng.standard_normal((size // 16 + 2, size // 16 + 2)).astype(np.float32)
    blotches = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC) * 0.08
    fine = rng.standard_normal((size, size)).astype(np.float32) * 0.03
    value = np.clip(rng.uniform(0.35, 0.7) + blotches + fine, 0.0, 1.0)
    return _hsv_to_rgb(np.float32(rng.uniform(0, 360)), np.float32(rng.uniform(0, 0.12)), value)


def _texture_pattern(rng: np.random.Generator, texture: int, xx: np.ndarray, yy: np.ndarray):
    """Boolean [S, S] pattern of one texture (True = pattern colour), randomly rotated."""
    name = TEXTURES[texture]
    if name == "plain":
        return np.zeros(xx.shape, dtype=bool)
    # A checkerboard turned by ~45 degrees is a lattice of dark diamonds that looks like dots:
    # keep it within 15 degrees of the axes. Stripes and dots take any orientation.
    theta = rng.uniform(-np.pi / 12, np.pi / 12) if name == "checkered" else rng.uniform(0, np.pi)
    u = xx * np.cos(theta) + yy * np.sin(theta) + rng.uniform(0, 32)
    v = -xx * np.sin(theta) + yy * np.cos(theta) + rng.uniform(0, 32)
    if name == "striped":
        period = rng.uniform(6.0, 9.0)
        return np.mod(u, period) < period / 2
    if name == "dotted":
        period = rng.uniform(7.0, 10.0)
        radius = period * rng.uniform(0.25, 0.32)
        du, dv = np.mod(u, period) - period / 2, np.mod(v, period) - period / 2
        return du * du + dv * dv < radius * radius
    cell = rng.uniform(3.0, 4.5)  # checkered
    return np.mod(np.floor(u / cell) + np.floor(v / cell), 2) == 0


def _shape_mask(rng: np.random.Generator, size: int) -> np.ndarray:
    """Boolean [S, S] mask of a random ellipse, rotated rectangle or star-shaped polygon."""
    mask = np.zeros((size, size), dtype=np.uint8)
    radius = rng.uniform(0.1, 0.22) * size
    cx, cy = rng.uniform(0.15, 0.85, size=2) * size
    kind = rng.integers(3)
    if kind == 0:
        axes = (round(radius), round(radius * rng.uniform(0.5, 1.0)))
        angle = rng.uniform(0, 180)
        cv2.ellipse(mask, (round(cx), round(cy)), axes, angle, 0, 360, 1, thickness=-1)
    elif kind == 1:
        box = ((cx, cy), (2 * radius, 2 * radius * rng.uniform(0.5, 1.0)), rng.uniform(0, 180))
        cv2.fillPoly(mask, [np.round(cv2.boxPoints(box)).astype(np.int32)], 1)
    else:
        n = rng.integers(5, 9)
        angles = np.sort(rng.uniform(0, 2 * np.pi, size=n))
        radii = radius * rng.uniform(0.6, 1.0, size=n)
        pts = np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], axis=1)
        cv2.fillPoly(mask, [np.round(pts).astype(np.int32)], 1)
    return mask.astype(bool)


def render_synthetic_sample(
    rng: np.random.Generator, image_size: int = 128, min_objects: int = 2, max_objects: int = 5
) -> tuple[np.ndarray, np.ndarray]:
    """Render one image and its label.

    Args:
        rng: random generator (all randomness comes from it).
        image_size: side S of the square image.
        min_objects, max_objects: range of the number of objects (later ones occlude earlier).

    Returns:
        ``(image, label)``: uint8 RGB [S, S, 3] and uint8 [S, S] (class index, 255 elsewhere).
    """
    size = image_size
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    image = _background(rng, size)
    label = np.full((size, size), IGNORE_LABEL, dtype=np.uint8)
    for _ in range(rng.integers(min_objects, max_objects + 1)):
        cls = int(rng.integers(len(SYNTHETIC_CLASSES)))
        hue_idx, tex_idx = divmod(cls, len(TEXTURES))
        mask = _shape_mask(rng, size)
        hue = np.float32(list(HUES.values())[hue_idx] + rng.uniform(-_HUE_JITTER, _HUE_JITTER))
        sat = np.float32(rng.uniform(0.65, 1.0))
        val = rng.uniform(0.7, 1.0)
        # A gentle shading gradient, and a dark pattern colour of the same hue.
        shade = 1.0 + 0.1 * ((xx - size / 2) * rng.uniform(-1, 1) / size)
        pattern = _texture_pattern(rng, tex_idx, xx, yy)
        value = np.where(pattern, val * rng.uniform(0.25, 0.45), val) * shade
        colors = _hsv_to_rgb(hue, sat, np.clip(value, 0, 1).astype(np.float32))
        image[mask] = colors[mask]
        label[mask] = cls
    image += rng.normal(0.0, 2.0, size=image.shape).astype(np.float32)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), label


def _dataset_name_for(root: Path) -> str:
    name = re.sub(r"[^A-Za-z0-9_]", "_", root.name) or "synthetic"
    return name[len("ocz_") :] if name.startswith("ocz_") and len(name) > 4 else name


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Like ``np.savez`` but byte-for-byte reproducible (fixed zip timestamps)."""
    tmp = path.with_name(path.name + ".tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:
        for key, arr in arrays.items():
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            with zf.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asanyarray(arr), allow_pickle=False)
    os.replace(tmp, path)


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _split_yaml(dataset: str, folder: str) -> str:
    header = (
        "# Synthetic compositional zero-shot benchmark, written by "
        "ocz_d2.data.synthetic.generate_synthetic_benchmark.\n"
        f"# Paths are relative to DETECTRON2_DATASETS (the folder that holds {folder}/).\n"
    )
    body = yaml.safe_dump(
        synthetic_split_config(dataset, folder), sort_keys=False, width=100, allow_unicode=True
    )
    return header + body


def generate_synthetic_benchmark(
    root: str | os.PathLike,
    *,
    num_train: int = 1000,
    num_val: int = 100,
    image_size: int = 128,
    seed: int = 0,
    embedding_dim: int = 64,
    min_objects: int = 2,
    max_objects: int = 5,
    dataset_name: str | None = None,
    force: bool = False,
    progress: Callable[[str, int, int], None] | None = None,
) -> SyntheticBenchmark:
    """Generate the synthetic benchmark under ``root`` (deterministic given the arguments).

    Image ``i`` of a split depends only on ``(seed, split, i)``, so the first images of a larger
    set equal those of a smaller one. A complete folder made with the same arguments is reused;
    otherwise (missing, half-written, other arguments, or ``force``) the generated files are
    removed and written again.

    Args:
        root: output folder, e.g. ``$DETECTRON2_DATASETS/ocz_synthetic``.
        num_train, num_val: number of images per split.
        image_size: side of the square images, in pixels.
        seed: random seed.
        embedding_dim: dimension D of the class embeddings.
        min_objects, max_objects: number of objects per image.
        dataset_name: the split file's ``dataset``; default: ``root``'s folder name without
            an ``ocz_`` prefix (``ocz_synthetic`` -> ``synthetic``).
        force: regenerate even if a complete folder exists.
        progress: called as ``progress(split, done, total)`` after each image.

    Returns:
        A :class:`SyntheticBenchmark` describing the folder.
    """
    if num_train < 0 or num_val < 0 or image_size < 16 or not 1 <= min_objects <= max_objects:
        raise ValueError(
            "Need num_train, num_val >= 0, image_size >= 16 and 1 <= min_objects <= "
            f"max_objects; got {num_train}, {num_val}, {image_size}, {min_objects}, {max_objects}."
        )
    root = Path(root).expanduser().absolute()
    dataset = dataset_name or _dataset_name_for(root)
    params = {
        "generator_version": _GENERATOR_VERSION,
        "num_train": num_train,
        "num_val": num_val,
        "image_size": image_size,
        "seed": seed,
        "embedding_dim": embedding_dim,
        "min_objects": min_objects,
        "max_objects": max_objects,
        "dataset": dataset,
    }
    info = SyntheticBenchmark(
        root=root,
        split_file=root / "split.yaml",
        class_embeddings=root / "class_embeddings.npz",
        dataset=dataset,
        classes=SYNTHETIC_CLASSES,
        unseen=SYNTHETIC_UNSEEN,
        num_train=num_train,
        num_val=num_val,
        image_size=image_size,
        generated=True,
    )
    marker = root / _MARKER
    if not force and marker.is_file():
        try:
            complete = json.loads(marker.read_text(encoding="utf-8")) == params
        except (OSError, ValueError):
            complete = False
        if complete:
            logger.info("Synthetic benchmark in %s is complete; reusing it.", root)
            return SyntheticBenchmark(**{**info.__dict__, "generated": False})

    # Remove only what this function writes: root may hold other files of the user.
    marker.unlink(missing_ok=True)
    for split in _SPLITS:
        for kind in ("images", "labels"):
            shutil.rmtree(root / kind / split, ignore_errors=True)
            (root / kind / split).mkdir(parents=True)

    for split_idx, (split, count) in enumerate(zip(_SPLITS, (num_train, num_val))):
        for i in range(count):
            rng = np.random.default_rng([seed, split_idx, i])
            image, label = render_synthetic_sample(rng, image_size, min_objects, max_objects)
            # Level 1: the noisy images barely compress better at higher levels, only slower.
            Image.fromarray(image).save(root / "images" / split / f"{i:05d}.png", compress_level=1)
            Image.fromarray(label).save(root / "labels" / split / f"{i:05d}.png", compress_level=1)
            if progress is not None:
                progress(split, i + 1, count)

    _write_npz(info.class_embeddings, synthetic_class_embeddings(embedding_dim, seed))
    _write_text(info.split_file, _split_yaml(dataset, root.name))
    _write_text(marker, json.dumps(params, indent=2, sort_keys=True) + "\n")
    logger.info(
        "Generated the synthetic benchmark in %s: %d train / %d val images of %d px.",
        root,
        num_train,
        num_val,
        image_size,
    )
    return info


def default_synthetic_root() -> Path:
    """``$DETECTRON2_DATASETS/ocz_synthetic`` (``datasets/ocz_synthetic`` if unset), absolute:
    the folder that the builtin splits ``ocz_synthetic_{train,val}`` read."""
    return Path(os.environ.get("DETECTRON2_DATASETS", "datasets")).expanduser().absolute() / (
        "ocz_synthetic"
    )


def ensure_synthetic_benchmark(root: str | os.PathLike | None = None, **kwargs) -> Path:
    """Generate the synthetic benchmark unless a complete one with these arguments exists.

    Args:
        root: output folder; ``None`` uses :func:`default_synthetic_root`.
        kwargs: arguments of :func:`generate_synthetic_benchmark` (defaults: 1000 / 100 images
            of 128 px, seed 0).

    Returns:
        The benchmark folder.
    """
    root = Path(root) if root is not None else default_synthetic_root()
    return generate_synthetic_benchmark(root, **kwargs).root
