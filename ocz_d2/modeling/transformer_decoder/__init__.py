"""Transformer (query) decoders, registered in ``TRANSFORMER_DECODER_REGISTRY``."""

from .zegformer_decoder import SegmentClassHead, ZegFormerDecoder
from .zero_shot_decoder import (
    TRANSFORMER_DECODER_REGISTRY,
    SinePositionEncoding,
    ZeroShotMaskDecoder,
    build_transformer_decoder,
)

__all__ = [
    "TRANSFORMER_DECODER_REGISTRY",
    "SegmentClassHead",
    "SinePositionEncoding",
    "ZegFormerDecoder",
    "ZeroShotMaskDecoder",
    "build_transformer_decoder",
]
