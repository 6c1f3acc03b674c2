"""Builtin zero-shot splits shipped with ocz_d2, registered lazily on ``import ocz_d2.data``.

Their data may not exist yet: the file-system checks run on the first ``DatasetCatalog.get``.
"""

from __future__ import annotations

import os
from pathlib import Path

from .split_file import register_split_file

__all__ = ["SYNTHETIC_SPLIT_FILE", "SYNTHETIC_ATTR_SPLIT_FILE", "register_all_synthetic"]

_SPLITS_DIR = Path(__file__).resolve().parent / "splits"
#: The package's split file of the synthetic benchmark (class names through CLIP's text tower).
SYNTHETIC_SPLIT_FILE = _SPLITS_DIR / "synthetic.yaml"
#: The same images with the attribute-composed class-embedding file (the random-CLIP route).
SYNTHETIC_ATTR_SPLIT_FILE = _SPLITS_DIR / "synthetic_attr.yaml"


def register_all_synthetic(root: str | os.PathLike | None = None) -> list[str]:
    """Register ``ocz_synthetic_{train,val,test}`` and ``ocz_synthetic_attr_{train,val,test}``
    (lazily).

    Args:
        root: the datasets folder that holds ``ocz_synthetic/``; ``None`` uses
            ``$DETECTRON2_DATASETS`` (default ``"datasets"``). Create the data with
            ``python tools/prepare_synthetic.py``.

    Returns:
        The registered names. Calling again with the same root is a no-op.
    """
    return [
        name
        for path in (SYNTHETIC_SPLIT_FILE, SYNTHETIC_ATTR_SPLIT_FILE)
        for name in register_split_file(path, root=root, lazy=True)
    ]
