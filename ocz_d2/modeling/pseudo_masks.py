"""Targets for what the labels leave out: pseudo-masks of unannotated regions (split matching)
and pseudo-labels of unseen classes (transductive self-training).

Both only ever write into pixels whose label is ignore, so no annotation is overridden.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from torch import nn

from .clustering import NO_REGION, SEEDINGS, voronoi_cluster

__all__ = ["PseudoMaskGenerator", "pixel_class_probabilities", "pseudo_label"]


class PseudoMaskGenerator(nn.Module):
    """Pseudo-masks of the unannotated pixels of a batch, from CLIP's dense features.

    Per image: the patches that are mostly unannotated (at least half of their pixels have the
    ignore label) are clustered into at most ``num_regions`` regions by :func:`voronoi_cluster`
    on CLIP's dense features (batched, vectorised, deterministic given ``seed``). A region's
    pseudo-mask is its patches' pixels that are unannotated, so a pseudo-mask never covers an
    annotated pixel (nor padding); regions smaller than ``min_area`` (a fraction of the image's
    pixels) are dropped. The kept regions' patch masks are returned for their embeddings (CLIP's
    CLS token restricted to the region, see ``CLIPPromptBackbone.region_embeddings``).

    No parameters; runs without gradients.
    """

    @configurable
    def __init__(
        self,
        *,
        num_regions: int = 8,
        min_area: float = 0.01,
        seeding: str = "kmeans++",
        kmeans_iters: int = 3,
        seed: int = 0,
    ):
        """
        Args:
            num_regions: clusters per image before small ones are dropped.
            min_area: smallest kept pseudo-mask, as a fraction of the image's (unpadded) pixels.
            seeding, kmeans_iters, seed: see :func:`voronoi_cluster`.
        """
        super().__init__()
        if num_regions < 1:
            raise ValueError(f"MODEL.OCZ.SPLIT.NUM_REGIONS must be >= 1, got {num_regions}.")
        if not 0 <= min_area < 1:
            raise ValueError(f"MODEL.OCZ.SPLIT.MIN_AREA must be in [0, 1), got {min_area}.")
        if seeding not in SEEDINGS:
            raise ValueError(f"MODEL.OCZ.SPLIT.SEEDING={seeding!r}: use one of {SEEDINGS}.")
        self.num_regions = int(num_regions)
        self.min_area = float(min_area)
        self.seeding = seeding
        self.kmeans_iters = int(kmeans_iters)
        self.seed = int(seed)

    @classmethod
    def from_config(cls, cfg) -> dict:
        split = cfg.MODEL.OCZ.SPLIT
        return {
            "num_regions": split.NUM_REGIONS,
            "min_area": split.MIN_AREA,
            "seeding": split.SEEDING,
            "kmeans_iters": split.KMEANS_ITERS,
            "seed": split.SEED,
        }

    @torch.no_grad()
    def forward(
        self, dense: torch.Tensor, unlabeled: torch.Tensor, image_area: torch.Tensor
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """
        Args:
            dense: [B, D, gh, gw] CLIP patch features (any width).
            unlabeled: bool [B, H, W], pixels of the image whose label is ignore (False on
                annotated pixels and on padding); H, W multiples of gh, gw.
            image_area: [B] pixels of each unpadded image.

        Returns:
            masks: per image bool [R_b, H, W] pseudo-masks (R_b <= num_regions, possibly 0);
            patch_masks: per image bool [R_b, gh, gw], each region's patches.
        """
        b, _, gh, gw = dense.shape
        h, w = unlabeled.shape[-2:]
        if h % gh or w % gw:
            raise ValueError(f"pixel grid {h}x{w} is not a multiple of the patch grid {gh}x{gw}")
        share = F.adaptive_avg_pool2d(unlabeled[:, None].float(), (gh, gw))[:, 0]  # [B, gh, gw]
        usable = (share >= 0.5).reshape(b, gh * gw)
        regions = voronoi_cluster(
            dense.flatten(2).transpose(1, 2), self.num_regions, seeding=self.seeding,
            iters=self.kmeans_iters, seed=self.seed, valid=usable, allow_fewer=True,
        ).view(b, gh, gw)  # fmt: skip
        ids = torch.arange(self.num_regions, device=dense.device)
        patch_masks = regions[:, None] == ids[None, :, None, None]  # [B, k, gh, gw]
        pixel_regions = regions.repeat_interleave(h // gh, 1).repeat_interleave(w // gw, 2)
        pixel_regions = pixel_regions.masked_fill(~unlabeled, NO_REGION)
        masks = pixel_regions[:, None] == ids[None, :, None, None]  # [B, k, H, W]
        areas = masks.flatten(2).sum(-1).float()
        keep = areas >= (self.min_area * image_area.float().to(areas.device))[:, None]
        keep &= areas > 0
        return [m[k] for m, k in zip(masks, keep)], [p[k] for p, k in zip(patch_masks, keep)]

    def extra_repr(self) -> str:
        return (
            f"num_regions={self.num_regions}, min_area={self.min_area}, seeding={self.seeding}, "
            f"kmeans_iters={self.kmeans_iters}, seed={self.seed}"
        )


def pixel_class_probabilities(pred_logits: torch.Tensor, pred_masks: torch.Tensor) -> torch.Tensor:
    """Mask-weighted class distribution of each pixel, no-object included.

    ``P(k | x) = sum_q sigmoid(m_q(x)) softmax(pred_logits_q)[k] / sum_q sigmoid(m_q(x))``: a
    probability over the K classes and no-object, unlike the semantic scores (which sum over
    queries and are unbounded).

    Args:
        pred_logits: [Q, K+1] (no-object last); pred_masks: [Q, H, W] mask logits.

    Returns:
        [K, H, W] probabilities of the K classes (no-object's share is 1 minus their sum).
    """
    weights = pred_masks.float().sigmoid()
    probs = torch.einsum("qk,qhw->khw", pred_logits.float().softmax(-1), weights)
    return probs[:-1] / weights.sum(0).clamp_min(1e-6)


@torch.no_grad()
def pseudo_label(
    scores: torch.Tensor, unlabeled: torch.Tensor, unseen: torch.Tensor, threshold: float
) -> torch.Tensor:
    """Self-training labels of unannotated pixels: the most likely unseen class, if confident.

    Args:
        scores: [K, H, W] per-pixel class probabilities of the current vocabulary (all
            classes), e.g. :func:`pixel_class_probabilities` (low where no-object queries
            cover the pixel).
        unlabeled: bool [H, W], pixels whose label is ignore (inside the image).
        unseen: int64 [U] vocabulary indices of the unseen classes.
        threshold: least score of the chosen unseen class (its confidence).

    Returns:
        int64 [H, W]: the unseen vocabulary index of highest score where ``unlabeled`` and that
        score reaches ``threshold``, -1 everywhere else.
    """
    if scores.shape[-2:] != unlabeled.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and mask {tuple(unlabeled.shape)} differ")
    out = torch.full(unlabeled.shape, -1, dtype=torch.long, device=scores.device)
    if unseen.numel() == 0:
        return out
    unseen = unseen.to(scores.device)
    confidence, best = scores.float()[unseen].max(0)
    chosen = unlabeled.to(scores.device) & (confidence >= threshold)
    return torch.where(chosen, unseen[best], out)
