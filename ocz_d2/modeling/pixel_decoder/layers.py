"""Layers shared by the pixel decoders."""

from __future__ import annotations

import fvcore.nn.weight_init as weight_init
from detectron2.layers import Conv2d, ShapeSpec, get_norm

__all__ = ["selected_features", "xavier_conv"]


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


def selected_features(cfg, input_shape: dict[str, ShapeSpec]) -> dict[str, ShapeSpec]:
    """The backbone outputs that ``MODEL.SEM_SEG_HEAD.IN_FEATURES`` names, in its order.

    Raises:
        ValueError: a named feature the backbone does not output.
    """
    names = list(cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES)
    missing = [n for n in names if n not in input_shape]
    if missing:
        raise ValueError(
            f"MODEL.SEM_SEG_HEAD.IN_FEATURES names {missing}, which the backbone does not "
            f"output; it outputs {sorted(input_shape)}."
        )
    return {n: input_shape[n] for n in names}
