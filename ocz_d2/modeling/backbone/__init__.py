"""Backbones of ocz_d2 (registered in Detectron2's ``BACKBONE_REGISTRY`` on import)."""

from .clip_prompt import (
    TINY_CLIP_MODELS,
    CLIPPromptBackbone,
    available_clip_models,
    create_clip_model,
    register_tiny_clip_configs,
)
from .cnn import build_clip_tower, load_backbone_weights, resolve_backbone_weights
from .tiny_vit import TINY_SSL_VIT

register_tiny_clip_configs()

__all__ = [
    "CLIPPromptBackbone",
    "TINY_CLIP_MODELS",
    "TINY_SSL_VIT",
    "available_clip_models",
    "build_clip_tower",
    "create_clip_model",
    "load_backbone_weights",
    "register_tiny_clip_configs",
    "resolve_backbone_weights",
]
