"""ocz_d2: object-centric zero-shot semantic segmentation on Detectron2.

Importing the package registers its Detectron2 components (meta-architecture, backbone, heads)
and the builtin dataset splits.
"""

from . import data, modeling  # noqa: F401  (registration side effects)
from .config import add_ocz_config
from .version import __version__

__all__ = ["add_ocz_config", "__version__"]
