"""ocz_d2."""
from .config import add_ocz_config
from .version import __version__

__all__ = ["add_ocz_config", "__version__"]
