"""Builtin zero-shot splits shipped with ocz_d2, registered lazily on ``import ocz_d2.data``.

Their data may not exist yet: the file-system checks run on the first ``DatasetCatalog.get``.
"""

from __future__ import annotations

import os
from pathlib import Path

from .split_file import register_split_file

__all__ = ["SYNTHETIC_SPLIT_FILE", "register_all_synthetic"]

#: The package's split file of the synthetic benchmark (found through ``__file__``).
SYNTHETIC_SPLIT_FILE = Path(__file__).resolve().parent / "splits" / "synthetic.yaml"


def register_all_synthetic(root: str | os.PathLike | None = None) -> list[str]:
    """Register ``ocz_synthetic_train`` and ``ocz_synthetic_val`` (lazily).

    Args:
        root: the datasets folder that holds ``ocz_synthetic/``; ``None`` uses
            ``$DETECTRON2_DATASETS`` (default ``"datasets"``). Create the data with
            ``python tools/prepare_synthetic.py``.

    Returns:
        The registered names. Calling again with the same root is a no-op.
    """
    return register_split_file(SYNTHETIC_SPLIT_FILE, root=root, lazy=True)
