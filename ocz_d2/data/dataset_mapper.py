"""Dataset mapper of zero-shot semantic segmentation (training and inference)."""

from __future__ import annotations

import copy
import logging
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.data import MetadataCatalog
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import Instances
from PIL import Image, UnidentifiedImageError

from ..constants import PADDING_MASK_KEY, UNSEEN_MASK_KEY, ZERO_SHOT_SETTINGS
from ..utils.errors import DataError, unreadable_file_message
from .augmentations import build_zero_shot_augmentations
from .register_zero_shot import ignore_label_of

__all__ = [
    "PADDING_MASK_KEY",
    "UNSEEN_MASK_KEY",
    "ZERO_SHOT_SETTINGS",
    "ZeroShotSemSegDatasetMapper",
    "read_label_map",
]

logger = logging.getLogger(__name__)

# Dataset-dict keys ending in this suffix that are not extra label maps.
_FILE_SUFFIX = "_file_name"
_NOT_EXTRA_MAPS = ("file_name", "sem_seg_file_name")


def read_label_map(path: str, *, what: str = "label") -> np.ndarray:
    """Read a single-channel label PNG as uint8 class indices, without palette conversion.

    Args:
        path: the file.
        what: what the file is, for error messages.

    Returns:
        uint8 array [H, W]. Palette ("P") images give their palette indices, as VOC-style labels
        expect; 16/32-bit images are accepted when their values fit in uint8.

    Raises:
        ValueError: if the file cannot be read, has several channels, or values above 255.
    """
    try:
        with Image.open(path) as img:
            mode = img.mode
            arr = np.asarray(img)
    except (OSError, UnidentifiedImageError, ValueError) as e:
        message = unreadable_file_message(f"Cannot read the {what} file {path}", path, e)
        raise DataError(message) from e
    if arr.ndim != 2:
        raise DataError(
            f"The {what} file {path} has mode {mode!r} and shape {arr.shape}; it must be a "
            "single-channel image of class indices (mode 'L' or 'P'), not a color image."
        )
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8)
    if arr.size and (arr.min() < 0 or arr.max() > 255):
        raise DataError(
            f"The {what} file {path} has values in [{arr.min()}, {arr.max()}]; label maps must "
            "hold values 0..255 (classes, 255 = ignore)."
        )
    return arr.astype(np.uint8)


class ZeroShotSemSegDatasetMapper:
    """Map a zero-shot dataset dict to model inputs.

    Steps: read the image (``cfg.INPUT.FORMAT``) and its label PNG; check label values against
    the dataset's ``K`` classes; in training, set pixels of unseen classes to ignore (the
    dataset's ``ignore_label`` metadata, 255 for the splits of :func:`register_zero_shot_split`;
    in the transductive setting their location is kept apart, in ``"unseen_mask"``);
    apply the augmentations (geometric ones also to extra label maps such as
    ``object_map_file_name``, with nearest interpolation); pad (training only) to the crop size
    and to ``size_divisibility`` (image with 0, label maps with ignore); build per-class
    instances.

    Output dict (the input dict's keys are kept)::

        "image":      uint8 tensor [3, H, W]
        "sem_seg":    int64 tensor [H, W] (class indices or ignore), if a label is given
        "instances":  Instances (training only): gt_classes int64 [T] (full-vocabulary indices
                      of the seen classes present), gt_masks bool tensor [T, H, W]
        "<key>":      int64 tensor [H, W] for every "<key>_file_name" (e.g. "object_map")
        "padding_mask": bool tensor [H, W] (training only), True on the padding added here
        "unseen_mask": bool tensor [H, W] (transductive training only), True where the ground
                      truth is an unseen class (ignore in "sem_seg"; the class is not given)
        "height", "width": original image size

    At inference (``is_train=False``) only the test resize is applied, unseen labels are kept,
    nothing is padded and no instances are built.
    """

    @configurable
    def __init__(
        self,
        is_train: bool = True,
        *,
        augmentations: list[T.Augmentation | T.Transform],
        image_format: str = "RGB",
        size_divisibility: int = 0,
        pad_to_size: tuple[int, int] | None = None,
        zero_shot_setting: str = "inductive",
    ):
        """
        Args:
            is_train: training (labels required, unseen -> ignore, padding, instances) or
                inference.
            augmentations: augmentations applied in order (see
                :func:`~ocz_d2.data.augmentations.build_zero_shot_augmentations`).
            image_format: image format for ``read_image`` ("RGB", "BGR", ...).
            size_divisibility: in training, pad height and width to a multiple of it (0: off).
            pad_to_size: in training, pad to at least this (height, width), e.g. the crop size,
                so that every training sample has the same shape (mmseg pads to the crop).
            zero_shot_setting: one of :data:`ZERO_SHOT_SETTINGS`.
        """
        if zero_shot_setting not in ZERO_SHOT_SETTINGS:
            raise DataError(
                f"INPUT.ZERO_SHOT_SETTING must be one of {ZERO_SHOT_SETTINGS}, got "
                f"{zero_shot_setting!r}."
            )
        self.is_train = is_train
        self.augmentations = T.AugmentationList(augmentations)
        self.image_format = image_format
        self.size_divisibility = size_divisibility
        self.pad_to_size = tuple(pad_to_size) if pad_to_size is not None else None
        self.zero_shot_setting = zero_shot_setting
        # dataset name -> (K, ignore label, uint8 lookup table applied to training labels, bool
        # table of the unseen class values)
        self._label_tables: dict[str, tuple[int, int, np.ndarray, np.ndarray]] = {}
        mode = "training" if is_train else "inference"
        logger.info(f"[{self.__class__.__name__}] Augmentations used in {mode}: {augmentations}")

    @classmethod
    def from_config(cls, cfg, is_train: bool = True) -> dict[str, Any]:
        crop = cfg.INPUT.CROP
        pad_to_size = None
        if is_train and crop.ENABLED and crop.TYPE == "absolute":
            pad_to_size = (int(crop.SIZE[0]), int(crop.SIZE[1]))
        return {
            "is_train": is_train,
            "augmentations": build_zero_shot_augmentations(cfg, is_train),
            "image_format": cfg.INPUT.FORMAT,
            "size_divisibility": cfg.INPUT.SIZE_DIVISIBILITY,
            "pad_to_size": pad_to_size,
            "zero_shot_setting": cfg.INPUT.ZERO_SHOT_SETTING,
        }

    def _label_table(
        self, dataset_name: str | None
    ) -> tuple[int, int, np.ndarray, np.ndarray] | None:
        """Return (K, ignore label, lookup table, is-unseen table) of a zero-shot dataset, or
        None if it has no zero-shot metadata."""
        if dataset_name is None:
            return None
        if dataset_name not in self._label_tables:
            meta = MetadataCatalog.get(dataset_name)
            classes = meta.get("stuff_classes")
            unseen = meta.get("unseen_classes")
            if classes is None or unseen is None:
                return None
            ignore = ignore_label_of(dataset_name)
            if not 0 <= ignore <= 255:
                raise DataError(
                    f"Dataset {dataset_name!r} has ignore_label {ignore} in its metadata; label "
                    "maps are uint8: register it with a value in 0..255 (255 by default)."
                )
            table = np.arange(256, dtype=np.uint8)
            if self.is_train:
                table[list(unseen)] = ignore
            is_unseen = np.zeros(256, dtype=bool)
            is_unseen[list(unseen)] = True
            self._label_tables[dataset_name] = (len(classes), ignore, table, is_unseen)
        return self._label_tables[dataset_name]

    def _prepare_label(self, label: np.ndarray, dataset_dict: dict) -> np.ndarray:
        """Check label values and, in inductive training, map unseen classes to ignore (before
        the augmentations, which then never see them; the transductive mapper hides them after
        the augmentations, see :meth:`_hide_unseen`)."""
        name = dataset_dict.get("dataset_name")
        info = self._label_table(name)
        if info is None:
            if self.is_train:
                raise DataError(
                    f"Dataset {name!r} of {dataset_dict['sem_seg_file_name']} has no zero-shot "
                    "metadata (stuff_classes, unseen_classes): register it with "
                    "ocz_d2.data.register_zero_shot_split or a split file, and keep "
                    "'dataset_name' in its dataset dicts."
                )
            return label
        num_classes, ignore, table, _ = info
        counts = np.bincount(label.ravel(), minlength=256)
        present = np.flatnonzero(counts)
        bad = [int(v) for v in present if v >= num_classes and v != ignore]
        if bad:
            raise DataError(
                f"Label file {dataset_dict['sem_seg_file_name']} has values {bad[:10]} outside "
                f"[0, {num_classes}) and the ignore value {ignore} (dataset "
                f"{name!r} has {num_classes} classes). Convert the raw labels with the dataset's "
                "prepare script (see datasets/README.md)."
            )
        if self.is_train and self.zero_shot_setting == "inductive":
            return table[label]
        return label

    def _hide_unseen(
        self, sem_seg: np.ndarray, dataset_dict: dict
    ) -> tuple[np.ndarray, np.ndarray]:
        """Transductive training: unseen-class pixels become ignore in the label, and their
        location is returned as a bool map (where some unseen class is, not which)."""
        _, _, table, is_unseen = self._label_table(dataset_dict.get("dataset_name"))
        return table[sem_seg], is_unseen[sem_seg]

    def _read_image(self, dataset_dict: dict) -> np.ndarray:
        path = dataset_dict["file_name"]
        try:
            image = utils.read_image(path, format=self.image_format)
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
            message = unreadable_file_message(f"Cannot read the image {path}", path, e)
            raise DataError(message) from e
        utils.check_image_size(dataset_dict, image)
        return image

    def _read_maps(
        self, dataset_dict: dict, image_shape: tuple[int, int]
    ) -> tuple[np.ndarray | None, dict[str, np.ndarray]]:
        """Read the label and the extra label maps; check that they match the image size."""
        sem_seg = None
        if dataset_dict.get("sem_seg_file_name"):
            sem_seg = read_label_map(dataset_dict["sem_seg_file_name"])
        elif self.is_train:
            raise DataError(
                f"Training needs a label for {dataset_dict['file_name']}: the dataset dict has "
                "no 'sem_seg_file_name'."
            )
        extras = {}
        for key in sorted(dataset_dict):
            if key.endswith(_FILE_SUFFIX) and key not in _NOT_EXTRA_MAPS and dataset_dict[key]:
                extras[key[: -len(_FILE_SUFFIX)]] = read_label_map(
                    dataset_dict[key], what=key[: -len(_FILE_SUFFIX)]
                )
        for key, arr in [("sem_seg", sem_seg), *extras.items()]:
            if arr is not None and arr.shape != image_shape:
                path = dataset_dict["sem_seg_file_name" if key == "sem_seg" else key + _FILE_SUFFIX]
                raise DataError(
                    f"{key} map {path} has size {arr.shape[::-1]} (w, h) but the image "
                    f"{dataset_dict['file_name']} has {image_shape[::-1]}."
                )
        if sem_seg is not None:
            sem_seg = self._prepare_label(sem_seg, dataset_dict)
        return sem_seg, extras

    def _padding(self, height: int, width: int) -> tuple[int, int]:
        """Return the (bottom, right) padding of a training sample."""
        target_h, target_w = height, width
        if self.pad_to_size is not None:
            target_h = max(target_h, self.pad_to_size[0])
            target_w = max(target_w, self.pad_to_size[1])
        if self.size_divisibility > 0:
            d = self.size_divisibility
            target_h, target_w = -(-target_h // d) * d, -(-target_w // d) * d
        return target_h - height, target_w - width

    def __call__(self, dataset_dict: dict) -> dict:
        """
        Args:
            dataset_dict: one record of a zero-shot dataset (see
                :func:`~ocz_d2.data.register_zero_shot.register_zero_shot_split`).

        Returns:
            The model input dict described in the class docstring.
        """
        dataset_dict = copy.deepcopy(dataset_dict)
        image = self._read_image(dataset_dict)
        sem_seg, extras = self._read_maps(dataset_dict, image.shape[:2])

        aug_input = T.AugInput(image, sem_seg=sem_seg)
        transforms = self.augmentations(aug_input)
        image, sem_seg = aug_input.image, aug_input.sem_seg
        extras = {k: transforms.apply_segmentation(v) for k, v in extras.items()}

        image_t = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        maps = {k: torch.as_tensor(v.astype(np.int64)) for k, v in extras.items()}
        masks = {}
        if self.is_train and self.zero_shot_setting == "transductive":
            sem_seg, unseen = self._hide_unseen(sem_seg, dataset_dict)
            masks[UNSEEN_MASK_KEY] = torch.as_tensor(unseen)
        if sem_seg is not None:
            maps["sem_seg"] = torch.as_tensor(sem_seg.astype(np.int64))

        if self.is_train:
            ignore = ignore_label_of(dataset_dict.get("dataset_name"))
            masks[PADDING_MASK_KEY] = torch.zeros(image_t.shape[-2:], dtype=torch.bool)
            pad_h, pad_w = self._padding(*image_t.shape[-2:])
            if pad_h or pad_w:
                pad = (0, pad_w, 0, pad_h)
                image_t = F.pad(image_t, pad, value=0)
                maps = {k: F.pad(v, pad, value=ignore) for k, v in maps.items()}
                masks = {k: F.pad(v, pad, value=k == PADDING_MASK_KEY) for k, v in masks.items()}

        dataset_dict["image"] = image_t
        dataset_dict.update(maps)
        dataset_dict.update(masks)
        if self.is_train:
            dataset_dict["instances"] = self._instances(maps["sem_seg"], ignore)
        return dataset_dict

    @staticmethod
    def _instances(sem_seg: torch.Tensor, ignore_label: int) -> Instances:
        """One binary mask per class present in ``sem_seg`` [H, W] (``ignore_label`` excluded)."""
        classes = torch.unique(sem_seg)
        classes = classes[classes != ignore_label]
        instances = Instances(tuple(sem_seg.shape))
        instances.gt_classes = classes.to(torch.int64)
        instances.gt_masks = sem_seg[None] == classes[:, None, None]
        return instances
