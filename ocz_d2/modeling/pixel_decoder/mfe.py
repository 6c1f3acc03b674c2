"""Multi-scale feature enhancement (MFE, from Split Matching): a residual multi-receptive-field
refinement of the pixel decoder's feature maps."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .ora import GranularExtractor

__all__ = ["MultiScaleFeatureEnhancement"]


class MultiScaleFeatureEnhancement(nn.Module):
    """``x + A(x)``, where ``A`` aggregates several receptive fields of ``x``: depth-wise 3x3
    convolutions at dilations ``rates`` and a global-average-pool branch, combined by a 1x1 conv
    (the :class:`GranularExtractor` of granular attention, used here as a residual branch).

    The combining conv starts at zero, so an enabled MFE starts as the identity and training
    decides how much context to add. [B, C, h, w] -> [B, C, h, w].
    """

    def __init__(self, dim: int, rates: Sequence[int] = (1, 2, 3)):
        super().__init__()
        self.aggregate = GranularExtractor(dim, rates)
        nn.init.zeros_(self.aggregate.mix.weight)
        nn.init.zeros_(self.aggregate.mix.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.aggregate(x)
