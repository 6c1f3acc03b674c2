"""ocz_d2's tiny timm ViT: the miniature's self-supervised tower (SimZSS) and guide (OC-ZSS).

``vit_ocz_tiny_patch16``: patch 16, width 128, 4 blocks of 4 heads, 128-pixel default input
(0.9M parameters). Registered with timm on import, so ``timm.create_model`` and the guide's /
vision tower's ``MODEL_NAME`` accept it; its weights come from a local file
(:mod:`ocz_d2.miniature.dino_pretrain` makes them) or are random.
"""

from __future__ import annotations

from timm.models import generate_default_cfgs, register_model
from timm.models.vision_transformer import _create_vision_transformer

__all__ = ["TINY_SSL_VIT"]

#: The timm name of the tiny ViT.
TINY_SSL_VIT = "vit_ocz_tiny_patch16"

# timm reads a module's ``default_cfgs`` when registering its models: no pretrained tag exists
# (weights come from a file), the mean/std are ImageNet's as for DINO.
default_cfgs = generate_default_cfgs(
    {
        TINY_SSL_VIT: {
            "url": "",
            "num_classes": 0,
            "input_size": (3, 128, 128),
            "mean": (0.485, 0.456, 0.406),
            "std": (0.229, 0.224, 0.225),
        }
    }
)


@register_model
def vit_ocz_tiny_patch16(pretrained: bool = False, **kwargs):
    """The tiny ViT (module docstring)."""
    args = {"img_size": 128, "patch_size": 16, "embed_dim": 128, "depth": 4, "num_heads": 4}
    return _create_vision_transformer(TINY_SSL_VIT, pretrained=pretrained, **{**args, **kwargs})
