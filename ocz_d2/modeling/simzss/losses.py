"""SimZSS's losses: a global InfoNCE and the concept loss.

- Global: symmetric InfoNCE between the images' CLS embeddings and the captions' end-of-text
  embeddings (both L2-normalised), at a learned scale.
- Concept: a caption's concept is the sum of its tokens' output embeddings, normalised
  (:func:`text_concepts`). Its visual concept is the image's patch features averaged with the
  weights softmax over patches of cos(concept, patch) / tau (:func:`pool_visual_concepts`),
  normalised. Each visual concept is classified among the batch's concepts: the class weight of
  concept id c is the normalised sum of the batch's text concepts with id c; logits are
  ``scale * cos(visual concept, class weight)`` with a fixed scale (1 / 0.07), and the target is
  the concept's own id (the paper) or the highest-scoring class (the released code)
  (:func:`concept_loss`). Gradients reach the text side only: the patches come from a frozen
  tower.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "CONCEPT_TARGETS",
    "concept_loss",
    "global_infonce",
    "pool_visual_concepts",
    "text_concepts",
]

#: Values of ``MODEL.SIMZSS.LOSS.CONCEPT_TARGET``.
CONCEPT_TARGETS = ("own", "argmax")


def global_infonce(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE: row i of ``image`` [B, D] and ``text`` [B, D] (normalised) are a pair.

    Returns:
        Scalar: mean of the image-to-text and text-to-image cross-entropies.
    """
    logits = scale * image @ text.t()
    target = torch.arange(len(image), device=image.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2


def text_concepts(tokens: torch.Tensor, spans: torch.Tensor) -> torch.Tensor:
    """Concept embeddings from caption token outputs.

    Args:
        tokens: [B, L, D] every token's output (projected).
        spans: int64 [N, 4] rows (caption index, concept id, first token, end token).

    Returns:
        [N, D]: per concept, its tokens' outputs summed, L2-normalised.
    """
    if len(spans) == 0:
        return tokens.new_zeros((0, tokens.shape[-1]))
    positions = torch.arange(tokens.shape[1], device=tokens.device)
    inside = (positions[None] >= spans[:, 2:3]) & (positions[None] < spans[:, 3:4])  # [N, L]
    summed = torch.einsum("nl,nld->nd", inside.to(tokens.dtype), tokens[spans[:, 0]])
    return F.normalize(summed, dim=-1)


def pool_visual_concepts(
    concepts: torch.Tensor, patches: torch.Tensor, owner: torch.Tensor, tau: float
) -> torch.Tensor:
    """Visual concepts: softmax-over-patches pooling of each concept's own image.

    Args:
        concepts: [N, D] normalised text concepts.
        patches: [B, P, D] normalised patch features.
        owner: int64 [N], the image of each concept.
        tau: softmax temperature.

    Returns:
        [N, D]: ``sum_p softmax_p(cos(c, patch_p) / tau) * patch_p``, L2-normalised.
    """
    own = patches[owner]  # [N, P, D]
    weights = (torch.einsum("nd,npd->np", concepts, own) / tau).softmax(dim=-1)
    return F.normalize(torch.einsum("np,npd->nd", weights, own), dim=-1)


def concept_loss(
    visual: torch.Tensor,
    concepts: torch.Tensor,
    ids: torch.Tensor,
    scale: float,
    target: str = "own",
) -> torch.Tensor:
    """Cross-entropy of the visual concepts over the batch's concepts.

    Args:
        visual: [N, D] normalised visual concepts.
        concepts: [N, D] normalised text concepts.
        ids: int64 [N] concept-bank ids.
        scale: fixed logit scale (1 / 0.07).
        target: "own" (the concept's own id) or "argmax" (the class of highest logit).

    Returns:
        Scalar (0 with a graph when N = 0).
    """
    if target not in CONCEPT_TARGETS:
        raise ValueError(
            f"MODEL.SIMZSS.LOSS.CONCEPT_TARGET={target!r}: use one of {CONCEPT_TARGETS}"
        )
    if len(ids) == 0:
        return visual.sum() * 0.0 + concepts.sum() * 0.0
    classes, column = torch.unique(ids, return_inverse=True)
    weights = concepts.new_zeros((len(classes), concepts.shape[1])).index_add_(0, column, concepts)
    logits = scale * visual @ F.normalize(weights, dim=-1).t()
    labels = column if target == "own" else logits.detach().argmax(dim=1)
    return F.cross_entropy(logits, labels)
