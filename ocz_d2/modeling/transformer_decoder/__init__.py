"""Transformer (query) decoders, registered in ``TRANSFORMER_DECODER_REGISTRY``."""

from .zero_shot_decoder import (
    TRANSFORMER_DECODER_REGISTRY,
    SinePositionEncoding,
    ZeroShotMaskDecoder,
    build_transformer_decoder,
)

__all__ = [
    "TRANSFORMER_DECODER_REGISTRY",
    "SinePositionEncoding",
    "ZeroShotMaskDecoder",
    "build_transformer_decoder",
]
