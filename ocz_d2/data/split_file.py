"""Declarative YAML split files: a new zero-shot split is a data file, no code.

Format (relative paths resolve against ``$DETECTRON2_DATASETS``, default ``"datasets"``)::

    dataset: synthetic            # registered names are ocz_<dataset>_<split>
    classes: [red plain, ...]     # K class names in the label order
    unseen: [red striped, ...]    # unseen classes: names or indices (may be empty)
    class_embeddings: ocz_synthetic/class_embeddings.npz   # optional
    splits:
      train: {image_root: ocz_synthetic/images/train, label_root: ocz_synthetic/labels/train}
      val:   {image_root: ocz_synthetic/images/val, label_root: ocz_synthetic/labels/val}

Each split entry may also set ``image_ext``, ``label_ext`` and ``extra_label_roots`` (a mapping
``key -> folder``, see :func:`~ocz_d2.data.register_zero_shot.register_zero_shot_split`).

A file with ``kind: captions`` registers image-caption datasets instead (what SimZSS trains on):
keys ``dataset``, ``splits`` (each ``{csv, img_key, caption_key, separator, image_root}``) and
an optional ``concept_bank``; see :mod:`ocz_d2.data.captions`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from typing import Any

import yaml

from ..utils.errors import DataError, MissingFileError
from ..utils.io import resolve_data_path
from .captions import register_caption_split
from .register_zero_shot import register_zero_shot_split

__all__ = [
    "load_split_file",
    "register_split_file",
    "register_split_files_from_config",
]

# key -> required?
_TOP_KEYS = {
    "dataset": True,
    "classes": True,
    "unseen": True,
    "class_embeddings": False,
    "splits": True,
}
_SPLIT_KEYS = {
    "image_root": True,
    "label_root": True,
    "image_ext": False,
    "label_ext": False,
    "extra_label_roots": False,
}
_CAPTION_TOP_KEYS = {"kind": True, "dataset": True, "concept_bank": False, "splits": True}
_CAPTION_SPLIT_KEYS = {
    "csv": True,
    "img_key": False,
    "caption_key": False,
    "separator": False,
    "image_root": False,
}
#: Values of a split file's ``kind`` (default "segmentation").
SPLIT_FILE_KINDS = ("segmentation", "captions")
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")


def _check_keys(where: str, data: dict, allowed: dict[str, bool]) -> None:
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise DataError(
            f"{where}: unknown key(s) {unknown}; allowed keys are {sorted(allowed)} "
            f"(required: {sorted(k for k, req in allowed.items() if req)})."
        )
    missing = sorted(k for k, req in allowed.items() if req and k not in data)
    if missing:
        raise DataError(f"{where}: missing required key(s) {missing}.")


def load_split_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read and validate the structure of a YAML split file.

    Args:
        path: the YAML file.

    Returns:
        The parsed mapping (keys ``dataset``, ``classes``, ``unseen``, ``splits`` and optionally
        ``class_embeddings``). Class names and paths are checked later, at registration.

    Raises:
        FileNotFoundError: if the file does not exist.
        ValueError: on a malformed file, an unknown or missing key.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise MissingFileError(
            f"Split file {path} does not exist (relative paths resolve against the working "
            f"directory {os.getcwd()})."
        )
    with open(path, encoding="utf-8") as f:
        try:
            data = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise DataError(f"Split file {path} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise DataError(f"Split file {path} must hold a mapping at the top level.")
    kind = data.get("kind", "segmentation")
    if kind not in SPLIT_FILE_KINDS:
        raise DataError(
            f"Split file {path}: 'kind' must be one of {SPLIT_FILE_KINDS}, got {kind!r}."
        )
    if kind == "captions":
        return _check_caption_file(path, data)
    data = {k: v for k, v in data.items() if k != "kind"}
    _check_keys(f"Split file {path}", data, _TOP_KEYS)
    if not isinstance(data["dataset"], str) or not _NAME_RE.match(data["dataset"]):
        raise DataError(
            f"Split file {path}: 'dataset' must be a name of letters, digits, '_', '-' or '.', "
            f"got {data['dataset']!r}."
        )
    if not isinstance(data["classes"], list):
        raise DataError(f"Split file {path}: 'classes' must be a list of class names.")
    if not isinstance(data["unseen"], list):
        raise DataError(f"Split file {path}: 'unseen' must be a list (names or indices).")
    splits = data["splits"]
    if not isinstance(splits, dict) or not splits:
        raise DataError(
            f"Split file {path}: 'splits' must map split names (e.g. train, val) to "
            "{image_root, label_root}."
        )
    for split, entry in splits.items():
        where = f"Split file {path}, split {split!r}"
        if not isinstance(split, str) or not _NAME_RE.match(split):
            raise DataError(f"{where}: split names must be letters, digits, '_', '-' or '.'.")
        if not isinstance(entry, dict):
            raise DataError(f"{where}: must be a mapping with image_root and label_root.")
        _check_keys(where, entry, _SPLIT_KEYS)
        extra = entry.get("extra_label_roots")
        if extra is not None and not isinstance(extra, dict):
            raise DataError(f"{where}: 'extra_label_roots' must map keys to folders.")
    return data


def _check_caption_file(path: str, data: dict) -> dict[str, Any]:
    _check_keys(f"Caption split file {path}", data, _CAPTION_TOP_KEYS)
    if not isinstance(data["dataset"], str) or not _NAME_RE.match(data["dataset"]):
        raise DataError(
            f"Caption split file {path}: 'dataset' must be a name of letters, digits, '_', '-' "
            f"or '.', got {data['dataset']!r}."
        )
    splits = data["splits"]
    if not isinstance(splits, dict) or not splits:
        raise DataError(
            f"Caption split file {path}: 'splits' must map split names to {{csv: ...}}."
        )
    for split, entry in splits.items():
        where = f"Caption split file {path}, split {split!r}"
        if not isinstance(split, str) or not _NAME_RE.match(split):
            raise DataError(f"{where}: split names must be letters, digits, '_', '-' or '.'.")
        if not isinstance(entry, dict):
            raise DataError(f"{where}: must be a mapping with at least 'csv'.")
        _check_keys(where, entry, _CAPTION_SPLIT_KEYS)
    return data


def _concept_bank_path(path: str, bank: str | None) -> str | None:
    """A caption split file's concept bank: absolute, next to the split file, else (relative)
    under the datasets root (resolved at registration)."""
    if not bank or os.path.isabs(bank):
        return bank or None
    beside = os.path.join(os.path.dirname(os.path.abspath(path)), bank)
    return beside if os.path.isfile(beside) else bank


def register_split_file(
    path: str | os.PathLike,
    *,
    root: str | os.PathLike | None = None,
    dataset: str | None = None,
    lazy: bool = False,
    unseen: list[str] | None = None,
    splits: list[str] | None = None,
) -> list[str]:
    """Register every split of a YAML split file.

    Args:
        path: the YAML split file (a relative path resolves against the working directory).
        root: base of the relative paths inside the file; ``None`` uses
            ``$DETECTRON2_DATASETS`` (default ``"datasets"``).
        dataset: overrides the file's ``dataset`` (the registered names become
            ``ocz_<dataset>_<split>``), e.g. to register a second copy of the data.
        lazy: defer file-system checks to the first ``DatasetCatalog.get`` (see
            :func:`~ocz_d2.data.register_zero_shot.register_zero_shot_split`).
        unseen: overrides the file's unseen list; ``[]`` registers a fully supervised copy
            (every class annotated in training and evaluated as one set); give it a new
            ``dataset`` name.
        splits: register only these splits of the file (None: all of them).

    Returns:
        The registered names, in the file's split order. Idempotent like
        :func:`~ocz_d2.data.register_zero_shot.register_zero_shot_split`.
    """
    data = load_split_file(path)
    base = dataset if dataset is not None else data["dataset"]
    if base.startswith("ocz_"):
        base = base[len("ocz_") :]
    unknown = sorted(set(splits or ()) - set(data["splits"]))
    if unknown:
        raise ValueError(f"split file {os.fspath(path)!r} has no splits {unknown}")
    if data.get("kind") == "captions":
        bank = _concept_bank_path(os.fspath(path), data.get("concept_bank"))
        return [
            register_caption_split(
                f"ocz_{base}_{split}",
                entry["csv"],
                img_key=entry.get("img_key", "filepath"),
                caption_key=entry.get("caption_key", "caption"),
                separator=entry.get("separator", ","),
                concept_bank=bank,
                image_root=entry.get("image_root"),
                root=root,
                split_file=path,
            )
            for split, entry in data["splits"].items()
            if splits is None or split in splits
        ]
    names = []
    for split, entry in data["splits"].items():
        if splits is not None and split not in splits:
            continue
        kwargs = {k: entry[k] for k in ("image_ext", "label_ext") if k in entry}
        names.append(
            register_zero_shot_split(
                f"ocz_{base}_{split}",
                image_root=entry["image_root"],
                label_root=entry["label_root"],
                classes=data["classes"],
                unseen=data["unseen"] if unseen is None else unseen,
                class_embeddings=data.get("class_embeddings"),
                extra_label_roots=entry.get("extra_label_roots"),
                split_file=path,
                lazy=lazy,
                root=root,
                **kwargs,
            )
        )
    return names


def register_split_files_from_config(cfg, *, lazy: bool = False) -> list[str]:
    """Register the split files listed in ``cfg.DATASETS.SPLIT_FILES``.

    A relative path is looked up in the working directory, then under ``$DETECTRON2_DATASETS``
    (where data-derived split files live, e.g. ``ocz_synthetic/split_objects_oracle.yaml``).

    Args:
        cfg: a Detectron2 config with the ocz_d2 keys.
        lazy: see :func:`register_split_file`.

    Returns:
        All registered names.
    """
    files: Iterable[str] = cfg.DATASETS.SPLIT_FILES
    names: list[str] = []
    for path in files:
        names.extend(register_split_file(resolve_split_file(path), lazy=lazy))
    return names


def resolve_split_file(path: str | os.PathLike) -> str:
    """The existing split file ``path`` names: as given, else under ``$DETECTRON2_DATASETS``.

    Raises:
        FileNotFoundError: naming both places.
    """
    return resolve_data_path(
        path,
        what=f"split file {os.fspath(path)!r} in DATASETS.SPLIT_FILES",
        fix="fix the path, or create it (object-map split files come from "
        "tools/precompute_object_maps.py or tools/prepare_synthetic.py).",
        error=MissingFileError,
    )
