"""Training and test augmentations of the zero-shot semantic-segmentation mapper.

Training follows the recipe of the zero-shot anchors (docs/PROTOCOLS.md): random rescale to a
target size times a factor in ``RESIZE_SCALE``, a category-area-constrained crop, a horizontal
flip and a photometric distortion (brightness, contrast, saturation, hue). Test:
``ResizeShortestEdge``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import cv2
import numpy as np
from detectron2.data import transforms as T
from fvcore.transforms.transform import Transform
from PIL import Image

from ..constants import IGNORE_LABEL
from .register_zero_shot import ignore_label_of

__all__ = [
    "PhotometricDistortionTransform",
    "RandomPhotometricDistortion",
    "RandomResizeScale",
    "build_zero_shot_augmentations",
]

logger = logging.getLogger(__name__)

_TO_HSV = {"RGB": cv2.COLOR_RGB2HSV, "BGR": cv2.COLOR_BGR2HSV}
_FROM_HSV = {"RGB": cv2.COLOR_HSV2RGB, "BGR": cv2.COLOR_HSV2BGR}


class PhotometricDistortionTransform(Transform):
    """Brightness, contrast, saturation and hue jitter of the image; labels and coordinates
    are left unchanged.

    Order: brightness, contrast (if ``contrast_first``), saturation, hue, contrast (otherwise),
    with clipping to [0, 255] after each step (the mmseg ``PhotoMetricDistortion`` recipe).
    Neutral parameters (0, 1, 1, 0) return the image unchanged.
    """

    def __init__(
        self,
        brightness_delta: float = 0.0,
        contrast: float = 1.0,
        saturation: float = 1.0,
        hue_delta: float = 0.0,
        contrast_first: bool = True,
        image_format: str = "RGB",
    ):
        """
        Args:
            brightness_delta: value added to every channel (0-255 scale).
            contrast: factor multiplying every channel.
            saturation: factor multiplying the HSV saturation.
            hue_delta: shift of the HSV hue, in degrees.
            contrast_first: apply the contrast before (True) or after the HSV steps.
            image_format: channel order of the images, "RGB" or "BGR" (others support
                brightness and contrast only).
        """
        super().__init__()
        self._set_attributes(locals())

    def apply_image(self, img: np.ndarray) -> np.ndarray:
        """Args: img: uint8 [H, W, C] (or float in 0-255). Returns: same shape and dtype."""
        if self._is_identity():
            return img
        x = img.astype(np.float32)
        if self.brightness_delta != 0:
            x = np.clip(x + self.brightness_delta, 0, 255)
        if self.contrast_first and self.contrast != 1:
            x = np.clip(x * self.contrast, 0, 255)
        if (self.saturation != 1 or self.hue_delta != 0) and self._has_color(x):
            # float32 HSV in OpenCV: hue in [0, 360), saturation and value in [0, 1].
            hsv = cv2.cvtColor(np.ascontiguousarray(x / 255.0), _TO_HSV[self.image_format])
            hsv[..., 1] = np.clip(hsv[..., 1] * self.saturation, 0, 1)
            hsv[..., 0] = np.mod(hsv[..., 0] + self.hue_delta, 360.0)
            x = np.clip(cv2.cvtColor(hsv, _FROM_HSV[self.image_format]) * 255.0, 0, 255)
        if not self.contrast_first and self.contrast != 1:
            x = np.clip(x * self.contrast, 0, 255)
        if img.dtype == np.uint8:
            return np.rint(x).astype(np.uint8)
        return x.astype(img.dtype)

    def _is_identity(self) -> bool:
        return (
            self.brightness_delta == 0
            and self.contrast == 1
            and self.saturation == 1
            and self.hue_delta == 0
        )

    def _has_color(self, x: np.ndarray) -> bool:
        return x.ndim == 3 and x.shape[2] == 3 and self.image_format in _TO_HSV

    def apply_segmentation(self, segmentation: np.ndarray) -> np.ndarray:
        return segmentation

    def apply_coords(self, coords: np.ndarray) -> np.ndarray:
        return coords

    def inverse(self) -> Transform:
        raise NotImplementedError("A photometric distortion has no geometric inverse.")


class RandomPhotometricDistortion(T.Augmentation):
    """Draw a :class:`PhotometricDistortionTransform`; each of the four jitters is applied with
    probability ``prob`` (defaults: the mmseg ``PhotoMetricDistortion`` ranges)."""

    def __init__(
        self,
        brightness_delta: float = 32.0,
        contrast_range: Sequence[float] = (0.5, 1.5),
        saturation_range: Sequence[float] = (0.5, 1.5),
        hue_delta: float = 36.0,
        prob: float = 0.5,
        image_format: str = "RGB",
    ):
        """
        Args:
            brightness_delta: brightness offsets are drawn from [-delta, delta] (0-255 scale).
            contrast_range: (min, max) contrast factor.
            saturation_range: (min, max) saturation factor.
            hue_delta: hue shifts are drawn from [-delta, delta] degrees (36 degrees equals
                mmseg's 18 in OpenCV's 0-180 hue units).
            prob: probability of each jitter.
            image_format: "RGB" or "BGR" (other formats: brightness and contrast only).
        """
        super().__init__()
        self._init(locals())

    def get_transform(self, image: np.ndarray) -> Transform:
        # Detectron2 augmentations draw from NumPy's global state, which its data loader seeds
        # per worker; a private Generator would repeat the same draws in every worker.
        def draw(low: float, high: float, neutral: float) -> float:
            if np.random.rand() < self.prob:  # noqa: NPY002
                return float(np.random.uniform(low, high))  # noqa: NPY002
            return neutral

        return PhotometricDistortionTransform(
            brightness_delta=draw(-self.brightness_delta, self.brightness_delta, 0.0),
            contrast=draw(*self.contrast_range, 1.0),
            saturation=draw(*self.saturation_range, 1.0),
            hue_delta=draw(-self.hue_delta, self.hue_delta, 0.0),
            contrast_first=bool(np.random.randint(2)),  # noqa: NPY002
            image_format=self.image_format,
        )


class RandomResizeScale(T.ResizeScale):
    """:class:`detectron2.data.transforms.ResizeScale` that can match the target's orientation.

    The image is resized, keeping its aspect ratio, to fit ``(target_height, target_width)``
    times a factor drawn from ``[min_scale, max_scale]``. With ``match_orientation`` the target
    is transposed for images whose orientation differs from it, so the fit only depends on the
    image's short and long sides: this is the mmseg ``Resize(img_scale=(2048, 512),
    ratio_range=...)`` of the anchors, where a portrait image gets its short side, not its long
    side, fitted to 512.
    """

    def __init__(
        self,
        min_scale: float,
        max_scale: float,
        target_height: int,
        target_width: int,
        interp: int = Image.BILINEAR,
        match_orientation: bool = True,
    ):
        """
        Args:
            min_scale, max_scale: range of the random factor.
            target_height, target_width: the box the image is fitted into (before scaling).
            interp: PIL interpolation of the image (labels always use nearest).
            match_orientation: transpose the target box for images of the other orientation.
        """
        super().__init__(min_scale, max_scale, target_height, target_width, interp)
        self.match_orientation = match_orientation

    def _get_resize(self, image: np.ndarray, scale: float) -> Transform:
        h, w = image.shape[:2]
        th, tw = self.target_height, self.target_width
        if self.match_orientation and (h > w) != (th > tw) and h != w and th != tw:
            th, tw = tw, th
        output_scale = min(th * scale / h, tw * scale / w)
        new_h, new_w = max(1, int(round(h * output_scale))), max(1, int(round(w * output_scale)))
        return T.ResizeTransform(h, w, new_h, new_w, self.interp)


def build_zero_shot_augmentations(
    cfg, is_train: bool, *, match_orientation: bool = True
) -> list[T.Augmentation]:
    """Build the augmentation list of :class:`~ocz_d2.data.ZeroShotSemSegDatasetMapper`.

    Args:
        cfg: config with ``cfg.INPUT`` keys ``RESIZE_SCALE``, ``RESIZE_TARGET``,
            ``CROP.{ENABLED, TYPE, SIZE, SINGLE_CATEGORY_MAX_AREA}``, ``FLIP_PROB``,
            ``COLOR_AUG``, ``FORMAT`` (training) and ``MIN_SIZE_TEST``, ``MAX_SIZE_TEST`` (test).
        is_train: training (random rescale, crop, flip, photometric) or test (resize only).
        match_orientation: see :class:`RandomResizeScale`.

    Returns:
        The augmentations, in application order.
    """
    if not is_train:
        if cfg.INPUT.MIN_SIZE_TEST > 0:
            return [T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)]
        return []
    min_scale, max_scale = (float(v) for v in cfg.INPUT.RESIZE_SCALE)
    target_h, target_w = (int(v) for v in cfg.INPUT.RESIZE_TARGET)
    if not 0 < min_scale <= max_scale or target_h <= 0 or target_w <= 0:
        raise ValueError(
            "INPUT.RESIZE_SCALE must be (min, max) with 0 < min <= max and INPUT.RESIZE_TARGET "
            f"positive (h, w); got {tuple(cfg.INPUT.RESIZE_SCALE)} and "
            f"{tuple(cfg.INPUT.RESIZE_TARGET)}."
        )
    augs: list[T.Augmentation] = [
        RandomResizeScale(
            min_scale, max_scale, target_h, target_w, match_orientation=match_orientation
        )
    ]
    if cfg.INPUT.CROP.ENABLED:
        augs.append(
            T.RandomCrop_CategoryAreaConstraint(
                cfg.INPUT.CROP.TYPE,
                cfg.INPUT.CROP.SIZE,
                cfg.INPUT.CROP.SINGLE_CATEGORY_MAX_AREA,
                _ignore_label_of_datasets(cfg.DATASETS.TRAIN),
            )
        )
    if cfg.INPUT.FLIP_PROB > 0:
        augs.append(T.RandomFlip(prob=cfg.INPUT.FLIP_PROB, horizontal=True, vertical=False))
    if cfg.INPUT.COLOR_AUG:
        augs.append(RandomPhotometricDistortion(image_format=cfg.INPUT.FORMAT))
    return augs


def _ignore_label_of_datasets(dataset_names) -> int:
    """The one ignore label of the training datasets (the crop must not count it as a class)."""
    labels = {name: ignore_label_of(name) for name in dataset_names}
    if len(set(labels.values())) > 1:
        raise ValueError(
            f"DATASETS.TRAIN mixes ignore labels {labels}: convert the label maps of one dataset "
            "so that all training datasets use the same ignore value"
        )
    return next(iter(labels.values()), IGNORE_LABEL)
