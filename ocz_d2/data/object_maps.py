"""Object maps: each image's regions (from the guide) stored once as a label PNG.

A dataset with object maps is registered with ``extra_label_roots: {object_map: <folder>}``; the
dataset mapper then reads ``object_map`` beside the label and applies the same geometric
augmentation to it (nearest), and training runs no guide at all. Pixel values are region indices
``0 .. n_o - 1``; 255 (the ignore label) means "no region".

Each object-map folder holds a record, ``object_maps.json``, of what made the maps (the guide, n_o,
input size, clustering). At model build every dataset with object maps is checked against the
config (:func:`check_object_map_records`), so maps made by another guide or for another n_o are
never used by accident.

:func:`precompute_object_maps` writes the maps of a config's guide for a split file's splits, with
their records and a split file that loads them (``tools/precompute_object_maps.py``).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
import yaml
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.detection_utils import read_image
from detectron2.modeling import build_model
from PIL import Image
from tqdm import tqdm

from ..config import ConfigError
from ..constants import IGNORE_LABEL, OBJECT_MAP_KEY
from ..utils.errors import ArgumentError, DataError, unreadable_file_message
from ..utils.io import (
    atomic_write_json,
    atomic_write_text,
    datasets_root,
    file_sha256,
    resolve_weights_path,
)
from .split_file import load_split_file, register_split_file, resolve_split_file

__all__ = [
    "NO_REGION_VALUE",
    "OBJECT_MAP_KEY",
    "RECORD_NAME",
    "check_object_map_records",
    "guide_record",
    "object_map_folder",
    "precompute_object_maps",
    "precompute_split",
    "read_record",
    "regions_to_pixels",
    "write_object_map_split_file",
    "write_record",
]

#: File name of the record in each object-map folder.
RECORD_NAME = "object_maps.json"
#: Pixel value of "no region" in an object map (the ignore label).
NO_REGION_VALUE = IGNORE_LABEL


def _file_fingerprint(
    path: str, key: str = "MODEL.OCZ.CLIP.WEIGHTS", fix: str | None = None
) -> str:
    """sha256 (first 16 hex digits) of the weights file that config key ``key`` names, resolved
    as the model resolves it (:func:`resolve_weights_path`: the working directory, then
    ``$DETECTRON2_DATASETS``)."""
    return file_sha256(resolve_weights_path(path, key=key, fix=fix))[:16]


def guide_record(cfg) -> dict:
    """What the regions of ``cfg``'s guide depend on: the record object maps must match."""
    ocz = cfg.MODEL.OCZ
    guide = ocz.GUIDE
    record = {"source": guide.SOURCE, "num_objects": int(ocz.OBJECTS.NUM)}
    if guide.SOURCE == "oracle":
        return record
    record.update(seeding=guide.SEEDING, kmeans_iters=int(guide.KMEANS_ITERS), seed=int(guide.SEED))
    if guide.SOURCE == "ssl":
        if guide.WEIGHTS:
            fingerprint = _file_fingerprint(
                guide.WEIGHTS,
                key="MODEL.OCZ.GUIDE.WEIGHTS",
                fix="give the SSL model's local weights file, or '' to use "
                "MODEL.OCZ.GUIDE.PRETRAINED.",
            )
            weights = "sha256:" + fingerprint
        else:
            weights = "pretrained" if guide.PRETRAINED else "random"
        record.update(
            ssl_model=guide.SSL_MODEL, ssl_weights=weights, input_size=int(guide.INPUT_SIZE)
        )
    elif guide.SOURCE == "clip":
        clip = ocz.CLIP
        weights = "sha256:" + _file_fingerprint(clip.WEIGHTS) if clip.WEIGHTS else clip.PRETRAINED
        record.update(clip_model=clip.MODEL_NAME, clip_weights=weights)
    return record


def write_record(folder: str | os.PathLike, record: dict) -> Path:
    """Write ``record`` as the folder's ``object_maps.json`` (atomically)."""
    path = Path(folder) / RECORD_NAME
    atomic_write_json(path, record, indent=2, sort_keys=True)
    return path


def read_record(folder: str | os.PathLike) -> dict:
    path = Path(folder) / RECORD_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"object-map folder {folder} has no {RECORD_NAME}: maps must come from "
            "tools/precompute_object_maps.py (or tools/prepare_synthetic.py --oracle-maps), which "
            "record the guide that made them."
        )
    return json.loads(path.read_text())


def check_object_map_records(cfg, dataset_names: Iterable[str]) -> None:
    """Check that the object maps of every named dataset were made by ``cfg``'s guide.

    Raises:
        ValueError: naming the dataset, the folder and every field that differs.
    """
    expected = None
    for name in dict.fromkeys(dataset_names):
        if name not in MetadataCatalog.list():
            continue
        roots = MetadataCatalog.get(name).get("extra_label_roots", None) or {}
        folder = roots.get(OBJECT_MAP_KEY)
        if folder is None or not os.path.isdir(folder):
            continue  # no maps (the guide runs online), or missing data (the loader says so)
        if expected is None:
            expected = guide_record(cfg)
        found = read_record(folder)
        diffs = [
            f"{key}: maps {found.get(key)!r}, config {value!r}"
            for key, value in expected.items()
            if found.get(key) != value
        ]
        if diffs:
            raise ValueError(
                f"the object maps of {name} ({folder}) were made by another guide than the "
                f"config's: {'; '.join(diffs)}. Recompute them with "
                "tools/precompute_object_maps.py for this config, or set MODEL.OCZ.GUIDE / "
                "MODEL.OCZ.OBJECTS.NUM to match."
            )


def write_object_map_split_file(
    split_file: str | os.PathLike,
    output: str | os.PathLike,
    dataset: str,
    folders: dict[str, str],
    root: str | os.PathLike | None = None,
) -> Path:
    """A copy of a split file whose splits load object maps (``extra_label_roots``).

    Args:
        split_file: the dataset's split file.
        output: the new split file.
        dataset: its ``dataset`` (registered names ``ocz_<dataset>_<split>``).
        folders: split -> object-map folder; splits not named here are dropped.
        root: the datasets root the paths are written relative to when they lie under it
            (default ``$DETECTRON2_DATASETS``).
    """
    data = load_split_file(split_file)
    root = os.path.abspath(root or datasets_root())
    data["dataset"] = dataset
    splits = {}
    for split, folder in folders.items():
        if split not in data["splits"]:
            raise KeyError(f"split {split!r} is not in {split_file}")
        entry = dict(data["splits"][split])
        folder = os.path.abspath(folder)
        rel = os.path.relpath(folder, root)
        entry["extra_label_roots"] = {OBJECT_MAP_KEY: folder if rel.startswith("..") else rel}
        splits[split] = entry
    data["splits"] = splits
    output = Path(output)
    header = (
        f"# {dataset}: {Path(split_file).name} with object maps (written by ocz_d2; paths are "
        "relative to $DETECTRON2_DATASETS).\n"
    )
    atomic_write_text(output, header + yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    return output


def regions_to_pixels(regions, patch_size: int, height: int, width: int) -> np.ndarray:
    """Patch-grid regions [gh, gw] -> uint8 pixel map [height, width] (255 = no region)."""
    pixels = regions.repeat_interleave(patch_size, 0).repeat_interleave(patch_size, 1)
    pixels = pixels[:height, :width].cpu().numpy()
    return np.where(pixels < 0, NO_REGION_VALUE, pixels).astype(np.uint8)


def object_map_folder(dicts: list[dict], name: str, split: str) -> Path:
    """``<dataset folder>/object_maps/<name>/<split>``: the dataset folder is the common parent of
    the split's image and label roots."""
    image_root = os.path.dirname(dicts[0]["file_name"])
    label_root = os.path.dirname(dicts[0]["sem_seg_file_name"])
    return Path(os.path.commonpath([image_root, label_root])) / "object_maps" / name / split


def precompute_split(model, dicts: list[dict], folder: Path, batch_size: int) -> float:
    """Write the object map of every image of ``dicts`` into ``folder``; returns images/s.

    Args:
        model: a model with object prompts (:meth:`online_regions`, ``backbone.patch_size``).
        dicts: the split's dataset dicts (images are read at their own size, not augmented).
        folder: where ``<label stem>.png`` go (created).
        batch_size: images per guide call; same-size images are batched, in the dataset's order.
    """
    folder.mkdir(parents=True, exist_ok=True)
    patch = model.backbone.patch_size
    start = time.perf_counter()
    # Same-size images are batched; the order follows the dataset.
    with tqdm(total=len(dicts), desc=f"object maps -> {folder}", unit="img") as bar:
        for i in range(0, len(dicts), batch_size):
            chunk = dicts[i : i + batch_size]
            images = []
            for d in chunk:
                try:
                    array = read_image(d["file_name"], format="RGB")
                except OSError as e:
                    path = d["file_name"]
                    raise DataError(
                        unreadable_file_message(f"cannot read the image {path}", path, e)
                    ) from e
                images.append(torch.as_tensor(np.ascontiguousarray(array.transpose(2, 0, 1))))
            by_size: dict[tuple, list[int]] = {}
            for j, img in enumerate(images):
                by_size.setdefault(tuple(img.shape[-2:]), []).append(j)
            for (h, w), members in by_size.items():
                regions = model.online_regions([images[j] for j in members])
                for j, reg in zip(members, regions):
                    stem = os.path.splitext(os.path.basename(chunk[j]["sem_seg_file_name"]))[0]
                    out = regions_to_pixels(reg, patch, h, w)
                    Image.fromarray(out).save(folder / f"{stem}.png", compress_level=1)
            bar.update(len(chunk))
    return len(dicts) / max(time.perf_counter() - start, 1e-9)


def precompute_object_maps(
    cfg,
    split_file: str | os.PathLike,
    name: str,
    *,
    splits: Sequence[str] | None = None,
    batch_size: int = 16,
    root: str | os.PathLike | None = None,
    on_split: Callable[[str, int, Path, float], None] | None = None,
) -> Path:
    """Object maps of ``cfg``'s guide for the splits of a split file, with their records and a
    split file that loads them.

    Every image is clustered into MODEL.OCZ.OBJECTS.NUM regions at its own size (no
    augmentation: the dataset mapper augments the maps with the images in training). Maps go to
    :func:`object_map_folder` (``<dataset folder>/object_maps/<name>/<split>/``), each folder with
    its record (:func:`guide_record`); the split file ``<stem>_objects_<name>.yaml`` beside
    ``split_file`` registers the same data with the maps (datasets
    ``ocz_<dataset>_objects_<name>_<split>``).

    Args:
        cfg: the model config whose guide makes the regions (object prompts, guide "ssl" or
            "clip"); its datasets are not used.
        split_file: the dataset's split file (as given, else under ``$DETECTRON2_DATASETS``).
        name: the name of this set of maps, e.g. ``"dino"``.
        splits: the splits to do (default: all of the file's).
        batch_size: images per guide call.
        root: the datasets folder the split file's paths are relative to, and that the new
            split file's paths are written relative to (default ``$DETECTRON2_DATASETS``).
        on_split: called after each split with (registered name, images, folder, images/s).

    Returns:
        The new split file.

    Raises:
        ConfigError: the config has no object prompts, or only the oracle guide.
        ArgumentError: a split that the file does not have.
    """
    if cfg.MODEL.OCZ.OBJECTS.NUM <= 0 or not cfg.MODEL.OCZ.OBJECTS.PROMPTS:
        raise ConfigError(
            "object maps need object prompts: set MODEL.OCZ.OBJECTS.NUM > 0 and "
            "MODEL.OCZ.OBJECTS.PROMPTS True"
        )
    if cfg.MODEL.OCZ.GUIDE.SOURCE == "oracle":
        raise ConfigError("the oracle guide has no online regions to store")
    split_file = resolve_split_file(split_file)
    data = load_split_file(split_file)
    splits = list(splits or data["splits"])
    unknown = [s for s in splits if s not in data["splits"]]
    if unknown:
        raise ArgumentError(f"--splits {unknown} are not in {split_file} ({list(data['splits'])})")
    # A private name: the file may already be registered (e.g. a builtin split of the same data).
    source = f"{data['dataset']}_{name}_maps_source"
    names = register_split_file(split_file, root=root, dataset=source)
    # Datasets are built from the config (DATASETS.*) but only the guide is used here.
    cfg = cfg.clone()
    cfg.defrost()
    cfg.DATASETS.TRAIN = ()
    cfg.DATASETS.TEST = ()
    cfg.DATASETS.VAL = ()
    cfg.MODEL.DEVICE = cfg.MODEL.DEVICE if torch.cuda.is_available() else "cpu"
    model = build_model(cfg).eval()
    record = guide_record(cfg)
    folders = {}
    for split, dataset_name in zip(data["splits"], names):
        if split not in splits:
            continue
        dicts = DatasetCatalog.get(dataset_name)
        folder = object_map_folder(dicts, name, split)
        rate = precompute_split(model, dicts, folder, batch_size)
        write_record(folder, record)
        folders[split] = str(folder)
        if on_split is not None:
            on_split(dataset_name, len(dicts), folder, rate)
    out = Path(split_file).with_name(f"{Path(split_file).stem}_objects_{name}.yaml")
    write_object_map_split_file(split_file, out, f"{data['dataset']}_objects_{name}", folders, root)
    return out
