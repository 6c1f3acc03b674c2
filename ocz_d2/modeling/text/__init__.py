"""Text side of ocz_d2: class-name embeddings from CLIP's text tower or from files."""

from .embeddings import TextEmbedder
from .templates import TEMPLATE_SETS, clean_class_name, get_templates
from .vocabulary import SYNONYM_SEPARATOR, Vocabulary, embed_vocabulary, name_key

__all__ = [
    "SYNONYM_SEPARATOR",
    "TEMPLATE_SETS",
    "TextEmbedder",
    "Vocabulary",
    "clean_class_name",
    "embed_vocabulary",
    "get_templates",
    "name_key",
]
