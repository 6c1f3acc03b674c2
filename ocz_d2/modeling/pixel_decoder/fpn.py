"""MaskFormer's pixel decoder (ZegFormer's): an FPN over a multi-scale CNN backbone."""

from __future__ import annotations

import fvcore.nn.weight_init as weight_init
import torch
import torch.nn as nn
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import Conv2d, ShapeSpec
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY

from .layers import selected_features, xavier_conv

__all__ = ["MaskFormerPixelDecoder"]


@SEM_SEG_HEADS_REGISTRY.register()
class MaskFormerPixelDecoder(nn.Module):
    """Mask features from a multi-scale backbone (a ResNet's ``res2..res5``) by an FPN.

    Top-down from the coarsest input: the coarsest map goes through a 3x3 conv (+ norm + ReLU);
    every finer map through a 1x1 lateral conv (+ norm), plus the nearest-upsampled coarser
    output, then a 3x3 conv (+ norm + ReLU). A 3x3 conv of the finest output gives the mask
    features (at the finest input's stride, 4 for a ResNet). The query decoder attends to one
    backbone map as it is (``transformer_in_feature``, MaskFormer's ``res5``), returned as the
    single "multi-scale" feature; ``decoder_in_channels`` is its width.

    Attributes (read by the meta-architecture): ``conv_dim`` (the FPN's width), ``mask_dim``,
    ``decoder_in_channels``.
    """

    @configurable
    def __init__(
        self,
        input_shape: dict[str, ShapeSpec],
        *,
        conv_dim: int,
        mask_dim: int,
        norm: str = "GN",
        transformer_in_feature: str = "res5",
    ):
        """
        Args:
            input_shape: name -> ShapeSpec(channels, stride) of the backbone maps used.
            conv_dim: width of the FPN.
            mask_dim: channels of the mask features.
            norm: norm of the FPN convs ("GN": 32 groups, ``conv_dim`` a multiple of 32; "BN";
                "" for none), as ``detectron2.layers.get_norm`` takes it.
            transformer_in_feature: the map handed to the query decoder; one of the inputs.
        """
        super().__init__()
        if not input_shape:
            raise ValueError("MaskFormerPixelDecoder: no input features; set IN_FEATURES.")
        if transformer_in_feature not in input_shape:
            raise ValueError(
                f"MODEL.OCZ.PIXEL_DECODER.TRANSFORMER_IN_FEATURE={transformer_in_feature!r} is "
                f"not among MODEL.SEM_SEG_HEAD.IN_FEATURES {sorted(input_shape)}: name one of them "
                "(MaskFormer and ZegFormer: res5)."
            )
        ordered = sorted(input_shape.items(), key=lambda kv: kv[1].stride, reverse=True)
        self.in_features = [name for name, _ in ordered]  # coarse to fine
        self.conv_dim = conv_dim
        self.mask_dim = mask_dim
        self.transformer_in_feature = transformer_in_feature
        self.decoder_in_channels = input_shape[transformer_in_feature].channels
        self.mask_stride = ordered[-1][1].stride
        coarsest_channels = ordered[0][1].channels
        self.top = xavier_conv(coarsest_channels, conv_dim, 3, norm, activation=F.relu)
        self.laterals = nn.ModuleList(
            xavier_conv(s.channels, conv_dim, 1, norm) for _, s in ordered[1:]
        )
        self.outputs = nn.ModuleList(
            xavier_conv(conv_dim, conv_dim, 3, norm, activation=F.relu) for _ in ordered[1:]
        )
        self.mask_features = Conv2d(conv_dim, mask_dim, kernel_size=3, padding=1)
        weight_init.c2_xavier_fill(self.mask_features)

    @classmethod
    def from_config(cls, cfg, input_shape: dict[str, ShapeSpec]) -> dict:
        head, ocz = cfg.MODEL.SEM_SEG_HEAD, cfg.MODEL.OCZ
        features = selected_features(cfg, input_shape)
        # The pyramid decoder's parts have no place here: say so rather than ignore them.
        unused = {
            "MODEL.OCZ.ORA.NUM_ROUNDS": ocz.ORA.NUM_ROUNDS > 0,
            "MODEL.OCZ.MFE.ENABLED": ocz.MFE.ENABLED,
            "MODEL.OCZ.PIXEL_DECODER.IMAGE_PATH.WIDTHS": bool(ocz.PIXEL_DECODER.IMAGE_PATH.WIDTHS),
        }
        if any(unused.values()):
            raise ValueError(
                f"MaskFormerPixelDecoder has no ORA, MFE or image path: switch off "
                f"{[k for k, on in unused.items() if on]} or use SimplePyramidPixelDecoder."
            )
        return {
            "input_shape": features,
            "conv_dim": head.CONVS_DIM,
            "mask_dim": head.MASK_DIM,
            "norm": head.NORM,
            "transformer_in_feature": ocz.PIXEL_DECODER.TRANSFORMER_IN_FEATURE,
        }

    def forward(self, features: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """
        Args:
            features: name -> [B, C_name, H / s_name, W / s_name]; must hold every input name
                (others are ignored).

        Returns:
            mask_features: [B, mask_dim, H / s, W / s] at the finest input stride s.
            multi_scale_features: ``[features[transformer_in_feature]]``, the map the query
                decoder attends to.
        """
        missing = [n for n in self.in_features if n not in features]
        if missing:
            raise KeyError(f"MaskFormerPixelDecoder: missing input features {missing}.")
        y = self.top(features[self.in_features[0]])
        for name, lateral, output in zip(self.in_features[1:], self.laterals, self.outputs):
            x = lateral(features[name])
            y = output(x + F.interpolate(y, size=x.shape[-2:], mode="nearest"))
        return self.mask_features(y), [features[self.transformer_in_feature]]
