"""A synthetic compositional zero-shot segmentation benchmark, generated in seconds on a CPU.

Classes are the 16 combinations of 4 hues and 4 textures (``"orange striped"``, ...). Each image
shows a few textured objects (ellipses, rotated rectangles, star-shaped polygons) that occlude
each other on a textured, low-saturation background (label 255, like VOC's background). The
unseen classes form a Latin square: one per hue and one per texture, so every attribute value
also appears in three seen classes. Class embeddings are exactly factorised: orthonormal hue and
texture vectors, class vector = normalize(hue vector + texture vector), so a model that learns
the attributes from seen classes can recognise the unseen combinations.

Layout written under ``root`` (usually ``$DETECTRON2_DATASETS/ocz_synthetic``)::

    images/{train,val,test}/NNNNN.png   RGB uint8
    labels/{train,val,test}/NNNNN.png   uint8 class indices 0..15, 255 = background / ignore
    captions/{train,val,test}.csv       filepath,caption: one caption per image (never used to
                                        train the segmentation model)
    pretrain/images/NNNNN.png           image-caption pretraining set for the tiny CLIP: another
    pretrain/captions.csv               random stream, all 16 classes (unseen ones included);
    pretrain/generation_complete.json   written on first use (:func:`ensure_pretraining_set`),
    zeroshot/images/NNNNN.png           with single-object images, balanced over the classes,
    zeroshot/labels.csv                 for the zero-shot classification check (filepath,label)
    class_embeddings.npz                classes [16], embeddings float32 [16, D] (+ attributes)
    split.yaml                          split file (class names only); relative to root's parent
    split_embeddings.yaml               the same splits with class_embeddings.npz as text side
    generation_complete.json            written last: a folder without it is regenerated

The pretraining set mirrors the real premise of zero-shot segmentation: CLIP has seen every
class, seen or unseen, in image-caption pairs; "unseen" only means that no mask was given. Its
captions name the objects by their attributes in varied wording and order. Half of its scenes at
the benchmark's scale are object views: one object alone on CLIP's mean colour, the caption
naming only it (photos of one object on a plain backdrop, in web terms).

The paths in ``split.yaml`` start with the folder name of ``root``, so the file registers as is
when ``DETECTRON2_DATASETS`` is ``root``'s parent (or with ``register_split_file(path,
root=root.parent)``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import cv2
import numpy as np
import yaml
from PIL import Image

from ..constants import IGNORE_LABEL
from ..data.object_maps import write_object_map_split_file, write_record
from ..data.split_file import load_split_file
from ..utils.io import atomic_write, atomic_write_json, atomic_write_text, datasets_root
from ..utils.parallel import default_workers, process_map

__all__ = [
    "HUES",
    "TEXTURES",
    "SYNTHETIC_CLASSES",
    "SYNTHETIC_UNSEEN",
    "UNSEEN_CELLS",
    "SyntheticBenchmark",
    "default_synthetic_root",
    "ensure_pretraining_set",
    "ensure_synthetic_benchmark",
    "generate_synthetic_benchmark",
    "generator_marker",
    "pretraining_set_record",
    "SyntheticScene",
    "render_synthetic_sample",
    "synthetic_caption",
    "synthetic_class_embeddings",
    "synthetic_split_config",
    "write_oracle_object_maps",
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

_MARKER = "generation_complete.json"
# Bump when the rendering changes, so that folders made by an older generator are regenerated.
_GENERATOR_VERSION = 4
# Bump when only the pretraining set's rendering changes (2: object views): the segmentation
# splits are kept, the pretraining set and the models pretrained on it are remade.
_PRETRAINING_SET_VERSION = 2
_SPLITS = ("train", "val", "test")
# Random stream of each image set: image i of set s is drawn from default_rng([seed, stream, i]).
_STREAMS = {"train": 0, "val": 1, "test": 2, "pretrain": 3, "zeroshot": 4}
_HUE_JITTER = 6.0  # degrees, per object
# An object is named in a caption when at least this fraction of the image shows it.
_MIN_CAPTION_AREA = 0.01
# Shape size of the close-ups in the CLIP pretraining and zero-shot check sets (the segmentation
# splits use 1): a texture is learnt much faster when it fills most of the image (measured).
_CLOSE_UP = 2.2
# Of the pretraining set's scenes at the benchmark's scale, the fraction shown as an object view
# (one object alone, see _write_pretraining_set); CLIP's mean colour is open_clip's
# OPENAI_DATASET_MEAN x 255, rounded (0 after CLIP's normalisation).
_OBJECT_VIEW_FRACTION = 0.5
_CLIP_MEAN_RGB = (123, 117, 104)


_SHAPE_KINDS = ("ellipse", "rectangle", "star")


@dataclass(frozen=True)
class SyntheticBenchmark:
    """What :func:`generate_synthetic_benchmark` made (or found complete)."""

    root: Path
    split_file: Path
    split_file_embeddings: Path
    class_embeddings: Path
    pretrain_captions: Path
    zeroshot_labels: Path
    dataset: str
    classes: tuple[str, ...]
    unseen: tuple[str, ...]
    num_train: int
    num_val: int
    num_test: int
    image_size: int
    generated: bool

    def captions(self, split: str) -> Path:
        """The caption CSV of a segmentation split (``"train"``, ``"val"``, ``"test"``)."""
        return self.root / "captions" / f"{split}.csv"


@dataclass(frozen=True)
class SyntheticScene:
    """One rendered image: ``image`` uint8 RGB [S, S, 3], ``label`` uint8 [S, S] (class index,
    255 elsewhere), ``objects``: (class index, shape kind, visible pixels) per drawn object,
    in drawing order (later ones occlude earlier ones), and ``instance`` int16 [S, S]: the index
    (in ``objects``) of the object seen at each pixel, -1 on the background."""

    image: np.ndarray
    label: np.ndarray
    objects: tuple[tuple[int, str, int], ...]
    instance: np.ndarray

    def region_map(self) -> np.ndarray:
        """The true object-instance map as regions: uint8 [S, S], 0 = background, visible objects
        numbered 1, 2, ... in drawing order (objects hidden by others get no number)."""
        visible = [k for k, (_, _, area) in enumerate(self.objects) if area > 0]
        lut = np.zeros(len(self.objects) + 1, dtype=np.uint8)  # index -1 -> background
        for number, k in enumerate(visible, start=1):
            lut[k] = number
        return lut[self.instance]

    def visible_indices(self, min_fraction: float = _MIN_CAPTION_AREA) -> list[int]:
        """Indices (in ``objects``) of the objects covering at least ``min_fraction`` of the
        image."""
        min_pixels = min_fraction * self.label.size
        return [k for k, (_, _, area) in enumerate(self.objects) if area >= min_pixels]

    def visible_objects(self, min_fraction: float = _MIN_CAPTION_AREA) -> list[tuple[int, str]]:
        """(class, shape kind) of the objects covering at least ``min_fraction`` of the image."""
        return [self.objects[k][:2] for k in self.visible_indices(min_fraction)]


def synthetic_split_config(
    dataset: str = "synthetic", folder: str = "ocz_synthetic", with_embeddings: bool = False
) -> dict:
    """The split-file contents of a synthetic benchmark stored in ``<datasets>/<folder>``.

    Args:
        dataset: the split file's ``dataset`` (registered names ``ocz_<dataset>_<split>``).
        folder: the benchmark's folder, relative to the datasets root.
        with_embeddings: name the attribute-composed ``class_embeddings.npz`` as the text side
            (the random-CLIP route); without it, class names go through CLIP's text tower.

    Returns:
        The mapping that :func:`~ocz_d2.data.split_file.load_split_file` reads.
    """
    config = {
        "dataset": dataset,
        "classes": list(SYNTHETIC_CLASSES),
        "unseen": list(SYNTHETIC_UNSEEN),
    }
    if with_embeddings:
        config["class_embeddings"] = f"{folder}/class_embeddings.npz"
    config["splits"] = {
        split: {
            "image_root": f"{folder}/images/{split}",
            "label_root": f"{folder}/labels/{split}",
            "image_ext": ".png",
        }
        for split in _SPLITS
    }
    return config


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


def _shape_mask(rng: np.random.Generator, size: int, scale: float = 1.0) -> tuple[np.ndarray, str]:
    """Boolean [S, S] mask of a random ellipse, rotated rectangle or star-shaped polygon, and the
    shape's kind ("ellipse", "rectangle", "star"). ``scale`` > 1 draws a close-up: a larger shape
    nearer the centre (textures keep their pixel scale)."""
    mask = np.zeros((size, size), dtype=np.uint8)
    radius = rng.uniform(0.1, 0.22) * size * scale
    margin = 0.15 if scale == 1.0 else 0.5 - 0.35 / scale
    cx, cy = rng.uniform(margin, 1 - margin, size=2) * size
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
    return mask.astype(bool), _SHAPE_KINDS[kind]


def render_synthetic_sample(
    rng: np.random.Generator,
    image_size: int = 128,
    min_objects: int = 2,
    max_objects: int = 5,
    classes: Sequence[int] | None = None,
    object_scale: float = 1.0,
) -> SyntheticScene:
    """Render one image, its label and its object list.

    Args:
        rng: random generator (all randomness comes from it).
        image_size: side S of the square image.
        min_objects, max_objects: range of the number of objects (later ones occlude earlier).
        classes: draw exactly these classes, in this order, instead of a random number of random
            classes (e.g. ``[c]`` for a single-object image).
        object_scale: size of the shapes relative to the benchmark's (> 1: close-ups, as in the
            CLIP pretraining set; textures keep their pixel scale).

    Returns:
        A :class:`SyntheticScene`.
    """
    size = image_size
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    image = _background(rng, size)
    label = np.full((size, size), IGNORE_LABEL, dtype=np.uint8)
    instance = np.full((size, size), -1, dtype=np.int16)
    if classes is None:
        count = int(rng.integers(min_objects, max_objects + 1))
    drawn = []
    for k in range(len(classes) if classes is not None else count):
        cls = int(classes[k]) if classes is not None else int(rng.integers(len(SYNTHETIC_CLASSES)))
        hue_idx, tex_idx = divmod(cls, len(TEXTURES))
        mask, kind = _shape_mask(rng, size, object_scale)
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
        instance[mask] = k
        drawn.append((cls, kind))
    image += rng.normal(0.0, 2.0, size=image.shape).astype(np.float32)
    areas = np.bincount(instance[instance >= 0].ravel(), minlength=len(drawn))
    objects = tuple((c, kind, int(a)) for (c, kind), a in zip(drawn, areas))
    image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    return SyntheticScene(image=image, label=label, objects=objects, instance=instance)


# Caption wording. Texture words as adjectives, and as "with ..." phrases.
_TEXTURE_WITH = {
    "plain": ("no pattern", "a plain surface", "a uniform colour"),
    "striped": ("stripes", "a striped pattern", "thin stripes"),
    "dotted": ("dots", "polka dots", "a dotted pattern"),
    "checkered": ("checks", "a checkerboard pattern", "a checkered pattern"),
}
_NOUNS = ("shape", "object", "thing")
_JOINERS_2 = ("{} and {}", "{} beside {}", "{} next to {}", "{} with {}", "{} near {}")
_FRAMES = ("{}", "a photo of {}", "an image of {}", "a picture showing {}", "there is {}")


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _object_phrase(rng: np.random.Generator, cls: int, kind: str) -> str:
    """A description of one object, e.g. "a striped orange star" or "a blue shape with dots"."""
    hue, texture = SYNTHETIC_CLASSES[cls].split(" ")
    noun = kind if rng.random() < 0.4 else _NOUNS[rng.integers(len(_NOUNS))]
    form = rng.integers(4)
    if form == 0:
        words = f"{hue} {texture} {noun}"
    elif form == 1:
        words = f"{texture} {hue} {noun}"
    elif form == 2:
        words = f"{hue} {noun} with {_TEXTURE_WITH[texture][rng.integers(3)]}"
    else:
        words = f"{noun} that is {hue} and {texture}"
    return f"{_article(words)} {words}"


def synthetic_caption(rng: np.random.Generator, objects: Sequence[tuple[int, str]]) -> str:
    """A caption naming every given object by its attributes, in varied wording and order.

    Args:
        rng: random generator of the wording.
        objects: (class index, shape kind) of the objects to name (e.g.
            :meth:`SyntheticScene.visible_objects`); empty gives a caption of the background.

    Returns:
        E.g. ``"a photo of a striped orange shape beside a blue ellipse with no pattern"``.
    """
    if not objects:
        return "a grey textured background"
    order = rng.permutation(len(objects))
    phrases = [_object_phrase(rng, *objects[i]) for i in order]
    if len(phrases) == 1:
        body = phrases[0]
    elif len(phrases) == 2:
        body = _JOINERS_2[rng.integers(len(_JOINERS_2))].format(*phrases)
    else:
        body = ", ".join(phrases[:-1]) + " and " + phrases[-1]
    return _FRAMES[rng.integers(len(_FRAMES))].format(body)


def _dataset_name_for(root: Path) -> str:
    name = re.sub(r"[^A-Za-z0-9_]", "_", root.name) or "synthetic"
    return name[len("ocz_") :] if name.startswith("ocz_") and len(name) > 4 else name


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Like ``np.savez`` but byte-for-byte reproducible (fixed zip timestamps); atomic."""

    def write(file) -> None:
        with zipfile.ZipFile(file, "w", compression=zipfile.ZIP_STORED) as zf:
            for key, arr in arrays.items():
                info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
                with zf.open(info, "w", force_zip64=True) as f:
                    np.lib.format.write_array(f, np.asanyarray(arr), allow_pickle=False)

    atomic_write(path, write)


def _split_yaml(dataset: str, folder: str, with_embeddings: bool) -> str:
    route = (
        "class embeddings from class_embeddings.npz (the random-CLIP route)"
        if with_embeddings
        else "class names through CLIP's text tower"
    )
    # The module path below is the generator's old home (ocz_d2.data.synthetic), kept on purpose:
    # the generated files stay byte-identical to those of earlier versions.
    header = (
        "# Synthetic compositional zero-shot benchmark, written by "
        "ocz_d2.data.synthetic.generate_synthetic_benchmark;\n"
        f"# {route}.\n"
        f"# Paths are relative to DETECTRON2_DATASETS (the folder that holds {folder}/).\n"
    )
    config = synthetic_split_config(dataset, folder, with_embeddings)
    return header + yaml.safe_dump(config, sort_keys=False, width=100, allow_unicode=True)


def _write_csv(path: Path, header: tuple[str, str], rows: list[tuple[str, str]]) -> None:
    lines = [",".join(header)] + [f"{a},{_csv_field(b)}" for a, b in rows]
    atomic_write_text(path, "\n".join(lines) + "\n")


def _csv_field(text: str) -> str:
    return f'"{text}"' if "," in text or '"' in text else text


def _save_png(array: np.ndarray, path: Path) -> None:
    # Level 1: the noisy images barely compress better at higher levels, only slower.
    Image.fromarray(array).save(path, compress_level=1)


@dataclass(frozen=True)
class _Params:
    """Everything that determines the generated files (the marker records it)."""

    num_train: int
    num_val: int
    num_test: int
    num_pretrain: int
    num_zeroshot_per_class: int
    image_size: int
    seed: int
    embedding_dim: int
    min_objects: int
    max_objects: int
    dataset: str

    def marker(self) -> dict:
        return {"generator_version": _GENERATOR_VERSION, **self.__dict__}


def _render_rows(
    item: Callable[[int], tuple[str, str]], count: int, label: str, progress, workers: int
) -> list[tuple[str, str]]:
    """``item(i)`` for ``i < count`` (each renders and writes image ``i``, returns its CSV row)
    in ``workers`` processes: image ``i`` depends only on its own seed, so the files are the
    same for any number of workers."""
    rows = []
    for row in process_map(item, range(count), workers=workers, start_method="fork"):
        rows.append(row)
        if progress is not None:
            progress(label, len(rows), count)
    return rows


def _segmentation_item(i: int, root: Path, split: str, p: _Params) -> tuple[str, str]:
    scene = render_synthetic_sample(
        np.random.default_rng([p.seed, _STREAMS[split], i]),
        p.image_size,
        p.min_objects,
        p.max_objects,
    )
    name = f"{i:05d}.png"
    _save_png(scene.image, root / "images" / split / name)
    _save_png(scene.label, root / "labels" / split / name)
    caption_rng = np.random.default_rng([p.seed, _STREAMS[split], i, 1])
    return f"images/{split}/{name}", synthetic_caption(caption_rng, scene.visible_objects())


def _write_segmentation_split(
    root: Path, split: str, count: int, p: _Params, progress, workers: int
) -> None:
    """Images, labels and captions of one segmentation split."""
    item = partial(_segmentation_item, root=root, split=split, p=p)
    rows = _render_rows(item, count, split, progress, workers)
    _write_csv(root / "captions" / f"{split}.csv", ("filepath", "caption"), rows)


def _object_view(
    scene: SyntheticScene, rng: np.random.Generator
) -> tuple[np.ndarray, list[tuple[int, str]]] | None:
    """One object of ``scene`` alone: the image with every other pixel at CLIP's mean colour,
    and that object's (class, shape kind); ``None`` when no object is large enough to name."""
    visible = scene.visible_indices()
    if not visible:
        return None
    k = visible[int(rng.integers(len(visible)))]
    image = scene.image.copy()
    image[scene.instance != k] = _CLIP_MEAN_RGB
    cls, kind, _ = scene.objects[k]
    return image, [(cls, kind)]


def _pretraining_item(i: int, root: Path, p: _Params) -> tuple[str, str]:
    rng = np.random.default_rng([p.seed, _STREAMS["pretrain"], i])
    kind = int(rng.choice(3, p=[0.5, 0.3, 0.2]))
    if kind == 0:
        scene = render_synthetic_sample(rng, p.image_size, 1, 1, object_scale=_CLOSE_UP)
    else:
        scene = render_synthetic_sample(rng, p.image_size, kind, kind)
    image, objects = scene.image, scene.visible_objects()
    caption_rng = np.random.default_rng([p.seed, _STREAMS["pretrain"], i, 1])
    view_rng = np.random.default_rng([p.seed, _STREAMS["pretrain"], i, 2])
    if kind != 0 and view_rng.random() < _OBJECT_VIEW_FRACTION:
        view = _object_view(scene, view_rng)
        if view is not None:
            image, objects = view
            caption_rng = np.random.default_rng([p.seed, _STREAMS["pretrain"], i, 3])
    name = f"images/{i:05d}.png"
    _save_png(image, root / "pretrain" / name)
    return name, synthetic_caption(caption_rng, objects)


def _write_pretraining_set(root: Path, p: _Params, progress, workers: int) -> None:
    """Image-caption pairs over all 16 classes (never used as masks): single-object close-ups
    (50%), and scenes at the benchmark's scale with one (30%) or two (20%) objects, half of
    which are shown as an object view instead: one of their objects alone on CLIP's mean colour
    (partly hidden where another object covered it), the caption naming only that object.
    Object views are how the test-time ensemble shows CLIP a segment
    (``MODEL.OCZ.SEGMENT_CLIP.STYLE "mask"``), as OVSeg adapts CLIP to masked images; here they
    are ordinary image-caption pairs, like photos of one object on a plain backdrop."""
    item = partial(_pretraining_item, root=root, p=p)
    rows = _render_rows(item, p.num_pretrain, "pretrain", progress, workers)
    _write_csv(root / "pretrain" / "captions.csv", ("filepath", "caption"), rows)


def _zeroshot_item(i: int, root: Path, p: _Params) -> tuple[str, str]:
    cls = i % len(SYNTHETIC_CLASSES)
    rng = np.random.default_rng([p.seed, _STREAMS["zeroshot"], i])
    scene = render_synthetic_sample(rng, p.image_size, classes=[cls], object_scale=_CLOSE_UP)
    name = f"images/{i:05d}.png"
    _save_png(scene.image, root / "zeroshot" / name)
    return name, SYNTHETIC_CLASSES[cls]


def _write_zeroshot_set(root: Path, p: _Params, workers: int) -> None:
    """Single-object close-ups (crops of one object, textures at the benchmark's pixel scale),
    ``num_zeroshot_per_class`` of each class, with their class name."""
    item = partial(_zeroshot_item, root=root, p=p)
    count = p.num_zeroshot_per_class * len(SYNTHETIC_CLASSES)
    rows = _render_rows(item, count, "zeroshot", None, workers)
    _write_csv(root / "zeroshot" / "labels.csv", ("filepath", "label"), rows)


def _reusable(marker: Path, params: _Params) -> bool:
    try:
        return json.loads(marker.read_text(encoding="utf-8")) == params.marker()
    except (OSError, ValueError):
        return False


def _clear_generated(root: Path) -> None:
    """Remove only what the generator writes: ``root`` may hold other files of the user."""
    (root / _MARKER).unlink(missing_ok=True)
    folders = [root / kind / split for kind in ("images", "labels") for split in _SPLITS]
    folders += [root / "captions", root / "pretrain", root / "zeroshot"]
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)
    for folder in folders:
        folder.mkdir(parents=True)
    for folder in ("pretrain", "zeroshot"):
        (root / folder / "images").mkdir()


def generate_synthetic_benchmark(
    root: str | os.PathLike,
    *,
    num_train: int = 1000,
    num_val: int = 100,
    num_test: int = 200,
    num_pretrain: int = 6000,
    num_zeroshot_per_class: int = 25,
    image_size: int = 128,
    seed: int = 0,
    embedding_dim: int = 64,
    min_objects: int = 2,
    max_objects: int = 5,
    dataset_name: str | None = None,
    force: bool = False,
    progress: Callable[[str, int, int], None] | None = None,
    workers: int | None = None,
) -> SyntheticBenchmark:
    """Generate the synthetic benchmark under ``root`` (deterministic given the arguments).

    Image ``i`` of a set depends only on ``(seed, set, i)``, so the first images of a larger
    set equal those of a smaller one. A complete folder made with the same arguments is reused;
    otherwise (missing, half-written, other arguments, or ``force``) the generated files are
    removed and written again.

    Args:
        root: output folder, e.g. ``$DETECTRON2_DATASETS/ocz_synthetic``.
        num_train, num_val, num_test: number of images per segmentation split.
        num_pretrain: image-caption pairs of the CLIP pretraining set (0 for none).
        num_zeroshot_per_class: single-object images per class for the zero-shot check.
        image_size: side of the square images, in pixels.
        seed: random seed.
        embedding_dim: dimension D of the class embeddings.
        min_objects, max_objects: number of objects per segmentation image.
        dataset_name: the split file's ``dataset``; default: ``root``'s folder name without
            an ``ocz_`` prefix (``ocz_synthetic`` -> ``synthetic``).
        force: regenerate even if a complete folder exists.
        progress: called as ``progress(set, done, total)`` after each image of the segmentation
            splits and the pretraining set.
        workers: rendering processes (default: one per core); the files do not depend on it.

    Returns:
        A :class:`SyntheticBenchmark` describing the folder.
    """
    counts = (num_train, num_val, num_test, num_pretrain, num_zeroshot_per_class)
    if min(counts) < 0 or image_size < 16 or not 1 <= min_objects <= max_objects:
        raise ValueError(
            "Need non-negative image counts, image_size >= 16 and 1 <= min_objects <= "
            f"max_objects; got counts {counts}, image_size {image_size}, objects "
            f"{min_objects}..{max_objects}."
        )
    root = Path(root).expanduser().absolute()
    params = _Params(
        num_train, num_val, num_test, num_pretrain, num_zeroshot_per_class, image_size, seed,
        embedding_dim, min_objects, max_objects, dataset_name or _dataset_name_for(root),
    )  # fmt: skip
    info = SyntheticBenchmark(
        root=root,
        split_file=root / "split.yaml",
        split_file_embeddings=root / "split_embeddings.yaml",
        class_embeddings=root / "class_embeddings.npz",
        pretrain_captions=root / "pretrain" / "captions.csv",
        zeroshot_labels=root / "zeroshot" / "labels.csv",
        dataset=params.dataset,
        classes=SYNTHETIC_CLASSES,
        unseen=SYNTHETIC_UNSEEN,
        num_train=num_train,
        num_val=num_val,
        num_test=num_test,
        image_size=image_size,
        generated=True,
    )
    marker = root / _MARKER
    if not force and _reusable(marker, params):
        logger.info("Synthetic benchmark in %s is complete; reusing it.", root)
        return dataclasses.replace(info, generated=False)

    _clear_generated(root)
    workers = workers or default_workers()
    for split, count in zip(_SPLITS, (num_train, num_val, num_test)):
        _write_segmentation_split(root, split, count, params, progress, workers)
    _write_npz(info.class_embeddings, synthetic_class_embeddings(embedding_dim, seed))
    atomic_write_text(
        info.split_file, _split_yaml(params.dataset, root.name, with_embeddings=False)
    )
    atomic_write_text(
        info.split_file_embeddings,
        _split_yaml(f"{params.dataset}_attr", root.name, with_embeddings=True),
    )
    atomic_write_json(marker, params.marker(), indent=2, sort_keys=True)
    logger.info(
        "Generated the synthetic benchmark in %s: %d train / %d val / %d test images of %d px "
        "(its %d image-caption pairs and zero-shot check images are rendered when first "
        "needed).",
        root, num_train, num_val, num_test, image_size, num_pretrain,
    )  # fmt: skip
    return info


def generator_marker(root: str | os.PathLike) -> dict:
    """The generation record of a complete synthetic benchmark folder: everything its files
    depend on."""
    marker = Path(root) / _MARKER
    try:
        return json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise FileNotFoundError(
            f"{Path(root)} is not a complete synthetic benchmark ({marker} unreadable: {e}); run "
            "tools/prepare_synthetic.py first."
        ) from e


def pretraining_set_record(root: str | os.PathLike) -> dict:
    """What determines the pretraining set of the benchmark in ``root``: the generator's record
    (:func:`generator_marker`) and the pretraining set's own version. Caches of models
    pretrained on the set are keyed by it."""
    return {**generator_marker(root), "pretraining_set_version": _PRETRAINING_SET_VERSION}


def ensure_pretraining_set(
    root: str | os.PathLike,
    progress: Callable[[str, int, int], None] | None = None,
    workers: int | None = None,
) -> Path:
    """The benchmark's image-caption pretraining set, and the single-object images of the
    zero-shot check (``zeroshot/labels.csv``), rendered on first use.

    Only pretraining (the tiny CLIP's or the SSL ViT's, when their cache misses) reads their
    images, so :func:`generate_synthetic_benchmark` leaves them out: with the caches warm the
    data stage renders the segmentation splits only. The set depends only on the generator's
    record, so it is reused while its own copy of that record (in ``pretrain/``) matches.

    Args:
        root: a complete synthetic benchmark folder.
        progress: called as ``progress("pretrain", done, total)`` after each image.
        workers: rendering processes (default: one per core); the files do not depend on it.

    Returns:
        The set's caption CSV ``<root>/pretrain/captions.csv`` (``filepath``, ``caption``; paths
        relative to ``pretrain/``).
    """
    root = Path(root)
    record = pretraining_set_record(root)
    marker = root / "pretrain" / _MARKER
    captions = root / "pretrain" / "captions.csv"
    try:
        if json.loads(marker.read_text(encoding="utf-8")) == record:
            return captions
    except (OSError, ValueError):
        pass
    if record.get("generator_version") != _GENERATOR_VERSION:
        raise RuntimeError(
            f"{root} was generated by another generator version "
            f"({record.get('generator_version')}, this one {_GENERATOR_VERSION}): regenerate it "
            "with tools/prepare_synthetic.py --force."
        )
    versions = ("generator_version", "pretraining_set_version")
    params = _Params(**{k: v for k, v in record.items() if k not in versions})
    logger.info("Rendering the pretraining set: %d image-caption pairs in %s.",
                params.num_pretrain, root / "pretrain")  # fmt: skip
    marker.unlink(missing_ok=True)
    for folder in ("pretrain", "zeroshot"):
        shutil.rmtree(root / folder / "images", ignore_errors=True)
        (root / folder / "images").mkdir(parents=True)
    workers = workers or default_workers()
    _write_pretraining_set(root, params, progress, workers)
    _write_zeroshot_set(root, params, workers)
    atomic_write_json(marker, record, indent=2, sort_keys=True)
    return captions


def write_oracle_object_maps(
    root: str | os.PathLike, num_objects: int = 6, split_file: str | os.PathLike | None = None
) -> Path:
    """Write each segmentation image's true object-instance map as an object map (the oracle
    guide, the upper bound of guidance) and a split file that loads them.

    The scenes are rendered again from the generator's recorded parameters (image ``i`` depends
    only on its seed), and each re-rendered image is checked against the stored one.

    Args:
        root: a complete synthetic benchmark folder.
        num_objects: n_o the maps are recorded for; must exceed the largest object count.
        split_file: the benchmark's split file to extend (default ``<root>/split.yaml``; e.g.
            ``split_embeddings.yaml`` for the attribute-embedding variant).

    Returns:
        The split file ``<split file stem>_objects_oracle.yaml`` beside it (datasets
        ``ocz_<its dataset>_objects_oracle_{train,val,test}``).
    """

    root = Path(root).absolute()
    params = generator_marker(root)
    if params["max_objects"] + 1 > num_objects:
        raise ValueError(
            f"oracle maps need n_o >= {params['max_objects'] + 1} (background + up to "
            f"{params['max_objects']} objects), got {num_objects}."
        )
    folders = {}
    for split in _SPLITS:
        folder = root / "object_maps" / "oracle" / split
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(params[f"num_{split}"]):
            scene = render_synthetic_sample(
                np.random.default_rng([params["seed"], _STREAMS[split], i]),
                params["image_size"],
                params["min_objects"],
                params["max_objects"],
            )
            name = f"{i:05d}.png"
            if i == 0 and not np.array_equal(
                np.asarray(Image.open(root / "images" / split / name).convert("RGB")), scene.image
            ):
                raise RuntimeError(
                    f"re-rendering {split}/{name} does not reproduce the stored image: the "
                    "benchmark was made by another generator version; regenerate it with "
                    "tools/prepare_synthetic.py --force."
                )
            _save_png(scene.region_map(), folder / name)
        write_record(folder, {"source": "oracle", "num_objects": int(num_objects)})
        folders[split] = str(folder)
    split_file = Path(split_file) if split_file is not None else root / "split.yaml"
    return write_object_map_split_file(
        split_file,
        split_file.with_name(f"{split_file.stem}_objects_oracle.yaml"),
        f"{load_split_file(split_file)['dataset']}_objects_oracle",
        folders,
        root=root.parent,
    )


def default_synthetic_root() -> Path:
    """``$DETECTRON2_DATASETS/ocz_synthetic`` (``datasets/ocz_synthetic`` if unset), absolute:
    the folder that the builtin splits ``ocz_synthetic_{train,val}`` read."""
    return Path(datasets_root()).expanduser().absolute() / "ocz_synthetic"


def ensure_synthetic_benchmark(
    root: str | os.PathLike | None = None, **kwargs
) -> SyntheticBenchmark:
    """Generate the synthetic benchmark unless a complete one with these arguments exists.

    Args:
        root: output folder; ``None`` uses :func:`default_synthetic_root`.
        kwargs: arguments of :func:`generate_synthetic_benchmark` (defaults: 1000 / 100 / 200
            segmentation images of 128 px, 6000 image-caption pairs, seed 0).

    Returns:
        The :class:`SyntheticBenchmark` (its ``root`` is the folder).
    """
    root = Path(root) if root is not None else default_synthetic_root()
    return generate_synthetic_benchmark(root, **kwargs)
