"""Test-time CLIP classification of the decoder's segments, ensembled with the decoder's classes.

ZegFormer (Ding et al., CVPR 2022, "Decoupling Zero-Shot Semantic Segmentation") classifies each
class-agnostic segment twice: by its query embedding against the class embeddings (what our
decoder does) and by CLIP looking at the segment; a geometric ensemble combines the two. This
module is the second classifier and the ensemble, for any model whose backbone is a
:class:`~ocz_d2.modeling.backbone.CLIPPromptBackbone`. Two routes give a segment's CLIP
embedding:

- ``"crop"`` (ZegFormer's): binarise the mask at input resolution, take its tight box, set the
  pixels outside the mask to CLIP's mean colour (0 after normalisation), cut the box out with
  ``roi_align`` at CLIP's input size and encode it with the frozen image tower: one CLIP forward
  per segment. Styles: ``"cropmask"`` (that), ``"crop"`` (the box unmasked), ``"mask"`` (the
  masked whole image, no crop).
- ``"region"`` (cheap): one prompt-free pass of the frozen CLIP over the image, then the last
  block run again for the CLS token alone, attending only to the segment's patches
  (:meth:`CLIPPromptBackbone.region_embeddings`): one pass plus one block for all segments.

Nothing here trains and nothing enters a checkpoint: the module has no parameters and borrows
the model's backbone at each call.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from torch import nn
from torchvision.ops import roi_align

__all__ = [
    "ENSEMBLE_SEEN_KEY",
    "PATCH_COVERAGE",
    "ROUTES",
    "STYLES",
    "SegmentCLIPClassifier",
    "binarize_masks",
    "crop_segments",
    "ensemble_probabilities",
    "mask_boxes",
    "segment_patches",
]

ROUTES = ("region", "crop")
STYLES = ("cropmask", "crop", "mask")
#: Region route: a segment's patches are those whose image pixels its binarised mask covers at
#: least this much (a segment that covers no patch that much takes every patch it touches; an
#: empty segment takes the whole image).
PATCH_COVERAGE = 0.5
#: Optional sample key: int64 indices into the sample's vocabulary of the classes the ensemble
#: treats as seen, for open-vocabulary samples ("class_names") whose caller knows them (a
#: predictor calibrated on a dataset). Calibration does not read it.
ENSEMBLE_SEEN_KEY = "ensemble_seen"
# Crop route: queries masked and cut out together (bounds the [chunk, 3, H, W] masked copies).
_CROP_CHUNK = 16


def binarize_masks(mask_logits: torch.Tensor) -> torch.Tensor:
    """Binarised masks: ``sigmoid(logit) > 0.5``, i.e. ``logit > 0`` (exact in any precision).

    Args:
        mask_logits: [..., H, W] mask logits.

    Returns:
        bool [..., H, W].
    """
    return mask_logits > 0


def _empty(masks: torch.Tensor) -> torch.Tensor:
    """bool [...]: masks [..., H, W] without a single pixel."""
    return ~masks.flatten(-2).any(-1)


def mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Tight boxes of binary masks, in pixel-edge coordinates.

    Pixel (y, x) spans [x, x + 1) x [y, y + 1), so a box (x0, y0, x1, y1) covers columns
    x0 .. x1 - 1 and rows y0 .. y1 - 1 (``roi_align(..., aligned=True)`` reads it so). An empty
    mask gets the whole image, (0, 0, W, H).

    Args:
        masks: bool [Q, H, W].

    Returns:
        float32 [Q, 4] boxes (x0, y0, x1, y1).
    """
    h, w = masks.shape[-2:]
    rows, cols = masks.any(2), masks.any(1)  # [Q, H], [Q, W]
    ys = torch.arange(h, device=masks.device)
    xs = torch.arange(w, device=masks.device)
    x0, x1 = torch.where(cols, xs, w).amin(1), torch.where(cols, xs + 1, 0).amax(1)
    y0, y1 = torch.where(rows, ys, h).amin(1), torch.where(rows, ys + 1, 0).amax(1)
    boxes = torch.stack([x0, y0, x1, y1], dim=1).float()
    whole = torch.tensor([0.0, 0.0, float(w), float(h)], device=masks.device)
    return torch.where(_empty(masks)[:, None], whole, boxes)


def crop_segments(
    image: torch.Tensor, masks: torch.Tensor, size: tuple[int, int], style: str = "cropmask"
) -> torch.Tensor:
    """CLIP inputs of segments: each segment's box cut out of the image (ZegFormer's route).

    An empty mask stands for the whole image (box and mask). ``roi_align`` (bilinear, adaptive
    sampling, ``aligned=True``) resamples every box to ``size``; where all its samples fall
    outside the mask, a masked crop is exactly 0.

    Args:
        image: [3, H, W] image normalised with CLIP's mean and std (0 = CLIP's mean colour).
        masks: bool [Q, H, W] binarised segments.
        size: (h, w) of CLIP's input (``visual.image_size``).
        style: "cropmask" (the mask's box; pixels outside the mask set to 0), "crop" (the box,
            unmasked) or "mask" (the whole image, pixels outside the mask set to 0).

    Returns:
        float32 [Q, 3, h, w] crops (float32 also keeps box coordinates exact).
    """
    if style not in STYLES:
        raise ValueError(f"MODEL.OCZ.SEGMENT_CLIP.STYLE={style!r}: use one of {STYLES}")
    if image.dim() != 3 or masks.dim() != 3 or masks.shape[-2:] != image.shape[-2:]:
        raise ValueError(
            f"crop_segments takes an image [3, H, W] and masks [Q, H, W] of its size; got "
            f"{tuple(image.shape)} and {tuple(masks.shape)}"
        )
    masks = masks | _empty(masks)[:, None, None]  # an empty segment is the whole image
    image = image.float()
    h, w = image.shape[-2:]
    if style == "mask":
        boxes = torch.tensor([0.0, 0.0, float(w), float(h)], device=image.device)
        boxes = boxes.expand(len(masks), 4)
    else:
        boxes = mask_boxes(masks)
    size = (int(size[0]), int(size[1]))
    if style == "crop":
        return roi_align(image[None], [boxes], size, spatial_scale=1.0, aligned=True)
    crops = []
    for start in range(0, len(masks), _CROP_CHUNK):
        chunk = masks[start : start + _CROP_CHUNK]
        masked = image[None] * chunk[:, None]  # outside: 0 = CLIP's mean colour
        index = torch.arange(len(chunk), device=image.device, dtype=torch.float32)
        rois = torch.cat([index[:, None], boxes[start : start + _CROP_CHUNK]], dim=1)
        crops.append(roi_align(masked, rois, size, spatial_scale=1.0, aligned=True))
    if not crops:
        return image.new_zeros((0, 3, *size))
    return torch.cat(crops)


def segment_patches(
    masks: torch.Tensor, patch_size: int, min_coverage: float = PATCH_COVERAGE
) -> torch.Tensor:
    """The CLIP patches of binarised segments (region route).

    Images are padded at the bottom and right to a multiple of the patch size (as the
    backbone's input is); coverage counts a patch's image pixels only. A patch belongs to a
    segment when the segment covers at least ``min_coverage`` of its image pixels; a non-empty
    segment that reaches that nowhere (a thin or small one) takes every patch it touches; an
    empty segment takes every patch holding image pixels (the whole image).

    Args:
        masks: bool [N, Q, h, w] segments at input resolution.
        patch_size: p.
        min_coverage: the fraction of a patch's image pixels, in (0, 1].

    Returns:
        bool [N, Q, ceil(h / p), ceil(w / p)].
    """
    n, q, h, w = masks.shape
    p = int(patch_size)
    gh, gw = math.ceil(h / p), math.ceil(w / p)
    pad = (0, gw * p - w, 0, gh * p - h)
    # Pixel counts per patch (sums of 0/1: exact in float32).
    flat = F.pad(masks.reshape(n * q, 1, h, w).float(), pad)
    covered = F.avg_pool2d(flat, p, divisor_override=1).reshape(n, q, gh, gw)
    image = F.pad(masks.new_ones((1, 1, h, w), dtype=torch.float32), pad)
    inside = F.avg_pool2d(image, p, divisor_override=1)[0, 0]
    touched = covered > 0
    chosen = touched & (covered >= min_coverage * inside)
    chosen = torch.where(chosen.flatten(-2).any(-1)[..., None, None], chosen, touched)
    return torch.where(touched.flatten(-2).any(-1)[..., None, None], chosen, inside > 0)


def ensemble_probabilities(
    decoder_logits: torch.Tensor,
    clip_logits: torch.Tensor,
    seen: torch.Tensor,
    ensemble_lambda: float = 2.0 / 3.0,
    seen_mean: bool = False,
) -> torch.Tensor:
    """ZegFormer's geometric ensemble of the decoder's and CLIP's class probabilities.

    Both are softmaxed with the decoder's no-object logit as an extra column, which is then
    dropped: ``p_dec = softmax(decoder_logits)[..., :K]``, ``p_clip = softmax([clip_logits,
    no-object logit])[..., :K]``. Then, with lambda = ``ensemble_lambda``, seen classes get
    ``p_dec^lambda * p_clip^(1 - lambda)`` and the other classes ``p_dec^(1 - lambda) *
    p_clip^lambda``. With no seen class (an open vocabulary) every class takes the second form,
    ``p_dec^(1/3) * p_clip^(2/3)`` at the default lambda.

    Args:
        decoder_logits: [..., Q, K + 1] the decoder's class logits (last column no-object).
        clip_logits: [..., Q, K] CLIP's class logits (``logit_scale * cos``).
        seen: int64 [S] indices of the seen classes (may be empty).
        ensemble_lambda: lambda in [0, 1].
        seen_mean: replace CLIP's seen-class probabilities by their mean over the seen classes
            (ZegFormer: CLIP then hardly ranks seen classes, the decoder does).

    Returns:
        float32 [..., Q, K] class scores of the queries (not normalised).
    """
    decoder_logits = decoder_logits.float()
    k = decoder_logits.shape[-1] - 1
    if clip_logits.shape[-1] != k or clip_logits.shape[:-1] != decoder_logits.shape[:-1]:
        raise ValueError(
            f"clip_logits {tuple(clip_logits.shape)} must be the decoder's logits "
            f"{tuple(decoder_logits.shape)} without the no-object column"
        )
    p_dec = decoder_logits.softmax(-1)[..., :k]
    with_no_object = torch.cat([clip_logits.float(), decoder_logits[..., k:]], dim=-1)
    p_clip = with_no_object.softmax(-1)[..., :k]
    is_seen = torch.zeros(k, dtype=torch.bool, device=decoder_logits.device)
    is_seen[seen.to(decoder_logits.device)] = True
    if seen_mean and is_seen.any():
        mean = p_clip[..., is_seen].mean(-1, keepdim=True)
        p_clip = torch.where(is_seen, mean, p_clip)
    dec_weight = torch.where(is_seen, ensemble_lambda, 1.0 - ensemble_lambda)
    return p_dec.pow(dec_weight) * p_clip.pow(1.0 - dec_weight)


class SegmentCLIPClassifier(nn.Module):
    """Test-time CLIP classification of a model's segments, ensembled with its decoder's classes
    (``MODEL.OCZ.SEGMENT_CLIP``; see the module docstring for the routes).

    It has no parameters: the backbone (the model's frozen CLIP) is passed to each call, so the
    state dict and checkpoints do not change when it is switched on.
    """

    @configurable
    def __init__(
        self,
        *,
        route: str = "region",
        style: str = "cropmask",
        ensemble_lambda: float = 2.0 / 3.0,
        seen_mean: bool = False,
        skip_no_object: float = 0.0,
        logit_scale: float = 100.0,
    ):
        """
        Args:
            route: "region" (one prompt-free pass, CLS attending to the segment's patches) or
                "crop" (one CLIP forward per segment on its crop).
            style: the crop route's input, "cropmask", "crop" or "mask" (:func:`crop_segments`).
            ensemble_lambda: lambda of :func:`ensemble_probabilities`, in [0, 1].
            seen_mean: ZegFormer's mean over CLIP's seen-class probabilities.
            skip_no_object: queries whose decoder no-object probability exceeds this keep the
                decoder's distribution and, in the crop route, are not encoded; 0 = off.
            logit_scale: CLIP's class logits are ``logit_scale * cos``.
        """
        super().__init__()
        key = "MODEL.OCZ.SEGMENT_CLIP"
        if route not in ROUTES:
            raise ValueError(f"{key}.ROUTE={route!r}: use one of {ROUTES}")
        if style not in STYLES:
            raise ValueError(f"{key}.STYLE={style!r}: use one of {STYLES}")
        if not 0.0 <= ensemble_lambda <= 1.0:
            raise ValueError(f"{key}.LAMBDA={ensemble_lambda} must be in [0, 1]")
        if not 0.0 <= skip_no_object <= 1.0:
            raise ValueError(f"{key}.SKIP_NO_OBJECT={skip_no_object} must be in [0, 1] (0: off)")
        if logit_scale <= 0:
            raise ValueError(f"{key}.LOGIT_SCALE={logit_scale} must be > 0 (CLIP's is 100)")
        self.route = route
        self.style = style
        self.ensemble_lambda = float(ensemble_lambda)
        self.seen_mean = bool(seen_mean)
        self.skip_no_object = float(skip_no_object)
        self.logit_scale = float(logit_scale)

    @classmethod
    def from_config(cls, cfg):
        seg = cfg.MODEL.OCZ.SEGMENT_CLIP
        return {
            "route": seg.ROUTE,
            "style": seg.STYLE,
            "ensemble_lambda": seg.LAMBDA,
            "seen_mean": seg.SEEN_MEAN,
            "skip_no_object": seg.SKIP_NO_OBJECT,
            "logit_scale": seg.LOGIT_SCALE,
        }

    def extra_repr(self) -> str:
        return (
            f"route={self.route}, style={self.style}, lambda={self.ensemble_lambda:.4f}, "
            f"seen_mean={self.seen_mean}, skip_no_object={self.skip_no_object}, "
            f"logit_scale={self.logit_scale}"
        )

    def check_backbone(self, backbone: nn.Module, text_dim: int | None) -> None:
        """Raise at build time when ``backbone`` cannot serve this route or its CLIP embeddings
        do not have the class embeddings' width."""
        needed = ("plain_forward", "region_embeddings", "patch_size")
        visual = getattr(getattr(backbone, "clip_model", None), "visual", None)
        if self.route == "region":
            missing = [a for a in needed if not hasattr(backbone, a)]
        else:
            missing = [] if hasattr(visual, "image_size") else ["clip_model.visual.image_size"]
        if missing:
            raise TypeError(
                f"MODEL.OCZ.SEGMENT_CLIP.ROUTE={self.route!r} needs a CLIP backbone with "
                f"{missing}; {type(backbone).__name__} lacks them: use CLIPPromptBackbone or set "
                "MODEL.OCZ.SEGMENT_CLIP.ENABLED False"
            )
        width = getattr(visual, "output_dim", None)
        if width != text_dim:
            raise ValueError(
                f"MODEL.OCZ.SEGMENT_CLIP compares CLIP image embeddings (width {width}) with the "
                f"class embeddings (width {text_dim}); they must match: use the CLIP text tower "
                "or an embedding file made with the same CLIP, or set "
                "MODEL.OCZ.SEGMENT_CLIP.ENABLED False"
            )

    def forward(
        self,
        backbone: nn.Module,
        images: torch.Tensor,
        pred_logits: torch.Tensor,
        pred_masks: torch.Tensor,
        text: torch.Tensor,
        seen: torch.Tensor,
    ) -> torch.Tensor:
        """Class scores of every query: the ensemble of the decoder's and CLIP's.

        Args:
            backbone: the model's :class:`CLIPPromptBackbone` (its frozen CLIP is used).
            images: [N, 3, h, w] images normalised with CLIP's mean and std, unpadded.
            pred_logits: [N, Q, K + 1] the decoder's class logits (last column no-object).
            pred_masks: [N, Q, h, w] mask logits at input resolution.
            text: [K, D] L2-normalised class embeddings.
            seen: int64 [S] indices of the seen classes in the vocabulary (may be empty).

        Returns:
            float32 [N, Q, K]: per query the ensemble's class scores, or the decoder's class
            probabilities where the query was skipped (``skip_no_object``).
        """
        logits = pred_logits.float()
        no_object = logits.softmax(-1)[..., -1]
        keep = (
            no_object <= self.skip_no_object
            if self.skip_no_object > 0
            else torch.ones_like(no_object, dtype=torch.bool)
        )
        masks = binarize_masks(pred_masks)
        if self.route == "region":
            embeds = self.region_embeddings(backbone, images, masks)
        else:
            embeds = self.crop_embeddings(backbone, images, masks, keep)
        clip_logits = self.logit_scale * embeds.float() @ text.float().t()
        probs = ensemble_probabilities(
            logits, clip_logits, seen, self.ensemble_lambda, self.seen_mean
        )
        return torch.where(keep[..., None], probs, logits.softmax(-1)[..., :-1])

    @staticmethod
    def region_embeddings(
        backbone: nn.Module, images: torch.Tensor, masks: torch.Tensor
    ) -> torch.Tensor:
        """Region route: [N, Q, D] L2-normalised CLIP embeddings of the segments.

        Args:
            backbone: a :class:`CLIPPromptBackbone`.
            images: [N, 3, h, w] normalised images.
            masks: bool [N, Q, h, w] binarised segments (:func:`segment_patches` picks patches).
        """
        p = backbone.patch_size
        h, w = images.shape[-2:]
        padded = F.pad(images, (0, -w % p, 0, -h % p))  # 0: CLIP's mean, as the model pads
        plain = backbone.plain_forward(padded)
        patches = segment_patches(masks, p)
        return backbone.region_embeddings(plain["last_input"], patches, prompted=False)

    def crop_embeddings(
        self, backbone: nn.Module, images: torch.Tensor, masks: torch.Tensor, keep: torch.Tensor
    ) -> torch.Tensor:
        """Crop route: [N, Q, D] L2-normalised CLIP embeddings of the kept segments (zeros for
        skipped ones). All kept segments of an image go through CLIP in one batch.

        Args:
            backbone: a backbone with the open_clip model as ``clip_model``.
            images: [N, 3, h, w] normalised images.
            masks: bool [N, Q, h, w] binarised segments.
            keep: bool [N, Q] the segments to encode.
        """
        visual = backbone.clip_model.visual
        size = tuple(visual.image_size)
        dtype = next(visual.parameters()).dtype
        n, q = masks.shape[:2]
        out = torch.zeros((n, q, visual.output_dim), device=images.device)
        for i in range(n):
            kept = torch.nonzero(keep[i]).squeeze(1)
            if not len(kept):
                continue
            crops = crop_segments(images[i], masks[i, kept], size, self.style)
            embeds = visual(crops.to(dtype))
            embeds = embeds[0] if isinstance(embeds, tuple) else embeds  # output_tokens
            out[i, kept] = F.normalize(embeds.float(), dim=-1)
        return out
