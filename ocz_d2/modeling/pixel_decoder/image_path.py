"""A light high-resolution path from the image into the pixel decoder (the miniature's option).

A frozen ViT sees the image through its patch grid: at patch 16, one token covers a 16 x 16
block, and detail finer than a patch (a texture period of 6-12 px) reaches the pixel decoder only
as what the frozen tokens happen to encode. SAN's side adapter and CAT-Seg's upsampling guidance
add a small trainable path from the image itself; this is the simplest form of that design: a
strided conv stem whose stride-s outputs are added to the pyramid level of stride s.

Off in every paper-scale config (``MODEL.OCZ.PIXEL_DECODER.IMAGE_PATH.WIDTHS: []``): the methods
reproduced here do not have it. The CPU miniature uses it (docs/DESIGN.md, "The miniature").
"""

from __future__ import annotations

from collections.abc import Sequence

import fvcore.nn.weight_init as weight_init
import torch
from detectron2.layers import Conv2d, get_norm
from torch import nn
from torch.nn import functional as F

__all__ = ["IMAGE_KEY", "ImageDetailPath"]

#: Key of the backbone feature dict under which the meta-architecture passes the normalised,
#: padded image batch [B, 3, H, W] to the pixel decoder.
IMAGE_KEY = "image"


def _conv(in_ch: int, out_ch: int, stride: int, norm: str) -> Conv2d:
    conv = Conv2d(
        in_ch,
        out_ch,
        kernel_size=3,
        stride=stride,
        padding=1,
        bias=not norm,
        norm=get_norm(norm, out_ch),
        activation=F.relu,
    )
    weight_init.c2_msra_fill(conv)
    return conv


class ImageDetailPath(nn.Module):
    """Stage i (of ``len(widths)``) halves the resolution: a stride-2 3x3 conv then ``depths[i]``
    3x3 convs (one by default), each with norm and ReLU, to ``widths[i]`` channels; its output
    has stride ``2 ** (i + 1)``. The outputs at ``out_strides`` are projected by a 1x1 conv to
    ``out_dim`` channels.

    Maps [B, 3, H, W] -> {stride: [B, out_dim, ceil(H / stride), ceil(W / stride)]}.
    """

    def __init__(
        self,
        widths: Sequence[int],
        out_strides: Sequence[int],
        out_dim: int,
        norm: str = "GN",
        in_channels: int = 3,
        depths: Sequence[int] = (),
    ):
        super().__init__()
        if not widths:
            raise ValueError("ImageDetailPath: widths is empty (the path is off: do not build it)")
        depths = [int(d) for d in depths] if depths else [1] * len(widths)
        if len(depths) != len(widths) or min(depths) < 0:
            raise ValueError(
                f"ImageDetailPath: depths {list(depths)} must give a count >= 0 of stride-1 convs "
                f"for each of the {len(widths)} stages of widths {list(widths)} (or be empty: "
                "one each)."
            )
        stage_strides = [2 ** (i + 1) for i in range(len(widths))]
        wanted = sorted(set(int(s) for s in out_strides) & set(stage_strides))
        if not wanted:
            raise ValueError(
                f"ImageDetailPath: its stages have strides {stage_strides}, none of which is a "
                f"pyramid level ({sorted(out_strides)}); lengthen "
                "MODEL.OCZ.PIXEL_DECODER.IMAGE_PATH.WIDTHS to reach a level's stride."
            )
        # GroupNorm's 32 groups need widths that are multiples of 32.
        bad = [w for w in widths if norm == "GN" and w % 32]
        if bad:
            raise ValueError(
                f"ImageDetailPath: widths {list(widths)} with norm GN: every width must be a "
                "multiple of 32 (GroupNorm's 32 groups)."
            )
        self.stages = nn.ModuleList()
        prev = in_channels
        for width, depth in zip(widths[: stage_strides.index(wanted[-1]) + 1], depths):
            convs = [_conv(prev, width, 2, norm)]
            convs += [_conv(width, width, 1, norm) for _ in range(depth)]
            self.stages.append(nn.Sequential(*convs))
            prev = width
        self.out_proj = nn.ModuleDict()
        for stride in wanted:
            proj = Conv2d(widths[stage_strides.index(stride)], out_dim, kernel_size=1)
            weight_init.c2_xavier_fill(proj)
            self.out_proj[str(stride)] = proj
        self.out_strides = wanted

    def forward(self, image: torch.Tensor) -> dict[int, torch.Tensor]:
        outputs = {}
        x = image
        for i, stage in enumerate(self.stages):
            x = stage(x)
            stride = 2 ** (i + 1)
            if stride in self.out_strides:
                outputs[stride] = self.out_proj[str(stride)](x)
        return outputs
