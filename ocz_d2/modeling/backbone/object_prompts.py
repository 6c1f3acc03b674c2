"""Object prompts: n_o learnable tokens, each tied to one region of the image.

OC-ZSS appends n_o object prompts to CLIP's token sequence and restricts attention with a
per-image mask: object prompt j and the patches of region j see each other; an object prompt sees
nothing else (no CLS, no visual prompt, no other object prompt; itself only), and nothing else
sees the object prompts. The patches, CLS and visual prompts keep attending to each other as
without object prompts.

Choice (the paper is silent): deep per-layer prompt embeddings whose states are carried through
the layers: layer 0 takes ``embeddings[0]``, layer i > 0 takes the previous layer's output of the
prompt plus ``embeddings[i]`` (zero-initialised, so training starts from carried states).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..clustering import NO_REGION

__all__ = ["ObjectPrompts"]


class ObjectPrompts(nn.Module):
    """n_o learnable object-prompt tokens per layer, and the attention mask that ties them to
    regions.

    Attributes:
        embeddings (nn.Parameter): [L, n_o, width].
    """

    def __init__(self, num_layers: int, num_objects: int, width: int, patch_size: int):
        super().__init__()
        if num_objects < 1:
            raise ValueError(f"ObjectPrompts needs at least one object, got {num_objects}.")
        self.num_objects = int(num_objects)
        emb = torch.zeros(num_layers, num_objects, width)
        # The scale of patch embeddings (as VPT's prompt initialisation).
        bound = math.sqrt(6.0 / float(3 * patch_size * patch_size + width))
        emb[0].uniform_(-bound, bound)
        self.embeddings = nn.Parameter(emb)

    def tokens(self, batch: int):
        """The ``extra_tokens`` callable of :meth:`CLIPPromptBackbone.forward`."""

        def next_tokens(layer: int, previous: torch.Tensor | None) -> torch.Tensor:
            emb = self.embeddings[layer].unsqueeze(0)
            if previous is None:
                return emb.expand(batch, -1, -1)
            return previous + emb.to(previous.dtype)

        return next_tokens

    def attention_mask(self, regions: torch.Tensor, layout: dict[str, slice]) -> torch.Tensor:
        """Per-image boolean attention mask (True = blocked) over the whole token sequence.

        Args:
            regions: int64 [B, gh, gw] (or [B, gh*gw]) region of each patch, in [0, n_o) or
                NO_REGION (such a patch sees no object prompt).
            layout: :meth:`CLIPPromptBackbone.token_layout` with ``num_extra = n_o``.

        Returns:
            bool [B, T, T]; row = query token, column = key token.
        """
        b = regions.shape[0]
        regions = regions.reshape(b, -1)
        patch, extra = layout["patch"], layout["extra"]
        n_patch = patch.stop - patch.start
        if regions.shape[1] != n_patch:
            raise ValueError(
                f"regions cover {regions.shape[1]} patches but the image has {n_patch}: give "
                "regions on the CLIP patch grid"
            )
        if extra.stop - extra.start != self.num_objects:
            raise ValueError("token layout has a different number of extra tokens than objects")
        bad = (regions != NO_REGION) & ((regions < 0) | (regions >= self.num_objects))
        if bad.any():
            raise ValueError(
                f"region values {sorted(set(regions[bad].tolist()))[:10]} are outside "
                f"[0, {self.num_objects})"
            )
        length = extra.stop
        objects = torch.arange(self.num_objects, device=regions.device)
        # member[b, p, j]: patch p lies in region j.
        member = regions[..., None] == objects
        mask = torch.zeros(b, length, length, dtype=torch.bool, device=regions.device)
        mask[:, :, extra] = True  # nobody sees the object prompts ...
        mask[:, extra, :] = True  # ... and they see nothing ...
        mask[:, patch, extra] = ~member  # ... except patches <-> prompt of their region
        mask[:, extra, patch] = ~member.transpose(1, 2)
        eye = torch.eye(self.num_objects, dtype=torch.bool, device=regions.device)
        mask[:, extra, extra] = ~eye  # and each prompt itself
        return mask
