"""SimZSS's parts: its losses and the dense inference helpers (PAMR)."""

from .losses import concept_loss, global_infonce, pool_visual_concepts, text_concepts
from .pamr import PAMR

__all__ = ["PAMR", "concept_loss", "global_infonce", "pool_visual_concepts", "text_concepts"]
