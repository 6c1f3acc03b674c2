"""Text side of ocz_d2: class-name embeddings from CLIP's text tower or from files."""

from .embeddings import TextEmbedder
from .templates import TEMPLATE_SETS, clean_class_name, get_templates

__all__ = [
    "TEMPLATE_SETS",
    "TextEmbedder",
    "clean_class_name",
    "get_templates",
]
