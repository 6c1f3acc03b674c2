"""A trainable text tower: open_clip's text transformer, every token's output projected.

SimZSS trains it against a frozen vision tower. It keeps the text parts of an open_clip CLIP
model (token and position embeddings, the causal transformer, ``ln_final``) and projects each
output token to the vision width, either with a new linear map or with the checkpoint's own
``text_projection``. :meth:`TextTower.encode_text` is open_clip's interface (end-of-text token,
projected), so :class:`~ocz_d2.modeling.text.TextEmbedder` embeds class names with it.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from ..backbone.clip_prompt import create_clip_model

__all__ = ["TEXT_PROJECTIONS", "TextTower"]

logger = logging.getLogger(__name__)

#: Values of ``MODEL.SIMZSS.TEXT.PROJECTION``.
TEXT_PROJECTIONS = ("linear", "clip")


class TextTower(nn.Module):
    """open_clip's text transformer with a projection of every token to ``out_dim``.

    Attributes:
        width (int): the transformer's width.
        context_length (int): tokens per caption.
        text_projection (nn.Linear | nn.Parameter): the projection ("linear": a Linear without
            bias; "clip": the checkpoint's [width, D] matrix).
    """

    def __init__(
        self,
        model_name: str,
        out_dim: int,
        *,
        pretrained: str = "",
        weights: str = "",
        projection: str = "linear",
    ):
        """
        Args:
            model_name: open_clip model whose text tower is used (``MODEL.SIMZSS.TEXT``).
            out_dim: D, the vision tower's width.
            pretrained, weights: start from an open_clip tag or a local state-dict file; both
                empty: random initialisation.
            projection: "linear" or "clip" (see ``MODEL.SIMZSS.TEXT.PROJECTION``).
        """
        super().__init__()
        if projection not in TEXT_PROJECTIONS:
            raise ValueError(
                f"MODEL.SIMZSS.TEXT.PROJECTION={projection!r}: use one of {TEXT_PROJECTIONS}"
            )
        clip = create_clip_model(model_name, pretrained, weights)
        if not hasattr(clip, "token_embedding"):
            raise ValueError(
                f"MODEL.SIMZSS.TEXT.MODEL_NAME={model_name!r} has no open_clip text transformer "
                "(token_embedding); use a CLIP ViT config such as ViT-B-16"
            )
        self.token_embedding = clip.token_embedding
        self.positional_embedding = clip.positional_embedding
        self.transformer = clip.transformer
        self.ln_final = clip.ln_final
        self.register_buffer("attn_mask", clip.attn_mask, persistent=False)
        self.width = int(self.transformer.width)
        self.context_length = int(self.positional_embedding.shape[0])
        if projection == "clip":
            proj = clip.text_projection
            if not isinstance(proj, torch.Tensor) or proj.shape[-1] != out_dim:
                got = None if not isinstance(proj, torch.Tensor) else tuple(proj.shape)
                raise ValueError(
                    f"MODEL.SIMZSS.TEXT.PROJECTION 'clip': {model_name}'s text projection "
                    f"{got} does not map to the vision width {out_dim}; use 'linear'"
                )
            self.text_projection = proj
        else:
            self.text_projection = nn.Linear(self.width, out_dim, bias=False)
            nn.init.normal_(self.text_projection.weight, std=self.width**-0.5)
        self.model_name = model_name

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.text_projection, nn.Linear):
            return self.text_projection(x)
        return x @ self.text_projection

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        """
        Args:
            text: int64 [B, L] tokens (open_clip's tokenizer; end-of-text has the largest id).

        Returns:
            [B, L, D] every token's output, projected (not normalised).
        """
        x = self.token_embedding(text) + self.positional_embedding[: text.shape[1]]
        mask = self.attn_mask
        if mask is not None:
            mask = mask[: text.shape[1], : text.shape[1]]
        x = self.transformer(x, attn_mask=mask)
        return self._project(self.ln_final(x))

    @staticmethod
    def end_of_text(tokens: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """[B, L, D] outputs -> [B, D] at each caption's end-of-text token."""
        return tokens[torch.arange(len(text), device=text.device), text.argmax(dim=-1)]

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """open_clip's interface: [B, L] tokens -> [B, D] end-of-text embeddings."""
        x = self.end_of_text(self(text), text)
        return F.normalize(x, dim=-1) if normalize else x
