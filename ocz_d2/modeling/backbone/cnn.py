"""A trainable CNN backbone beside a frozen CLIP (ZegFormer's design).

ZegFormer segments with a ResNet that trains (Detectron2's ``build_resnet_backbone``, ImageNet
weights) and classifies with a frozen CLIP: its text tower embeds the class names, its image
tower classifies the segments at test time. Here the backbone is Detectron2's ResNet as
``MODEL.BACKBONE.NAME`` builds it; this module loads its initial weights
(``MODEL.OCZ.RESNET.WEIGHTS``) and builds the frozen CLIP that the meta-architecture keeps
beside it (:func:`build_clip_tower`).
"""

from __future__ import annotations

import logging

from detectron2.checkpoint import DetectionCheckpointer
from torch import nn

from ...utils.io import resolve_weights_path
from .clip_prompt import CLIPPromptBackbone

__all__ = ["build_clip_tower", "load_backbone_weights", "resolve_backbone_weights"]

logger = logging.getLogger(__name__)

_KEY = "MODEL.OCZ.RESNET.WEIGHTS"
_FIX = (
    f"fix {_KEY}: a local file in Detectron2's format (e.g. R-101.pkl from Detectron2's model "
    "zoo, or torchvision's weights converted by Detectron2's convert-torchvision-to-d2.py), the "
    "model-zoo URL detectron2://ImageNetPretrained/MSRA/R-101.pkl where downloads work, or '' "
    "to train the ResNet from scratch"
)


def resolve_backbone_weights(weights: str) -> str:
    """``MODEL.OCZ.RESNET.WEIGHTS`` as a loadable path: a URL (``scheme://``) as given, a local
    file as found by :func:`~ocz_d2.utils.io.resolve_weights_path` (working directory, then
    ``$DETECTRON2_DATASETS``).

    Raises:
        FileNotFoundError: a local file that is nowhere; the message names the key and the fix.
    """
    if "://" in weights:
        return weights
    return resolve_weights_path(weights, key=_KEY, fix=_FIX)


def load_backbone_weights(backbone: nn.Module, weights: str) -> None:
    """Load initial weights into a CNN backbone with Detectron2's checkpointer (it converts the
    model zoo's Caffe2 names and matches names by suffix).

    Args:
        backbone: the backbone (e.g. Detectron2's ``ResNet``).
        weights: ``MODEL.OCZ.RESNET.WEIGHTS`` (see :func:`resolve_backbone_weights`).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: not one of the backbone's tensors is in the file (a file of another model).
    """
    path = resolve_backbone_weights(weights)
    checkpointer = DetectionCheckpointer(backbone)
    checkpoint = checkpointer._load_file(checkpointer.path_manager.get_local_path(path))
    incompatible = checkpointer._load_model(checkpoint)
    names = {name for name, _ in backbone.named_parameters()}
    if names and set(incompatible.missing_keys) >= names:
        raise ValueError(
            f"{_KEY}={weights!r} holds none of the backbone's {len(names)} tensors (e.g. "
            f"{sorted(names)[:2]}): it is not a checkpoint of this backbone; {_FIX}."
        )
    checkpointer._log_incompatible_keys(incompatible)
    logger.info("Backbone initialised from %s", path)


def build_clip_tower(cfg) -> CLIPPromptBackbone:
    """The frozen CLIP kept beside a CNN backbone: ``MODEL.OCZ.CLIP``'s model and weights,
    without prompts; its text tower embeds the class names (unless an embedding file replaces
    it), its image tower serves test-time segment classification (``MODEL.OCZ.SEGMENT_CLIP``).

    Raises:
        ValueError: ``MODEL.OCZ.CLIP.FROZEN`` is False (ZegFormer's CLIP does not train).
    """
    clip = cfg.MODEL.OCZ.CLIP
    if not clip.FROZEN:
        raise ValueError(
            f"MODEL.OCZ.CLIP.FROZEN is False, but the CLIP beside a CNN backbone "
            f"({cfg.MODEL.BACKBONE.NAME}) is frozen: set it True"
        )
    return CLIPPromptBackbone(
        model_name=clip.MODEL_NAME,
        pretrained=clip.PRETRAINED,
        weights=clip.WEIGHTS,
        num_prompts=0,
        num_objects=0,
        out_layers=(),
        frozen=True,
        keep_text_tower=not cfg.MODEL.OCZ.TEXT.EMBEDDINGS_FILE,
    )
