"""Multi-scale feature enhancement (MFE, from Split Matching): a residual multi-receptive-field
refinement of the pixel decoder's feature maps."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .ora import GranularExtractor

__all__ = ["MultiScaleFeatureEnhancement"]


class MultiScaleFeatureEnhancement(nn.Module):
    """Per feature level ``x + A(x)``, where ``A`` aggregates several receptive fields of ``x``:
    depth-wise 3x3 convolutions at dilations ``rates`` and a global-average-pool branch, combined
    by a 1x1 conv (the :class:`GranularExtractor` of granular attention, used here as a residual
    branch; one per level).

    The combining convs start at zero, so an enabled MFE starts as the identity and training
    decides how much context to add. ``num_levels`` maps [B, C, h_i, w_i] -> the same shapes.
    """

    def __init__(self, dim: int, rates: Sequence[int] = (1, 2, 3), num_levels: int = 1):
        super().__init__()
        if num_levels < 1:
            raise ValueError(
                f"MultiScaleFeatureEnhancement: num_levels must be >= 1, got {num_levels}"
            )
        self.aggregate = nn.ModuleList(GranularExtractor(dim, rates) for _ in range(num_levels))
        for branch in self.aggregate:
            nn.init.zeros_(branch.mix.weight)
            nn.init.zeros_(branch.mix.bias)

    def forward(self, levels: list[torch.Tensor]) -> list[torch.Tensor]:
        if len(levels) != len(self.aggregate):
            raise ValueError(
                f"MFE has {len(self.aggregate)} levels, got {len(levels)} feature maps"
            )
        return [x + aggregate(x) for aggregate, x in zip(self.aggregate, levels)]
