"""The object guide: a frozen self-supervised ViT (DINO) whose patch features are clustered into
regions (:mod:`ocz_d2.modeling.clustering`, which also says how its grid maps onto CLIP's).
"""

from __future__ import annotations

import logging

import timm
import torch
import torch.nn.functional as F
from torch import nn

from ...utils.io import resolve_weights_path
from ..clustering import cluster_feature_map
from . import tiny_vit  # noqa: F401  (registers ocz_d2's tiny timm ViT)

__all__ = ["SSLGuide", "create_ssl_model"]

logger = logging.getLogger(__name__)


class SSLGuide(nn.Module):
    """A frozen timm ViT (default DINO ViT-B/16) whose patch features are clustered into regions.

    It normalises its input itself (with the timm model's own mean/std), from the raw 0..255 RGB
    batch, so it is independent of CLIP's normalisation.
    """

    def __init__(
        self,
        model_name: str = "vit_base_patch16_224.dino",
        *,
        pretrained: bool = True,
        weights: str = "",
        num_regions: int = 6,
        seeding: str = "farthest",
        kmeans_iters: int = 3,
        seed: int = 0,
        input_size: int = 0,
    ):
        """
        Args:
            model_name: any timm ViT name (``MODEL.OCZ.GUIDE.SSL_MODEL``).
            pretrained: download timm's pretrained weights for the name's tag (when ``weights`` is
                empty); False gives a randomly initialised ViT (seeded by ``seed``).
            weights: local weights file for the timm model (wins over ``pretrained``).
            num_regions: n_o.
            seeding, kmeans_iters, seed: see :func:`~ocz_d2.modeling.clustering.voronoi_cluster`.
            input_size: resize the image so its longer side is this many pixels before the ViT;
                0 keeps the image's size.
        """
        super().__init__()
        self.model_name = model_name
        self.model = create_ssl_model(model_name, pretrained=pretrained, weights=weights, seed=seed)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.model.eval()
        cfg = self.model.pretrained_cfg or {}
        mean = cfg.get("mean", (0.485, 0.456, 0.406))
        std = cfg.get("std", (0.229, 0.224, 0.225))
        self.register_buffer("pixel_mean", 255.0 * torch.tensor(mean).view(1, 3, 1, 1), False)
        self.register_buffer("pixel_std", 255.0 * torch.tensor(std).view(1, 3, 1, 1), False)
        patch = self.model.patch_embed.patch_size
        self.patch_size = int(patch[0] if isinstance(patch, (tuple, list)) else patch)
        self.num_regions = int(num_regions)
        self.seeding = seeding
        self.kmeans_iters = int(kmeans_iters)
        self.seed = int(seed)
        self.input_size = int(input_size)

    def train(self, mode: bool = True):
        super().train(mode)
        self.model.eval()  # frozen: always eval
        return self

    def _resized_hw(self, h: int, w: int) -> tuple[int, int]:
        """The image size the ViT sees (before padding to its patch size)."""
        if self.input_size <= 0:
            return h, w
        scale = self.input_size / max(h, w)
        return round(h * scale), round(w * scale)

    def _grid_stride(self, image_hw: tuple[int, int]) -> tuple[float, float]:
        """Cell size (stride_h, stride_w), in input pixels, of the grid of :meth:`features` for
        images of size ``image_hw``.

        The patch size over the resize factor of each axis (``input_size`` rounds each side, so
        the factors may differ slightly); the patch size itself without ``input_size``.
        """
        h, w = int(image_hw[0]), int(image_hw[1])
        rh, rw = self._resized_hw(h, w)
        return self.patch_size * h / rh, self.patch_size * w / rw

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[float, float]]:
        """Patch features of raw RGB images, and the geometry of their grid.

        Args:
            images: [B, 3, H, W], 0..255.

        Returns:
            feats: [B, C, h, w]; ``h = ceil(H' / p)`` for the height H' the ViT sees (H resized
                by ``input_size``, else H) and its patch size p, the image being padded at the
                bottom/right to whole patches, so the last cells may reach past H (likewise w).
            stride: (stride_h, stride_w), the cell size in input pixels (p over the resize
                factor of each axis; p without ``input_size``); cells start at the top-left pixel
                (see :func:`~ocz_d2.modeling.clustering.resample_regions`).
        """
        x = (images.to(self.pixel_mean.dtype) - self.pixel_mean) / self.pixel_std
        size = self._resized_hw(*x.shape[-2:])
        if size != tuple(x.shape[-2:]):
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        h, w = x.shape[-2:]
        p = self.patch_size
        x = F.pad(x, (0, -w % p, 0, -h % p))
        tokens = self.model.forward_features(x)
        tokens = tokens[:, self.model.num_prefix_tokens :]
        gh, gw = x.shape[-2] // p, x.shape[-1] // p
        feats = tokens.transpose(1, 2).reshape(tokens.shape[0], -1, gh, gw)
        return feats, self._grid_stride(images.shape[-2:])

    @torch.no_grad()
    def forward(self, images: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
        """Regions of raw RGB images on a CLIP patch grid.

        Args:
            images: [B, 3, H, W], 0..255.
            grid_hw: (gh, gw), the CLIP patch grid tiling the images (patches of H/gh x W/gw
                pixels).

        Returns:
            int64 [B, gh, gw]: each CLIP patch takes the region of the guide cell under its centre.
        """
        h, w = images.shape[-2:]
        feats, stride = self.features(images)
        return cluster_feature_map(
            feats, self.num_regions, grid_hw, stride, (h / grid_hw[0], w / grid_hw[1]),
            seeding=self.seeding, iters=self.kmeans_iters, seed=self.seed,
        )  # fmt: skip


def create_ssl_model(
    model_name: str,
    *,
    pretrained: bool = True,
    weights: str = "",
    seed: int = 0,
    key: str = "MODEL.OCZ.GUIDE",
    name_key: str = "SSL_MODEL",
) -> nn.Module:
    """A timm ViT (the guide's, or SimZSS's vision tower), with weights from a local file,
    timm's hub, or random.

    The random initialisation draws from a generator forked from ``seed``, so a random model is
    the same in every run and the global RNG is not disturbed. ``key`` / ``name_key`` name the
    config node and model-name key in error messages.
    """
    known = set(timm.list_models(pretrained=False))
    if model_name not in known and model_name.split(".")[0] not in known:
        raise ValueError(
            f"Unknown timm model {key}.{name_key}={model_name!r}; use a timm ViT name "
            "such as 'vit_base_patch16_224.dino' (see timm.list_models('vit_*'))."
        )
    kwargs = {"num_classes": 0, "dynamic_img_size": True}
    if weights:
        # A relative path: the working directory, then $DETECTRON2_DATASETS (data-derived
        # weights, such as the miniature's tiny ViT, live beside their data).
        weights = resolve_weights_path(
            weights,
            key=f"{key}.WEIGHTS",
            fix=f"give a local timm state-dict file, or '' to use {key}.PRETRAINED.",
        )
        return timm.create_model(
            model_name, pretrained=True, pretrained_cfg_overlay={"file": weights}, **kwargs
        )
    if pretrained:
        try:
            return timm.create_model(model_name, pretrained=True, **kwargs)
        except Exception as e:  # timm raises various errors when the hub is unreachable
            raise RuntimeError(
                f"Could not get timm weights for {model_name!r} (this machine may be offline). "
                f"Download them once where the hub is reachable and set {key}.WEIGHTS "
                f"to the file. Cause: {e}"
            ) from e
    logger.warning(
        "timm model %s has random weights (%s.PRETRAINED False, WEIGHTS empty).", model_name, key
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return timm.create_model(model_name, pretrained=False, **kwargs)
