"""Model components of ocz_d2; importing this registers them with Detectron2."""

from . import backbone, meta_arch, pixel_decoder, text, transformer_decoder
from .backbone import CLIPPromptBackbone
from .meta_arch import OCZeroShotSegmentor, SimZSS
from .pixel_decoder import SimplePyramidPixelDecoder
from .segment_classifier import SegmentCLIPClassifier
from .text import TextEmbedder
from .transformer_decoder import TRANSFORMER_DECODER_REGISTRY, ZeroShotMaskDecoder

__all__ = [
    "CLIPPromptBackbone",
    "OCZeroShotSegmentor",
    "SegmentCLIPClassifier",
    "SimZSS",
    "SimplePyramidPixelDecoder",
    "TRANSFORMER_DECODER_REGISTRY",
    "TextEmbedder",
    "ZeroShotMaskDecoder",
    "backbone",
    "meta_arch",
    "pixel_decoder",
    "text",
    "transformer_decoder",
]
