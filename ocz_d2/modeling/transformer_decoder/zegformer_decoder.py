"""ZegFormer's query decoder: a DETR decoder on one feature map, and its segment classifier."""

from __future__ import annotations

import math

import fvcore.nn.weight_init as weight_init
import torch
import torch.nn as nn
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import Conv2d

from .zero_shot_decoder import _MLP, TRANSFORMER_DECODER_REGISTRY, SinePositionEncoding

__all__ = ["SegmentClassHead", "ZegFormerDecoder"]


class SegmentClassHead(nn.Module):
    """ZegFormer's classification of a segment embedding against class-name embeddings.

    A linear projection of the query to the text width, L2-normalised: ``e``. The logits are
    ``s * e . t_k`` for the L2-normalised class embeddings ``t_k`` and ``s * e . b`` last for a
    learnable background (no-object) embedding ``b`` that is **not** normalised (its length is
    learnt too), with a fixed scale ``s`` (ZegFormer: 100, CLIP's temperature 0.01).
    """

    def __init__(self, hidden_dim: int, text_dim: int, logit_scale: float = 100.0):
        """
        Args:
            hidden_dim: width of the queries.
            text_dim: width of the class embeddings.
            logit_scale: the fixed scale s (> 0).
        """
        super().__init__()
        if logit_scale <= 0:
            raise ValueError(
                f"SegmentClassHead: the logit scale must be > 0, got {logit_scale} "
                "(MODEL.OCZ.DECODER.LOGIT_SCALE; ZegFormer: 100)."
            )
        self.proj = nn.Linear(hidden_dim, text_dim)
        # Initialised as a Linear layer's weight (kaiming-uniform, a = sqrt 5): length ~ 0.58.
        self.no_object_embed = nn.Parameter(torch.empty(1, text_dim))
        nn.init.kaiming_uniform_(self.no_object_embed, a=math.sqrt(5))
        self.logit_scale = float(logit_scale)

    def extra_repr(self) -> str:
        return f"logit_scale={self.logit_scale} (fixed)"

    def forward(
        self, queries: torch.Tensor, text: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            queries: [..., Q, hidden_dim] decoded queries.
            text: [K, text_dim] class embeddings (normalised here).

        Returns:
            logits [..., Q, K + 1] (background last) and the L2-normalised segment embeddings
            [..., Q, text_dim].
        """
        embeds = F.normalize(self.proj(queries), dim=-1)
        targets = torch.cat([F.normalize(text.to(embeds), dim=-1), self.no_object_embed.to(embeds)])
        return self.logit_scale * embeds @ targets.t(), embeds


class _DETRDecoderLayer(nn.Module):
    """DETR's decoder layer: self-attention among the queries, cross-attention to the memory,
    FFN; each with dropout, a residual connection and LayerNorm (post-norm, or pre-norm)."""

    def __init__(self, dim: int, nheads: int, dim_feedforward: int, dropout: float, pre_norm: bool):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, nheads, dropout=dropout, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(dim, nheads, dropout=dropout, batch_first=True)
        self.ffn = nn.Sequential(
            nn.Linear(dim, dim_feedforward),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(dim_feedforward, dim),
        )
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(3))
        self.dropouts = nn.ModuleList(nn.Dropout(dropout) for _ in range(3))
        self.pre_norm = pre_norm

    def forward(
        self,
        queries: torch.Tensor,
        memory: torch.Tensor,
        memory_pos: torch.Tensor,
        query_pos: torch.Tensor,
    ) -> torch.Tensor:
        """queries, query_pos: [B, Q, D]; memory, memory_pos: [B, S, D] -> [B, Q, D]."""

        def self_attn(x: torch.Tensor) -> torch.Tensor:
            q = x + query_pos
            return self.self_attn(q, q, x, need_weights=False)[0]

        def cross(x: torch.Tensor) -> torch.Tensor:
            keys = memory + memory_pos
            return self.cross_attn(x + query_pos, keys, memory, need_weights=False)[0]

        for fn, norm, drop in zip((self_attn, cross, self.ffn), self.norms, self.dropouts):
            if self.pre_norm:
                queries = queries + drop(fn(norm(queries)))
            else:
                queries = norm(queries + drop(fn(queries)))
        return queries


@TRANSFORMER_DECODER_REGISTRY.register()
class ZegFormerDecoder(nn.Module):
    """ZegFormer's (MaskFormer's) query decoder with its segment classification head.

    Differences from :class:`ZeroShotMaskDecoder` (ours), all ZegFormer's design:

    - a DETR decoder: content queries start at zero, learned positional queries
      (``query_embed``), self-attention before cross-attention, dropout 0.1, post-norm;
    - one feature map (MaskFormer's ``res5``, projected to the width by a 1x1 conv), no masked
      attention, no round-robin over levels;
    - a prediction after every layer from the shared final LayerNorm (``dec_layers``
      predictions: ``dec_layers - 1`` auxiliary ones, none from the initial queries);
    - classes by :class:`SegmentClassHead`: a fixed logit scale and an unnormalised background
      embedding (ours: a learned scale, a normalised no-object embedding).

    The mask head is the same 3-layer MLP (mask logits = MLP(query) . mask features).

    Outputs: "pred_logits" [B, Q, K+1], "pred_masks" [B, Q, h, w], "pred_embeds" [B, Q, D]
    (normalised segment embeddings), "aux_outputs" (``num_aux_outputs`` dicts of the same).
    """

    @configurable
    def __init__(
        self,
        *,
        in_channels: int,
        mask_dim: int,
        text_dim: int,
        hidden_dim: int = 256,
        num_queries: int = 100,
        nheads: int = 8,
        dim_feedforward: int = 2048,
        dec_layers: int = 6,
        pre_norm: bool = False,
        dropout: float = 0.1,
        logit_scale: float = 100.0,
    ):
        """
        Args:
            in_channels: channels of the feature map attended to.
            mask_dim: channels of the mask features.
            text_dim: width of the class embeddings.
            hidden_dim: decoder width (even, divisible by ``nheads``).
            num_queries: number of queries.
            nheads: attention heads.
            dim_feedforward: hidden width of the FFN.
            dec_layers: decoder layers (>= 1), one prediction each.
            pre_norm: pre-norm (True) or post-norm (False, DETR's) blocks.
            dropout: dropout in attention, FFN and residual branches.
            logit_scale: the fixed class-logit scale of :class:`SegmentClassHead`.
        """
        super().__init__()
        if hidden_dim % nheads or hidden_dim % 2:
            raise ValueError(
                f"ZegFormerDecoder: hidden_dim {hidden_dim} must be even and divisible by "
                f"nheads {nheads}."
            )
        if dec_layers < 1 or num_queries < 1:
            raise ValueError(
                f"ZegFormerDecoder: need dec_layers >= 1 and num_queries >= 1; got {dec_layers}, "
                f"{num_queries} (MODEL.OCZ.DECODER.DEC_LAYERS, NUM_QUERIES)."
            )
        self.num_queries = num_queries
        self.mask_dim = mask_dim
        self.text_dim = text_dim
        #: Auxiliary predictions per forward (the criterion supervises as many).
        self.num_aux_outputs = dec_layers - 1
        self.pe_layer = SinePositionEncoding(hidden_dim // 2)
        if in_channels != hidden_dim:
            self.input_proj = Conv2d(in_channels, hidden_dim, kernel_size=1)
            weight_init.c2_xavier_fill(self.input_proj)
        else:
            self.input_proj = nn.Identity()
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.layers = nn.ModuleList(
            _DETRDecoderLayer(hidden_dim, nheads, dim_feedforward, dropout, pre_norm)
            for _ in range(dec_layers)
        )
        for p in self.layers.parameters():  # DETR initialises its transformer so
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        self.decoder_norm = nn.LayerNorm(hidden_dim)
        self.mask_embed = _MLP(hidden_dim, hidden_dim, mask_dim, 3)
        self.class_head = SegmentClassHead(hidden_dim, text_dim, logit_scale)

    @classmethod
    def from_config(cls, cfg, in_channels: int, mask_dim: int, text_dim: int) -> dict:
        ocz = cfg.MODEL.OCZ
        dec = ocz.DECODER
        # Our decoder's options that ZegFormer's lacks: refuse them rather than ignore them.
        unsupported = {
            "MODEL.OCZ.DECODER.MASK_POOLING": dec.MASK_POOLING,
            "MODEL.OCZ.LOSS.PIXEL_WEIGHT": ocz.LOSS.PIXEL_WEIGHT > 0,
        }
        if any(unsupported.values()):
            raise ValueError(
                f"ZegFormerDecoder has no mask pooling and no pixel logits: switch off "
                f"{[k for k, on in unsupported.items() if on]} or use ZeroShotMaskDecoder."
            )
        return {
            "in_channels": in_channels,
            "mask_dim": mask_dim,
            "text_dim": text_dim,
            "hidden_dim": dec.HIDDEN_DIM,
            "num_queries": dec.NUM_QUERIES,
            "nheads": dec.NHEADS,
            "dim_feedforward": dec.DIM_FEEDFORWARD,
            "dec_layers": dec.DEC_LAYERS,
            "pre_norm": dec.PRE_NORM,
            "dropout": dec.DROPOUT,
            "logit_scale": dec.LOGIT_SCALE,
        }

    def forward(
        self,
        multi_scale_features: list[torch.Tensor],
        mask_features: torch.Tensor,
        text_embeds: torch.Tensor,
    ) -> dict:
        """
        Args:
            multi_scale_features: one map [B, in_channels, h, w] (the pixel decoder's
                ``transformer_in_feature``).
            mask_features: [B, mask_dim, H, W].
            text_embeds: [K, text_dim] class embeddings of the current vocabulary.

        Returns:
            see the class docstring.
        """
        if len(multi_scale_features) != 1:
            raise ValueError(
                f"ZegFormerDecoder attends to one feature map, got {len(multi_scale_features)}: "
                "use MaskFormerPixelDecoder (MODEL.SEM_SEG_HEAD.NAME)."
            )
        if mask_features.dim() != 4 or mask_features.shape[1] != self.mask_dim:
            raise ValueError(
                f"ZegFormerDecoder: mask_features must be [B, {self.mask_dim}, h, w], got "
                f"{tuple(mask_features.shape)}."
            )
        if text_embeds.dim() != 2 or text_embeds.shape[1] != self.text_dim:
            raise ValueError(
                f"ZegFormerDecoder: text_embeds must be [K, {self.text_dim}], got "
                f"{tuple(text_embeds.shape)}; the class embeddings' width must match the "
                "text encoder's."
            )
        feature = multi_scale_features[0]
        memory = self.input_proj(feature).flatten(2).transpose(1, 2)
        memory_pos = self.pe_layer(feature).flatten(2).transpose(1, 2).to(memory.dtype)
        batch = feature.shape[0]
        query_pos = self.query_embed.weight.unsqueeze(0).expand(batch, -1, -1)
        queries = torch.zeros_like(query_pos)
        predictions = []
        for layer in self.layers:
            queries = layer(queries, memory, memory_pos, query_pos)
            predictions.append(
                self._predict(self.decoder_norm(queries), mask_features, text_embeds)
            )
        output = dict(predictions[-1])
        output["aux_outputs"] = predictions[:-1]
        return output

    def _predict(
        self, decoded: torch.Tensor, mask_features: torch.Tensor, text: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        pred_masks = torch.einsum("bqc,bchw->bqhw", self.mask_embed(decoded), mask_features)
        pred_logits, pred_embeds = self.class_head(decoded, text)
        return {"pred_logits": pred_logits, "pred_masks": pred_masks, "pred_embeds": pred_embeds}
