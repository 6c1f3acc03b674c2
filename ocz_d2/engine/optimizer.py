"""Optimizer with per-module LR multipliers, and the warmup + poly schedule."""

from __future__ import annotations

import logging

import torch
from detectron2.solver import LRMultiplier, WarmupParamScheduler
from detectron2.solver.build import maybe_add_gradient_clipping
from fvcore.common.param_scheduler import PolynomialDecayParamScheduler
from torch import nn

logger = logging.getLogger(__name__)

_NO_DECAY_TYPES = (nn.GroupNorm, nn.LayerNorm, nn.BatchNorm2d, nn.Embedding)
# Parameter names that are embeddings in all but type: no weight decay.
_NO_DECAY_NAMES = ("prompt", "query_feat", "query_embed", "level_embed", "no_object", "logit_scale")


def lr_multiplier(name: str, backbone_multiplier: float, head_multiplier: float) -> float:
    """LR multiplier of a parameter, matched by module prefix.

    ``backbone.*`` (the visual and object prompts, CLIP itself being frozen; or a CNN backbone's
    weights) gets
    ``backbone_multiplier``, everything else (pixel decoder with ORA and granular attention,
    transformer decoder, text-side parameters) ``head_multiplier``.

    Choice: ORA is a new, randomly initialised module that transforms features, like the heads
    (OTSeg/ZegCLIP train those at x10), while the prompts are inputs to a pretrained network and
    keep the base rate; so ORA sits in the heads' group, the object prompts in the backbone's.
    """
    return backbone_multiplier if name.startswith("backbone.") else head_multiplier


def build_param_groups(
    model: nn.Module,
    *,
    base_lr: float,
    weight_decay: float,
    weight_decay_norm: float,
    weight_decay_embed: float,
    backbone_multiplier: float,
    head_multiplier: float,
) -> list[dict]:
    """The trainable parameters (frozen ones skipped) in one group per (LR, weight decay) pair,
    in the order of their first parameter: few groups, so that AdamW updates each group with one
    fused kernel."""
    groups: dict[tuple[float, float], dict] = {}
    seen = set()
    counts = {"backbone": 0, "head": 0}
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or param in seen:
                continue
            seen.add(param)
            name = f"{module_name}.{param_name}" if module_name else param_name
            decay = weight_decay
            if isinstance(module, _NO_DECAY_TYPES):
                decay = weight_decay_norm
            elif any(k in name for k in _NO_DECAY_NAMES):
                decay = weight_decay_embed
            mult = lr_multiplier(name, backbone_multiplier, head_multiplier)
            counts["backbone" if name.startswith("backbone.") else "head"] += param.numel()
            lr = base_lr * mult
            group = groups.setdefault((lr, decay), {"params": [], "lr": lr, "weight_decay": decay})
            group["params"].append(param)
    logger.info(
        "trainable parameters: backbone %.2fM x%g LR, heads %.2fM x%g LR",
        counts["backbone"] / 1e6,
        backbone_multiplier,
        counts["head"] / 1e6,
        head_multiplier,
    )
    return list(groups.values())


def build_optimizer(cfg, model: nn.Module) -> torch.optim.Optimizer:
    """AdamW (or SGD) over the trainable parameters, with Detectron2's gradient clipping."""
    groups = build_param_groups(
        model,
        base_lr=cfg.SOLVER.BASE_LR,
        weight_decay=cfg.SOLVER.WEIGHT_DECAY,
        weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
        weight_decay_embed=cfg.SOLVER.WEIGHT_DECAY_EMBED,
        backbone_multiplier=cfg.SOLVER.BACKBONE_MULTIPLIER,
        head_multiplier=cfg.SOLVER.HEAD_MULTIPLIER,
    )
    if not groups:
        raise ValueError("the model has no trainable parameter: check MODEL.OCZ.CLIP.FROZEN")
    name = cfg.SOLVER.OPTIMIZER.upper()
    if name == "ADAMW":
        # One fused kernel per group instead of a loop over the tensors (RESULTS.md).
        cls, kwargs = torch.optim.AdamW, {"fused": True}
    elif name == "SGD":
        cls, kwargs = torch.optim.SGD, {"momentum": cfg.SOLVER.MOMENTUM}
    else:
        raise ValueError(f"SOLVER.OPTIMIZER={cfg.SOLVER.OPTIMIZER!r}: use 'ADAMW' or 'SGD'")
    clip = cfg.SOLVER.CLIP_GRADIENTS
    if clip.ENABLED and clip.CLIP_TYPE == "full_model":
        cls = _with_full_model_clipping(cls, clip.CLIP_VALUE, clip.NORM_TYPE)
    else:  # Detectron2's per-parameter "value" / "norm" clipping, or none
        cls = maybe_add_gradient_clipping(cfg, cls)
    return cls(groups, lr=cfg.SOLVER.BASE_LR, **kwargs)


def _with_full_model_clipping(cls: type, max_norm: float, norm_type: float) -> type:
    """``cls`` whose ``step`` first clips the gradient norm over all parameters together
    (``SOLVER.CLIP_GRADIENTS.CLIP_TYPE = "full_model"``; Detectron2 only clips per parameter)."""

    class FullModelGradientClipping(cls):
        def step(self, closure=None):
            params = [p for group in self.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type)
            return super().step(closure)

    FullModelGradientClipping.__name__ = cls.__name__ + "WithFullModelGradientClip"
    return FullModelGradientClipping


def build_lr_scheduler(cfg, optimizer: torch.optim.Optimizer):
    """Linear warmup then poly decay (``SOLVER.LR_SCHEDULER_NAME = "WarmupPolyLR"``).

    Other names go to Detectron2's own builder (WarmupMultiStepLR, WarmupCosineLR).
    """
    if cfg.SOLVER.LR_SCHEDULER_NAME != "WarmupPolyLR":
        from detectron2.solver import build_lr_scheduler as d2_build

        return d2_build(cfg, optimizer)
    max_iter = cfg.SOLVER.MAX_ITER
    sched = WarmupParamScheduler(
        PolynomialDecayParamScheduler(1.0, cfg.SOLVER.POLY_LR_POWER),
        cfg.SOLVER.WARMUP_FACTOR,
        min(cfg.SOLVER.WARMUP_ITERS / max(max_iter, 1), 1.0),
        cfg.SOLVER.WARMUP_METHOD,
    )
    return LRMultiplier(optimizer, multiplier=sched, max_iter=max_iter)
