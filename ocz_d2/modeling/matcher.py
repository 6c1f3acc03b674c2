"""Hungarian matching of predicted masks to target masks, on points of valid pixels."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from detectron2.config import configurable
from scipy.optimize import linear_sum_assignment

from .point_utils import point_sample, sample_valid_points

__all__ = ["HungarianMatcher", "batch_dice_cost", "batch_sigmoid_ce_cost"]

# Stand-in for non-finite costs (inf logits give inf or NaN costs); scipy rejects non-finite
# entries, and any real cost is orders of magnitude smaller.
_INVALID_COST = 1e8


def batch_sigmoid_ce_cost(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Pairwise mean sigmoid binary cross-entropy.

    Args:
        logits: [Q, P] predicted mask logits at P points.
        targets: [T, P] target values in [0, 1] at the same points.

    Returns:
        [Q, T] cost, ``mean_p BCE(logits[q, p], targets[t, p])``.
    """
    num_points = logits.shape[1]
    # BCE(x, y) = y * softplus(-x) + (1 - y) * softplus(x): linear in y, hence one matmul each.
    pos = F.softplus(-logits)
    neg = F.softplus(logits)
    cost = torch.einsum("qp,tp->qt", pos, targets) + torch.einsum("qp,tp->qt", neg, 1 - targets)
    return cost / max(num_points, 1)


def batch_dice_cost(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Pairwise dice cost ``1 - (2 |p t| + 1) / (|p| + |t| + 1)`` with ``p = sigmoid(logits)``.

    Args:
        logits: [Q, P] predicted mask logits at P points.
        targets: [T, P] target values in [0, 1] at the same points.

    Returns:
        [Q, T] cost in [0, 1).
    """
    probs = logits.sigmoid()
    numerator = 2 * torch.einsum("qp,tp->qt", probs, targets)
    denominator = probs.sum(-1)[:, None] + targets.sum(-1)[None, :]
    return 1 - (numerator + 1) / (denominator + 1)


class HungarianMatcher(nn.Module):
    """One-to-one assignment of queries to target masks, per image.

    Cost of query q and target t (one shared set of points per image, drawn uniformly over the
    image's valid pixels, so ignore pixels never count)::

        cost_class * (-softmax(pred_logits)[q, label_t])
        + cost_mask * mean-BCE(pred_mask_q, mask_t) + cost_dice * dice(pred_mask_q, mask_t)

    The costs are computed in float32 with autocast off; ``scipy.optimize.linear_sum_assignment``
    runs per image on CPU. With ``query_indices`` only a subset of the queries takes part (a split
    matcher matches seen queries to seen-class targets and candidate queries to pseudo-masks by
    calling it twice with two index ranges).
    """

    @configurable
    def __init__(
        self,
        *,
        cost_class: float = 1.0,
        cost_mask: float = 1.0,
        cost_dice: float = 1.0,
        num_points: int = 12544,
    ):
        """
        Args:
            cost_class: weight of the classification cost.
            cost_mask: weight of the sigmoid binary cross-entropy mask cost.
            cost_dice: weight of the dice cost.
            num_points: points sampled per image (shared by all queries and targets).
        """
        super().__init__()
        if cost_class == 0 and cost_mask == 0 and cost_dice == 0:
            raise ValueError("HungarianMatcher: all cost weights are 0; set at least one > 0.")
        if num_points <= 0:
            raise ValueError(f"HungarianMatcher: num_points must be > 0, got {num_points}.")
        self.cost_class = cost_class
        self.cost_mask = cost_mask
        self.cost_dice = cost_dice
        self.num_points = num_points

    @classmethod
    def from_config(cls, cfg) -> dict:
        loss = cfg.MODEL.OCZ.LOSS
        return {
            "cost_class": loss.CLASS_WEIGHT,
            "cost_mask": loss.MASK_WEIGHT,
            "cost_dice": loss.DICE_WEIGHT,
            "num_points": loss.TRAIN_NUM_POINTS,
        }

    @torch.no_grad()
    def forward(
        self,
        outputs: dict[str, torch.Tensor],
        targets: list[dict[str, torch.Tensor]],
        query_indices: torch.Tensor | None = None,
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Match the predictions of each image to its targets.

        Args:
            outputs: "pred_logits" [B, Q, K+1] (last = no-object) and "pred_masks" [B, Q, h, w]
                mask logits.
            targets: B dicts: "labels" int64 [T] (indices into the current vocabulary 0..K-1),
                "masks" bool/float [T, H, W] (any resolution), optional "valid" bool [H, W] (not
                ignore, not padding; all True when absent).
            query_indices: optional int64 [Q'] queries that take part (default: all Q).

        Returns:
            B tuples ``(query_idx, target_idx)`` of int64 CPU tensors of length min(Q', T);
            ``query_idx`` indexes the full query set, sorted increasingly.
        """
        pred_logits = outputs["pred_logits"]
        pred_masks = outputs["pred_masks"]
        if len(targets) != pred_logits.shape[0]:
            raise ValueError(
                f"HungarianMatcher: {len(targets)} targets for a batch of {pred_logits.shape[0]}."
            )
        if query_indices is not None:
            query_indices = query_indices.to(device=pred_logits.device, dtype=torch.long)
            pred_logits = pred_logits[:, query_indices]
            pred_masks = pred_masks[:, query_indices]

        indices = []
        with torch.autocast(device_type=pred_logits.device.type, enabled=False):
            for b, target in enumerate(targets):
                cost = self._cost_matrix(pred_logits[b].float(), pred_masks[b].float(), target)
                if cost.shape[1] == 0:
                    rows = cols = torch.zeros(0, dtype=torch.int64)
                else:
                    cost = torch.nan_to_num(
                        cost, nan=_INVALID_COST, posinf=_INVALID_COST, neginf=-_INVALID_COST
                    )
                    row, col = linear_sum_assignment(cost.cpu().numpy())
                    rows = torch.as_tensor(row, dtype=torch.int64)
                    cols = torch.as_tensor(col, dtype=torch.int64)
                if query_indices is not None:
                    rows = query_indices.cpu()[rows]
                indices.append((rows, cols))
        return indices

    def _cost_matrix(
        self, logits: torch.Tensor, mask_logits: torch.Tensor, target: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """[Q, T] weighted cost of one image (see the class docstring)."""
        labels = target["labels"].to(logits.device)
        num_classes = logits.shape[-1] - 1
        num_queries, num_targets = logits.shape[0], labels.shape[0]
        if num_targets == 0:
            return logits.new_zeros((num_queries, 0))
        if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
            raise ValueError(
                f"HungarianMatcher: target labels must lie in [0, {num_classes - 1}] (the current "
                f"vocabulary); got range [{int(labels.min())}, {int(labels.max())}]. Map labels to "
                "vocabulary indices and drop ignore (255) before matching."
            )
        cost = -self.cost_class * logits.softmax(-1)[:, labels]

        masks = target["masks"].to(device=logits.device, dtype=torch.float32)
        valid = target.get("valid")
        if valid is None:
            valid = torch.ones(masks.shape[-2:], dtype=torch.bool, device=masks.device)
        if valid.shape != masks.shape[-2:]:
            raise ValueError(
                f"HungarianMatcher: valid {tuple(valid.shape)} and masks {tuple(masks.shape)} "
                "must share their spatial size."
            )
        coords = sample_valid_points(valid.to(masks.device), self.num_points)
        if coords.shape[0] == 0:
            # No valid pixel: only the class cost can tell queries apart.
            return cost
        coords = coords.unsqueeze(0)
        pred_points = point_sample(mask_logits.unsqueeze(0), coords)[0]  # [Q, P]
        # Points are pixel centres of the target grid, so bilinear sampling is exact there.
        target_points = point_sample(masks.unsqueeze(0), coords)[0]  # [T, P]
        if self.cost_mask:
            cost = cost + self.cost_mask * batch_sigmoid_ce_cost(pred_points, target_points)
        if self.cost_dice:
            cost = cost + self.cost_dice * batch_dice_cost(pred_points, target_points)
        return cost

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}(cost_class={self.cost_class}, cost_mask={self.cost_mask}, "
            f"cost_dice={self.cost_dice}, num_points={self.num_points})"
        )
