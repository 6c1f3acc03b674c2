"""Pixel decoders (registered in Detectron2's ``SEM_SEG_HEADS_REGISTRY``)."""

from .simple_pyramid import SimplePyramidPixelDecoder

__all__ = ["SimplePyramidPixelDecoder"]
