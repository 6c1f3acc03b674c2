"""Object maps: each image's regions (from the guide) stored once as a label PNG.

A dataset with object maps is registered with ``extra_label_roots: {object_map: <folder>}``; the
dataset mapper then reads ``object_map`` beside the label and applies the same geometric
augmentation to it (nearest), and training runs no guide at all. Pixel values are region indices
``0 .. n_o - 1``; 255 (the ignore label) means "no region".

Each object-map folder holds a record, ``object_maps.json``, of what made the maps (the guide, n_o,
input size, clustering). At model build every dataset with object maps is checked against the
config (:func:`check_object_map_records`), so maps made by another guide or for another n_o are
never used by accident.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import yaml
from detectron2.data import MetadataCatalog

from ..constants import OBJECT_MAP_KEY
from ..utils.io import (
    atomic_write_json,
    atomic_write_text,
    datasets_root,
    file_sha256,
    resolve_weights_path,
)
from .split_file import load_split_file

__all__ = [
    "OBJECT_MAP_KEY",
    "RECORD_NAME",
    "check_object_map_records",
    "guide_record",
    "read_record",
    "write_object_map_split_file",
    "write_record",
]

#: File name of the record in each object-map folder.
RECORD_NAME = "object_maps.json"


def _file_fingerprint(path: str) -> str:
    """sha256 (first 16 hex digits) of a weights file (resolved like MODEL.OCZ.CLIP.WEIGHTS)."""
    return file_sha256(resolve_weights_path(path))[:16]


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
            if not os.path.isfile(guide.WEIGHTS):
                raise FileNotFoundError(
                    f"MODEL.OCZ.GUIDE.WEIGHTS={guide.WEIGHTS!r} does not exist: give the SSL "
                    "model's local weights file, or '' to use MODEL.OCZ.GUIDE.PRETRAINED."
                )
            weights = "sha256:" + _file_fingerprint(os.path.abspath(guide.WEIGHTS))
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
