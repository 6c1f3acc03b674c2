"""Layers shared by the pixel decoders."""

from __future__ import annotations

import fvcore.nn.weight_init as weight_init
from detectron2.layers import Conv2d, get_norm

__all__ = ["xavier_conv"]


def xavier_conv(in_ch: int, out_ch: int, kernel: int, norm: str, activation=None) -> Conv2d:
    """A ``kernel`` x ``kernel`` conv at stride 1 keeping the size, with Detectron2's ``norm``
    (bias only without one), an optional activation and Caffe2's Xavier initialisation."""
    conv = Conv2d(
        in_ch,
        out_ch,
        kernel_size=kernel,
        padding=kernel // 2,
        bias=not norm,
        norm=get_norm(norm, out_ch),
        activation=activation,
    )
    weight_init.c2_xavier_fill(conv)
    return conv
