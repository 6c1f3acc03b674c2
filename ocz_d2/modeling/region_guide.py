"""The region guide: where the object prompts' regions come from.

Per image, either its precomputed object map (``"object_map"``, pixel region indices, see
``tools/precompute_object_maps.py``) or, online, a frozen feature map clustered into n_o regions:
a self-supervised ViT's (:class:`~ocz_d2.modeling.backbone.ssl_guide.SSLGuide`, source "ssl") or
CLIP's own prompt-free patch features (source "clip"); source "oracle" takes object maps only.
The clustering and the mapping of the guide's grid onto CLIP's are
:mod:`ocz_d2.modeling.clustering`'s.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.structures import ImageList
from torch import nn

from .backbone.ssl_guide import SSLGuide
from .clustering import NO_REGION, cells_with_image, cluster_feature_map, label_map_to_grid
from .padding import image_patches

__all__ = ["GUIDE_SOURCES", "RegionGuide"]

GUIDE_SOURCES = ("ssl", "clip", "oracle")


class RegionGuide(nn.Module):
    """Regions [B, gh, gw] on the CLIP patch grid of a padded batch, for the object prompts.

    No parameters or buffers (nothing in the checkpoint): the SSL model of the "ssl" source is
    frozen, possibly large, and built on first use, so training on object maps never builds (or
    downloads) it; it is kept out of the module tree (and so out of the state dict), as
    :meth:`ssl_model`.
    """

    @configurable
    def __init__(
        self,
        *,
        num_regions: int,
        source: str = "ssl",
        seeding: str = "farthest",
        kmeans_iters: int = 3,
        seed: int = 0,
        ssl_kwargs: dict | None = None,
    ):
        """
        Args:
            num_regions: n_o, regions per image (the backbone's object prompts).
            source: "ssl" | "clip" | "oracle" (``MODEL.OCZ.GUIDE.SOURCE``).
            seeding, kmeans_iters, seed: the online clustering (see
                :func:`~ocz_d2.modeling.clustering.voronoi_cluster`).
            ssl_kwargs: arguments of :class:`SSLGuide` (source "ssl"; its model is built from
                them on first use).
        """
        super().__init__()
        if source not in GUIDE_SOURCES:
            raise ValueError(f"MODEL.OCZ.GUIDE.SOURCE={source!r}: use {GUIDE_SOURCES}")
        self.num_regions = int(num_regions)
        self.source = source
        self.seeding = seeding
        self.kmeans_iters = int(kmeans_iters)
        self.seed = int(seed)
        self.ssl_kwargs = dict(ssl_kwargs or {})
        # Built lazily, kept out of the state dict (frozen, and possibly large).
        self._ssl_model: list[SSLGuide] = []

    @classmethod
    def from_config(cls, cfg) -> dict:
        guide = cfg.MODEL.OCZ.GUIDE
        if guide.SOURCE not in GUIDE_SOURCES:
            raise ValueError(
                f"MODEL.OCZ.GUIDE.SOURCE={guide.SOURCE!r}: use one of {GUIDE_SOURCES}."
            )
        return {
            "num_regions": cfg.MODEL.OCZ.OBJECTS.NUM,
            "source": guide.SOURCE,
            "seeding": guide.SEEDING,
            "kmeans_iters": guide.KMEANS_ITERS,
            "seed": guide.SEED,
            "ssl_kwargs": {
                "model_name": guide.SSL_MODEL,
                "pretrained": guide.PRETRAINED,
                "weights": guide.WEIGHTS,
                "num_regions": cfg.MODEL.OCZ.OBJECTS.NUM,
                "seeding": guide.SEEDING,
                "kmeans_iters": guide.KMEANS_ITERS,
                "seed": guide.SEED,
                "input_size": guide.INPUT_SIZE,
            },
        }

    def ssl_model(self, device: torch.device | str | None = None) -> SSLGuide:
        """The SSL guide model, built on first use (and moved to ``device`` when given)."""
        if not self._ssl_model:
            self._ssl_model.append(SSLGuide(**self.ssl_kwargs))
        model = self._ssl_model[0]
        if device is not None and model.pixel_mean.device != torch.device(device):
            model.to(device)
        return model

    def forward(
        self,
        backbone: nn.Module,
        images: torch.Tensor,
        raw: list[torch.Tensor],
        object_maps: list[torch.Tensor | None],
        none_value: int,
        image_mask: torch.Tensor,
    ) -> torch.Tensor:
        """Regions [B, gh, gw] of a padded batch for the object prompts.

        Patches that hold no image (:func:`image_patches`) get NO_REGION on both paths, so an
        object map and the online guide agree on padded crops.

        Args:
            backbone: the CLIP backbone (its ``patch_size``; its ``plain_forward`` for the "clip"
                source). Passed in, not held, so that its weights stay the model's alone.
            images: [B, 3, H, W] normalised, padded batch (H, W multiples of the patch size).
            raw: the raw images [3, h_i, w_i] (0..255; in training the mapper's padded crops),
                for an online SSL guide.
            object_maps: per image its object map [h_i, w_i] (pixel region indices, ``none_value``
                where none), or None; all or none of the images must have one.
            none_value: the maps' "no region" value (the dataset's ignore label).
            image_mask: bool [B, H, W], True on image pixels (:func:`batch_image_mask`).
        """
        device = images.device
        p = backbone.patch_size
        grid_hw = (images.shape[-2] // p, images.shape[-1] // p)
        in_image = image_patches(image_mask, p)
        given = [m is not None for m in object_maps]
        if all(given):
            maps = ImageList.from_tensors(
                [m.to(device) for m in object_maps], p, pad_value=float(none_value)
            ).tensor
            maps = F.pad(
                maps,
                (0, images.shape[-1] - maps.shape[-1], 0, images.shape[-2] - maps.shape[-2]),
                value=none_value,
            )
            regions = label_map_to_grid(maps, p, self.num_regions, none_value)
            return regions.masked_fill(~in_image, NO_REGION)
        if any(given):
            raise ValueError(
                "a batch mixes images with and without object maps: give every image of a "
                "dataset an object map (tools/precompute_object_maps.py), or none"
            )
        if self.source == "oracle":
            raise ValueError(
                "MODEL.OCZ.GUIDE.SOURCE is 'oracle' but the images have no object map: register "
                "the dataset with extra_label_roots {object_map: ...} (see "
                "tools/precompute_object_maps.py), or choose the 'ssl' or 'clip' guide"
            )
        with torch.no_grad():
            if self.source == "clip":
                feats, stride = backbone.plain_forward(images)["patch"], (p, p)
            else:
                padded = torch.zeros_like(images)
                for i, r in enumerate(raw):
                    padded[i, :, : r.shape[-2], : r.shape[-1]] = r.to(device)
                feats, stride = self.ssl_model(device).features(padded)
        regions = cluster_feature_map(
            feats, self.num_regions, grid_hw, stride, p, seeding=self.seeding,
            iters=self.kmeans_iters, seed=self.seed,
            valid=cells_with_image(image_mask, feats.shape[-2:], stride), per_image=True,
        )  # fmt: skip
        return regions.masked_fill(~in_image, NO_REGION)

    def extra_repr(self) -> str:
        return (
            f"source={self.source}, num_regions={self.num_regions}, seeding={self.seeding}, "
            f"kmeans_iters={self.kmeans_iters}, seed={self.seed}"
        )
