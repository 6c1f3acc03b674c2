"""Pixel decoders (registered in Detectron2's ``SEM_SEG_HEADS_REGISTRY``)."""

from .fpn import MaskFormerPixelDecoder
from .simple_pyramid import SimplePyramidPixelDecoder

__all__ = ["MaskFormerPixelDecoder", "SimplePyramidPixelDecoder"]
