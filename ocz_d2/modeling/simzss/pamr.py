"""PAMR, pixel-adaptive mask refinement (Araslanov & Roth, CVPR 2020), written from the paper.

Scores are refined by repeated averaging over each pixel's neighbours (the 8 pixels of a 3x3
neighbourhood at each dilation), weighted by how similar the neighbours' colours are:
affinity(i, j) = mean over channels of -|I_i - I_j| / (0.1 * sigma_i + eps), sigma_i the
standard deviation of the channel over i's neighbours, then a softmax over the neighbours. A
refinement step is a convex combination of neighbouring scores, so scores stay in their range.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PAMR"]


def _neighbours(x: torch.Tensor, dilations: Sequence[int]) -> torch.Tensor:
    """[B, C, H, W] -> [B, C, N, H, W], the 8 neighbours at every dilation (edges replicated)."""
    out = []
    h, w = x.shape[-2:]
    for d in dilations:
        padded = F.pad(x, (d, d, d, d), mode="replicate")
        for dy in (-d, 0, d):
            for dx in (-d, 0, d):
                if dy == 0 and dx == 0:
                    continue
                out.append(padded[..., d + dy : d + dy + h, d + dx : d + dx + w])
    return torch.stack(out, dim=2)


class PAMR(nn.Module):
    """Refine [B, K, H, W] scores with the image's local colour affinities (module doc)."""

    def __init__(self, iters: int = 10, dilations: Sequence[int] = (1, 2)):
        super().__init__()
        if iters < 1 or not dilations or any(int(d) < 1 for d in dilations):
            raise ValueError(
                f"PAMR needs iters >= 1 and dilations >= 1, got {iters} and {list(dilations)} "
                "(MODEL.SIMZSS.TEST.PAMR_ITERS / PAMR_DILATIONS)"
            )
        self.iters = int(iters)
        self.dilations = tuple(int(d) for d in dilations)

    def affinity(self, image: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] image -> [B, N, H, W] weights over the N neighbours (sum 1)."""
        near = _neighbours(image, self.dilations)  # [B, C, N, H, W]
        sigma = near.std(dim=2, keepdim=True)
        diff = (near - image.unsqueeze(2)).abs() / (0.1 * sigma + 1e-8)
        return (-diff.mean(dim=1)).softmax(dim=1)

    @torch.no_grad()
    def forward(self, image: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """
        Args:
            image: [B, 3, H, W] (any scale; only relative differences count).
            scores: [B, K, H, W].

        Returns:
            [B, K, H, W] refined scores.
        """
        weights = self.affinity(image.to(scores.dtype)).unsqueeze(1)  # [B, 1, N, H, W]
        for _ in range(self.iters):
            scores = (_neighbours(scores, self.dilations) * weights).sum(dim=2)
        return scores
