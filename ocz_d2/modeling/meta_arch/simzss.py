"""SimZSS (ICLR 2025): a frozen vision tower, a text tower trained on captions, dense inference
by patch-text similarity. Written from the paper; the released code was read, not copied.

Training (image-caption batches from :class:`~ocz_d2.data.captions.CaptionDatasetMapper`):
the global InfoNCE between CLS and end-of-text, plus lambda times the concept loss
(:mod:`ocz_d2.modeling.simzss.losses`). Inference (segmentation samples, or any vocabulary
through ``"class_names"``): cosine between every patch and every class embedding, upsampled
bilinearly to the image, an optional background rule and PAMR, whole image or sliding window.
"""

from __future__ import annotations

import logging
import math

import open_clip
import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.data import MetadataCatalog
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.modeling.postprocessing import sem_seg_postprocess
from torch import nn

from ...data.concepts import ConceptMatch, concept_token_spans
from ..backbone.clip_prompt import register_tiny_clip_configs
from ..backbone.vision_tower import FrozenVisionTower, build_vision_tower
from ..simzss import PAMR, concept_loss, global_infonce, pool_visual_concepts, text_concepts
from ..simzss.losses import CONCEPT_TARGETS
from ..text import TextEmbedder
from ..text.text_tower import TextTower
from .zero_shot_segmentor import sliding_windows

__all__ = ["BACKGROUND_RULES", "SimZSS"]

logger = logging.getLogger(__name__)

#: Values of ``MODEL.SIMZSS.TEST.BACKGROUND``.
BACKGROUND_RULES = ("none", "threshold", "prompt")


@META_ARCH_REGISTRY.register()
class SimZSS(nn.Module):
    """SimZSS as a Detectron2 meta-architecture (module docstring).

    Training inputs: dicts with ``"image"`` (uint8 [3, S, S], one size per batch),
    ``"caption"`` and ``"concepts"`` (int64 [C, 3]: concept id and the character span in the
    caption). Inference inputs: the segmentation mapper's dicts (``"image"``, ``"height"``,
    ``"width"``, ``"dataset_name"``) or ``"class_names"`` (with optional ``"class_embeddings"``
    [K, D]) for an open vocabulary. The model has no seen-class calibration (``calibration`` is
    0 and only there for the tuned protocol).
    """

    @configurable
    def __init__(
        self,
        *,
        vision: FrozenVisionTower,
        text: TextTower,
        text_embedder: TextEmbedder,
        global_logit_scale: float = 1.0 / 0.07,
        concept_weight: float = 0.05,
        concept_scale: float = 1.0 / 0.07,
        pool_temperature: float = 0.1,
        concept_target: str = "own",
        test_mode: str = "whole",
        window_size: tuple[int, int] = (448, 448),
        window_stride: tuple[int, int] = (224, 224),
        slide_batch: int = 0,
        background: str = "none",
        background_class: str = "background",
        background_threshold: float = 0.2,
        background_prompts: tuple[str, ...] = ("background",),
        pamr: PAMR | None = None,
    ):
        """
        Args:
            vision: the frozen tower (its ``dim`` is the joint width D).
            text: the trained text tower, projecting to D.
            text_embedder: class names -> embeddings through ``text`` (templates, cache).
            global_logit_scale: initial scale of the global InfoNCE (learned, at most 100).
            concept_weight: lambda of the concept loss (0: off).
            concept_scale: fixed scale of the concept logits.
            pool_temperature: tau of the visual-concept pooling.
            concept_target: "own" or "argmax".
            test_mode: "whole" or "slide".
            window_size, window_stride: sliding-window geometry (h, w) in input pixels.
            slide_batch: windows per forward pass (0: all).
            background: "none", "threshold" or "prompt" (``MODEL.SIMZSS.TEST.BACKGROUND``).
            background_class: the class name the rule applies to.
            background_threshold: the "threshold" rule's score.
            background_prompts: the "prompt" rule's phrases.
            pamr: refine the upsampled scores, or None.
        """
        super().__init__()
        if concept_target not in CONCEPT_TARGETS:
            raise ValueError(
                f"MODEL.SIMZSS.LOSS.CONCEPT_TARGET={concept_target!r}: use one of {CONCEPT_TARGETS}"
            )
        if background not in BACKGROUND_RULES:
            raise ValueError(
                f"MODEL.SIMZSS.TEST.BACKGROUND={background!r}: use one of {BACKGROUND_RULES}"
            )
        if test_mode not in ("whole", "slide"):
            raise ValueError(f"MODEL.OCZ.TEST.MODE={test_mode!r}: use 'whole' or 'slide'")
        if pool_temperature <= 0:
            raise ValueError(f"MODEL.SIMZSS.LOSS.POOL_TEMPERATURE must be > 0: {pool_temperature}")
        self.vision = vision
        self.text = text
        self.text_embedder = text_embedder
        self.logit_scale = nn.Parameter(torch.tensor(math.log(global_logit_scale)))
        self.concept_weight = float(concept_weight)
        self.concept_scale = float(concept_scale)
        self.pool_temperature = float(pool_temperature)
        self.concept_target = concept_target
        self.test_mode = test_mode
        self.window_size = tuple(window_size)
        self.window_stride = tuple(window_stride)
        self.slide_batch = int(slide_batch)
        self.background = background
        self.background_class = background_class
        self.background_threshold = float(background_threshold)
        self.background_prompts = tuple(background_prompts)
        self.pamr = pamr
        self.calibration = 0.0
        self._tokenizer = open_clip.get_tokenizer(text.model_name)
        if not hasattr(self._tokenizer, "encode"):
            raise ValueError(
                f"the tokenizer of MODEL.SIMZSS.TEXT.MODEL_NAME={text.model_name!r} has no BPE "
                "encode(): the concepts' token spans need open_clip's SimpleTokenizer"
            )

    @classmethod
    def from_config(cls, cfg):
        register_tiny_clip_configs()
        simzss = cfg.MODEL.SIMZSS
        vision = build_vision_tower(cfg)
        text = TextTower(
            simzss.TEXT.MODEL_NAME,
            vision.dim,
            pretrained=simzss.TEXT.PRETRAINED,
            weights=simzss.TEXT.WEIGHTS,
            projection=simzss.TEXT.PROJECTION,
        )
        embedder = TextEmbedder(
            clip_model=text,
            model_name=simzss.TEXT.MODEL_NAME,
            templates=cfg.MODEL.OCZ.TEXT.TEMPLATES,
            chunk_size=cfg.MODEL.OCZ.TEXT.CHUNK_SIZE,
            dim=vision.dim,
        )
        test = cfg.MODEL.OCZ.TEST
        stest = simzss.TEST
        return {
            "vision": vision,
            "text": text,
            "text_embedder": embedder,
            "global_logit_scale": simzss.LOSS.GLOBAL_LOGIT_SCALE,
            "concept_weight": simzss.LOSS.CONCEPT_WEIGHT,
            "concept_scale": simzss.LOSS.CONCEPT_SCALE,
            "pool_temperature": simzss.LOSS.POOL_TEMPERATURE,
            "concept_target": simzss.LOSS.CONCEPT_TARGET,
            "test_mode": test.MODE,
            "window_size": tuple(test.WINDOW_SIZE),
            "window_stride": tuple(test.WINDOW_STRIDE),
            "slide_batch": test.SLIDE_BATCH,
            "background": stest.BACKGROUND,
            "background_class": stest.BACKGROUND_CLASS,
            "background_threshold": stest.BACKGROUND_THRESHOLD,
            "background_prompts": tuple(stest.BACKGROUND_PROMPTS),
            "pamr": PAMR(stest.PAMR_ITERS, stest.PAMR_DILATIONS) if stest.PAMR else None,
        }

    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    def train(self, mode: bool = True):
        """Set the mode; class embeddings cached during evaluation go stale once the text tower
        trains again, so the cache is cleared."""
        super().train(mode)
        if mode:
            self.text_embedder.clear_cache()
        return self

    # ------------------------------------------------------------------ training
    def forward(self, batched_inputs: list[dict]):
        """Training: ``{"loss_global", "loss_concept"}`` (weighted); inference: a list of
        ``{"sem_seg": [K, height, width]}`` (class scores: cosines, rules applied)."""
        if self.training:
            return self._forward_train(batched_inputs)
        return [self._inference_one(x) for x in batched_inputs]

    def tokenize(self, captions: list[str], concepts: list[torch.Tensor]):
        """Captions -> tokens [B, L] and concept spans [N, 4] (caption, id, first, end token)."""
        text = self._tokenizer(captions).to(self.device)
        rows = []
        for b, (caption, found) in enumerate(zip(captions, concepts)):
            matches = [ConceptMatch(*map(int, row)) for row in found.tolist()]
            spans = concept_token_spans(
                caption, matches, self._tokenizer.encode, self.text.context_length
            )
            rows.extend((b, *span) for span in spans)
        spans = torch.tensor(rows, dtype=torch.long, device=self.device).reshape(-1, 4)
        return text, spans

    def losses(
        self, cls: torch.Tensor, patches: torch.Tensor, tokens: torch.Tensor, text, spans
    ) -> dict[str, torch.Tensor]:
        """The weighted losses from vision outputs and text-tower outputs.

        Args:
            cls: [B, D] CLS embeddings; patches: [B, D, h, w] (neither normalised).
            tokens: [B, L, D] text-tower outputs; text: [B, L] tokens; spans: [N, 4].
        """
        image = F.normalize(cls, dim=-1)
        caption = F.normalize(TextTower.end_of_text(tokens, text), dim=-1)
        scale = self.logit_scale.exp().clamp(max=100.0)
        out = {"loss_global": global_infonce(image, caption, scale)}
        if self.concept_weight > 0:
            concepts = text_concepts(tokens, spans)
            flat = F.normalize(patches.flatten(2).transpose(1, 2), dim=-1)
            visual = pool_visual_concepts(concepts, flat, spans[:, 0], self.pool_temperature)
            out["loss_concept"] = self.concept_weight * concept_loss(
                visual, concepts, spans[:, 1], self.concept_scale, self.concept_target
            )
        return out

    def _forward_train(self, batched_inputs: list[dict]) -> dict:
        missing = [k for k in ("caption", "concepts") if k not in batched_inputs[0]]
        if missing:
            raise ValueError(
                f"SimZSS trains on image-caption samples, but the batch has no {missing}: "
                "DATASETS.TRAIN must name caption datasets (a split file with kind: captions)"
            )
        images = torch.stack([x["image"] for x in batched_inputs]).to(self.device)
        cls, patches = self.vision(self._pad(images))
        text, spans = self.tokenize(
            [x["caption"] for x in batched_inputs], [x["concepts"] for x in batched_inputs]
        )
        return self.losses(cls, patches, self.text(text), text, spans)

    def _pad(self, images: torch.Tensor) -> torch.Tensor:
        p = self.vision.patch_size
        h, w = images.shape[-2:]
        return F.pad(images.float(), (0, -w % p, 0, -h % p))

    # ------------------------------------------------------------------ inference
    def vocabulary(self, sample: dict) -> tuple[list[str], torch.Tensor]:
        """(class names, [K, D] normalised embeddings) of a sample, background rule applied."""
        if "class_names" in sample:
            names = list(sample["class_names"])
            text = sample.get("class_embeddings")
            if text is None:
                text = self.text_embedder.get(names, cache=False)
            text = text.to(self.device)
        else:
            name = sample.get("dataset_name")
            if name is None:
                raise KeyError(
                    "a sample has neither 'dataset_name' nor 'class_names': use the ocz_d2 "
                    "dataset mapper, or pass class_names for open-vocabulary inference"
                )
            names = list(MetadataCatalog.get(name).stuff_classes)
            text = self.text_embedder.get(names, dataset_name=name)
        if self.background == "prompt" and self.background_class in names:
            k = names.index(self.background_class)
            prompts = self.text_embedder.get(list(self.background_prompts))
            text = text.clone()
            text[k] = F.normalize(prompts.mean(0), dim=-1)
        return names, text

    def dense_scores(self, images: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """[N, 3, h, w] raw images -> [N, K, h, w] patch-text cosines, upsampled bilinearly."""
        h, w = images.shape[-2:]
        padded = self._pad(images)
        _, patches = self.vision(padded)
        patches = F.normalize(patches, dim=1)
        scores = torch.einsum("bdhw,kd->bkhw", patches, text.to(patches.dtype))
        scores = F.interpolate(scores, size=padded.shape[-2:], mode="bilinear", align_corners=False)
        return scores[..., :h, :w]

    @torch.no_grad()
    def _inference_one(self, sample: dict) -> dict:
        names, text = self.vocabulary(sample)
        image = sample["image"].to(self.device).float()
        if self.test_mode == "slide":
            scores = self._slide_scores(image, text)
        else:
            scores = self.dense_scores(image[None], text)[0]
        if self.pamr is not None:
            scores = self.pamr(image[None], scores[None])[0]
        if self.background == "threshold" and self.background_class in names:
            scores[names.index(self.background_class)] = self.background_threshold
        height = sample.get("height", image.shape[-2])
        width = sample.get("width", image.shape[-1])
        return {"sem_seg": sem_seg_postprocess(scores, image.shape[-2:], height, width)}

    def _slide_scores(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Average of window scores; [3, H, W] -> [K, H, W]."""
        height, width = image.shape[-2:]
        scores = image.new_zeros((text.shape[0], height, width))
        counts = image.new_zeros((1, height, width))
        wh, ww = min(self.window_size[0], height), min(self.window_size[1], width)
        corners = sliding_windows(height, width, self.window_size, self.window_stride)
        step = self.slide_batch or len(corners)
        for start in range(0, len(corners), step):
            chunk = corners[start : start + step]
            crops = torch.stack([image[:, y : y + wh, x : x + ww] for y, x in chunk])
            for (y, x), window in zip(chunk, self.dense_scores(crops, text)):
                scores[:, y : y + wh, x : x + ww] += window
                counts[:, y : y + wh, x : x + ww] += 1
        return scores / counts
