"""Prepare the real benchmarks (VOC 2012 + SBD, COCO-Stuff 164k, PASCAL Context-59,
ADE20K-150) from their raw downloads; the command lines are ``datasets/prepare_*.py``."""

from .ade20k import prepare_ade20k
from .coco_captions import prepare_coco_captions
from .coco_stuff import prepare_coco_stuff
from .common import PrepareError, PrepareResult, format_summary
from .context import prepare_context
from .voc import prepare_voc

__all__ = [
    "PrepareError",
    "PrepareResult",
    "format_summary",
    "prepare_ade20k",
    "prepare_coco_captions",
    "prepare_coco_stuff",
    "prepare_context",
    "prepare_voc",
]
