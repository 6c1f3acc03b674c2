"""ocz_d2: object-centric zero-shot semantic segmentation on Detectron2.

Importing the package registers its Detectron2 components (meta-architecture, backbone, heads)
and the builtin dataset splits.
"""

import warnings as _warnings

# fvcore and Detectron2 call torch.jit.script when imported, which recent torch versions flag
# with a FutureWarning that nobody here can act on: imported first under a filter, they stay
# quiet; every other warning, and torch.jit.script called later, still shows.
with _warnings.catch_warnings():
    _warnings.filterwarnings(
        "ignore", message="`torch.jit.script` is deprecated", category=FutureWarning
    )
    import detectron2.modeling  # noqa: F401
    import fvcore.nn  # noqa: F401

from . import data, modeling  # noqa: F401  (registration side effects)
from .config import add_ocz_config
from .version import __version__

__all__ = ["add_ocz_config", "__version__"]
