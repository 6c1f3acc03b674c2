"""Set-prediction losses of the zero-shot mask decoder (classification, mask BCE, dice)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.utils import comm

from .matcher import HungarianMatcher, check_mask_loss, embedding_class_cost
from .point_utils import point_sample, sample_uncertain_points, uniform_valid_points

__all__ = [
    "CANDIDATE_PREFIX",
    "SetCriterion",
    "SplitCriterion",
    "build_criterion",
    "dice_loss",
    "expand_weight_dict",
    "pixel_text_loss",
    "sigmoid_ce_loss",
    "sigmoid_focal_loss",
]

_LOSS_KEYS = {
    "labels": ("loss_ce",),
    "no_object": ("loss_ce",),
    "masks": ("loss_mask", "loss_dice"),
    "embeddings": ("loss_embed",),
}


def sigmoid_ce_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum over masks of the mean-over-points sigmoid BCE.

    Args:
        logits: [M, P] predicted logits; targets: [M, P] values in [0, 1].

    Returns:
        Scalar, ``sum_m mean_p BCE``; 0 (still in the graph) when M or P is 0.
    """
    if logits.numel() == 0:
        return logits.sum() * 0.0
    loss = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    return loss.mean(1).sum()


def sigmoid_focal_loss(
    logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0
) -> torch.Tensor:
    """Sum over masks of the mean-over-points sigmoid focal loss (RetinaNet's; MaskFormer's and
    ZegFormer's mask loss).

    Per point, with ``p = sigmoid(logit)`` and ``p_t = p t + (1 - p)(1 - t)``:
    ``alpha_t (1 - p_t)^gamma BCE(logit, t)``, ``alpha_t = alpha t + (1 - alpha)(1 - t)``
    (``alpha_t = 1`` when ``alpha < 0``).

    Args:
        logits: [M, P] predicted logits; targets: [M, P] values in [0, 1].
        alpha: weight of the positive points, in [0, 1]; negative: no weighting.
        gamma: exponent of the modulating factor (>= 0).

    Returns:
        Scalar, ``sum_m mean_p focal``; 0 (still in the graph) when M or P is 0.
    """
    if logits.numel() == 0:
        return logits.sum() * 0.0
    probs = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = probs * targets + (1 - probs) * (1 - targets)
    loss = ce * (1 - p_t).pow(gamma)
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss.mean(1).sum()


def dice_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum over masks of ``1 - (2 |p t| + 1) / (|p| + |t| + 1)``, ``p = sigmoid(logits)``.

    Args:
        logits: [M, P] predicted logits; targets: [M, P] values in [0, 1].

    Returns:
        Scalar; 0 (still in the graph) when M or P is 0.
    """
    if logits.numel() == 0:
        return logits.sum() * 0.0
    probs = logits.sigmoid()
    numerator = 2 * (probs * targets).sum(-1)
    denominator = probs.sum(-1) + targets.sum(-1)
    return (1 - (numerator + 1) / (denominator + 1)).sum()


def expand_weight_dict(base: dict[str, float], num_aux_layers: int) -> dict[str, float]:
    """Add the weights of the auxiliary (per-layer) losses, keys suffixed ``_{i}``.

    Args:
        base: weight per loss key, e.g. {"loss_ce": 2.0, "loss_mask": 5.0, "loss_dice": 5.0}.
        num_aux_layers: number of auxiliary predictions (0 without deep supervision).

    Returns:
        ``base`` plus ``{f"{k}_{i}": w}`` for i in 0..num_aux_layers-1.
    """
    out = dict(base)
    for i in range(num_aux_layers):
        out.update({f"{k}_{i}": w for k, w in base.items()})
    return out


def _count_aux_layers(weight_dict: dict[str, float], base_keys: set[str]) -> int:
    """Number of auxiliary layers named by ``{key}_{i}`` entries; they must be 0..n-1."""
    suffixes = set()
    for key in weight_dict:
        for base in base_keys:
            suffix = key[len(base) + 1 :]
            if key.startswith(base + "_") and suffix.isdigit():
                suffixes.add(int(suffix))
    if suffixes != set(range(len(suffixes))):
        raise ValueError(
            f"SetCriterion: auxiliary weight keys have suffixes {sorted(suffixes)}; expected "
            "0..n-1 (see expand_weight_dict)."
        )
    return len(suffixes)


# Target value of a query that gets no classification loss (F.cross_entropy's ignore_index).
_NO_CLASS_LOSS = -100


class SetCriterion(nn.Module):
    """Hungarian-matched losses of a set of mask predictions, with ignore-aware mask losses.

    Per prediction set (the final one and, with deep supervision, each auxiliary one, re-matched
    independently; auxiliary keys get the suffix ``_{i}``):

    - ``loss_ce``: cross-entropy over the current K classes + no-object (index K). Matched
      queries target their label, every other query targets no-object; class weights are 1 with
      ``no_object_weight`` for no-object, built for the current K at every call (the vocabulary
      may change between batches).
    - ``loss_mask`` / ``loss_dice``: sigmoid BCE (or, with ``mask_loss="focal"``, the sigmoid
      focal loss) and dice of each matched (query, target) pair on points chosen by uncertainty
      among the image's VALID pixels; summed over pairs and divided by the number of target
      masks (all-reduced over ranks, at least 1).
    - "no_object" instead of "labels" (targets without class labels, e.g. pseudo-masks):
      ``loss_ce`` teaches only the unmatched queries no-object; matched ones get no class term.
      The weighted sum is divided by the number of queries (matched ones included, each counted
      with weight 1), not by the summed weights, so the loss is proportional to
      ``no_object_weight`` (a weighted mean over no-object targets only would cancel it).
    - "embeddings": ``loss_embed``, ``1 - cos(pred_embeds_q, embeds_t)`` of each matched pair,
      summed and divided like the mask losses (targets carry "embeds" [T, D]).

    The matcher sees all prediction sets of a call at once (one host transfer per call).

    Ignore semantics (seen group): pixels with ``valid == False`` (label 255 — unannotated
    pixels and, in inductive training, pixels of unseen classes — and padding) are never sampled,
    so they are neither foreground nor background for any mask loss: a seen query is not taught
    that an unseen object is background, and nothing is learnt about those pixels from the
    seen-class targets. The classification loss is unaffected by pixels. A candidate group that
    gives pseudo-masks a meaning on ignore pixels passes its own ``valid`` maps.

    An image without targets contributes only no-object class terms; the mask losses are then 0
    but connected to the graph, so backward works with an all-ignore batch.

    ``forward`` returns the unweighted losses; ``self.weight_dict`` maps every key (suffixed ones
    included) to its weight: ``total = sum(losses[k] * weight_dict[k] for k in losses)``.
    """

    @configurable
    def __init__(
        self,
        *,
        matcher: HungarianMatcher,
        weight_dict: dict[str, float],
        no_object_weight: float = 0.1,
        losses: tuple[str, ...] = ("labels", "masks"),
        num_points: int = 12544,
        oversample_ratio: float = 3.0,
        importance_sample_ratio: float = 0.75,
        num_aux_layers: int | None = None,
        no_object_on_ignore: bool = True,
        mask_loss: str = "bce",
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ):
        """
        Args:
            matcher: assigns queries to targets.
            weight_dict: weight of each base loss key ("loss_ce", "loss_mask", "loss_dice");
                suffixed keys already present are kept, missing ones are added for
                ``num_aux_layers`` auxiliary predictions.
            no_object_weight: class weight of no-object in the cross-entropy.
            losses: subset of ("labels", "masks").
            num_points: points per mask for the mask losses.
            oversample_ratio: candidate points per point for uncertainty sampling (>= 1).
            importance_sample_ratio: fraction of points chosen by uncertainty (in [0, 1]).
            num_aux_layers: auxiliary predictions supervised (0: auxiliary outputs ignored);
                None infers it from the suffixed keys of ``weight_dict`` (``loss_ce_0`` ...).
            no_object_on_ignore: whether an unmatched query whose predicted mask lies mostly on
                ignore pixels is taught no-object. False leaves its class free (no class loss):
                in inductive training ignore pixels include unseen objects, and teaching the
                queries that find them "no-object" suppresses unseen classes at test time.
            mask_loss: "bce" (:func:`sigmoid_ce_loss`) or "focal" (:func:`sigmoid_focal_loss`).
            focal_alpha, focal_gamma: the focal loss's alpha and gamma.
        """
        super().__init__()
        check_mask_loss(mask_loss, focal_alpha, focal_gamma)
        unknown = set(losses) - set(_LOSS_KEYS)
        if unknown:
            raise ValueError(f"SetCriterion: unknown losses {sorted(unknown)}; use {_LOSS_KEYS}.")
        if {"labels", "no_object"} <= set(losses):
            raise ValueError(
                "SetCriterion: 'labels' and 'no_object' both define loss_ce; pick one."
            )
        base_keys = {k for name in losses for k in _LOSS_KEYS[name]}
        missing = base_keys - set(weight_dict)
        if missing:
            raise ValueError(f"SetCriterion: weight_dict lacks weights for {sorted(missing)}.")
        if num_aux_layers is None:
            num_aux_layers = _count_aux_layers(weight_dict, base_keys)
        self.matcher = matcher
        base = {k: v for k, v in weight_dict.items() if k in base_keys}
        self.weight_dict = {**expand_weight_dict(base, num_aux_layers), **weight_dict}
        self.no_object_weight = no_object_weight
        self.losses = tuple(losses)
        self.num_points = num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        self.num_aux_layers = num_aux_layers
        self.no_object_on_ignore = no_object_on_ignore
        self.mask_loss = mask_loss
        self.focal_alpha = float(focal_alpha)
        self.focal_gamma = float(focal_gamma)

    @classmethod
    def from_config(cls, cfg) -> dict:
        loss = cfg.MODEL.OCZ.LOSS
        weight_dict = {
            "loss_ce": loss.CLASS_WEIGHT,
            "loss_mask": loss.MASK_WEIGHT,
            "loss_dice": loss.DICE_WEIGHT,
        }
        # The decoder yields one auxiliary prediction before its first layer and one after each
        # layer but the last.
        num_aux = cfg.MODEL.OCZ.DECODER.DEC_LAYERS if loss.DEEP_SUPERVISION else 0
        return {
            "matcher": HungarianMatcher(cfg),
            "weight_dict": weight_dict,
            "no_object_weight": loss.NO_OBJECT_WEIGHT,
            "losses": ("labels", "masks"),
            "num_points": loss.TRAIN_NUM_POINTS,
            "oversample_ratio": loss.OVERSAMPLE_RATIO,
            "importance_sample_ratio": loss.IMPORTANCE_SAMPLE_RATIO,
            "num_aux_layers": num_aux,
            "no_object_on_ignore": loss.NO_OBJECT_ON_IGNORE,
            "mask_loss": loss.MASK_LOSS,
            "focal_alpha": loss.FOCAL_ALPHA,
            "focal_gamma": loss.FOCAL_GAMMA,
        }

    def forward(
        self,
        outputs: dict,
        targets: list[dict[str, torch.Tensor]],
        query_indices: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Compute the losses.

        Args:
            outputs: "pred_logits" [B, Q, K+1], "pred_masks" [B, Q, h, w] and optionally
                "aux_outputs" (list of dicts with the same keys).
            targets: B dicts: "labels" int64 [T] in 0..K-1, "masks" bool/float [T, H, W],
                optional "valid" bool [H, W] (usable pixels; all True when absent).
            query_indices: optional int64 [Q'] subset of queries the losses apply to (matching,
                no-object targets and masks all restricted to it); default all.

        Returns:
            Unweighted scalar losses: "loss_ce", "loss_mask", "loss_dice" (those selected by
            ``losses``) and the same keys suffixed ``_{i}`` for the auxiliary predictions.
        """
        aux_outputs = outputs.get("aux_outputs") or []
        if self.num_aux_layers and len(aux_outputs) != self.num_aux_layers:
            raise ValueError(
                f"SetCriterion expects {self.num_aux_layers} auxiliary outputs (deep supervision) "
                f"but got {len(aux_outputs)}; check MODEL.OCZ.DECODER.DEC_LAYERS and "
                "MODEL.OCZ.LOSS.DEEP_SUPERVISION."
            )
        num_masks = self._num_masks(targets, outputs["pred_logits"].device)
        sets = [outputs] + list(aux_outputs[: self.num_aux_layers])
        sets = [self._restrict(s, query_indices) for s in sets]
        matched = self.matcher.match_sets(sets, targets)
        losses = {}
        for i, (pred, indices) in enumerate(zip(sets, matched)):
            suffix = "" if i == 0 else f"_{i - 1}"
            set_losses = self._losses_of(pred, targets, indices, num_masks)
            losses.update({f"{k}{suffix}": v for k, v in set_losses.items()})
        return losses

    @staticmethod
    def _restrict(outputs: dict, query_indices: torch.Tensor | None) -> dict:
        pred = {k: outputs[k] for k in ("pred_logits", "pred_masks", "pred_embeds") if k in outputs}
        if query_indices is None:
            return pred
        index = query_indices.to(device=pred["pred_logits"].device, dtype=torch.long)
        return {k: v[:, index] for k, v in pred.items()}

    def _losses_of(
        self,
        pred: dict,
        targets: list[dict[str, torch.Tensor]],
        indices: list[tuple[torch.Tensor, torch.Tensor]],
        num_masks: float,
    ) -> dict[str, torch.Tensor]:
        losses = {}
        if "labels" in self.losses or "no_object" in self.losses:
            losses.update(self.loss_labels(pred, targets, indices, "labels" in self.losses))
        if "masks" in self.losses:
            losses.update(self.loss_masks(pred, targets, indices, num_masks))
        if "embeddings" in self.losses:
            losses.update(self.loss_embeddings(pred, targets, indices, num_masks))
        return losses

    def loss_labels(
        self,
        outputs: dict[str, torch.Tensor],
        targets: list[dict[str, torch.Tensor]],
        indices: list[tuple[torch.Tensor, torch.Tensor]],
        with_labels: bool = True,
    ) -> dict[str, torch.Tensor]:
        """Weighted cross-entropy over K+1 classes; unmatched queries target no-object (K).

        Matched queries target their label, or get no class term when ``with_labels`` is False.
        With labels, the weighted mean of ``F.cross_entropy`` (divided by the summed class
        weights of the targets); without, the weighted sum divided by the number of queries
        that take part, each counted with weight 1 (see below).
        """
        logits = outputs["pred_logits"].float()
        batch, num_queries, num_classes_plus_one = logits.shape
        no_object = num_classes_plus_one - 1
        target_classes = torch.full(
            (batch, num_queries), no_object, dtype=torch.int64, device=logits.device
        )
        matched = torch.zeros((batch, num_queries), dtype=torch.bool, device=logits.device)
        for b, (query_idx, target_idx) in enumerate(indices):
            query_idx = query_idx.to(logits.device)
            if not with_labels:
                target_classes[b, query_idx] = _NO_CLASS_LOSS
                matched[b, query_idx] = True
                continue
            labels = targets[b]["labels"].to(logits.device)
            target_classes[b, query_idx] = labels[target_idx.to(logits.device)]
        if not self.no_object_on_ignore:
            on_ignore = self._mostly_on_ignore(outputs["pred_masks"], targets)
            target_classes[on_ignore & (target_classes == no_object)] = _NO_CLASS_LOSS
        empty_weight = logits.new_ones(num_classes_plus_one)
        empty_weight[-1] = self.no_object_weight
        if (target_classes == _NO_CLASS_LOSS).all():  # nothing to learn: zero, in the graph
            return {"loss_ce": logits.sum() * 0.0}
        if with_labels:
            loss = F.cross_entropy(
                logits.transpose(1, 2),
                target_classes,
                weight=empty_weight,
                ignore_index=_NO_CLASS_LOSS,
            )
            return {"loss_ce": loss}
        # Without labels every class term targets no-object, so F.cross_entropy's weighted mean
        # (sum of w * CE over the sum of w) would cancel no_object_weight: each unmatched query
        # would weigh 1 / #unmatched whatever w (about 7x a seen query's w / (M + w (Q - M)) with
        # 80 seen + 20 candidate queries, w = 0.1 and a few masks per image). Instead, divide the
        # weighted sum by the queries that take part, each counted with weight 1 as if it were a
        # real-class target (the seen group's denominator when all its queries are matched):
        # matched queries (no class term) and those taught no-object; those left free by
        # no_object_on_ignore drop out, as from the seen group's mean. The loss is then
        # proportional to w, and an unmatched query weighs w / #queries however many are matched
        # (dividing by #unmatched instead would push the last unmatched query hardest).
        per_query = F.cross_entropy(
            logits.transpose(1, 2),
            target_classes,
            weight=empty_weight,
            ignore_index=_NO_CLASS_LOSS,
            reduction="none",
        )  # [B, Q]: w * CE on the no-object targets, 0 elsewhere
        counted = (matched | (target_classes != _NO_CLASS_LOSS)).sum()
        return {"loss_ce": per_query.sum() / counted.clamp(min=1)}

    @staticmethod
    @torch.no_grad()
    def _mostly_on_ignore(pred_masks: torch.Tensor, targets: list[dict]) -> torch.Tensor:
        """bool [B, Q]: more than half of the query's soft mask lies on ignore pixels."""
        probs = pred_masks.float().sigmoid()
        out = torch.zeros(probs.shape[:2], dtype=torch.bool, device=probs.device)
        for b, target in enumerate(targets):
            valid = target.get("valid")
            if valid is None:
                continue
            valid = F.interpolate(
                valid[None, None].float().to(probs.device), size=probs.shape[-2:], mode="area"
            )[0, 0]
            mass = probs[b].flatten(1).sum(1).clamp(min=1e-6)
            out[b] = (probs[b] * (1 - valid)).flatten(1).sum(1) / mass > 0.5
        return out

    def loss_masks(
        self,
        outputs: dict[str, torch.Tensor],
        targets: list[dict[str, torch.Tensor]],
        indices: list[tuple[torch.Tensor, torch.Tensor]],
        num_masks: float,
    ) -> dict[str, torch.Tensor]:
        """BCE and dice of matched pairs on uncertain points among valid pixels, each pair on
        points of its own image; all pairs of the batch are sampled and scored together."""
        pred_masks = outputs["pred_masks"]
        device = pred_masks.device
        # Keeps both losses in the graph when no image has a matched pair.
        loss_mask = pred_masks.sum() * 0.0
        loss_dice = pred_masks.sum() * 0.0
        valid = [
            t["valid"].to(device)
            if t.get("valid") is not None
            else torch.ones(t["masks"].shape[-2:], dtype=torch.bool, device=device)
            for t in targets
        ]
        # Images with a matched pair and a valid pixel (no point can be drawn in the others).
        images = [b for b, (q, _) in enumerate(indices) if q.numel() and valid[b].any()]
        if not images:
            return {"loss_mask": loss_mask, "loss_dice": loss_dice}
        sizes = {tuple(valid[b].shape) for b in images}
        if len(sizes) > 1:
            raise ValueError(
                f"SetCriterion: the targets of one batch must share their (padded) size; got "
                f"{sorted(sizes)} (prepare_targets pads every image to the batch's size)."
            )
        counts = [indices[b][0].numel() for b in images]
        image_index = torch.repeat_interleave(torch.arange(len(images)), torch.tensor(counts))
        batch_index = torch.tensor(images)[image_index].to(device)
        query_index = torch.cat([indices[b][0] for b in images]).to(device)
        with torch.autocast(device_type=device.type, enabled=False):
            src = pred_masks[batch_index, query_index].float()  # [M, h, w]
            tgt = torch.cat(
                [targets[b]["masks"].to(device)[indices[b][1].to(device)] for b in images]
            ).float()  # [M, H, W]
            coords = sample_uncertain_points(
                src,
                torch.stack([valid[b] for b in images]),
                self.num_points,
                self.oversample_ratio,
                self.importance_sample_ratio,
                image_index=image_index.to(device),
            )
            src_points = point_sample(src.unsqueeze(1), coords).squeeze(1)  # [M, P]
            tgt_points = point_sample(tgt.unsqueeze(1), coords).squeeze(1)  # [M, P]
            loss_mask = loss_mask + self._point_mask_loss(src_points, tgt_points)
            loss_dice = loss_dice + dice_loss(src_points, tgt_points)
        return {"loss_mask": loss_mask / num_masks, "loss_dice": loss_dice / num_masks}

    def _point_mask_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.mask_loss == "focal":
            return sigmoid_focal_loss(logits, targets, self.focal_alpha, self.focal_gamma)
        return sigmoid_ce_loss(logits, targets)

    def loss_embeddings(
        self,
        outputs: dict[str, torch.Tensor],
        targets: list[dict[str, torch.Tensor]],
        indices: list[tuple[torch.Tensor, torch.Tensor]],
        num_masks: float,
    ) -> dict[str, torch.Tensor]:
        """``1 - cos`` between each matched query's class embedding and its target's embedding."""
        embeds = outputs["pred_embeds"]
        loss = embeds.sum() * 0.0
        for b, (query_idx, target_idx) in enumerate(indices):
            if query_idx.numel() == 0:
                continue
            pred = embeds[b, query_idx.to(embeds.device)].float()
            tgt = targets[b]["embeds"].to(embeds.device)[target_idx.to(embeds.device)].float()
            loss = loss + (1 - F.cosine_similarity(pred, tgt, dim=-1)).sum()
        return {"loss_embed": loss / num_masks}

    @staticmethod
    def _num_masks(targets: list[dict[str, torch.Tensor]], device: torch.device) -> float:
        """Number of target masks in the global batch (at least 1) divided by the world size.

        Each rank divides its loss sum by this; DDP then averages over ranks, so the losses and
        gradients equal one process's on the whole batch. The floor of 1 applies to the global
        count: taken after the division (as Mask2Former does), a batch with fewer masks than
        ranks was normalised by 1 per rank, i.e. divided by the world size too many times.
        """
        total = torch.as_tensor(
            float(sum(len(t["masks"]) for t in targets)), dtype=torch.float32, device=device
        )
        world_size = comm.get_world_size()
        if world_size > 1 and dist.is_available() and dist.is_initialized():
            dist.all_reduce(total)
        return max(total.item(), 1.0) / world_size

    def __repr__(self) -> str:
        lines = [
            f"matcher: {self.matcher!r}",
            f"losses: {list(self.losses)}",
            f"weight_dict: {self.weight_dict}",
            f"no_object_weight: {self.no_object_weight}",
            f"num_points: {self.num_points}",
            f"oversample_ratio: {self.oversample_ratio}",
            f"importance_sample_ratio: {self.importance_sample_ratio}",
            f"num_aux_layers: {self.num_aux_layers}",
            f"mask_loss: {self.mask_loss}",
        ]
        body = "\n".join("    " + line for line in lines)
        return f"{self.__class__.__name__}(\n{body}\n)"


#: Prefix of the candidate group's loss keys in :class:`SplitCriterion` ("loss_cand_mask" ...).
CANDIDATE_PREFIX = "loss_cand_"


class SplitCriterion(nn.Module):
    """Split matching: two :class:`SetCriterion` on two groups of queries, behind one call.

    Queries ``0..num_seen-1`` (the seen group) are matched to the ground-truth masks of the
    training vocabulary by ``seen`` (class + mask costs; CE over classes + no-object, mask BCE +
    dice on annotated pixels). Queries ``num_seen..Q-1`` (the candidate group) are matched to the
    pseudo-masks of unannotated regions by ``candidate`` (cost ``-cos(query class embedding,
    region embedding)`` + mask costs; losses: no-object for its unmatched queries, mask BCE + dice
    against the pseudo-masks and the embedding alignment ``loss_embed``). The candidate keys get
    the prefix :data:`CANDIDATE_PREFIX` (``loss_ce`` -> ``loss_cand_ce``, ``loss_mask_0`` ->
    ``loss_cand_mask_0``), so the two groups' losses are logged and weighted separately.

    Targets: the seen group's dicts (see :class:`SetCriterion`), each with a "candidates" dict
    for the candidate group: "masks" [R, H, W], "embeds" [R, D], "valid" [H, W] (the pixels the
    pseudo-masks are defined on). With no candidate query (``num_seen`` = Q) this is exactly
    ``seen`` on all queries.
    """

    def __init__(self, seen: SetCriterion, candidate: SetCriterion, num_seen: int):
        super().__init__()
        if num_seen < 1:
            raise ValueError(f"SplitCriterion: the seen group needs queries, got {num_seen}.")
        self.seen = seen
        self.candidate = candidate
        self.num_seen = int(num_seen)
        self.weight_dict = dict(seen.weight_dict)
        self.weight_dict.update({self._rename(k): v for k, v in candidate.weight_dict.items()})

    @staticmethod
    def _rename(key: str) -> str:
        return CANDIDATE_PREFIX + key[len("loss_") :]

    def forward(self, outputs: dict, targets: list[dict]) -> dict[str, torch.Tensor]:
        """Losses of both groups (see the class docstring); unweighted, as SetCriterion's."""
        num_queries = outputs["pred_logits"].shape[1]
        if num_queries < self.num_seen:
            raise ValueError(
                f"SplitCriterion: {self.num_seen} seen queries but the decoder has {num_queries}."
            )
        device = outputs["pred_logits"].device
        if num_queries == self.num_seen:
            return self.seen(outputs, targets)
        seen_idx = torch.arange(self.num_seen, device=device)
        losses = self.seen(outputs, targets, seen_idx)
        missing = [i for i, t in enumerate(targets) if "candidates" not in t]
        if missing:
            raise KeyError(
                f"SplitCriterion: targets {missing} have no 'candidates' (pseudo-masks); the "
                "meta-architecture adds them when MODEL.OCZ.SPLIT.NUM_CANDIDATES > 0"
            )
        candidate_idx = torch.arange(self.num_seen, num_queries, device=device)
        candidate = self.candidate(outputs, [t["candidates"] for t in targets], candidate_idx)
        losses.update({self._rename(k): v for k, v in candidate.items()})
        return losses

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}(num_seen={self.num_seen},\n  seen={self.seen!r},\n"
            f"  candidate={self.candidate!r})"
        )


def build_criterion(cfg, num_aux_outputs: int | None = None) -> SetCriterion | SplitCriterion:
    """The training criterion of a config: :class:`SetCriterion` on all queries, or with
    ``MODEL.OCZ.SPLIT.NUM_CANDIDATES`` > 0 a :class:`SplitCriterion` whose candidate group is
    matched by ``-cos`` of class and region embeddings plus mask costs (``MODEL.OCZ.SPLIT``).

    Args:
        cfg: the config.
        num_aux_outputs: auxiliary predictions the transformer decoder makes (its
            ``num_aux_outputs``); None: ``DEC_LAYERS``, ZeroShotMaskDecoder's. Supervised only
            with ``MODEL.OCZ.LOSS.DEEP_SUPERVISION``.
    """
    loss = cfg.MODEL.OCZ.LOSS
    if num_aux_outputs is None:
        seen = SetCriterion(cfg)
    else:
        seen = SetCriterion(cfg, num_aux_layers=num_aux_outputs if loss.DEEP_SUPERVISION else 0)
    split = cfg.MODEL.OCZ.SPLIT
    num_candidates, num_queries = split.NUM_CANDIDATES, cfg.MODEL.OCZ.DECODER.NUM_QUERIES
    if num_candidates == 0:
        return seen
    if not 0 < num_candidates < num_queries:
        raise ValueError(
            f"MODEL.OCZ.SPLIT.NUM_CANDIDATES={num_candidates} must lie in [0, "
            f"MODEL.OCZ.DECODER.NUM_QUERIES={num_queries}): the seen group needs queries too."
        )
    matcher = HungarianMatcher(
        cost_class=split.EMBED_COST,
        cost_mask=split.MASK_WEIGHT,
        cost_dice=split.DICE_WEIGHT,
        num_points=loss.TRAIN_NUM_POINTS,
        class_cost=embedding_class_cost,
        mask_cost=loss.MASK_LOSS,
        focal_alpha=loss.FOCAL_ALPHA,
        focal_gamma=loss.FOCAL_GAMMA,
    )
    candidate = SetCriterion(
        matcher=matcher,
        weight_dict={
            "loss_ce": loss.CLASS_WEIGHT,
            "loss_mask": split.MASK_WEIGHT,
            "loss_dice": split.DICE_WEIGHT,
            "loss_embed": split.EMBED_WEIGHT,
        },
        no_object_weight=loss.NO_OBJECT_WEIGHT,
        losses=("no_object", "masks", "embeddings"),
        num_points=loss.TRAIN_NUM_POINTS,
        oversample_ratio=loss.OVERSAMPLE_RATIO,
        importance_sample_ratio=loss.IMPORTANCE_SAMPLE_RATIO,
        num_aux_layers=seen.num_aux_layers,
        no_object_on_ignore=True,
        mask_loss=loss.MASK_LOSS,
        focal_alpha=loss.FOCAL_ALPHA,
        focal_gamma=loss.FOCAL_GAMMA,
    )
    return SplitCriterion(seen, candidate, num_queries - num_candidates)


def pixel_text_loss(
    pixel_logits: torch.Tensor, targets: list[dict], num_points: int = 0
) -> torch.Tensor:
    """Auxiliary per-pixel cross-entropy (``MODEL.OCZ.LOSS.PIXEL_WEIGHT``).

    Args:
        pixel_logits: [B, K, h, w] class logits of the mask features over the training
            vocabulary (no no-object column).
        targets: B dicts with "labels" int64 [T] (vocabulary indices), "masks" [T, H, W] and
            "valid" bool [H, W]; a pixel's target is the label of the mask that covers it, and
            pixels outside every mask of a label below K, or not valid, take no part.
        num_points: 0: every annotated pixel (the logits upsampled bilinearly to H x W); P > 0:
            P points per image drawn uniformly (with replacement, torch's global generator) over
            its annotated pixels, the logits sampled there bilinearly (the values the upsampled
            map has at those pixels): an unbiased estimate of each image's mean, without the
            full-resolution map (``MODEL.OCZ.LOSS.PIXEL_NUM_POINTS``).

    Returns:
        Scalar: the mean cross-entropy over the pixels (or points) that take part; zero, in the
        graph, when none does.
    """
    num_classes = pixel_logits.shape[1]
    height, width = targets[0]["valid"].shape
    label_map = torch.full(
        (len(targets), height, width), -100, dtype=torch.long, device=pixel_logits.device
    )
    for b, target in enumerate(targets):
        for label, mask in zip(target["labels"].tolist(), target["masks"]):
            if 0 <= label < num_classes:
                label_map[b][(mask > 0.5) & target["valid"]] = label
    annotated = label_map >= 0
    if not annotated.any():
        return pixel_logits.sum() * 0.0
    if num_points <= 0:
        logits = F.interpolate(
            pixel_logits.float(), size=(height, width), mode="bilinear", align_corners=False
        )
        return F.cross_entropy(logits, label_map, ignore_index=-100)
    coords, picks, counts = uniform_valid_points(annotated, num_points)
    labels = torch.where(
        counts[:, None] > 0, label_map[annotated][picks], -100
    )  # no pixel: no part
    logits = point_sample(pixel_logits.float(), coords)  # [B, K, P]
    return F.cross_entropy(logits, labels, ignore_index=-100)
