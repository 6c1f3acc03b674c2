"""Object Refinement Attention (ORA) and granular attention (OC-ZSS).

ORA refines the patch features PF with object features OF over S rounds. Each round:

1. object stage: OF attends to PF (queries from OF, keys/values from PF), then a GRU updates OF;
2. patch stage: PF attends to the updated OF (queries from PF, keys/values from OF), then a GRU
   updates PF.

Granular attention replaces the object stage's K/V projections and the patch stage's Q projection
(the three that read the patch grid) by :class:`GranularExtractor`, a multi-receptive-field
extractor on the grid. Choices (the paper is silent): the weights are shared across rounds (the
rounds are a recurrence, as in slot attention); inputs to every projection are layer-normalised;
OF starts from the object prompts' outputs, or from learned embeddings (random initialisation,
the paper's ablation) when the backbone has no object prompts.

The recurrence's states start layer-normalised (pf_0 = LN(W_in PF), of_0 = LN(W_in OF)): a GRU's
state is a convex mix of its previous value and a tanh candidate, so it must start on that scale.
The refinement's change is added to PF: refined = PF + W_out(pf_S - pf_0).

Width: ORA may work narrower than the backbone (``dim`` < ``channels``, e.g. the pixel decoder's
256 for a ViT-B's 768). PF and OF are then projected to ``dim`` on entry (W_in) and the change is
projected back (W_out), zero-initialised so that a narrow ORA starts as the identity. At ``dim`` =
``channels`` W_in and W_out are the identity.

Padding: patches that hold no image are closed as keys of the object stage and left out of
granular attention's global pool. The cost
per patch and round scales with ``dim``**2 (three granular mixes at 5 ``dim``**2 each with four
rates, a GRU at 6 ``dim``**2), so 256 instead of 768 makes ORA about 9x cheaper.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GranularExtractor", "ObjectRefinementAttention"]


class GranularExtractor(nn.Module):
    """Multi-receptive-field features on a patch grid: parallel depth-wise 3x3 convolutions with
    dilations ``rates``, a global-average-pool branch, concatenated and mixed by a 1x1 conv.

    [B, C, h, w] -> [B, C, h, w].
    """

    def __init__(self, dim: int, rates: Sequence[int] = (1, 3, 6, 9)):
        super().__init__()
        if not rates or any(int(r) < 1 for r in rates):
            raise ValueError(f"MODEL.OCZ.ORA.GRANULAR_RATES must be >= 1, got {list(rates)}.")
        self.rates = tuple(int(r) for r in rates)
        self.branches = nn.ModuleList(
            nn.Conv2d(dim, dim, 3, padding=r, dilation=r, groups=dim) for r in self.rates
        )
        self.pool = nn.Conv2d(dim, dim, 1)
        self.mix = nn.Conv2d(dim * (len(self.rates) + 1), dim, 1)

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """
        Args:
            x: [B, C, h, w].
            valid: optional bool [B, h, w], the cells that hold image: the global pool averages
                over them only (padding would dilute it).
        """
        if valid is None:
            mean = x.mean(dim=(2, 3), keepdim=True)
        else:
            weight = valid[:, None].to(x.dtype)
            mean = (x * weight).sum((2, 3), keepdim=True) / weight.sum((2, 3), True).clamp_min(1)
        pooled = self.pool(mean).expand_as(x)
        return self.mix(torch.cat([b(x) for b in self.branches] + [pooled], dim=1))


class _GridProjection(nn.Module):
    """A projection of patch tokens: linear, or granular on the grid. [B, N, C] -> [B, N, C]."""

    def __init__(self, dim: int, rates: Sequence[int] | None):
        super().__init__()
        self.granular = GranularExtractor(dim, rates) if rates else None
        self.linear = None if rates else nn.Linear(dim, dim)

    def forward(
        self, x: torch.Tensor, grid_hw: tuple[int, int], valid: torch.Tensor | None = None
    ) -> torch.Tensor:
        if self.granular is None:
            return self.linear(x)
        b, n, c = x.shape
        grid = x.transpose(1, 2).reshape(b, c, *grid_hw)
        return self.granular(grid, valid).flatten(2).transpose(1, 2)


def _attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    heads: int,
    key_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Multi-head scaled dot-product attention of already projected [B, n, C] tensors;
    ``key_valid`` (bool [B, n_k]) closes the keys that are False (padding)."""
    b, nq, c = q.shape

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(b, t.shape[1], heads, c // heads).transpose(1, 2)

    mask = None if key_valid is None else key_valid[:, None, None, :]
    out = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=mask)
    return out.transpose(1, 2).reshape(b, nq, c)


class _GRUUpdate(nn.Module):
    """GRU cell applied token-wise: state [B, n, C] updated with input [B, n, C]."""

    def __init__(self, dim: int):
        super().__init__()
        self.cell = nn.GRUCell(dim, dim)

    def forward(self, inputs: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        b, n, c = state.shape
        return self.cell(inputs.reshape(b * n, c), state.reshape(b * n, c)).view(b, n, c)


class ObjectRefinementAttention(nn.Module):
    """S rounds of object stage + patch stage refining patch features with object features."""

    def __init__(
        self,
        channels: int,
        *,
        dim: int = 0,
        num_rounds: int = 4,
        num_heads: int = 8,
        num_objects: int = 0,
        granular_rates: Sequence[int] | None = (1, 3, 6, 9),
    ):
        """
        Args:
            channels: channels of PF and OF (the ViT width).
            dim: ORA's own width; 0 (or ``channels``) works at ``channels`` with no projections.
            num_rounds: S (>= 1; S = 0 is "no ORA", decided by the caller).
            num_heads: attention heads (must divide the width ORA works at).
            num_objects: learned object embeddings for the random-init ablation (used when
                :meth:`forward` gets no object features); 0 requires object features.
            granular_rates: dilation rates of granular attention; None or () for plain linear
                projections.
        """
        super().__init__()
        if num_rounds < 1:
            raise ValueError(f"ObjectRefinementAttention needs >= 1 round, got {num_rounds}.")
        dim = int(dim) or int(channels)
        if dim < 0:
            raise ValueError(f"MODEL.OCZ.ORA.DIM must be >= 0 (0: the backbone's width), got {dim}")
        if dim % num_heads:
            raise ValueError(
                f"MODEL.OCZ.ORA.NHEADS={num_heads} must divide ORA's width {dim} "
                "(MODEL.OCZ.ORA.DIM, 0: the backbone's width)."
            )
        self.channels = int(channels)
        self.dim = dim
        self.num_rounds = int(num_rounds)
        self.num_heads = int(num_heads)
        rates = tuple(granular_rates) if granular_rates else None
        self.granular = rates is not None
        # Entry and exit projections of a narrow ORA (None at the backbone's width).
        narrow = dim != self.channels
        self.patch_in = nn.Linear(self.channels, dim) if narrow else None
        self.object_in = nn.Linear(self.channels, dim) if narrow else None
        self.patch_exit = nn.Linear(dim, self.channels) if narrow else None
        # The GRUs' initial states, layer-normalised: a GRU's state is a convex mix of its
        # previous value and a tanh candidate in [-1, 1], so it must start on that scale (CLIP's
        # residual stream, e.g. res11, is far larger).
        self.patch_state_norm = nn.LayerNorm(dim)
        self.object_state_norm = nn.LayerNorm(dim)
        if narrow:
            nn.init.zeros_(self.patch_exit.weight)
            nn.init.zeros_(self.patch_exit.bias)
        # Object stage: objects query the patches.
        self.obj_norm = nn.LayerNorm(dim)
        self.patch_norm = nn.LayerNorm(dim)
        self.obj_q = nn.Linear(dim, dim)
        self.obj_k = _GridProjection(dim, rates)
        self.obj_v = _GridProjection(dim, rates)
        self.obj_out = nn.Linear(dim, dim)
        self.obj_gru = _GRUUpdate(dim)
        # Patch stage: patches query the objects.
        self.patch_q = _GridProjection(dim, rates)
        self.patch_k = nn.Linear(dim, dim)
        self.patch_v = nn.Linear(dim, dim)
        self.patch_out = nn.Linear(dim, dim)
        self.patch_gru = _GRUUpdate(dim)
        if num_objects > 0:
            self.object_init = nn.Parameter(torch.randn(num_objects, dim) * dim**-0.5)
        else:
            self.register_parameter("object_init", None)

    def forward(
        self,
        patches: torch.Tensor,
        objects: torch.Tensor | None = None,
        valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """
        Args:
            patches: PF [B, C, h, w], C = ``channels``.
            objects: OF [B, n_o, C] (object-prompt outputs), or None to start from the learned
                embeddings (which live at ORA's width).
            valid: optional bool [B, h, w], the patches that hold image (not padding): objects
                attend to them only, and granular attention's global pool averages over them.

        Returns:
            Refined PF [B, C, h, w]: PF + W_out(pf_S - pf_0), W_out the exit projection
            (identity at full width), pf_0 the layer-normalised entry state.
        """
        b, c, h, w = patches.shape
        if c != self.channels:
            raise ValueError(
                f"ORA was built for {self.channels}-channel patch features, got "
                f"{tuple(patches.shape)}"
            )
        if valid is not None and tuple(valid.shape) != (b, h, w):
            raise ValueError(f"ORA's valid patches {tuple(valid.shape)} must be [B, h, w]")
        if objects is None:
            if self.object_init is None:
                raise ValueError(
                    "ORA got no object features and has no learned ones: enable object prompts "
                    "(MODEL.OCZ.OBJECTS.PROMPTS) or set MODEL.OCZ.ORA.OBJECT_INIT 'random'"
                )
            of = self.object_init.unsqueeze(0).expand(b, -1, -1)
        elif objects.shape[0] != b or objects.shape[2] != c:
            raise ValueError(
                f"object features {tuple(objects.shape)} do not fit patch features "
                f"{tuple(patches.shape)} (need [B, n_o, C])"
            )
        else:
            of = objects if self.object_in is None else self.object_in(objects)
        of = self.object_state_norm(of)
        grid = (h, w)
        key_valid = None if valid is None else valid.reshape(b, h * w)
        tokens = patches.flatten(2).transpose(1, 2)  # [B, N, C]
        start = self.patch_state_norm(tokens if self.patch_in is None else self.patch_in(tokens))
        pf = start
        for _ in range(self.num_rounds):
            of, pf = self._round(of, pf, grid, valid, key_valid)
        change = pf - start
        refined = tokens + (change if self.patch_exit is None else self.patch_exit(change))
        return refined.transpose(1, 2).reshape(b, c, h, w)

    def _round(
        self,
        of: torch.Tensor,
        pf: torch.Tensor,
        grid: tuple[int, int],
        valid: torch.Tensor | None,
        key_valid: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One round: the object stage updates OF from PF, then the patch stage updates PF from
        the updated OF. [B, n_o, d], [B, N, d] -> same."""
        pn, on = self.patch_norm(pf), self.obj_norm(of)
        msg = _attend(
            self.obj_q(on), self.obj_k(pn, grid, valid), self.obj_v(pn, grid, valid),
            self.num_heads, key_valid,
        )  # fmt: skip
        of = self.obj_gru(self.obj_out(msg), of)
        on = self.obj_norm(of)
        msg = _attend(
            self.patch_q(pn, grid, valid), self.patch_k(on), self.patch_v(on), self.num_heads
        )
        pf = self.patch_gru(self.patch_out(msg), pf)
        return of, pf
