"""Query-based mask decoder whose classes are text embeddings (open vocabulary)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import Conv2d
from detectron2.utils.registry import Registry

__all__ = [
    "TRANSFORMER_DECODER_REGISTRY",
    "SinePositionEncoding",
    "ZeroShotMaskDecoder",
    "build_transformer_decoder",
]

TRANSFORMER_DECODER_REGISTRY = Registry("OCZ_TRANSFORMER_DECODER")
TRANSFORMER_DECODER_REGISTRY.__doc__ = """
Registry of ocz_d2 transformer decoders, selected by ``cfg.MODEL.OCZ.DECODER.NAME``.

A registered class is called as ``cls(cfg, in_channels, mask_dim, text_dim)`` and its forward as
``forward(multi_scale_features, mask_features, text_embeds)``.
"""

# CLIP's bound on its learned logit scale; keeps the softmax from saturating during training.
_MAX_LOGIT_SCALE = 100.0


def build_transformer_decoder(cfg, in_channels: int, mask_dim: int, text_dim: int) -> nn.Module:
    """Build the decoder named by ``cfg.MODEL.OCZ.DECODER.NAME``.

    Args:
        cfg: config with the ocz_d2 keys.
        in_channels: channels of the pixel decoder's multi-scale features.
        mask_dim: channels of the mask features.
        text_dim: width of the class (text) embeddings.
    """
    name = cfg.MODEL.OCZ.DECODER.NAME
    return TRANSFORMER_DECODER_REGISTRY.get(name)(cfg, in_channels, mask_dim, text_dim)


class SinePositionEncoding(nn.Module):
    """Fixed 2-D sinusoidal position encoding of a feature map.

    Pixel centres are normalised to ``(i + 0.5) / n * 2 pi`` along each axis, so the encoding
    depends on the relative position only (any resolution). Channels: ``num_feats`` for y then
    ``num_feats`` for x, each half sines then cosines at geometric frequencies.
    """

    def __init__(self, num_feats: int, temperature: float = 10000.0):
        """
        Args:
            num_feats: channels per axis (even); the output has ``2 * num_feats`` channels.
            temperature: base of the geometric frequency progression.
        """
        super().__init__()
        if num_feats % 2:
            raise ValueError(f"SinePositionEncoding: num_feats must be even, got {num_feats}.")
        self.num_feats = num_feats
        self.temperature = temperature

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: [B, C, H, W] (only its shape, device and dtype are used).

        Returns:
            [B, 2 * num_feats, H, W].
        """
        batch, _, height, width = x.shape
        half = self.num_feats // 2
        exponents = torch.arange(half, device=x.device, dtype=torch.float32) / half
        inv_freq = self.temperature ** (-exponents)  # [half]

        def encode(n: int) -> torch.Tensor:  # [n, num_feats]
            pos = (torch.arange(n, device=x.device, dtype=torch.float32) + 0.5) / n * 2 * math.pi
            angles = pos[:, None] * inv_freq[None, :]
            return torch.cat([angles.sin(), angles.cos()], dim=1)

        pos_y = encode(height)[:, None, :].expand(height, width, self.num_feats)
        pos_x = encode(width)[None, :, :].expand(height, width, self.num_feats)
        pos = torch.cat([pos_y, pos_x], dim=2).permute(2, 0, 1)
        return pos.unsqueeze(0).expand(batch, -1, -1, -1).to(x.dtype)


class _MLP(nn.Sequential):
    """Linear layers with ReLU in between."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int):
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        layers: list[nn.Module] = []
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
            layers.append(nn.Linear(d_in, d_out))
            if i < num_layers - 1:
                layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


class _DecoderLayer(nn.Module):
    """Cross-attention to the pixel features, self-attention among queries, FFN; each with a
    residual connection and LayerNorm (pre- or post-norm)."""

    def __init__(self, dim: int, nheads: int, dim_feedforward: int, dropout: float, pre_norm: bool):
        super().__init__()
        self.cross_attn = nn.MultiheadAttention(dim, nheads, dropout=dropout, batch_first=True)
        self.self_attn = nn.MultiheadAttention(dim, nheads, dropout=dropout, batch_first=True)
        self.ffn = nn.Sequential(
            nn.Linear(dim, dim_feedforward),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(dim_feedforward, dim),
        )
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(3))
        self.dropout = nn.Dropout(dropout)
        self.pre_norm = pre_norm
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def _residual(self, x: torch.Tensor, fn, norm: nn.LayerNorm) -> torch.Tensor:
        if self.pre_norm:
            return x + self.dropout(fn(norm(x)))
        return norm(x + self.dropout(fn(x)))

    def forward(
        self,
        queries: torch.Tensor,
        memory: torch.Tensor,
        memory_pos: torch.Tensor,
        query_pos: torch.Tensor,
        attn_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """
        Args:
            queries, query_pos: [B, Q, D]. memory, memory_pos: [B, S, D].
            attn_mask: None or bool [B * nheads, Q, S], True = may not attend.

        Returns:
            [B, Q, D] updated queries.
        """
        keys = memory + memory_pos

        def cross(x: torch.Tensor) -> torch.Tensor:
            return self.cross_attn(
                x + query_pos, keys, memory, attn_mask=attn_mask, need_weights=False
            )[0]

        def self_attn(x: torch.Tensor) -> torch.Tensor:
            q = x + query_pos
            return self.self_attn(q, q, x, need_weights=False)[0]

        queries = self._residual(queries, cross, self.norms[0])
        queries = self._residual(queries, self_attn, self.norms[1])
        return self._residual(queries, self.ffn, self.norms[2])


@TRANSFORMER_DECODER_REGISTRY.register()
class ZeroShotMaskDecoder(nn.Module):
    """Mask decoder with text-embedding classes (Mask2Former-style, open vocabulary).

    ``num_queries`` learnable queries (content ``query_feat`` and positional ``query_embed``,
    one ``nn.Embedding`` each) attend, layer by layer, to one level of the multi-scale pixel
    features in turn (coarse to fine, round-robin), with masked attention restricting each query
    to the foreground of its previous mask prediction. A prediction is made from the initial
    queries and after every layer (``dec_layers + 1`` in all; the last is the output, the others
    are ``aux_outputs``). Per query:

    - mask logits = MLP(query) . mask_features;
    - class embedding = normalize(Linear(query)) in the text space, ``pred_embeds``; with
      ``mask_pooling`` (the miniature's option), normalize(Linear(query) + Linear'(pool)),
      where pool is the mask features averaged over the query's mask (its sigmoid, detached: the
      class loss trains the features, not the mask), so that class evidence in the pixel
      features reaches the class directly, as a per-pixel classifier's would;
    - class logits = s * cos(embedding, text_k) for the K classes of the current vocabulary and
      s * cos(embedding, no_object) last, s = exp(logit_scale) (learned, at most 100).

    Query groups: all queries are rows of the same embedding tables and go through the same
    layers; a group is an index range of rows. Split matching uses e.g.
    ``seen = arange(0, n_seen)`` and ``candidates = arange(n_seen, num_queries)`` on the query
    axis of every output, so no module here changes when the split is introduced.

    Optimiser note: ``logit_scale`` is a 1-D parameter outside any norm or embedding module; give
    it no weight decay (decay would pull the scale towards 1).
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
        dropout: float = 0.0,
        masked_attention: bool = True,
        logit_scale_init: float = 50.0,
        num_feature_levels: int = 3,
        mask_pooling: bool = False,
        pixel_logits: bool = False,
    ):
        """
        Args:
            in_channels: channels of the multi-scale features.
            mask_dim: channels of the mask features.
            text_dim: width of the text (class) embeddings.
            hidden_dim: decoder width (even, divisible by ``nheads``).
            num_queries: total number of queries.
            nheads: attention heads.
            dim_feedforward: hidden width of the FFN.
            dec_layers: number of decoder layers.
            pre_norm: pre-norm (True) or post-norm (False) residual blocks.
            dropout: dropout in attention and FFN.
            masked_attention: restrict cross-attention to the previously predicted masks.
            logit_scale_init: initial class-logit scale, in (0, 100].
            num_feature_levels: number of multi-scale feature maps given to ``forward``.
            mask_pooling: add the mask-pooled mask features (projected) to the class embedding.
            pixel_logits: also output "pixel_logits", per-pixel class logits of the mask
                features (a 1x1 projection to the text space; s * cos to each class), for the
                auxiliary pixel-text loss (``MODEL.OCZ.LOSS.PIXEL_WEIGHT``).
        """
        super().__init__()
        if hidden_dim % nheads or hidden_dim % 2:
            raise ValueError(
                f"ZeroShotMaskDecoder: hidden_dim {hidden_dim} must be even and divisible by "
                f"nheads {nheads}."
            )
        if not 0 < logit_scale_init <= _MAX_LOGIT_SCALE:
            raise ValueError(
                f"ZeroShotMaskDecoder: logit_scale_init must be in (0, {_MAX_LOGIT_SCALE}], got "
                f"{logit_scale_init} (MODEL.OCZ.DECODER.LOGIT_SCALE)."
            )
        if num_feature_levels < 1 or dec_layers < 0 or num_queries < 1:
            raise ValueError(
                "ZeroShotMaskDecoder: need num_feature_levels >= 1, dec_layers >= 0 and "
                f"num_queries >= 1; got {num_feature_levels}, {dec_layers}, {num_queries}."
            )
        self.num_queries = num_queries
        #: Auxiliary predictions per forward: the initial queries' and every layer's but the last.
        self.num_aux_outputs = dec_layers
        self.num_feature_levels = num_feature_levels
        self.nheads = nheads
        self.mask_dim = mask_dim
        self.text_dim = text_dim
        self.masked_attention = masked_attention

        self.pe_layer = SinePositionEncoding(hidden_dim // 2)
        self.level_embed = nn.Embedding(num_feature_levels, hidden_dim)
        self.input_proj = nn.ModuleList()
        for _ in range(num_feature_levels):
            if in_channels == hidden_dim:
                self.input_proj.append(nn.Identity())
            else:
                proj = Conv2d(in_channels, hidden_dim, kernel_size=1)
                nn.init.kaiming_uniform_(proj.weight, a=1)
                nn.init.zeros_(proj.bias)
                self.input_proj.append(proj)

        self.query_feat = nn.Embedding(num_queries, hidden_dim)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.layers = nn.ModuleList(
            _DecoderLayer(hidden_dim, nheads, dim_feedforward, dropout, pre_norm)
            for _ in range(dec_layers)
        )
        self.decoder_norm = nn.LayerNorm(hidden_dim)
        self.mask_embed = _MLP(hidden_dim, hidden_dim, mask_dim, 3)
        self.class_embed = nn.Linear(hidden_dim, text_dim)
        # Drawn without moving the RNG: the other layers start the same with or without it.
        with torch.random.fork_rng(devices=[]):
            self.mask_pool_proj = nn.Linear(mask_dim, text_dim) if mask_pooling else None
        with torch.random.fork_rng(devices=[]):  # each optional part in its own fork
            self.pixel_proj = Conv2d(mask_dim, text_dim, kernel_size=1) if pixel_logits else None
        # An Embedding so that Detectron2's optimiser treats it as one (WEIGHT_DECAY_EMBED).
        self.no_object_embed = nn.Embedding(1, text_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(logit_scale_init)))

    @classmethod
    def from_config(cls, cfg, in_channels: int, mask_dim: int, text_dim: int) -> dict:
        dec = cfg.MODEL.OCZ.DECODER
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
            "masked_attention": dec.MASKED_ATTENTION,
            "logit_scale_init": dec.LOGIT_SCALE,
            "num_feature_levels": len(cfg.MODEL.OCZ.PIXEL_DECODER.DECODER_STRIDES),
            "mask_pooling": dec.MASK_POOLING,
            "pixel_logits": cfg.MODEL.OCZ.LOSS.PIXEL_WEIGHT > 0,
        }

    def forward(
        self,
        multi_scale_features: list[torch.Tensor],
        mask_features: torch.Tensor,
        text_embeds: torch.Tensor,
    ) -> dict:
        """
        Args:
            multi_scale_features: ``num_feature_levels`` maps [B, in_channels, h_l, w_l]; layer i
                attends to level ``i % num_feature_levels``.
            mask_features: [B, mask_dim, h, w].
            text_embeds: [K, text_dim] class embeddings of the current vocabulary (normalised
                here); K may change between calls.

        Returns:
            dict with "pred_logits" [B, Q, K+1] (no-object last), "pred_masks" [B, Q, h, w]
            (logits), "pred_embeds" [B, Q, text_dim] (L2-normalised class embeddings) and
            "aux_outputs": ``dec_layers`` dicts with the same three keys, from the initial
            queries and from every layer but the last; with ``pixel_logits``, also
            "pixel_logits" [B, K, h, w].
        """
        self._check_inputs(multi_scale_features, mask_features, text_embeds)
        memories, memory_pos, sizes = self._prepare_memory(multi_scale_features)
        batch = mask_features.shape[0]
        queries = self.query_feat.weight.unsqueeze(0).expand(batch, -1, -1)
        query_pos = self.query_embed.weight.unsqueeze(0).expand(batch, -1, -1)
        no_object = F.normalize(self.no_object_embed.weight, dim=-1)
        class_targets = torch.cat([F.normalize(text_embeds, dim=-1).to(no_object), no_object])

        predictions = []
        pred, attn_mask = self._predict(queries, mask_features, class_targets, sizes[0])
        predictions.append(pred)
        for i, layer in enumerate(self.layers):
            level = i % self.num_feature_levels
            queries = layer(queries, memories[level], memory_pos[level], query_pos, attn_mask)
            next_size = sizes[(i + 1) % self.num_feature_levels]
            pred, attn_mask = self._predict(queries, mask_features, class_targets, next_size)
            predictions.append(pred)
        output = dict(predictions[-1])
        output["aux_outputs"] = predictions[:-1]
        if self.pixel_proj is not None:
            pixel_embeds = F.normalize(self.pixel_proj(mask_features), dim=1)
            scale = self.logit_scale.exp().clamp(max=_MAX_LOGIT_SCALE)
            text = class_targets[:-1].to(pixel_embeds)
            output["pixel_logits"] = scale * torch.einsum("bdhw,kd->bkhw", pixel_embeds, text)
        return output

    def _check_inputs(
        self,
        multi_scale_features: list[torch.Tensor],
        mask_features: torch.Tensor,
        text_embeds: torch.Tensor,
    ) -> None:
        if len(multi_scale_features) != self.num_feature_levels:
            raise ValueError(
                f"ZeroShotMaskDecoder expects {self.num_feature_levels} feature levels, got "
                f"{len(multi_scale_features)}; num_feature_levels must equal "
                "len(MODEL.OCZ.PIXEL_DECODER.DECODER_STRIDES)."
            )
        if mask_features.dim() != 4 or mask_features.shape[1] != self.mask_dim:
            raise ValueError(
                f"ZeroShotMaskDecoder: mask_features must be [B, {self.mask_dim}, h, w], got "
                f"{tuple(mask_features.shape)}."
            )
        if text_embeds.dim() != 2 or text_embeds.shape[1] != self.text_dim:
            raise ValueError(
                f"ZeroShotMaskDecoder: text_embeds must be [K, {self.text_dim}], got "
                f"{tuple(text_embeds.shape)}; the class embeddings' width must match the "
                "text encoder's."
            )

    def _prepare_memory(self, features: list[torch.Tensor]):
        """Flatten each level to [B, h*w, D] with its projection + level embedding, and its
        sine position encoding; also return the level sizes."""
        memories, positions, sizes = [], [], []
        for level, feat in enumerate(features):
            sizes.append(tuple(feat.shape[-2:]))
            src = self.input_proj[level](feat).flatten(2).transpose(1, 2)
            memories.append(src + self.level_embed.weight[level][None, None, :])
            positions.append(self.pe_layer(feat).flatten(2).transpose(1, 2).to(src.dtype))
        return memories, positions, sizes

    def _predict(
        self,
        queries: torch.Tensor,
        mask_features: torch.Tensor,
        class_targets: torch.Tensor,
        attn_size: tuple[int, int],
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """Prediction heads on [B, Q, D] queries; also the attention mask for the next layer."""
        decoded = self.decoder_norm(queries)
        mask_embed = self.mask_embed(decoded)
        pred_masks = torch.einsum("bqc,bchw->bqhw", mask_embed, mask_features)
        class_embeds = self.class_embed(decoded)
        if self.mask_pool_proj is not None:
            weights = pred_masks.detach().sigmoid()
            pooled = torch.einsum("bqhw,bchw->bqc", weights, mask_features)
            pooled = pooled / weights.sum((-2, -1)).clamp(min=1.0).unsqueeze(-1)
            class_embeds = class_embeds + self.mask_pool_proj(pooled)
        pred_embeds = F.normalize(class_embeds, dim=-1)
        scale = self.logit_scale.exp().clamp(max=_MAX_LOGIT_SCALE)
        pred_logits = scale * pred_embeds @ class_targets.to(pred_embeds).t()
        pred = {"pred_logits": pred_logits, "pred_masks": pred_masks, "pred_embeds": pred_embeds}
        attn_mask = self.attention_mask(pred_masks, attn_size) if self.masked_attention else None
        return pred, attn_mask

    def attention_mask(self, pred_masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Cross-attention mask from mask logits.

        Args:
            pred_masks: [B, Q, h, w] mask logits.
            size: (h_l, w_l) of the feature level attended next.

        Returns:
            bool [B * nheads, Q, h_l * w_l], True where the (resized) mask probability is below
            0.5; a query blocked everywhere is left fully open instead (no empty softmax).
        """
        with torch.no_grad():
            resized = F.interpolate(pred_masks, size=size, mode="bilinear", align_corners=False)
            blocked = (resized.sigmoid() < 0.5).flatten(2)
            blocked &= ~blocked.all(dim=-1, keepdim=True)
            return blocked.repeat_interleave(self.nheads, dim=0)
