"""Hungarian matching of predicted masks to target masks, on points of valid pixels."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from detectron2.config import configurable
from scipy.optimize import linear_sum_assignment

from .point_utils import point_sample, sample_valid_points

__all__ = [
    "MASK_LOSSES",
    "HungarianMatcher",
    "batch_dice_cost",
    "batch_sigmoid_ce_cost",
    "batch_sigmoid_focal_cost",
    "check_mask_loss",
    "embedding_class_cost",
    "label_class_cost",
    "solve_assignments",
]

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
    # BCE(x, y) = y * softplus(-x) + (1 - y) * softplus(x), and softplus(x) = softplus(-x) + x,
    # so BCE(x, y) = softplus(-x) + (1 - y) * x: one softplus, a row sum and one matmul.
    pos = F.softplus(-logits)
    cost = pos.sum(-1, keepdim=True) + logits @ (1 - targets).t()
    return cost / max(num_points, 1)


def batch_sigmoid_focal_cost(
    logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0
) -> torch.Tensor:
    """Pairwise mean sigmoid focal loss (the mask cost of MaskFormer and ZegFormer).

    For a binary target the focal loss of a point is ``alpha (1 - p)^gamma softplus(-x)`` when
    the target is 1 and ``(1 - alpha) p^gamma softplus(x)`` when it is 0 (``p = sigmoid(x)``),
    so the mean over points is one matmul per term.

    Args:
        logits: [Q, P] predicted mask logits at P points.
        targets: [T, P] binary targets at the same points.
        alpha: weight of the positive points in [0, 1]; negative: no weighting.
        gamma: exponent of the modulating factor.

    Returns:
        [Q, T] cost, ``mean_p focal(logits[q, p], targets[t, p])``.
    """
    num_points = logits.shape[1]
    probs = logits.sigmoid()
    pos = (1 - probs).pow(gamma) * F.softplus(-logits)
    neg = probs.pow(gamma) * F.softplus(logits)
    if alpha >= 0:
        pos, neg = alpha * pos, (1 - alpha) * neg
    cost = pos @ targets.t() + neg @ (1 - targets).t()
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


def label_class_cost(pred: dict[str, torch.Tensor], target: dict) -> torch.Tensor:
    """Class cost of labelled targets: ``-softmax(pred_logits)[q, label_t]``.

    Args:
        pred: one image's "pred_logits" [Q, K+1] (last = no-object).
        target: "labels" int64 [T] in 0..K-1.

    Returns:
        [Q, T] cost.
    """
    logits = pred["pred_logits"]
    labels = target["labels"].to(logits.device)
    num_classes = logits.shape[-1] - 1
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(
            f"HungarianMatcher: target labels must lie in [0, {num_classes - 1}] (the current "
            f"vocabulary); got range [{int(labels.min())}, {int(labels.max())}]. Map labels to "
            "vocabulary indices and drop ignore (255) before matching."
        )
    return -logits.softmax(-1)[:, labels]


def embedding_class_cost(pred: dict[str, torch.Tensor], target: dict) -> torch.Tensor:
    """Class cost of targets described by an embedding (pseudo-masks): ``-cos(e_q, r_t)``.

    Args:
        pred: one image's "pred_embeds" [Q, D] (L2-normalised query class embeddings).
        target: "embeds" [T, D] (L2-normalised region embeddings).

    Returns:
        [Q, T] cost in [-1, 1].
    """
    embeds = pred["pred_embeds"]
    regions = target["embeds"].to(device=embeds.device, dtype=embeds.dtype)
    if regions.shape[-1] != embeds.shape[-1]:
        raise ValueError(
            f"HungarianMatcher: region embeddings have width {regions.shape[-1]} but the query "
            f"class embeddings {embeds.shape[-1]}: both must live in CLIP's joint space"
        )
    return -embeds @ regions.t()


def solve_assignments(costs: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Minimum-cost one-to-one assignments of several cost matrices, with one host transfer.

    The matrices (any devices, any shapes [Q_i, T_i]) are flattened into one buffer, moved to
    the CPU at once, and solved one by one with ``scipy.optimize.linear_sum_assignment``;
    non-finite costs are replaced by a large finite one first.

    Returns:
        Per matrix ``(rows, cols)`` int64 CPU tensors of length min(Q_i, T_i), rows increasing.
    """
    if not costs:
        return []
    flat = torch.cat([c.detach().float().reshape(-1) for c in costs])
    flat = torch.nan_to_num(flat, nan=_INVALID_COST, posinf=_INVALID_COST, neginf=-_INVALID_COST)
    flat = flat.cpu().numpy()
    out, offset = [], 0
    for cost in costs:
        rows_n, cols_n = cost.shape
        block = flat[offset : offset + rows_n * cols_n].reshape(rows_n, cols_n)
        offset += rows_n * cols_n
        if cols_n == 0 or rows_n == 0:
            empty = torch.zeros(0, dtype=torch.int64)
            out.append((empty, empty.clone()))
            continue
        row, col = linear_sum_assignment(block)
        out.append(
            (torch.as_tensor(row, dtype=torch.int64), torch.as_tensor(col, dtype=torch.int64))
        )
    return out


ClassCost = Callable[[dict, dict], torch.Tensor]

#: Mask losses (and costs) on the sampled points: ``MODEL.OCZ.LOSS.MASK_LOSS``.
MASK_LOSSES = ("bce", "focal")


def check_mask_loss(mask_loss: str, alpha: float, gamma: float) -> None:
    """Raise when ``MODEL.OCZ.LOSS.MASK_LOSS`` / ``FOCAL_ALPHA`` / ``FOCAL_GAMMA`` are invalid."""
    if mask_loss not in MASK_LOSSES:
        raise ValueError(f"MODEL.OCZ.LOSS.MASK_LOSS={mask_loss!r}: use one of {MASK_LOSSES}")
    if alpha > 1 or (alpha < 0 and alpha != -1):
        raise ValueError(
            f"MODEL.OCZ.LOSS.FOCAL_ALPHA={alpha} must be in [0, 1], or -1 for no weighting"
        )
    if gamma < 0:
        raise ValueError(f"MODEL.OCZ.LOSS.FOCAL_GAMMA={gamma} must be >= 0")


class HungarianMatcher(nn.Module):
    """One-to-one assignment of queries to target masks, per image.

    Cost of query q and target t (one shared set of points per image, drawn uniformly over the
    image's valid pixels, so pixels outside ``valid`` never count)::

        cost_class * class_cost(q, t)
        + cost_mask * mask_cost(pred_mask_q, mask_t) + cost_dice * dice(pred_mask_q, mask_t)

    ``mask_cost`` is the mean sigmoid BCE over the points (``"bce"``) or the mean sigmoid focal
    loss (``"focal"``, MaskFormer's).

    ``class_cost`` is a function of one image's predictions and targets:
    :func:`label_class_cost` (``-softmax(pred_logits)[q, label_t]``, the default, for labelled
    targets) or :func:`embedding_class_cost` (``-cos(pred_embeds_q, embeds_t)``, for pseudo-masks
    described by region embeddings). The costs are computed in float32 with autocast off, on the
    predictions' device; the cost matrices of all images (and of all prediction sets given to
    :meth:`match_sets`) reach the CPU in one transfer (:func:`solve_assignments`).
    """

    @configurable
    def __init__(
        self,
        *,
        cost_class: float = 1.0,
        cost_mask: float = 1.0,
        cost_dice: float = 1.0,
        num_points: int = 12544,
        class_cost: ClassCost = label_class_cost,
        mask_cost: str = "bce",
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ):
        """
        Args:
            cost_class: weight of the classification cost.
            cost_mask: weight of the mask cost.
            cost_dice: weight of the dice cost.
            num_points: points sampled per image (shared by all queries and targets).
            class_cost: the classification cost function (see the class docstring).
            mask_cost: "bce" or "focal" (see the class docstring).
            focal_alpha, focal_gamma: the focal cost's alpha and gamma.
        """
        super().__init__()
        check_mask_loss(mask_cost, focal_alpha, focal_gamma)
        if cost_class == 0 and cost_mask == 0 and cost_dice == 0:
            raise ValueError("HungarianMatcher: all cost weights are 0; set at least one > 0.")
        if num_points <= 0:
            raise ValueError(f"HungarianMatcher: num_points must be > 0, got {num_points}.")
        self.cost_class = cost_class
        self.cost_mask = cost_mask
        self.cost_dice = cost_dice
        self.num_points = num_points
        self.class_cost = class_cost
        self.mask_cost = mask_cost
        self.focal_alpha = float(focal_alpha)
        self.focal_gamma = float(focal_gamma)

    @classmethod
    def from_config(cls, cfg) -> dict:
        loss = cfg.MODEL.OCZ.LOSS
        return {
            "cost_class": loss.CLASS_WEIGHT,
            "cost_mask": loss.MASK_WEIGHT,
            "cost_dice": loss.DICE_WEIGHT,
            "num_points": loss.TRAIN_NUM_POINTS,
            "mask_cost": loss.MASK_LOSS,
            "focal_alpha": loss.FOCAL_ALPHA,
            "focal_gamma": loss.FOCAL_GAMMA,
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
            outputs: "pred_logits" [B, Q, K+1] (last = no-object), "pred_masks" [B, Q, h, w]
                mask logits and, for :func:`embedding_class_cost`, "pred_embeds" [B, Q, D].
            targets: B dicts: "masks" bool/float [T, H, W] (any resolution), optional "valid"
                bool [H, W] (pixels the masks are defined on; all True when absent), and what
                the class cost reads: "labels" int64 [T] (indices into the current vocabulary
                0..K-1) or "embeds" [T, D].
            query_indices: optional int64 [Q'] queries that take part (default: all Q).

        Returns:
            B tuples ``(query_idx, target_idx)`` of int64 CPU tensors of length min(Q', T);
            ``query_idx`` indexes the full query set, sorted increasingly.
        """
        return self.match_sets([outputs], targets, query_indices)[0]

    @torch.no_grad()
    def match_sets(
        self,
        sets: list[dict[str, torch.Tensor]],
        targets: list[dict[str, torch.Tensor]],
        query_indices: torch.Tensor | None = None,
    ) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
        """:meth:`forward` for several prediction sets (e.g. the final and the auxiliary
        predictions of deep supervision) against the same targets, with one host transfer. The
        sets of an image are costed together, on one shared draw of points.

        Returns:
            Per set, per image ``(query_idx, target_idx)`` (as :meth:`forward`).
        """
        batch = sets[0]["pred_masks"].shape[0]
        if len(targets) != batch or any(s["pred_masks"].shape[0] != batch for s in sets):
            raise ValueError(f"HungarianMatcher: {len(targets)} targets for a batch of {batch}.")
        device = sets[0]["pred_masks"].device
        preds = [{k: v for k, v in s.items() if isinstance(v, torch.Tensor)} for s in sets]
        if query_indices is not None:
            index = query_indices.to(device=device, dtype=torch.long)
            preds = [{k: v[:, index] for k, v in p.items()} for p in preds]
        keys = [k for k in preds[0] if all(k in p for p in preds)]
        num_queries = preds[0]["pred_masks"].shape[1]
        per_image = []
        with torch.autocast(device_type=device.type, enabled=False):
            for b, target in enumerate(targets):
                # All sets of an image in one cost matrix [S * Q, T] (the same points for all).
                stacked = {k: torch.cat([p[k][b] for p in preds]).float() for k in keys}
                per_image.append(self._cost_matrix(stacked, target).split(num_queries))
        costs = [per_image[b][i] for i in range(len(sets)) for b in range(batch)]
        solved = solve_assignments(costs)
        if query_indices is not None:
            to_full = query_indices.cpu().long()
            solved = [(to_full[rows], cols) for rows, cols in solved]
        return [solved[i * batch : (i + 1) * batch] for i in range(len(sets))]

    def _cost_matrix(self, pred: dict[str, torch.Tensor], target: dict) -> torch.Tensor:
        """[Q, T] weighted cost of one image (see the class docstring)."""
        mask_logits = pred["pred_masks"]
        masks = target["masks"].to(device=mask_logits.device, dtype=torch.float32)
        num_queries, num_targets = mask_logits.shape[0], masks.shape[0]
        if num_targets == 0:
            return mask_logits.new_zeros((num_queries, 0))
        cost = mask_logits.new_zeros((num_queries, num_targets))
        if self.cost_class:
            cost = cost + self.cost_class * self.class_cost(pred, target)
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
        if self.cost_mask and self.mask_cost == "focal":
            focal = batch_sigmoid_focal_cost(
                pred_points, target_points, self.focal_alpha, self.focal_gamma
            )
            cost = cost + self.cost_mask * focal
        elif self.cost_mask:
            cost = cost + self.cost_mask * batch_sigmoid_ce_cost(pred_points, target_points)
        if self.cost_dice:
            cost = cost + self.cost_dice * batch_dice_cost(pred_points, target_points)
        return cost

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}(cost_class={self.cost_class}, cost_mask={self.cost_mask}, "
            f"cost_dice={self.cost_dice}, num_points={self.num_points}, "
            f"class_cost={self.class_cost.__name__}, mask_cost={self.mask_cost})"
        )
