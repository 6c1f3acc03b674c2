"""Builtin zero-shot splits shipped with ocz_d2, registered lazily on ``import ocz_d2.data``.

Their data may not exist yet: the file-system checks run on the first ``DatasetCatalog.get``.
"""

from __future__ import annotations

import os
from pathlib import Path

from .split_file import register_split_file

__all__ = [
    "SYNTHETIC_SPLIT_FILE",
    "SYNTHETIC_ATTR_SPLIT_FILE",
    "BENCHMARK_SPLIT_FILES",
    "FULL_LABEL_SET_TARGETS",
    "register_all_synthetic",
    "register_all_benchmarks",
]

_SPLITS_DIR = Path(__file__).resolve().parent / "splits"
#: The package's split file of the synthetic benchmark (class names through CLIP's text tower).
SYNTHETIC_SPLIT_FILE = _SPLITS_DIR / "synthetic.yaml"
#: The same images with the attribute-composed class-embedding file (the random-CLIP route).
SYNTHETIC_ATTR_SPLIT_FILE = _SPLITS_DIR / "synthetic_attr.yaml"


def register_all_synthetic(root: str | os.PathLike | None = None) -> list[str]:
    """Register ``ocz_synthetic_{train,val,test}``, ``ocz_synthetic_attr_{train,val,test}`` and
    ``ocz_synthetic_supervised_{train,val,test}`` (lazily). The supervised copy is the same
    images with every class annotated (no unseen class): its test mIoU is the miniature's fully
    supervised upper bound (``configs/synthetic/ocz_tiny_supervised.yaml``).

    Args:
        root: the datasets folder that holds ``ocz_synthetic/``; ``None`` uses
            ``$DETECTRON2_DATASETS`` (default ``"datasets"``). Create the data with
            ``python tools/prepare_synthetic.py``.

    Returns:
        The registered names. Calling again with the same root is a no-op.
    """
    names = [
        name
        for path in (SYNTHETIC_SPLIT_FILE, SYNTHETIC_ATTR_SPLIT_FILE)
        for name in register_split_file(path, root=root, lazy=True)
    ]
    return names + register_split_file(
        SYNTHETIC_SPLIT_FILE, root=root, lazy=True, dataset="synthetic_supervised", unseen=[]
    )


#: The real benchmarks' split files (``datasets/prepare_*.py`` make their data): registered as
#: ``ocz_<dataset>_{train,val}`` with the seen/unseen split of docs/PROTOCOLS.md.
BENCHMARK_SPLIT_FILES = tuple(
    _SPLITS_DIR / name
    for name in (
        "voc.yaml",
        "coco_stuff.yaml",
        "context59_zs3.yaml",
        "context59_cascade.yaml",
        "ade150.yaml",
    )
)
#: Cross-domain targets evaluated over their full label set (no unseen class): split file ->
#: registered dataset base. ADE-150's own split file already has no unseen class
#: (``ocz_ade150_val``).
FULL_LABEL_SET_TARGETS = {
    _SPLITS_DIR / "voc.yaml": "voc_all",
    _SPLITS_DIR / "context59_zs3.yaml": "context59_all",
}


def register_all_benchmarks(root: str | os.PathLike | None = None) -> list[str]:
    """Register the real benchmarks lazily (their data may not exist yet).

    Names: ``ocz_voc_{train,val}``, ``ocz_coco_stuff_{train,val}``,
    ``ocz_context59_zs3_{train,val}``, ``ocz_context59_cascade_{train,val}`` (the two published
    10-class Context splits), ``ocz_ade150_{train,val}``, and the full-label-set
    targets ``ocz_voc_all_val`` and ``ocz_context59_all_val`` (same classes and files as their
    split file, the unseen list emptied: every class is evaluated as one set).

    Args:
        root: the datasets folder; ``None`` uses ``$DETECTRON2_DATASETS``.

    Returns:
        The registered names. Calling again with the same root is a no-op.
    """
    names = [
        n for path in BENCHMARK_SPLIT_FILES for n in register_split_file(path, root=root, lazy=True)
    ]
    for path, base in FULL_LABEL_SET_TARGETS.items():
        names += register_split_file(
            path, root=root, lazy=True, dataset=base, unseen=[], splits=["val"]
        )
    return names
