"""The zero-shot segmentation meta-architecture: CLIP backbone, pixel decoder, query decoder."""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.data import MetadataCatalog
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone, build_sem_seg_head
from detectron2.modeling.postprocessing import sem_seg_postprocess
from detectron2.structures import ImageList
from detectron2.utils.events import get_event_storage
from detectron2.utils.memory import retry_if_cuda_oom
from torch import nn

from ...constants import OBJECT_MAP_KEY, UNSEEN_MASK_KEY, ZERO_SHOT_SETTINGS
from ...data.object_maps import check_object_map_records
from ...data.register_zero_shot import ignore_label_of
from ..backbone import CLIPPromptBackbone, build_clip_tower, load_backbone_weights
from ..criterion import SetCriterion, SplitCriterion, build_criterion, pixel_text_loss
from ..init_seed import component_seed
from ..padding import PATCH_VALID_KEY, batch_image_mask, image_patches
from ..pixel_decoder.image_path import IMAGE_KEY
from ..pseudo_masks import PseudoMaskGenerator
from ..region_guide import RegionGuide
from ..segment_classifier import ENSEMBLE_SEEN_KEY, SegmentCLIPClassifier
from ..targets import SPLIT_TARGETS, add_candidates, add_pseudo_labels, prepare_targets
from ..text import TextEmbedder
from ..transformer_decoder import build_transformer_decoder

logger = logging.getLogger(__name__)

TEST_MODES = ("whole", "slide")


def semantic_inference(
    pred_logits: torch.Tensor, pred_masks: torch.Tensor, class_probs: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-pixel class scores from mask classification.

    Args:
        pred_logits: [Q, K+1] class logits of each query (the last column is no-object).
        pred_masks: [Q, H, W] mask logits.
        class_probs: [Q, K] class scores of the queries to use instead of the softmax of
            ``pred_logits`` (e.g. :class:`SegmentCLIPClassifier`'s ensemble), or None.
    Returns:
        [K, H, W] scores: sum over queries of softmax class probability times mask sigmoid.
    """
    probs = pred_logits.softmax(-1)[:, :-1] if class_probs is None else class_probs
    masks = pred_masks.sigmoid()
    return torch.einsum("qk,qhw->khw", probs.to(masks.dtype), masks)


def calibrate(scores: torch.Tensor, seen_classes: torch.Tensor, gamma: float) -> torch.Tensor:
    """Subtract ``gamma`` from the scores of the seen classes ([K, H, W] or [B, K, H, W])."""
    if gamma == 0 or seen_classes.numel() == 0:
        return scores
    scores = scores.clone()
    scores[..., seen_classes, :, :] -= gamma
    return scores


def sliding_windows(height: int, width: int, window: tuple[int, int], stride: tuple[int, int]):
    """Top-left corners ``(y, x)`` of windows covering an ``height x width`` image.

    Windows are clipped to the image (an image smaller than the window gets one window); the last
    window in each direction is aligned to the border so every pixel is covered.
    """

    def starts(size: int, win: int, step: int) -> list[int]:
        if size <= win:
            return [0]
        n = math.ceil((size - win) / step) + 1
        return sorted({min(i * step, size - win) for i in range(n)})

    return [
        (y, x)
        for y in starts(height, window[0], stride[0])
        for x in starts(width, window[1], stride[1])
    ]


def inference_groups(samples: list[dict]) -> dict[tuple, list[int]]:
    """Indices of the samples that can share one inference forward, in order of first
    appearance: same image size, same vocabulary (``"dataset_name"``, or ``"class_names"`` and
    the very same ``"class_embeddings"`` tensor), same ensemble seen classes, and object maps
    for all or none."""
    groups: dict[tuple, list[int]] = {}
    for i, sample in enumerate(samples):
        if "class_names" in sample:
            embeddings = sample.get("class_embeddings")
            vocab: tuple = ("names", tuple(sample["class_names"]), id(embeddings))
        else:
            vocab = ("dataset", sample.get("dataset_name"))
        seen = sample.get(ENSEMBLE_SEEN_KEY)
        seen_key = None if seen is None else tuple(torch.as_tensor(seen).flatten().tolist())
        key = (
            tuple(sample["image"].shape),
            vocab,
            seen_key,
            sample.get(OBJECT_MAP_KEY) is not None,
        )
        groups.setdefault(key, []).append(i)
    return groups


@META_ARCH_REGISTRY.register()
class OCZeroShotSegmentor(nn.Module):
    """Zero-shot semantic segmentation by mask classification against text embeddings.

    Training: the vocabulary is the seen classes of the batch's dataset (inductive, and
    transductive before self-training starts) or all its classes (transductive self-training);
    targets are one binary mask per class present, with ignore pixels excluded from the mask
    losses (see :class:`SetCriterion`). With split matching (``pseudo_masker``), the candidate
    queries are trained on pseudo-masks of the ignore pixels (:class:`SplitCriterion`); with
    self-training, ignore pixels that the current prediction assigns confidently to an unseen
    class join the targets first. Inference: per-pixel scores over the
    dataset's full vocabulary (seen + unseen), seen-class calibration, whole image or sliding
    window. A sample dict may carry ``"class_names"`` to segment with any vocabulary
    (open-vocabulary inference; no calibration then), and with them ``"class_embeddings"``
    ([K, D], rows L2-normalised) to use instead of the text embedder's embeddings of the names
    (``ZeroShotPredictor`` passes synonym-averaged embeddings from its bounded cache this way).
    With ``MODEL.OCZ.SEGMENT_CLIP.ENABLED``, each query's class probabilities are ZegFormer's
    ensemble of the decoder's and the frozen CLIP's classification of its segment
    (:class:`SegmentCLIPClassifier`); its seen classes are the dataset's, or for ``"class_names"``
    none unless the sample names them (``"ensemble_seen"``, indices into the names).

    The backbone is the registered one that ``MODEL.BACKBONE.NAME`` names: the frozen CLIP with
    prompts (:class:`CLIPPromptBackbone`, OC-ZSS) or a trainable CNN (Detectron2's
    ``build_resnet_backbone``, ZegFormer). With a CNN the model keeps a frozen, prompt-free CLIP
    beside it (``clip_tower``, ``MODEL.OCZ.CLIP``) for the class names and the segment route.
    """

    @configurable
    def __init__(
        self,
        *,
        backbone: nn.Module,
        pixel_decoder: nn.Module,
        transformer_decoder: nn.Module,
        criterion: SetCriterion | SplitCriterion,
        text_embedder: TextEmbedder,
        pixel_mean: tuple[float, ...],
        pixel_std: tuple[float, ...],
        size_divisibility: int,
        zero_shot_setting: str = "inductive",
        calibration: float = 0.1,
        test_mode: str = "whole",
        window_size: tuple[int, int] = (512, 512),
        window_stride: tuple[int, int] = (426, 426),
        slide_batch: int = 0,
        guide: RegionGuide | None = None,
        pseudo_masker: PseudoMaskGenerator | None = None,
        split_targets: str = "prompted",
        self_training: dict | None = None,
        segment_classifier: SegmentCLIPClassifier | None = None,
        pixel_weight: float = 0.0,
        pixel_num_points: int = 0,
        clip_tower: CLIPPromptBackbone | None = None,
    ):
        """
        Args:
            backbone: a :class:`CLIPPromptBackbone` (or any backbone with the same outputs), or a
                CNN backbone (then with a ``clip_tower``).
            pixel_decoder: maps backbone features to ``(mask_features, multi_scale_features)``.
            transformer_decoder: query decoder (see ``ZeroShotMaskDecoder``).
            criterion: matching-based loss.
            text_embedder: class names -> normalised text embeddings (it chooses the source of
                each vocabulary: a global file, the dataset's file or the CLIP text tower).
            pixel_mean, pixel_std: per-channel normalisation of the input (0..255 scale).
            size_divisibility: pad the batch to a multiple of this.
            zero_shot_setting: "inductive" or "transductive".
            calibration: gamma subtracted from seen-class scores at test (inductive only).
            test_mode: "whole" or "slide".
            window_size, window_stride: sliding-window geometry (h, w) in input pixels.
            slide_batch: windows of an image per forward pass in slide mode; 0 = all at once.
            guide: the object prompts' regions, from a sample's ``"object_map"`` or, without
                one, online (:class:`RegionGuide`: SSL ViT or CLIP features, clustered); None
                when the backbone has no object prompts (ignored then).
            pseudo_masker: pseudo-masks of the ignore pixels for the candidate queries; required
                by (and only with) a :class:`SplitCriterion` with candidate queries.
            split_targets: features of the pseudo-masks and region embeddings: "prompted" (this
                step's prompted CLIP pass) or "plain" (a frozen prompt-free CLIP pass).
            self_training: {"start_iter", "threshold"} of transductive self-training (see
                ``MODEL.OCZ.SELF_TRAINING``); used only in the transductive setting.
            segment_classifier: test-time CLIP classification of the segments, ensembled with
                the decoder's classes (``MODEL.OCZ.SEGMENT_CLIP``); None: off.
            pixel_weight: weight of the auxiliary pixel-text loss on the decoder's
                "pixel_logits" (``MODEL.OCZ.LOSS.PIXEL_WEIGHT``; the decoder must output them).
            pixel_num_points: points per image of that loss, 0 for every annotated pixel
                (``MODEL.OCZ.LOSS.PIXEL_NUM_POINTS``).
            clip_tower: the frozen CLIP kept beside a backbone that is not CLIP (its images are
                renormalised from ``pixel_mean``/``pixel_std`` to CLIP's for the segment
                classifier); None when the backbone is the CLIP.
        """
        super().__init__()
        if zero_shot_setting not in ZERO_SHOT_SETTINGS:
            raise ValueError(
                f"INPUT.ZERO_SHOT_SETTING={zero_shot_setting!r}: use one of {ZERO_SHOT_SETTINGS}"
            )
        if test_mode not in TEST_MODES:
            raise ValueError(f"MODEL.OCZ.TEST.MODE={test_mode!r}: use one of {TEST_MODES}")
        if pixel_num_points < 0:
            raise ValueError(
                f"MODEL.OCZ.LOSS.PIXEL_NUM_POINTS={pixel_num_points}: use 0 (every annotated "
                "pixel) or a number of points per image > 0"
            )
        if clip_tower is not None and hasattr(backbone, "clip_model"):
            raise ValueError("the backbone is a CLIP already: give no clip_tower")
        self.backbone = backbone
        self.clip_tower = clip_tower
        self.pixel_decoder = pixel_decoder
        self.transformer_decoder = transformer_decoder
        self.criterion = criterion
        # The auxiliary pixel-text loss's weight; the decoder outputs "pixel_logits" when > 0.
        self.pixel_weight = pixel_weight
        self.pixel_num_points = pixel_num_points
        self.text_embedder = text_embedder
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)
        # The CLIP beside a CNN sees its own normalisation (ZegFormer: ImageNet's for the ResNet,
        # CLIP's for CLIP).
        clip_stats = (
            getattr(clip_tower, "pixel_mean", None),
            getattr(clip_tower, "pixel_std", None),
        )
        self.clip_pixel_stats = None
        if clip_stats[0] is not None and (
            tuple(clip_stats[0]) != tuple(pixel_mean) or tuple(clip_stats[1]) != tuple(pixel_std)
        ):
            self.clip_pixel_stats = tuple(torch.tensor(v).view(-1, 1, 1) for v in clip_stats)
        self.size_divisibility = size_divisibility
        self.zero_shot_setting = zero_shot_setting
        self.calibration = calibration
        self.test_mode = test_mode
        self.window_size = tuple(window_size)
        self.window_stride = tuple(window_stride)
        if slide_batch < 0:
            raise ValueError(f"MODEL.OCZ.TEST.SLIDE_BATCH must be >= 0, got {slide_batch}")
        self.slide_batch = int(slide_batch)
        self.num_objects = int(getattr(backbone, "num_objects", 0))
        if self.num_objects and guide is None:
            raise ValueError("the backbone has object prompts: a guide is required")
        if self.num_objects and guide.num_regions != self.num_objects:
            raise ValueError(
                f"the guide makes {guide.num_regions} regions but the backbone has "
                f"{self.num_objects} object prompts"
            )
        # No parameters or buffers: the state dict is the same with or without it.
        self.guide = guide if self.num_objects else None
        has_candidates = isinstance(criterion, SplitCriterion)
        if has_candidates != (pseudo_masker is not None):
            raise ValueError("split matching needs both a SplitCriterion and a pseudo_masker")
        if has_candidates and not hasattr(backbone, "region_embeddings"):
            raise TypeError(
                f"split matching needs region embeddings from the backbone; "
                f"{type(backbone).__name__} has no region_embeddings (use CLIPPromptBackbone)"
            )
        self.pseudo_masker = pseudo_masker
        if split_targets not in SPLIT_TARGETS:
            raise ValueError(
                f"MODEL.OCZ.SPLIT.TARGET_FEATURES={split_targets!r}: use one of {SPLIT_TARGETS}"
            )
        self.split_targets = split_targets
        self.self_training = dict(self_training or {"start_iter": 0, "threshold": 0.0})
        if segment_classifier is not None:
            segment_classifier.check_backbone(self.clip_model_owner, text_embedder.dim)
        self.segment_classifier = segment_classifier

    @classmethod
    def from_config(cls, cfg):
        ocz = cfg.MODEL.OCZ
        # Each part from its own random stream: configs that differ in one part start the
        # others from the same weights (paired comparisons, tools/report.py).
        with component_seed(cfg.SEED, "backbone"):
            backbone = build_backbone(cfg)
        clip_tower = _clip_beside(cfg, backbone)
        with component_seed(cfg.SEED, "pixel_decoder"):
            pixel_decoder = build_sem_seg_head(cfg, backbone.output_shape())
        clip_owner = clip_tower if clip_tower is not None else backbone
        clip_model = clip_owner.clip_model if getattr(clip_owner, "has_text_tower", False) else None
        datasets = list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST)
        text_embedder = TextEmbedder(cfg, clip_model=clip_model, dataset_names=datasets)
        if text_embedder.dim is None:
            raise ValueError(
                "no source of class embeddings: the CLIP text tower was dropped and neither "
                "MODEL.OCZ.TEXT.EMBEDDINGS_FILE nor the datasets' class_embeddings is set"
            )
        with component_seed(cfg.SEED, "transformer_decoder"):
            transformer_decoder = build_transformer_decoder(
                cfg,
                **_pixel_decoder_widths(pixel_decoder, cfg.MODEL.SEM_SEG_HEAD.NAME),
                text_dim=text_embedder.dim,
            )
        criterion = build_criterion(cfg, getattr(transformer_decoder, "num_aux_outputs", None))
        pseudo_masker = None
        if isinstance(criterion, SplitCriterion):
            pseudo_masker = PseudoMaskGenerator(cfg)
            _check_region_embedding_width(backbone, text_embedder.dim)
        _check_pixel_stats(cfg, backbone)
        if getattr(backbone, "num_objects", 0):
            check_object_map_records(cfg, datasets + list(cfg.DATASETS.VAL))
        guide = None
        if getattr(backbone, "num_objects", 0):
            with component_seed(cfg.SEED, "guide"):  # draws nothing today; the SSL model: lazily
                guide = RegionGuide(cfg)
        divisibility = max(
            cfg.INPUT.SIZE_DIVISIBILITY,
            max(ocz.PIXEL_DECODER.DECODER_STRIDES),
            getattr(backbone, "patch_size", 1),
            getattr(backbone, "size_divisibility", 0),
        )
        return {
            "backbone": backbone,
            "pixel_decoder": pixel_decoder,
            "transformer_decoder": transformer_decoder,
            "criterion": criterion,
            "pixel_weight": cfg.MODEL.OCZ.LOSS.PIXEL_WEIGHT,
            "pixel_num_points": cfg.MODEL.OCZ.LOSS.PIXEL_NUM_POINTS,
            "text_embedder": text_embedder,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "size_divisibility": divisibility,
            "zero_shot_setting": cfg.INPUT.ZERO_SHOT_SETTING,
            "calibration": ocz.TEST.CALIBRATION,
            "test_mode": ocz.TEST.MODE,
            "window_size": ocz.TEST.WINDOW_SIZE,
            "window_stride": ocz.TEST.WINDOW_STRIDE,
            "slide_batch": ocz.TEST.SLIDE_BATCH,
            "guide": guide,
            "pseudo_masker": pseudo_masker,
            "split_targets": ocz.SPLIT.TARGET_FEATURES,
            "self_training": {
                "start_iter": ocz.SELF_TRAINING.START_ITER,
                "threshold": ocz.SELF_TRAINING.THRESHOLD,
            },
            "segment_classifier": (
                SegmentCLIPClassifier(cfg) if ocz.SEGMENT_CLIP.ENABLED else None
            ),
            "clip_tower": clip_tower,
        }

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    @property
    def clip_model_owner(self) -> nn.Module:
        """The module holding the model's frozen CLIP: the backbone, or the ``clip_tower``
        beside a CNN backbone."""
        return self.clip_tower if self.clip_tower is not None else self.backbone

    def clip_normalized(self, images: torch.Tensor) -> torch.Tensor:
        """[N, 3, h, w] images normalised with ``pixel_mean``/``pixel_std`` -> with CLIP's."""
        if self.clip_pixel_stats is None:
            return images
        mean, std = (v.to(images) for v in self.clip_pixel_stats)
        raw = images * self.pixel_std.to(images) + self.pixel_mean.to(images)
        return (raw - mean) / std

    # ------------------------------------------------------------------ vocabulary
    def vocabulary(
        self, sample: dict, training: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The classes a sample is segmented with.

        Returns:
            class_ids: int64 [K'] indices into the dataset's class list (the vocabulary order),
            text: [K', D] normalised class embeddings,
            seen: int64 indices into ``class_ids`` of the seen classes (for calibration).
        """
        if "class_names" in sample:  # open vocabulary: any names, nothing is "seen"
            names = list(sample["class_names"])
            text = sample.get("class_embeddings")  # precomputed by the caller (e.g. synonyms)
            if text is None:
                text = self.text_embedder.get(names)
            elif tuple(text.shape[:1]) != (len(names),):
                raise ValueError(
                    f"a sample's class_embeddings has shape {tuple(text.shape)} but it names "
                    f"{len(names)} classes: give one embedding row per class name"
                )
            ids = torch.arange(len(names), device=self.device)
            return ids, text.to(self.device), ids.new_zeros(0)
        name = sample.get("dataset_name")
        if name is None:
            raise KeyError(
                "a sample has neither 'dataset_name' nor 'class_names': use the ocz_d2 dataset "
                "mapper, or pass class_names for open-vocabulary inference"
            )
        meta = MetadataCatalog.get(name)
        classes = list(meta.stuff_classes)
        seen = torch.as_tensor(
            meta.get("seen_classes", list(range(len(classes)))), dtype=torch.long
        )
        text = self.text_embedder.get(classes, dataset_name=name)
        if training and not self.self_training_active():
            return (
                seen.to(self.device),
                text[seen.to(text.device)],
                torch.arange(len(seen), device=self.device),
            )
        return torch.arange(len(classes), device=self.device), text, seen.to(self.device)

    # ------------------------------------------------------------------ forward
    def forward(self, batched_inputs: list[dict]):
        """
        Args:
            batched_inputs: list of mapper outputs (see ZeroShotSemSegDatasetMapper): "image"
                uint8 [3, H, W]; in training "instances" (gt_classes in the dataset's class
                indices, gt_masks) and "sem_seg" ([H, W]; the dataset's ignore label outside every
                target); "height"/"width" for the output size at inference; "dataset_name" or
                "class_names" (optionally with "class_embeddings" [K, D]).
        Returns:
            training: dict of weighted losses; inference: list of {"sem_seg": [K, height, width]}.

        At inference, the samples of one image size and one vocabulary go through the model
        together (one forward for the group; in slide mode, the windows of all its images);
        an image's output does not depend on the others of its batch.
        """
        if self.training:
            return self._forward_train(batched_inputs)
        outputs: list[dict | None] = [None] * len(batched_inputs)
        for indices in inference_groups(batched_inputs).values():
            group = self._inference_group([batched_inputs[i] for i in indices])
            for i, out in zip(indices, group):
                outputs[i] = out
        return outputs

    def _normalize(self, batched_inputs: list[dict]) -> ImageList:
        images = [
            (x["image"].to(self.device) - self.pixel_mean) / self.pixel_std for x in batched_inputs
        ]
        return ImageList.from_tensors(images, self.size_divisibility)

    def _predict(
        self,
        images: torch.Tensor,
        text: torch.Tensor,
        image_mask: torch.Tensor,
        regions: torch.Tensor | None = None,
    ) -> tuple[dict, dict]:
        """Decoder outputs and the backbone features (split matching reads "dense" and
        "last_input" from them).

        Args:
            images: [B, 3, H, W] normalised, padded batch.
            text: [K, D] class embeddings.
            image_mask: bool [B, H, W], True on image pixels (False on padding).
            regions: [B, gh, gw] object regions (object prompts only).
        """
        features = self.backbone(images, regions) if self.num_objects else self.backbone(images)
        if hasattr(self.backbone, "patch_size"):
            # The pixel decoder's refiner (ORA) attends only to image patches.
            features[PATCH_VALID_KEY] = image_patches(image_mask, self.backbone.patch_size)
        features[IMAGE_KEY] = images  # the pixel decoder's optional image path reads it
        mask_features, multi_scale = self.pixel_decoder(features)
        return self.transformer_decoder(multi_scale, mask_features, text), features

    def self_training_active(self) -> bool:
        """Whether training is in its self-training phase: transductive setting, and the
        iteration (Detectron2's event storage) has reached ``MODEL.OCZ.SELF_TRAINING.START_ITER``.
        """
        if self.zero_shot_setting != "transductive":
            return False
        start = self.self_training["start_iter"]
        if start <= 0:
            return True
        try:
            storage = get_event_storage()
        except AssertionError as e:
            raise RuntimeError(
                "self-training starts at MODEL.OCZ.SELF_TRAINING.START_ITER and reads the "
                "iteration from Detectron2's EventStorage: train inside "
                "`with EventStorage(start_iter):` (DefaultTrainer does)"
            ) from e
        return storage.iter >= start

    # ------------------------------------------------------------------ object regions
    def _regions(
        self,
        images: torch.Tensor,
        raw: list[torch.Tensor],
        object_maps: list[torch.Tensor | None],
        none_value: int,
        image_mask: torch.Tensor,
    ) -> torch.Tensor | None:
        """Regions [B, gh, gw] of a padded batch for the object prompts (None without them);
        see :meth:`RegionGuide.forward`."""
        if not self.num_objects:
            return None
        return self.guide(self.backbone, images, raw, object_maps, none_value, image_mask)

    @torch.no_grad()
    def online_regions(self, images: list[torch.Tensor]) -> torch.Tensor:
        """The guide's regions of raw RGB images (uint8 or float [3, H, W], 0..255), as this
        model computes them without object maps (what tools/precompute_object_maps.py stores).

        Returns:
            int64 [B, gh, gw] on the CLIP patch grid of the padded batch; -1 on padding.
        """
        if not self.num_objects:
            raise ValueError("this model has no object prompts (MODEL.OCZ.OBJECTS.NUM = 0)")
        batch = self._normalize([{"image": x} for x in images])
        mask = batch_image_mask(
            [{"image": x} for x in images], batch.tensor.shape[-2:], self.device
        )
        return self._regions(batch.tensor, images, [None] * len(images), 0, mask)

    def _forward_train(self, batched_inputs: list[dict]) -> dict:
        names = {x.get("dataset_name") for x in batched_inputs}
        if len(names) != 1:
            raise ValueError(
                f"a training batch mixes datasets {sorted(map(str, names))} with different "
                "vocabularies; use one dataset per batch (DATALOADER.ASPECT_RATIO_GROUPING off and "
                "one entry in DATASETS.TRAIN, or datasets that share a class list)"
            )
        class_ids, text, seen_vocab = self.vocabulary(batched_inputs[0], training=True)
        images = self._normalize(batched_inputs)
        image_mask = batch_image_mask(batched_inputs, images.tensor.shape[-2:], self.device)
        ignore = ignore_label_of(batched_inputs[0].get("dataset_name"))
        regions = self._regions(
            images.tensor,
            [x["image"] for x in batched_inputs],
            [x.get(OBJECT_MAP_KEY) for x in batched_inputs],
            ignore,
            image_mask,
        )
        outputs, features = self._predict(images.tensor, text, image_mask, regions)
        targets = prepare_targets(batched_inputs, image_mask, class_ids, ignore, self.device)
        if self.self_training_active():
            if any(x.get(UNSEEN_MASK_KEY) is None for x in batched_inputs):
                raise ValueError(
                    "transductive self-training labels the pixels of unseen classes, but the "
                    "samples have no 'unseen_mask': use the ocz_d2 mapper with "
                    "INPUT.ZERO_SHOT_SETTING 'transductive' (it writes one)"
                )
            threshold = self.self_training["threshold"]
            add_pseudo_labels(targets, outputs, seen_vocab, threshold)
        if self.pseudo_masker is not None:
            add_candidates(
                targets,
                features,
                images.tensor,
                self.backbone,
                self.pseudo_masker,
                self.split_targets,
            )
        losses = self.criterion(outputs, targets)
        weights = self.criterion.weight_dict
        losses = {k: v * weights[k] for k, v in losses.items() if k in weights}
        if "pixel_logits" in outputs:
            losses["loss_pixel"] = self.pixel_weight * pixel_text_loss(
                outputs["pixel_logits"], targets, self.pixel_num_points
            )
        return losses

    # ------------------------------------------------------------------ inference
    def _inference_group(self, samples: list[dict]) -> list[dict]:
        """Inference on samples of one image size and one vocabulary (:func:`inference_groups`):
        one forward for all of them."""
        first = samples[0]
        class_ids, text, seen = self.vocabulary(first, training=False)
        images = torch.stack([x["image"].to(self.device) for x in samples])
        images = (images - self.pixel_mean) / self.pixel_std
        object_maps = [x.get(OBJECT_MAP_KEY) for x in samples]
        if all(m is None for m in object_maps):
            none_value = 0
        else:
            none_value = ignore_label_of(first.get("dataset_name"))
        # The segment classifier's seen classes; a caller may name them for class_names.
        ensemble_seen = first.get(ENSEMBLE_SEEN_KEY, seen)
        ensemble_seen = torch.as_tensor(ensemble_seen, dtype=torch.long, device=self.device)
        if self.test_mode == "slide":
            scores = self._slide_scores(images, text, object_maps, none_value, ensemble_seen)
        else:
            scores = self._scores(images, text, object_maps, none_value, ensemble_seen)
        outputs = []
        for sample, image_scores in zip(samples, scores):
            if self.zero_shot_setting == "inductive":
                image_scores = calibrate(image_scores, seen, self.calibration)
            height = sample.get("height", images.shape[-2])
            width = sample.get("width", images.shape[-1])
            image_scores = retry_if_cuda_oom(sem_seg_postprocess)(
                image_scores, images.shape[-2:], height, width
            )
            outputs.append({"sem_seg": image_scores})
        return outputs

    def _scores(
        self,
        image: torch.Tensor,
        text: torch.Tensor,
        object_map: torch.Tensor | list[torch.Tensor | None] | None = None,
        none_value: int = 255,
        seen: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """[N, 3, h, w] normalised images of one size -> [N, K, h, w] class scores (padding
        handled here).

        ``object_map`` is the object map [h, w] of a single image, a list of N maps (or None
        entries), or None; ``none_value`` its "no region" value (see :meth:`_regions`).
        ``seen``: int64 indices of the seen classes, for the segment classifier (None: none).
        """
        h, w = image.shape[-2:]
        if object_map is None or isinstance(object_map, torch.Tensor):
            object_map = [object_map] * len(image)
        padded = ImageList.from_tensors(list(image), self.size_divisibility).tensor
        raw = [x * self.pixel_std + self.pixel_mean for x in image]
        image_mask = batch_image_mask([{"image": x} for x in image], padded.shape[-2:], self.device)
        regions = self._regions(padded, raw, list(object_map), none_value, image_mask)
        outputs, _ = self._predict(padded, text, image_mask, regions)
        masks = F.interpolate(
            outputs["pred_masks"], size=padded.shape[-2:], mode="bilinear", align_corners=False
        )[..., :h, :w]
        probs = [None] * len(image)
        if self.segment_classifier is not None:
            seen = seen if seen is not None else torch.zeros(0, dtype=torch.long)
            probs = self.segment_classifier(
                self.clip_model_owner,
                self.clip_normalized(image),
                outputs["pred_logits"],
                masks,
                text,
                seen,
            )
        return torch.stack(
            [
                retry_if_cuda_oom(semantic_inference)(lg, mk, p)
                for lg, mk, p in zip(outputs["pred_logits"], masks, probs)
            ]
        )

    def _slide_scores(
        self,
        images: torch.Tensor,
        text: torch.Tensor,
        object_maps: list[torch.Tensor | None] | None = None,
        none_value: int = 255,
        seen: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Average of window scores over a sliding window; [N, 3, H, W] -> [N, K, H, W].

        Every window has the same size (clipped to the image), so the windows of all N images
        go through the model stacked as one batch (at most ``slide_batch`` per forward when that
        is > 0). ``object_maps``: per image its object map [H, W] or None (or None for all).
        """
        n, _, height, width = images.shape
        if object_maps is None:
            object_maps = [None] * n
        scores = images.new_zeros((n, text.shape[0], height, width))
        counts = images.new_zeros((1, 1, height, width))
        wh, ww = min(self.window_size[0], height), min(self.window_size[1], width)
        corners = sliding_windows(height, width, self.window_size, self.window_stride)
        for y, x in corners:
            counts[..., y : y + wh, x : x + ww] += 1
        windows = [(i, y, x) for i in range(n) for y, x in corners]
        step = self.slide_batch or len(windows)
        for start in range(0, len(windows), step):
            chunk = windows[start : start + step]
            crops = torch.stack([images[i, :, y : y + wh, x : x + ww] for i, y, x in chunk])
            maps = None
            if any(m is not None for m in object_maps):
                maps = [object_maps[i][y : y + wh, x : x + ww] for i, y, x in chunk]
            window_scores = self._scores(crops, text, maps, none_value, seen)
            for (i, y, x), window in zip(chunk, window_scores):
                scores[i, :, y : y + wh, x : x + ww] += window
        return scores / counts


def _clip_beside(cfg, backbone: nn.Module) -> CLIPPromptBackbone | None:
    """The frozen CLIP kept beside a backbone that is not CLIP (None for a CLIP backbone), after
    loading the backbone's initial weights (``MODEL.OCZ.RESNET.WEIGHTS``)."""
    ocz = cfg.MODEL.OCZ
    if isinstance(backbone, CLIPPromptBackbone):
        if ocz.RESNET.WEIGHTS:
            raise ValueError(
                f"MODEL.OCZ.RESNET.WEIGHTS={ocz.RESNET.WEIGHTS!r} initialises a CNN backbone, but "
                "the backbone is CLIPPromptBackbone: set it to '' (CLIP's weights are "
                "MODEL.OCZ.CLIP.WEIGHTS / PRETRAINED)"
            )
        return None
    if ocz.OBJECTS.NUM > 0:
        raise ValueError(
            f"MODEL.OCZ.OBJECTS.NUM={ocz.OBJECTS.NUM}: objects (object prompts, ORA) need the CLIP "
            f"backbone, not {cfg.MODEL.BACKBONE.NAME}: set it to 0 or MODEL.BACKBONE.NAME "
            "CLIPPromptBackbone"
        )
    if ocz.RESNET.WEIGHTS:
        load_backbone_weights(backbone, ocz.RESNET.WEIGHTS)
    with component_seed(cfg.SEED, "clip_tower"):
        return build_clip_tower(cfg)


def _check_region_embedding_width(backbone: nn.Module, text_dim: int) -> None:
    """Split matching compares query class embeddings (text width) with CLIP region embeddings
    (the image tower's output width): they must agree."""
    proj = getattr(getattr(getattr(backbone, "clip_model", None), "visual", None), "proj", None)
    width = None if proj is None else int(proj.shape[-1])
    if width != text_dim:
        raise ValueError(
            f"split matching (MODEL.OCZ.SPLIT.NUM_CANDIDATES > 0) compares the queries' class "
            f"embeddings (width {text_dim}, the class embeddings') with CLIP region embeddings "
            f"(width {width}); they must match: use the CLIP text tower or an embedding file "
            "made with the same CLIP, or set NUM_CANDIDATES 0"
        )


def _pixel_decoder_widths(pixel_decoder: nn.Module, name: str) -> dict[str, int]:
    """The channels of a built pixel decoder's outputs, as the transformer decoder's inputs.

    Returns:
        ``{"in_channels": ..., "mask_dim": ...}`` from the decoder's ``decoder_in_channels`` (or,
        without it, ``conv_dim``: the multi-scale features) and ``mask_dim`` (mask features)
        attributes.
    """
    widths = {
        "in_channels": getattr(
            pixel_decoder, "decoder_in_channels", getattr(pixel_decoder, "conv_dim", None)
        ),
        "mask_dim": getattr(pixel_decoder, "mask_dim", None),
    }
    if not all(isinstance(v, int) for v in widths.values()):
        raise TypeError(
            f"pixel decoder {name} ({type(pixel_decoder).__name__}) must have int attributes "
            "conv_dim (channels of its multi-scale features) and mask_dim (channels of its "
            "mask features): set them in its __init__ (see SimplePyramidPixelDecoder)"
        )
    return widths


def _check_pixel_stats(cfg, backbone) -> None:
    expected = getattr(backbone, "pixel_mean", None)
    if expected is None:
        return
    for key, want in (("PIXEL_MEAN", backbone.pixel_mean), ("PIXEL_STD", backbone.pixel_std)):
        got = list(getattr(cfg.MODEL, key))
        if len(got) != 3 or any(abs(a - b) > 1e-2 for a, b in zip(got, want)):
            logger.warning(
                "MODEL.%s=%s differs from CLIP's %s: CLIP features degrade with other "
                "normalisation (the ocz_d2 base configs set CLIP's values)",
                key,
                got,
                [round(v, 3) for v in want],
            )
