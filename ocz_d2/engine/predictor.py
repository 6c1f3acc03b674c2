"""Inference on any image with any class names: :class:`ZeroShotPredictor`.

predictor = ZeroShotPredictor(cfg)                      # cfg.MODEL.WEIGHTS: a trained model
result = predictor("photo.jpg", "cat, dog, sofa|couch")
result.labels      # [H, W] int64, k = the k-th class
result.areas       # [K] pixels per class
result.scores      # [K, H, W] per-pixel class scores (numpy, like every field)
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from detectron2.data import MetadataCatalog
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.modeling import build_model
from PIL import Image, UnidentifiedImageError
from torch import nn

from ..data.augmentations import build_zero_shot_augmentations
from ..data.split_file import register_split_files_from_config
from ..modeling.meta_arch.zero_shot_segmentor import TEST_MODES, calibrate
from ..modeling.segment_classifier import ENSEMBLE_SEEN_KEY, SegmentCLIPClassifier
from ..modeling.text.templates import clean_class_name
from ..modeling.text.vocabulary import Vocabulary, embed_vocabulary, name_key
from ..utils.errors import ArgumentError, DataError, MissingFileError, unreadable_file_message
from .checkpoint import AtomicCheckpointer, check_checkpoint_file

__all__ = [
    "ImageLike",
    "SegmentationResult",
    "VocabularyLike",
    "ZeroShotPredictor",
    "check_image_pixels",
    "load_image",
]

logger = logging.getLogger(__name__)

#: An image: a file path, an RGB uint8 array [H, W, 3] (or grey [H, W], or RGBA), a PIL image.
ImageLike = str | os.PathLike | np.ndarray | Image.Image
#: A vocabulary: a :class:`Vocabulary`, "a, b|c" text, or a list of "a" / "b|c" / ["b", "c"].
VocabularyLike = Vocabulary | str | Sequence[str | Sequence[str]]


def load_image(path: str | os.PathLike) -> np.ndarray:
    """An image file as RGB uint8 [H, W, 3] (EXIF orientation applied).

    Raises:
        ValueError: when the file is missing or is not a readable image; the message names it.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"cannot read image {path}: no such file")
    try:
        return utils.read_image(path, format="RGB")
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
        raise DataError(unreadable_file_message(f"cannot read image {path}", path, e)) from e


def check_image_pixels(height: int, width: int, limit: int, what: str = "the image") -> None:
    """Refuse an image of more than ``limit`` pixels (0: no limit).

    Raises:
        DataError: naming the size, the limit and what to do.
    """
    if limit and height * width > limit:
        raise DataError(
            f"{what} is {width} x {height} = {height * width:,} pixels, more than the limit of "
            f"{limit:,} (MODEL.OCZ.TEST.MAX_IMAGE_PIXELS): downscale it, or raise the limit"
        )


def _as_rgb(image: ImageLike) -> np.ndarray:
    """RGB uint8 [H, W, 3] of any :data:`ImageLike`."""
    if isinstance(image, (str, os.PathLike)):
        return load_image(image)
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    if not isinstance(image, np.ndarray):
        raise TypeError(f"an image is a path, a numpy array or a PIL image, not {type(image)}")
    if image.dtype != np.uint8:
        raise ArgumentError(
            f"image arrays must be uint8 (0..255), got {image.dtype}: convert first, e.g. "
            "(x * 255).round().astype(np.uint8) for values in [0, 1]"
        )
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] not in (3, 4) or min(image.shape[:2]) < 1:
        raise ArgumentError(f"an image array is [H, W, 3] RGB (or [H, W], RGBA), got {image.shape}")
    return np.ascontiguousarray(image[..., :3])


def _as_vocabulary(vocabulary: VocabularyLike) -> Vocabulary:
    if isinstance(vocabulary, Vocabulary):
        return vocabulary
    if isinstance(vocabulary, str):
        return Vocabulary.from_text(vocabulary)
    return Vocabulary.parse(vocabulary)


@dataclass(frozen=True)
class SegmentationResult:
    """The segmentation of one image.

    Attributes:
        labels: int64 [H, W] at the input's size; value k is ``vocabulary.classes[k]``.
        scores: float32 [K, H, W] per-pixel class scores (the model's sum over queries of class
            probability x mask probability; minus gamma for calibrated classes); the labels are
            their argmax.
        areas: int64 [K] pixels labelled with each class.
        class_scores: float64 [K] mean score of each class over its own pixels (NaN when
            absent): how confidently the class won where it won.
        vocabulary: the classes, in label order.
        calibrated: int64 indices of the classes whose scores were lowered by gamma.
    """

    labels: np.ndarray
    scores: np.ndarray
    areas: np.ndarray
    class_scores: np.ndarray
    vocabulary: Vocabulary
    calibrated: np.ndarray

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.vocabulary.names

    @property
    def present(self) -> list[int]:
        """Indices of the classes with at least one pixel, in vocabulary order."""
        return [int(k) for k in np.flatnonzero(self.areas)]


class ZeroShotPredictor:
    """Segment images with a trained model and any vocabulary (Detectron2's ``DefaultPredictor``
    for open-vocabulary segmentation).

    Images are read and resized as in evaluation (``INPUT.FORMAT``, ``INPUT.MIN_SIZE_TEST``);
    the outputs are at the input's size. Class names, with synonyms ("sofa|couch": embeddings
    averaged), go through the model's text embedder (its CLIP text tower, or
    ``MODEL.OCZ.TEXT.EMBEDDINGS_FILE`` when set, which must then hold every name). The
    embeddings of the last ``cache_size`` vocabularies are kept (least recently used dropped
    first), so a stream of different vocabularies takes bounded memory.

    Calibration: none by default (in an arbitrary vocabulary nothing is "seen"). With
    ``calibration=<registered dataset>``, classes with a name (any synonym) among that
    dataset's seen classes get ``gamma`` subtracted from their scores, as in the dataset's
    evaluation; without a vocabulary the dataset's own classes (and its embeddings) are used,
    which reproduces the evaluation's predictions.
    """

    def __init__(
        self,
        cfg,
        *,
        model: nn.Module | None = None,
        weights: str | None = None,
        allow_untrained: bool = False,
        device: str | None = None,
        mode: str | None = None,
        calibration: str | None = None,
        gamma: float | None = None,
        cache_size: int | None = None,
        batch_size: int = 1,
        segment_clip: bool | None = None,
    ):
        """
        Args:
            cfg: a config with the ocz_d2 keys (see :func:`ocz_d2.config.load_config`); cloned.
            model: an already built model (e.g. just trained): no weights are loaded; it is
                moved to ``device`` when given and put in eval mode, and each prediction sets
                its test mode and windows (``mode``, the cfg's windows). None: built from
                ``cfg``.
            weights: the trained model file; None: ``cfg.MODEL.WEIGHTS``.
            allow_untrained: accept empty weights (random heads: smoke tests only).
            device: "cpu", "cuda", "cuda:1"...; None: ``cfg.MODEL.DEVICE``.
            mode: "whole" or "slide" (windows ``MODEL.OCZ.TEST.WINDOW_SIZE`` /
                ``WINDOW_STRIDE`` on the resized image); None: ``MODEL.OCZ.TEST.MODE``.
            calibration: a registered dataset whose seen classes are calibrated, or None.
            gamma: the calibration; None: ``MODEL.OCZ.TEST.CALIBRATION``.
            cache_size: vocabularies whose embeddings are kept; None:
                ``MODEL.OCZ.TEST.VOCABULARY_CACHE_SIZE``.
            batch_size: images per model call in :meth:`predict` (same-size images share
                one forward).
            segment_clip: ZegFormer's ensemble with CLIP's classification of the segments
                (``MODEL.OCZ.SEGMENT_CLIP``, its settings from the cfg); None:
                ``MODEL.OCZ.SEGMENT_CLIP.ENABLED``. The attribute can be switched between
                calls (the classifier has no parameters).

        Raises:
            ValueError / FileNotFoundError: empty or missing weights, an unknown mode or
                calibration dataset, an unavailable device, a bad cache or batch size.
        """
        cfg = cfg.clone()
        cfg.defrost()
        if device is not None:
            cfg.MODEL.DEVICE = device
        self._check_settings(cfg, mode, cache_size, batch_size)
        self.cfg = cfg
        self.mode = cfg.MODEL.OCZ.TEST.MODE if mode is None else mode
        self.cache_size = (
            cfg.MODEL.OCZ.TEST.VOCABULARY_CACHE_SIZE if cache_size is None else int(cache_size)
        )
        self.batch_size = int(batch_size)
        self.gamma = float(cfg.MODEL.OCZ.TEST.CALIBRATION if gamma is None else gamma)
        self.calibration = calibration
        self._seen_names = self._seen_names_of(cfg, calibration) if calibration else frozenset()
        self.input_format = cfg.INPUT.FORMAT
        self.augmentations = T.AugmentationList(build_zero_shot_augmentations(cfg, False))
        self._cache: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self.max_image_pixels = int(cfg.MODEL.OCZ.TEST.MAX_IMAGE_PIXELS)
        self.weights = cfg.MODEL.WEIGHTS if weights is None else weights
        if model is None:
            model = self._build(cfg, allow_untrained)
        elif device is not None:
            model.to(device)
        self.model = model.eval()
        self.segment_clip = bool(
            cfg.MODEL.OCZ.SEGMENT_CLIP.ENABLED if segment_clip is None else segment_clip
        )
        # Mask-classification models (OC-ZSS, ZegFormer) can classify their segments with CLIP;
        # a patch-text model (SimZSS) has no segments.
        self._has_segments = hasattr(model, "segment_classifier")
        # The model's own classifier (cfg ENABLED), or one built when first switched on.
        self._segment_classifier = getattr(model, "segment_classifier", None)

    @staticmethod
    def _check_settings(cfg, mode: str | None, cache_size: int | None, batch_size: int) -> None:
        if str(cfg.MODEL.DEVICE).startswith("cuda") and not torch.cuda.is_available():
            raise ArgumentError(
                f"MODEL.DEVICE is {cfg.MODEL.DEVICE!r} but CUDA is not available: use 'cpu'"
            )
        mode = cfg.MODEL.OCZ.TEST.MODE if mode is None else mode
        if mode not in TEST_MODES:
            raise ArgumentError(f"mode {mode!r}: use one of {TEST_MODES}")
        size = cfg.MODEL.OCZ.TEST.VOCABULARY_CACHE_SIZE if cache_size is None else cache_size
        if size < 0 or batch_size < 1:
            raise ArgumentError(
                f"cache_size must be >= 0 and batch_size >= 1, got {size}, {batch_size}"
            )
        if cfg.MODEL.OCZ.TEST.MAX_IMAGE_PIXELS < 0:
            raise ArgumentError(
                f"MODEL.OCZ.TEST.MAX_IMAGE_PIXELS must be >= 0 (0: no limit), got "
                f"{cfg.MODEL.OCZ.TEST.MAX_IMAGE_PIXELS}"
            )
        if cfg.INPUT.FORMAT not in ("RGB", "BGR"):
            raise ArgumentError(
                f"INPUT.FORMAT={cfg.INPUT.FORMAT!r}: the predictor takes RGB or BGR"
            )

    def _build(self, cfg, allow_untrained: bool) -> nn.Module:
        weights = self.weights
        if not weights and not allow_untrained:
            raise ArgumentError(
                "MODEL.WEIGHTS is empty: give the trained model (e.g. MODEL.WEIGHTS "
                "output/demo/model_final.pth); untrained heads give meaningless segmentations"
            )
        if weights and "://" not in weights and not os.path.isfile(weights):
            raise MissingFileError(f"MODEL.WEIGHTS {weights!r} does not exist")
        check_checkpoint_file(weights)  # a truncated file: named before the model is built
        model = build_model(cfg)
        if weights:
            AtomicCheckpointer(model).load(weights)
        else:
            logger.warning("MODEL.WEIGHTS is empty: the heads are untrained")
        return model

    @staticmethod
    def _seen_names_of(cfg, dataset: str) -> frozenset[str]:
        if dataset not in MetadataCatalog.list():
            register_split_files_from_config(cfg, lazy=True)
        meta = MetadataCatalog.get(dataset) if dataset in MetadataCatalog.list() else None
        if meta is None or meta.get("stuff_classes", None) is None:
            raise ArgumentError(
                f"calibration dataset {dataset!r} is not a registered zero-shot split (add its "
                "split file to DATASETS.SPLIT_FILES, or give no calibration)"
            )
        classes = list(meta.stuff_classes)
        seen = meta.get("seen_classes", list(range(len(classes))))
        return frozenset(name_key(clean_class_name(classes[i])) for i in seen)

    @property
    def device(self) -> torch.device:
        return self.model.device

    # ------------------------------------------------------------------ vocabulary
    def embeddings(self, vocabulary: VocabularyLike | None) -> tuple[Vocabulary, torch.Tensor]:
        """The vocabulary (the calibration dataset's when None) and its embeddings [K, D].

        Served from the bounded cache when the same vocabulary was used recently.
        """
        if vocabulary is None:
            if not self.calibration:
                raise ArgumentError("no vocabulary: give class names (or a calibration dataset)")
            vocab = Vocabulary.parse(MetadataCatalog.get(self.calibration).stuff_classes)
            key: tuple = ("dataset", self.calibration)
        else:
            vocab = _as_vocabulary(vocabulary)
            key = ("names", vocab.classes)
        text = self._cache.get(key)
        if text is not None:
            self._cache.move_to_end(key)
            return vocab, text
        embedder = self.model.text_embedder
        if key[0] == "dataset":
            text = embedder.get(vocab.names, dataset_name=self.calibration, cache=False)
        else:
            text = embed_vocabulary(embedder, vocab)
        if self.cache_size:
            self._cache[key] = text
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return vocab, text

    def cached_vocabularies(self) -> int:
        """Number of vocabularies whose embeddings are cached (at most ``cache_size``)."""
        return len(self._cache)

    def calibrated_classes(self, vocabulary: Vocabulary) -> list[int]:
        """Indices of the classes calibrated: one of their names is a seen class of the
        calibration dataset (none without calibration)."""
        return [
            k
            for k, synonyms in enumerate(vocabulary.classes)
            if any(name_key(clean_class_name(s)) in self._seen_names for s in synonyms)
        ]

    # ------------------------------------------------------------------ inference
    def _sample(self, image: ImageLike) -> dict:
        rgb = _as_rgb(image)
        height, width = rgb.shape[:2]
        check_image_pixels(height, width, self.max_image_pixels)
        array = rgb[..., ::-1] if self.input_format == "BGR" else rgb
        aug = T.AugInput(np.ascontiguousarray(array))
        self.augmentations(aug)
        tensor = torch.as_tensor(np.ascontiguousarray(aug.image.transpose(2, 0, 1)))
        return {"image": tensor, "height": height, "width": width}

    def __call__(
        self, image: ImageLike, vocabulary: VocabularyLike | None = None
    ) -> SegmentationResult:
        """Segment one image; see :meth:`predict`."""
        return self.predict([image], vocabulary)[0]

    @torch.no_grad()
    def predict(
        self, images: Sequence[ImageLike], vocabulary: VocabularyLike | None = None
    ) -> list[SegmentationResult]:
        """Segment images with one vocabulary.

        Args:
            images: paths, RGB uint8 arrays or PIL images, of any sizes. They go to the model
                ``batch_size`` at a time; the model runs the images of one size (after the
                test resize) in one forward, each at its own size (no padding to a common size
                changes a result): a result does not depend on the batch (up to float
                rounding of the batched products).
            vocabulary: the K classes (see :data:`VocabularyLike`); None: the calibration
                dataset's classes.

        Returns:
            One :class:`SegmentationResult` per image, in order.

        Raises:
            ValueError: an unreadable image or a bad vocabulary (empty, a name twice).
        """
        if isinstance(images, (str, os.PathLike, np.ndarray, Image.Image)):
            raise TypeError("predict takes a list of images; call the predictor for one image")
        vocab, text = self.embeddings(vocabulary)
        calibrated = torch.tensor(self.calibrated_classes(vocab), dtype=torch.long)
        # Set at each call: a model shared by predictors runs each one's own mode and windows.
        self.model.test_mode = self.mode
        self.model.window_size = tuple(self.cfg.MODEL.OCZ.TEST.WINDOW_SIZE)
        self.model.window_stride = tuple(self.cfg.MODEL.OCZ.TEST.WINDOW_STRIDE)
        if not self._has_segments:
            if self.segment_clip:
                raise ArgumentError(
                    f"segment_clip: {type(self.model).__name__} has no segments to classify "
                    "with CLIP (it classifies patches); turn MODEL.OCZ.SEGMENT_CLIP.ENABLED off"
                )
            return self._predict_batches(images, vocab, text, calibrated)
        own_classifier = self.model.segment_classifier
        self.model.segment_classifier = self._classifier() if self.segment_clip else None
        try:
            return self._predict_batches(images, vocab, text, calibrated)
        finally:
            self.model.segment_classifier = own_classifier

    def _classifier(self) -> SegmentCLIPClassifier:
        """The segment classifier: the model's, or one built from the cfg's settings."""
        if self._segment_classifier is None:
            classifier = SegmentCLIPClassifier(self.cfg).to(self.model.device)
            classifier.check_backbone(self.model.backbone, self.model.text_embedder.dim)
            self._segment_classifier = classifier
        return self._segment_classifier

    def _predict_batches(
        self,
        images: Sequence[ImageLike],
        vocab: Vocabulary,
        text: torch.Tensor,
        calibrated: torch.Tensor,
    ) -> list[SegmentationResult]:
        results = []
        for start in range(0, len(images), self.batch_size):
            samples = [self._sample(x) for x in images[start : start + self.batch_size]]
            for s in samples:
                # The calibrated (seen) classes are also the seen side of the segment-CLIP
                # ensemble (MODEL.OCZ.SEGMENT_CLIP), as in evaluation.
                s.update(
                    {"class_names": vocab.names, "class_embeddings": text,
                     ENSEMBLE_SEEN_KEY: calibrated}
                )  # fmt: skip
            for out in self.model(samples):
                results.append(self._result(out["sem_seg"], vocab, calibrated))
        return results

    def _result(
        self, scores: torch.Tensor, vocab: Vocabulary, calibrated: torch.Tensor
    ) -> SegmentationResult:
        scores = calibrate(scores.float(), calibrated.to(scores.device), self.gamma)
        top, labels = scores.max(0)
        k = scores.shape[0]
        areas = torch.bincount(labels.flatten(), minlength=k)
        sums = torch.zeros(k, dtype=torch.float64, device=scores.device)
        sums.index_add_(0, labels.flatten(), top.flatten().double())
        mean = (sums / areas.clamp(min=1)).masked_fill(areas == 0, float("nan"))
        return SegmentationResult(
            labels=labels.cpu().numpy(),
            scores=scores.cpu().numpy(),
            areas=areas.cpu().numpy(),
            class_scores=mean.cpu().numpy(),
            vocabulary=vocab,
            calibrated=calibrated.numpy(),
        )
