"""Image-caption datasets (what SimZSS trains on), registered like segmentation splits.

A caption split file is a YAML split file with ``kind: captions`` (see
:mod:`ocz_d2.data.split_file`; relative paths resolve against ``$DETECTRON2_DATASETS``)::

    kind: captions
    dataset: synthetic_pretrain          # registered names are ocz_<dataset>_<split>
    concept_bank: synthetic_concepts.txt # optional: next to this file, else under the root
    splits:
      train:
        csv: ocz_synthetic/pretrain/captions.csv   # open_clip's CSV format
        img_key: filepath                          # optional (default filepath)
        caption_key: caption                       # optional (default caption)
        separator: ","                             # optional ("," or "\\t")
        image_root: ocz_synthetic                  # optional: where relative image paths
                                                   # start (default: the CSV's folder)

Each record is ``{"file_name", "caption", "image_id", "dataset_name"}``; the metadata holds
``evaluator_type = "captions"``, ``caption_csv`` and ``concept_bank`` (absolute path or None).
:class:`CaptionDatasetMapper` turns a record into model inputs: the image, the caption's CLIP
tokens and its concepts' token spans.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Sequence

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T

from ..utils.errors import DataError, MissingFileError, unreadable_file_message
from .caption_csv import read_caption_csv
from .concepts import ConceptBank, build_concept_extractor
from .register_zero_shot import register_path_check, resolve_dataset_path

__all__ = [
    "CAPTIONS_EVALUATOR_TYPE",
    "CaptionDatasetMapper",
    "is_caption_split",
    "register_caption_split",
]

logger = logging.getLogger(__name__)

#: ``evaluator_type`` of a caption split's metadata.
CAPTIONS_EVALUATOR_TYPE = "captions"

_CAPTION_SPLITS: dict[str, dict] = {}


def is_caption_split(name: str) -> bool:
    """Whether ``name`` was registered by :func:`register_caption_split`."""
    return name in _CAPTION_SPLITS


def register_caption_split(
    name: str,
    csv: str | os.PathLike,
    *,
    img_key: str = "filepath",
    caption_key: str = "caption",
    separator: str = ",",
    concept_bank: str | os.PathLike | None = None,
    image_root: str | os.PathLike | None = None,
    root: str | os.PathLike | None = None,
    split_file: str | os.PathLike | None = None,
) -> str:
    """Register an image-caption CSV as a dataset (lazily: the CSV is read on first use).

    Args:
        name: dataset name; ``"ocz_"`` is prefixed if missing.
        csv: the CSV (relative: under ``root`` or ``$DETECTRON2_DATASETS``).
        img_key, caption_key, separator: the CSV's columns and separator.
        concept_bank: concept bank file (absolute, or relative to ``root``), or None.
        image_root: folder the CSV's relative image paths start from (absolute, or relative to
            ``root``); None: the CSV's folder (open_clip's convention).
        root: base of relative paths.
        split_file: the split file it comes from (recorded in the metadata).

    Returns:
        The registered name. Registering the same name again with the same settings is a no-op;
        with other settings it is an error.
    """
    name = name if name.startswith("ocz_") else f"ocz_{name}"
    spec = {
        "csv": resolve_dataset_path(csv, root),
        "img_key": img_key,
        "caption_key": caption_key,
        "separator": separator,
        "concept_bank": None if not concept_bank else resolve_dataset_path(concept_bank, root),
        "image_root": None if not image_root else resolve_dataset_path(image_root, root),
    }
    if name in _CAPTION_SPLITS:
        if _CAPTION_SPLITS[name] != spec:
            raise DataError(
                f"caption dataset {name} is already registered with other settings "
                f"({_CAPTION_SPLITS[name]}); give the new one another dataset name"
            )
        return name
    if name in DatasetCatalog.list():
        raise DataError(f"dataset {name} is already registered (not as a caption dataset)")
    DatasetCatalog.register(name, lambda: _load_records(name, spec))
    MetadataCatalog.get(name).set(
        evaluator_type=CAPTIONS_EVALUATOR_TYPE,
        caption_csv=spec["csv"],
        concept_bank=spec["concept_bank"],
        split_file=os.path.abspath(split_file) if split_file else None,
    )
    _CAPTION_SPLITS[name] = spec
    register_path_check(name, lambda: _check_paths(name, spec))
    return name


def _check_paths(name: str, spec: dict) -> None:
    if not os.path.isfile(spec["csv"]):
        raise MissingFileError(
            f"{name}: the caption CSV {spec['csv']} does not exist (relative paths resolve "
            "against $DETECTRON2_DATASETS); for the miniature run tools/prepare_synthetic.py"
        )
    if spec["concept_bank"] and not os.path.isfile(spec["concept_bank"]):
        raise MissingFileError(f"{name}: the concept bank {spec['concept_bank']} does not exist")


def _load_records(name: str, spec: dict) -> list[dict]:
    _check_paths(name, spec)
    try:
        files, captions = read_caption_csv(
            spec["csv"],
            img_key=spec["img_key"],
            caption_key=spec["caption_key"],
            separator=spec["separator"],
            image_root=spec["image_root"],
        )
    except FileNotFoundError as e:
        raise MissingFileError(f"{name}: {e}") from e
    except ValueError as e:
        raise DataError(f"{name}: {e}") from e
    logger.info("%s: %d image-caption pairs from %s", name, len(files), spec["csv"])
    return [
        {"file_name": str(f), "caption": c, "image_id": i, "dataset_name": name}
        for i, (f, c) in enumerate(zip(files, captions))
    ]


class CaptionDatasetMapper:
    """Caption record -> model input (training): the image resized so its shorter side is the
    crop size, a random crop of that size (centre crop at inference), a horizontal flip, and
    the caption's concepts (found here, in the loader's workers: spaCy is the slow part).

    Output: ``"image"`` uint8 [3, S, S], ``"caption"``, ``"concepts"`` int64 [C, 3] (concept id,
    character start, character end in the caption; C may be 0), ``"dataset_name"``. The model
    tokenizes the caption and finds the concepts' tokens (its text tower owns the tokenizer).
    """

    @configurable
    def __init__(
        self,
        *,
        is_train: bool,
        crop_size: int,
        flip_prob: float,
        extractors: dict,
        image_format: str = "RGB",
    ):
        """
        Args:
            is_train: random crop and flip (else centre crop, no flip).
            crop_size: side S of the square crops.
            flip_prob: horizontal flip probability in training.
            extractors: dataset name -> concept extractor (``caption -> [ConceptMatch]``) or
                None (no concept bank: the caption trains the global loss only).
            image_format: Detectron2 image format.
        """
        self.is_train = is_train
        self.crop_size = int(crop_size)
        self.flip_prob = float(flip_prob)
        self.extractors = dict(extractors)
        self.image_format = image_format
        augs = [T.ResizeShortestEdge(self.crop_size, max_size=10**6)]
        if is_train:
            augs.append(T.RandomCrop("absolute", (self.crop_size, self.crop_size)))
            if self.flip_prob > 0:
                augs.append(T.RandomFlip(prob=self.flip_prob, horizontal=True))
        self.augmentations = T.AugmentationList(augs)
        logger.info("Caption mapper (train=%s): %s", is_train, self.augmentations)

    @classmethod
    def from_config(cls, cfg, is_train: bool = True, dataset_names: Sequence[str] | None = None):
        names = list(cfg.DATASETS.TRAIN if dataset_names is None else dataset_names)
        concepts = cfg.MODEL.SIMZSS.CONCEPTS
        extractors = {}
        for name in names:
            path = concepts.BANK or MetadataCatalog.get(name).get("concept_bank", None)
            if not path:
                logger.warning(
                    "%s has no concept bank (MODEL.SIMZSS.CONCEPTS.BANK or the split file's "
                    "concept_bank): its captions train the global loss only",
                    name,
                )
                extractors[name] = None
                continue
            bank = ConceptBank.from_file(resolve_dataset_path(path) if concepts.BANK else path)
            extractors[name] = build_concept_extractor(
                bank, concepts.EXTRACTOR, concepts.SPACY_PIPELINE
            )
        return {
            "is_train": is_train,
            "crop_size": cfg.INPUT.CROP.SIZE[0],
            "flip_prob": cfg.INPUT.FLIP_PROB,
            "extractors": extractors,
            "image_format": cfg.INPUT.FORMAT,
        }

    def __call__(self, record: dict) -> dict:
        record = copy.deepcopy(record)
        try:
            image = utils.read_image(record["file_name"], format=self.image_format)
        except OSError as e:
            path = record["file_name"]
            raise DataError(unreadable_file_message(f"Cannot read image {path}", path, e)) from e
        aug = T.AugInput(image)
        self.augmentations(aug)
        image = aug.image
        if not self.is_train:  # centre crop
            h, w = image.shape[:2]
            top, left = (h - self.crop_size) // 2, (w - self.crop_size) // 2
            image = image[top : top + self.crop_size, left : left + self.crop_size]
        caption = record["caption"]
        extractor = self.extractors.get(record.get("dataset_name"))
        found = [] if extractor is None else extractor(caption)
        return {
            "image": torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1))),
            "caption": caption,
            "concepts": torch.tensor(
                [(m.concept, m.start, m.end) for m in found], dtype=torch.long
            ).reshape(-1, 3),
            "dataset_name": record.get("dataset_name"),
        }
