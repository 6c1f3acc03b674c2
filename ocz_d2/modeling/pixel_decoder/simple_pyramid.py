"""A ViTDet-style simple feature pyramid from single-scale ViT features, with FPN fusion."""

from __future__ import annotations

import logging

import fvcore.nn.weight_init as weight_init
import torch
import torch.nn as nn
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import Conv2d, ShapeSpec, get_norm
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY

from ..padding import PATCH_VALID_KEY
from .image_path import IMAGE_KEY, ImageDetailPath
from .layers import selected_features, xavier_conv
from .mfe import MultiScaleFeatureEnhancement
from .ora import ObjectRefinementAttention

__all__ = ["SimplePyramidPixelDecoder"]

logger = logging.getLogger(__name__)


def _log2_ratio(stride: int, base: int) -> int:
    """Signed log2 of ``stride / base``; raises unless the ratio is a power of 2."""
    big, small = max(stride, base), min(stride, base)
    ratio = big // small
    if big % small or ratio & (ratio - 1):
        raise ValueError(
            f"SimplePyramidPixelDecoder: stride {stride} is not a power-of-2 multiple or fraction "
            f"of the backbone stride {base}; choose MODEL.OCZ.PIXEL_DECODER.DECODER_STRIDES and "
            "MASK_STRIDE among base * 2**k."
        )
    steps = ratio.bit_length() - 1
    return steps if stride >= base else -steps


class _ScaleBlock(nn.Sequential):
    """Resample a stride-p map to stride ``p * 2**steps`` (ViTDet): 2x2 deconvs (steps < 0) or
    2x2 max-pools (steps > 0), then a 1x1 and a 3x3 conv, each followed by the norm."""

    def __init__(self, dim: int, steps: int, norm: str):
        layers: list[nn.Module] = []
        for i in range(-steps):
            layers.append(nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2))
            if i < -steps - 1:
                norm_layer = get_norm(norm, dim)
                if norm_layer is not None:
                    layers.append(norm_layer)
                layers.append(nn.GELU())
        for _ in range(steps):
            # ceil_mode: odd grids keep their border row/column (33 -> 17, like a strided conv).
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True))
        layers.append(xavier_conv(dim, dim, 1, norm))
        layers.append(xavier_conv(dim, dim, 3, norm))
        super().__init__(*layers)


@SEM_SEG_HEADS_REGISTRY.register()
class SimplePyramidPixelDecoder(nn.Module):
    """Multi-scale pixel features from the single-stride feature maps of a plain ViT.

    0. Refine (optional): an ``refiner`` (ORA) replaces the deepest input map (the last of
       ``IN_FEATURES``) by its refinement with the object features ``features["objects"]``
       (absent: the refiner's own learned objects). Which map that is, is the config's choice:
       ``res11`` (ViT-B's last block, before ``ln_post``; the shipped configs) or ``patch`` (the
       same tokens after ``ln_post``, the space of the object features).
    1. Fuse: every input map (e.g. several CLIP layers and the refined patch features, all at
       backbone stride p) is projected by a 1x1 conv (+ norm) to ``conv_dim``; the projections
       are summed (choice: one shared base map, as in ViTDet's single-input pyramid, with the
       intermediate layers adding detail).
    2. Pyramid: per output stride s (``decoder_strides`` and ``mask_stride``, powers of 2 times
       p), ``log2(p / s)`` 2x2 deconvolutions or ``log2(s / p)`` 2x2 max-pools, then 1x1 and 3x3
       convs.
    3. FPN: top-down from the coarsest level, each finer level adds the nearest-upsampled coarser
       output and goes through a 3x3 conv + norm + ReLU; the finest (``mask_stride``) output
       gives ``mask_features`` by a 1x1 conv.
    2b. Image path (optional, ``image_path_widths``; the miniature's): :class:`ImageDetailPath`,
       a small conv stem on the image (``features["image"]``), adds its stride-s output to the
       pyramid level of stride s, before the FPN.
    4. MFE (optional, ``mfe_rates``): :class:`MultiScaleFeatureEnhancement` refines every FPN
       output (a residual multi-receptive-field aggregation per level) before it is returned or
       projected to the mask features.

    Any input size works: from an h x w input grid, a level 2**k times finer is
    (h * 2**k) x (w * 2**k) and a level 2**k times coarser is ceil(h / 2**k) x ceil(w / 2**k).
    """

    @configurable
    def __init__(
        self,
        input_shape: dict[str, ShapeSpec],
        *,
        conv_dim: int,
        mask_dim: int,
        norm: str = "GN",
        decoder_strides: tuple[int, ...] = (32, 16, 8),
        mask_stride: int = 4,
        refiner: nn.Module | None = None,
        mfe_rates: tuple[int, ...] | None = None,
        image_path_widths: tuple[int, ...] = (),
        image_path_depths: tuple[int, ...] = (),
    ):
        """
        Args:
            input_shape: name -> ShapeSpec(channels, stride) of the features used, in order;
                all strides must be equal.
            conv_dim: width of the pyramid and of ``multi_scale_features``.
            mask_dim: channels of ``mask_features``.
            norm: "GN" (32 groups: ``conv_dim`` must be a multiple of 32), "BN", "" (none), ...
                as accepted by ``detectron2.layers.get_norm``.
            decoder_strides: strides of the levels given to the transformer decoder, in the order
                returned (coarse to fine by convention).
            mask_stride: stride of ``mask_features``; at most min(decoder_strides).
            refiner: optional module ``refiner(pf [B, C, h, w], objects [B, n, C] | None,
                valid [B, h, w] | None) -> [B, C, h, w]`` applied to the last input feature
                (ORA); ``valid`` is ``features["patch_valid"]``, the patches that hold image.
                None: no refinement.
            mfe_rates: dilation rates of MFE on every output level; None: no MFE.
            image_path_widths: stage widths of the image path (stage i at stride 2**(i+1));
                empty: no image path.
            image_path_depths: stride-1 convs of each image-path stage after its stride-2
                conv; empty: one each.
        """
        super().__init__()
        if not input_shape:
            raise ValueError("SimplePyramidPixelDecoder: no input features; set IN_FEATURES.")
        strides = {spec.stride for spec in input_shape.values()}
        if len(strides) != 1:
            raise ValueError(
                "SimplePyramidPixelDecoder expects single-stride ViT features, got strides "
                f"{ {k: v.stride for k, v in input_shape.items()} }."
            )
        self.in_features = list(input_shape)
        self.backbone_stride = strides.pop()
        self.decoder_strides = [int(s) for s in decoder_strides]
        self.mask_stride = int(mask_stride)
        if not self.decoder_strides:
            raise ValueError("SimplePyramidPixelDecoder: DECODER_STRIDES is empty.")
        if self.mask_stride > min(self.decoder_strides):
            raise ValueError(
                f"SimplePyramidPixelDecoder: MASK_STRIDE {self.mask_stride} must not exceed the "
                f"finest decoder stride {min(self.decoder_strides)}."
            )
        self.conv_dim = conv_dim
        self.mask_dim = mask_dim
        self.refined_feature = self.in_features[-1]
        self.refiner = refiner

        self.input_proj = nn.ModuleDict(
            {
                name: xavier_conv(spec.channels, conv_dim, 1, norm)
                for name, spec in input_shape.items()
            }
        )
        # All pyramid levels, coarse to fine; the mask stride is the finest.
        self.level_strides = sorted(set(self.decoder_strides) | {self.mask_stride}, reverse=True)
        self.scale_blocks = nn.ModuleList(
            _ScaleBlock(conv_dim, _log2_ratio(s, self.backbone_stride), norm)
            for s in self.level_strides
        )
        self.fpn_convs = nn.ModuleList(
            xavier_conv(conv_dim, conv_dim, 3, norm, activation=F.relu)
            for _ in self.level_strides[1:]
        )
        # Optional parts draw their weights without moving the RNG, so the layers after them
        # start the same with or without them (paired comparisons).
        with torch.random.fork_rng(devices=[]):
            self.mfe = (
                MultiScaleFeatureEnhancement(conv_dim, mfe_rates, len(self.level_strides))
                if mfe_rates
                else None
            )

        with torch.random.fork_rng(devices=[]):  # its own fork: the same with or without MFE
            self.image_path = (
                ImageDetailPath(
                    image_path_widths,
                    self.level_strides,
                    conv_dim,
                    norm,
                    depths=image_path_depths,
                )
                if image_path_widths
                else None
            )
        self.mask_proj = Conv2d(conv_dim, mask_dim, kernel_size=1)
        weight_init.c2_xavier_fill(self.mask_proj)
        logger.debug(
            "SimplePyramidPixelDecoder: inputs %s at stride %d, levels %s, mask stride %d",
            self.in_features,
            self.backbone_stride,
            self.level_strides,
            self.mask_stride,
        )

    @classmethod
    def from_config(cls, cfg, input_shape: dict[str, ShapeSpec]) -> dict:
        head = cfg.MODEL.SEM_SEG_HEAD
        features = selected_features(cfg, input_shape)
        return {
            "input_shape": features,
            "conv_dim": head.CONVS_DIM,
            "mask_dim": head.MASK_DIM,
            "norm": head.NORM,
            "decoder_strides": tuple(cfg.MODEL.OCZ.PIXEL_DECODER.DECODER_STRIDES),
            "mask_stride": cfg.MODEL.OCZ.PIXEL_DECODER.MASK_STRIDE,
            "refiner": build_object_refiner(cfg, list(features.values())[-1].channels)
            if features
            else None,
            "mfe_rates": tuple(cfg.MODEL.OCZ.MFE.RATES) if cfg.MODEL.OCZ.MFE.ENABLED else None,
            "image_path_widths": tuple(cfg.MODEL.OCZ.PIXEL_DECODER.IMAGE_PATH.WIDTHS),
            "image_path_depths": tuple(cfg.MODEL.OCZ.PIXEL_DECODER.IMAGE_PATH.DEPTHS),
        }

    def forward(self, features: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """
        Args:
            features: name -> [B, C_name, H/p, W/p]; must contain every name of
                ``self.in_features`` (others are ignored); with a refiner, optionally "objects"
                [B, n_o, C] (object features OF); with an image path, "image" [B, 3, H, W]
                (the normalised batch, H = h * p).

        Returns:
            mask_features: [B, mask_dim, h_m, w_m] at ``mask_stride``.
            multi_scale_features: one [B, conv_dim, h_i, w_i] per ``decoder_strides`` entry, in
                that order.
        """
        missing = [n for n in self.in_features if n not in features]
        if missing:
            raise KeyError(f"SimplePyramidPixelDecoder: missing input features {missing}.")
        sizes = {tuple(features[n].shape[-2:]) for n in self.in_features}
        if len(sizes) != 1:
            raise ValueError(
                f"SimplePyramidPixelDecoder: input features differ in spatial size: {sizes}."
            )
        inputs = {n: features[n] for n in self.in_features}
        if self.refiner is not None:
            name = self.refined_feature
            inputs[name] = self.refiner(
                inputs[name], features.get("objects"), features.get(PATCH_VALID_KEY)
            )
        base = sum(self.input_proj[n](inputs[n]) for n in self.in_features)
        levels = [block(base) for block in self.scale_blocks]
        if self.image_path is not None:
            if IMAGE_KEY not in features:
                raise KeyError(
                    f"SimplePyramidPixelDecoder: the image path needs features[{IMAGE_KEY!r}], "
                    "the normalised image batch (the meta-architecture passes it)."
                )
            detail = self.image_path(features[IMAGE_KEY])
            for i, stride in enumerate(self.level_strides):
                if stride in detail:
                    if detail[stride].shape[-2:] != levels[i].shape[-2:]:
                        raise ValueError(
                            f"SimplePyramidPixelDecoder: the image path's stride-{stride} map is "
                            f"{tuple(detail[stride].shape[-2:])}, the pyramid level "
                            f"{tuple(levels[i].shape[-2:])}: the image must be the backbone "
                            "grid times the patch size."
                        )
                    levels[i] = levels[i] + detail[stride]

        outputs = [levels[0]]
        for level, conv in zip(levels[1:], self.fpn_convs):
            top_down = F.interpolate(outputs[-1], size=level.shape[-2:], mode="nearest")
            outputs.append(conv(level + top_down))
        if self.mfe is not None:
            outputs = self.mfe(outputs)
        by_stride = dict(zip(self.level_strides, outputs))
        mask_features = self.mask_proj(by_stride[self.mask_stride])
        return mask_features, [by_stride[s] for s in self.decoder_strides]


ORA_OBJECT_INITS = ("prompts", "random")


def build_object_refiner(cfg, channels: int) -> ObjectRefinementAttention | None:
    """ORA from ``cfg.MODEL.OCZ.ORA`` for patch features of ``channels`` channels; None when
    S = 0.

    Raises:
        ValueError: when the object source does not fit ``MODEL.OCZ.OBJECTS``.
    """
    ora, objects = cfg.MODEL.OCZ.ORA, cfg.MODEL.OCZ.OBJECTS
    if ora.NUM_ROUNDS <= 0:
        return None
    if ora.OBJECT_INIT not in ORA_OBJECT_INITS:
        raise ValueError(f"MODEL.OCZ.ORA.OBJECT_INIT={ora.OBJECT_INIT!r}: use {ORA_OBJECT_INITS}.")
    if objects.NUM <= 0:
        raise ValueError(
            "MODEL.OCZ.ORA.NUM_ROUNDS > 0 needs objects: set MODEL.OCZ.OBJECTS.NUM (n_o) > 0."
        )
    prompts = bool(objects.PROMPTS)
    if (ora.OBJECT_INIT == "prompts") != prompts:
        raise ValueError(
            f"MODEL.OCZ.ORA.OBJECT_INIT={ora.OBJECT_INIT!r} does not fit MODEL.OCZ.OBJECTS.PROMPTS="
            f"{prompts}: ORA starts from the object prompts ('prompts', with PROMPTS True) or "
            "from learned embeddings ('random', with PROMPTS False)."
        )
    # Drawn without moving the RNG: the pixel decoder's own layers start the same with or
    # without ORA (paired comparisons).
    with torch.random.fork_rng(devices=[]):
        return ObjectRefinementAttention(
            channels,
            dim=ora.DIM,
            num_rounds=ora.NUM_ROUNDS,
            num_heads=ora.NHEADS,
            num_objects=objects.NUM if ora.OBJECT_INIT == "random" else 0,
            granular_rates=tuple(ora.GRANULAR_RATES) if ora.GRANULAR else None,
        )
