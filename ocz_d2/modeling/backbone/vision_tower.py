"""Frozen vision towers for SimZSS: a self-supervised timm ViT, or a CLIP image tower.

Both take raw RGB batches (0..255), normalise them with their own statistics, and return the
CLS embedding and the patch features, never with gradients: the tower is frozen and stays in
eval mode. Checkpoints leave its weights out when they can be rebuilt (a pretrained tag or a
local file), recording their digests (:mod:`ocz_d2.engine.checkpoint`).
"""

from __future__ import annotations

import os

import torch
from torch import nn

from ...utils.errors import MissingFileError
from ...utils.io import resolve_data_path
from .clip_prompt import CLIPPromptBackbone
from .ssl_guide import create_ssl_model

__all__ = ["ClipVisionTower", "FrozenVisionTower", "TimmVisionTower", "build_vision_tower"]

VISION_SOURCES = ("timm", "clip")


class FrozenVisionTower(nn.Module):
    """Base of the frozen towers.

    Attributes:
        dim (int): D, channels of the CLS embedding and the patch features.
        patch_size (int): p, the patch grid's stride in input pixels.
    """

    dim: int
    patch_size: int

    def _freeze(self, module: nn.Module) -> None:
        for p in module.parameters():
            p.requires_grad_(False)
        module.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        for child in self.children():
            child.eval()  # frozen: always eval
        return self

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] 0..255 -> the tower's normalised input."""
        return (images.to(self.pixel_mean.dtype) - self.pixel_mean) / self.pixel_std

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            images: [B, 3, H, W] RGB, 0..255; H and W multiples of ``patch_size``.

        Returns:
            cls: [B, D]; patches: [B, D, H / p, W / p]; neither normalised.
        """
        h, w = images.shape[-2:]
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(
                f"vision tower input {h}x{w} is not a multiple of its patch size "
                f"{self.patch_size}: pad it first"
            )
        return self._features(self.normalize(images))

    def _features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class TimmVisionTower(FrozenVisionTower):
    """A frozen timm ViT (default DINOv2 ViT-B/14 with registers): its final normed tokens,
    CLS first, registers skipped."""

    def __init__(
        self,
        model_name: str = "vit_base_patch14_reg4_dinov2.lvd142m",
        *,
        pretrained: bool = True,
        weights: str = "",
        seed: int = 0,
    ):
        super().__init__()
        self.model = create_ssl_model(
            model_name,
            pretrained=pretrained,
            weights=weights,
            seed=seed,
            key="MODEL.SIMZSS.VISION",
            name_key="MODEL_NAME",
        )
        self._freeze(self.model)
        if getattr(self.model, "cls_token", None) is None:
            raise ValueError(
                f"MODEL.SIMZSS.VISION.MODEL_NAME={model_name!r} has no CLS token; SimZSS's global "
                "loss needs one (use a ViT such as vit_base_patch14_reg4_dinov2.lvd142m)"
            )
        cfg = self.model.pretrained_cfg or {}
        mean = cfg.get("mean", (0.485, 0.456, 0.406))
        std = cfg.get("std", (0.229, 0.224, 0.225))
        self.register_buffer("pixel_mean", 255.0 * torch.tensor(mean).view(1, 3, 1, 1), False)
        self.register_buffer("pixel_std", 255.0 * torch.tensor(std).view(1, 3, 1, 1), False)
        patch = self.model.patch_embed.patch_size
        self.patch_size = int(patch[0] if isinstance(patch, (tuple, list)) else patch)
        self.dim = int(self.model.num_features)
        self._source = {
            "kind": "timm",
            "model_name": model_name,
            "pretrained": bool(pretrained) and not weights,
            "weights": os.path.basename(weights) if weights else "",
        }

    def frozen_weights(self) -> dict | None:
        """Checkpoints leave the ViT out when its weights come from timm or a file."""
        if not (self._source["pretrained"] or self._source["weights"]):
            return None
        return {"prefix": "model.", "source": dict(self._source)}

    def _features(self, x):
        tokens = self.model.forward_features(x)
        gh, gw = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        patches = tokens[:, self.model.num_prefix_tokens :]
        return tokens[:, 0], patches.transpose(1, 2).reshape(len(x), -1, gh, gw)


class ClipVisionTower(FrozenVisionTower):
    """The frozen image tower of an open_clip ViT, without prompts: CLS and patch tokens
    through ``ln_post`` and the projection (CLIP's joint space, D = its embedding size)."""

    def __init__(self, model_name: str, *, pretrained: str = "", weights: str = ""):
        super().__init__()
        self.clip = CLIPPromptBackbone(
            model_name=model_name,
            pretrained=pretrained,
            weights=weights,
            num_prompts=0,
            out_layers=(0,),
            frozen=True,
            keep_text_tower=False,
        )
        self.register_buffer(
            "pixel_mean", torch.tensor(self.clip.pixel_mean).view(1, 3, 1, 1), False
        )
        self.register_buffer("pixel_std", torch.tensor(self.clip.pixel_std).view(1, 3, 1, 1), False)
        self.patch_size = int(self.clip.patch_size)
        self.dim = int(self.clip.embed_dim)

    def _features(self, x):
        out = self.clip.plain_forward(x)
        # plain_forward normalises its joint-space outputs; SimZSS normalises anyway.
        return out["cls"], out["dense"]


def build_vision_tower(cfg) -> FrozenVisionTower:
    """The tower of ``MODEL.SIMZSS.VISION`` (``"clip"``: ``MODEL.OCZ.CLIP``'s model)."""
    vision = cfg.MODEL.SIMZSS.VISION
    if vision.SOURCE == "timm":
        weights = vision.WEIGHTS
        if weights:  # relative: the working directory, then $DETECTRON2_DATASETS
            weights = resolve_data_path(
                weights,
                what=f"vision tower weights MODEL.SIMZSS.VISION.WEIGHTS={weights!r}",
                fix="give a local timm state-dict file, or '' to use PRETRAINED",
                error=MissingFileError,
            )
        return TimmVisionTower(
            vision.MODEL_NAME,
            pretrained=vision.PRETRAINED,
            weights=weights,
            seed=cfg.SEED if cfg.SEED >= 0 else 0,
        )
    if vision.SOURCE == "clip":
        clip = cfg.MODEL.OCZ.CLIP
        return ClipVisionTower(clip.MODEL_NAME, pretrained=clip.PRETRAINED, weights=clip.WEIGHTS)
    raise ValueError(f"MODEL.SIMZSS.VISION.SOURCE={vision.SOURCE!r}: use one of {VISION_SOURCES}")
