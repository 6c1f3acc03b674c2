"""Reference values of split matching: candidate costs, candidate losses, group separation.

Every expected number is computed by hand in the test (``math`` on scalars, small loops) from
the weights of the criterion that :func:`build_criterion` makes of the default config, on
constructed cases where only the right sign / the right target gives the expected value:

- with the real (random) point sampling, the masks are constant on the valid pixels, so any
  draw of points gives the same cost or loss; pixels outside "valid" hold other values (and
  uncertain logits, which importance sampling would favour), so counting them changes the value;
- with non-constant masks, the samplers are replaced by "every valid pixel once" (the sampling
  contract), and the hand computation loops over the valid pixels.
"""

from __future__ import annotations

import math

import pytest
import torch
from detectron2.config import get_cfg

import ocz_d2.modeling.criterion as criterion_module
import ocz_d2.modeling.matcher as matcher_module
from ocz_d2 import add_ocz_config
from ocz_d2.modeling.criterion import SplitCriterion, build_criterion
from ocz_d2.modeling.point_utils import valid_pixel_centres

H = W = 4
NUM_CLASSES = 3  # K; the logits have K + 1 entries, the last is no-object
NUM_SEEN, NUM_QUERIES = 2, 5  # queries 0-1 seen, 2-4 candidates
NUM_POINTS = 48

# Region embeddings r0, r1 and the candidate queries' class embeddings (unit vectors). Costs
# -cos: r0 <- (-0.6, -0.8, 1.0), r1 <- (-0.8, 0.6, 0.0) over candidates 0, 1, 2: the optimum
# r0 -> candidate 1, r1 -> candidate 0 (total -1.6, unique). With the sign flipped (+cos) the
# optimum is r0 -> candidate 2, r1 -> candidate 1 instead.
REGIONS = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
CAND_EMBEDS = torch.tensor([[0.6, 0.8], [0.8, -0.6], [-1.0, 0.0]])
EXPECTED_PAIRS = {0: 3, 1: 2}  # region -> query (full index)
CAND_LOGITS = torch.tensor([[0.5, -1.0, 2.0, 1.0], [1.5, 0.2, -0.3, 0.7], [-0.4, 1.1, 0.3, -2.0]])


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _cfg(**overrides):
    cfg = get_cfg()
    add_ocz_config(cfg)
    cfg.MODEL.OCZ.DECODER.NUM_QUERIES = NUM_QUERIES
    cfg.MODEL.OCZ.SPLIT.NUM_CANDIDATES = NUM_QUERIES - NUM_SEEN
    cfg.MODEL.OCZ.LOSS.DEEP_SUPERVISION = False
    cfg.MODEL.OCZ.LOSS.TRAIN_NUM_POINTS = NUM_POINTS
    for key, value in overrides.items():
        cfg.merge_from_list([key, value])
    return cfg


def _criterion(**overrides) -> SplitCriterion:
    criterion = build_criterion(_cfg(**overrides))
    assert isinstance(criterion, SplitCriterion) and criterion.num_seen == NUM_SEEN
    return criterion


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _bce(x: float, t: float) -> float:
    p = _sigmoid(x)
    return -(t * math.log(p) + (1 - t) * math.log(1 - p))


def _ce(logits, target: int) -> float:
    """-log softmax(logits)[target]."""
    values = [float(v) for v in logits]
    return math.log(sum(math.exp(v) for v in values)) - values[target]


def _cos(a, b) -> float:
    a, b = [float(v) for v in a], [float(v) for v in b]
    dot = sum(x * y for x, y in zip(a, b))
    return dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def _constant_dice(x: float, t: float, num_points: int) -> float:
    """Dice of a prediction with logit x at every point against a target t at every point."""
    p = _sigmoid(x)
    return 1 - (2 * p * t * num_points + 1) / (p * num_points + t * num_points + 1)


def _constant_case(cand_logit_values=(0.5, 0.5, 0.5)):
    """One image; candidate c's mask logit is ``cand_logit_values[c]`` on the candidates' valid
    pixels (columns 0-2) and 0 (the most uncertain) on column 3, which is not valid for them.
    Pseudo-mask r0 is 1 on the valid pixels (0 on column 3), r1 is 0 there (1 on column 3)."""
    cand_valid = torch.ones(H, W, dtype=torch.bool)
    cand_valid[:, 3] = False
    r0 = cand_valid.float()
    r1 = 1 - r0
    masks = torch.zeros(NUM_QUERIES, H, W)
    masks[:NUM_SEEN] = torch.stack([r0, r1]) * 20 - 10  # the seen queries: the pseudo-masks
    for c, x in enumerate(cand_logit_values):
        masks[NUM_SEEN + c][cand_valid] = x
    logits = torch.zeros(NUM_QUERIES, NUM_CLASSES + 1)
    logits[NUM_SEEN:] = CAND_LOGITS
    # Seen queries carry the region embeddings exactly (cos 1): cheaper for the regions than
    # any candidate, so a candidate group that took in seen queries would match them instead.
    embeds = torch.cat([REGIONS, CAND_EMBEDS])
    outputs = {
        "pred_logits": logits[None],
        "pred_masks": masks[None],
        "pred_embeds": embeds[None],
    }
    gt = torch.zeros(1, H, W)
    gt[0, :2] = 1
    target = {
        "labels": torch.tensor([1]),
        "masks": gt,
        "valid": torch.ones(H, W, dtype=torch.bool),  # differs from the candidates' valid
        "candidates": {"masks": torch.stack([r0, r1]), "embeds": REGIONS, "valid": cand_valid},
    }
    return outputs, target


def _hand_cost(matcher, cand_logit_values, targets_on_valid=(1.0, 0.0)):
    """[3, 2] candidate cost by hand: cost_class * -cos + cost_mask * BCE + cost_dice * dice."""
    cost = torch.zeros(len(cand_logit_values), len(targets_on_valid))
    for q, x in enumerate(cand_logit_values):
        for t, value in enumerate(targets_on_valid):
            cost[q, t] = (
                matcher.cost_class * -_cos(CAND_EMBEDS[q], REGIONS[t])
                + matcher.cost_mask * _bce(x, value)
                + matcher.cost_dice * _constant_dice(x, value, matcher.num_points)
            )
    return cost


# ---------------------------------------------------------------- candidate matching cost


def test_candidate_cost_matrix_and_pairs_match_hand_computation():
    # Identical candidate masks: the mask costs are the same for every candidate, so the
    # embedding term alone decides the assignment.
    criterion = _criterion()
    matcher = criterion.candidate.matcher
    cfg = _cfg()
    assert (matcher.cost_class, matcher.cost_mask, matcher.cost_dice) == (
        cfg.MODEL.OCZ.SPLIT.EMBED_COST,
        cfg.MODEL.OCZ.SPLIT.MASK_WEIGHT,
        cfg.MODEL.OCZ.SPLIT.DICE_WEIGHT,
    )
    outputs, target = _constant_case()
    candidates = slice(NUM_SEEN, NUM_QUERIES)
    pred = {k: v[0, candidates] for k, v in outputs.items()}
    cost = matcher._cost_matrix(pred, target["candidates"])
    expected = _hand_cost(matcher, (0.5, 0.5, 0.5))
    torch.testing.assert_close(cost, expected)
    # The embedding term alone separates the candidates (values -cos, by hand).
    torch.testing.assert_close(
        cost - cost[0:1], matcher.cost_class * torch.tensor([[0.0, 0.0], [-0.2, 1.4], [1.6, 0.8]])
    )
    ((query_idx, target_idx),) = matcher(
        outputs, [target["candidates"]], query_indices=torch.arange(NUM_SEEN, NUM_QUERIES)
    )
    assert dict(zip(target_idx.tolist(), query_idx.tolist())) == EXPECTED_PAIRS


# ---------------------------------------------------------------- candidate losses


def test_candidate_mask_losses_count_only_valid_pixels():
    # Candidate 1 (logit 1.5) is matched to r0 (1 on valid pixels), candidate 0 (logit -1.0) to
    # r1 (0 on valid pixels); candidate 2 is unmatched. Column 3 (not valid for the candidates,
    # valid for the seen group) holds logit 0 and the opposite target values.
    a, b = 1.5, -1.0
    outputs, target = _constant_case((b, a, 0.3))
    criterion = _criterion()
    ((query_idx, target_idx),) = criterion.candidate.matcher(
        outputs, [target["candidates"]], query_indices=torch.arange(NUM_SEEN, NUM_QUERIES)
    )
    assert dict(zip(target_idx.tolist(), query_idx.tolist())) == EXPECTED_PAIRS
    losses = criterion(outputs, [target])
    points, num_masks = criterion.candidate.num_points, 2
    expected_mask = (_bce(a, 1.0) + _bce(b, 0.0)) / num_masks
    expected_dice = (_constant_dice(a, 1.0, points) + _constant_dice(b, 0.0, points)) / num_masks
    torch.testing.assert_close(losses["loss_cand_mask"], torch.tensor(expected_mask))
    torch.testing.assert_close(losses["loss_cand_dice"], torch.tensor(expected_dice))
    # Swapped targets would give other values (the case can tell them apart).
    swapped = (_bce(a, 0.0) + _bce(b, 1.0)) / num_masks
    assert abs(swapped - expected_mask) > 1.0


def _every_valid_pixel(monkeypatch):
    """Samplers that return every valid pixel centre once: deterministic costs and losses."""

    def uncertain(mask_logits, valid, num_points, *args, image_index=None, **kwargs):
        if valid is None:
            valid = torch.ones(mask_logits.shape[-2:], dtype=torch.bool)
        if valid.dim() == 2:
            return valid_pixel_centres(valid).expand(mask_logits.shape[0], -1, -1)
        # [B, H, W], one grid per image (these tests' images have equally many valid pixels).
        return torch.stack([valid_pixel_centres(v) for v in valid])[image_index]

    monkeypatch.setattr(criterion_module, "sample_uncertain_points", uncertain)
    monkeypatch.setattr(matcher_module, "sample_valid_points", lambda v, n: valid_pixel_centres(v))


def _hand_mask_losses(logit_map, target_map, valid):
    """Mean BCE and dice of one pair over the valid pixels, by a loop over the pixels."""
    bce, inter, sum_p, sum_t, count = 0.0, 0.0, 0.0, 0.0, 0
    for i in range(logit_map.shape[0]):
        for j in range(logit_map.shape[1]):
            if not valid[i, j]:
                continue
            x, t = float(logit_map[i, j]), float(target_map[i, j])
            bce += _bce(x, t)
            p = _sigmoid(x)
            inter, sum_p, sum_t, count = inter + p * t, sum_p + p, sum_t + t, count + 1
    return bce / count, 1 - (2 * inter + 1) / (sum_p + sum_t + 1)


def test_candidate_mask_losses_on_a_non_constant_mask_skip_invalid_pixels(monkeypatch):
    _every_valid_pixel(monkeypatch)
    outputs, target = _constant_case()
    cand_valid = target["candidates"]["valid"].clone()
    cand_valid[0, :] = False  # row 0 also invalid for the candidates
    r0 = torch.zeros(H, W)
    r0[1:3, 0:2] = 1.0  # a 2x2 region ...
    r0[0, 0] = 1.0  # ... and a pixel outside the valid region (must not count)
    r1 = torch.zeros(H, W)
    r1[3, 0:3] = 1.0
    target["candidates"].update(masks=torch.stack([r0, r1]), valid=cand_valid)
    gen = torch.Generator().manual_seed(3)
    outputs["pred_masks"][0, NUM_SEEN:] = torch.randn(3, H, W, generator=gen) * 2
    criterion = _criterion()
    ((query_idx, target_idx),) = criterion.candidate.matcher(
        outputs, [target["candidates"]], query_indices=torch.arange(NUM_SEEN, NUM_QUERIES)
    )
    pairs = dict(zip(target_idx.tolist(), query_idx.tolist()))
    assert pairs == EXPECTED_PAIRS  # the embedding term still decides here
    losses = criterion(outputs, [target])
    masks = outputs["pred_masks"][0]
    hand = [_hand_mask_losses(masks[pairs[t]], m, cand_valid) for t, m in enumerate((r0, r1))]
    torch.testing.assert_close(losses["loss_cand_mask"], torch.tensor(sum(h[0] for h in hand) / 2))
    torch.testing.assert_close(losses["loss_cand_dice"], torch.tensor(sum(h[1] for h in hand) / 2))
    # Counting every pixel (valid ignored) would give other values.
    everywhere = torch.ones(H, W, dtype=torch.bool)
    wrong = [_hand_mask_losses(masks[pairs[t]], m, everywhere) for t, m in enumerate((r0, r1))]
    assert abs(sum(w[0] for w in wrong) - sum(h[0] for h in hand)) > 0.05


def test_candidate_embedding_loss_aligns_with_the_matched_region():
    outputs, target = _constant_case((-1.0, 1.5, 0.3))
    losses = _criterion()(outputs, [target])
    embeds = outputs["pred_embeds"][0]
    expected = sum(1 - _cos(embeds[q], REGIONS[t]) for t, q in EXPECTED_PAIRS.items()) / 2
    torch.testing.assert_close(losses["loss_cand_embed"], torch.tensor(expected))
    assert expected == pytest.approx(0.2)
    # The swapped regions give another value: the test can tell the targets apart.
    swapped = sum(1 - _cos(embeds[q], REGIONS[1 - t]) for t, q in EXPECTED_PAIRS.items()) / 2
    assert swapped == pytest.approx(1.0)


def test_unmatched_candidates_are_taught_no_object():
    outputs, target = _constant_case((-1.0, 1.5, 0.3))
    criterion = _criterion()
    losses = criterion(outputs, [target])
    w = _cfg().MODEL.OCZ.LOSS.NO_OBJECT_WEIGHT
    assert criterion.candidate.no_object_weight == w
    unmatched = set(range(NUM_SEEN, NUM_QUERIES)) - set(EXPECTED_PAIRS.values())
    assert unmatched == {4}
    logits = outputs["pred_logits"][0]
    # w * CE(no-object) of the unmatched candidate; matched ones have no class term. Divided by
    # the candidate queries (3), each counted with weight 1.
    expected = sum(w * _ce(logits[q], NUM_CLASSES) for q in unmatched) / (NUM_QUERIES - NUM_SEEN)
    torch.testing.assert_close(losses["loss_cand_ce"], torch.tensor(expected))


# ---------------------------------------------------------------- no-object weight (candidates)


def _no_pseudo_mask_batch():
    """Two images whose candidate groups have no pseudo-mask: every candidate is no-object."""
    outputs, target = _constant_case()
    gen = torch.Generator().manual_seed(1)
    outputs = {k: v.expand(2, *v.shape[1:]).clone() for k, v in outputs.items()}
    outputs["pred_logits"] = torch.randn(2, NUM_QUERIES, NUM_CLASSES + 1, generator=gen) * 2
    target["candidates"] = {
        "masks": torch.zeros(0, H, W),
        "embeds": torch.zeros(0, 2),
        "valid": target["candidates"]["valid"],
    }
    return outputs, [target, target]


def test_candidate_no_object_weight_scales_the_class_loss():
    outputs, targets = _no_pseudo_mask_batch()
    logits = outputs["pred_logits"][:, NUM_SEEN:]
    mean_ce = sum(_ce(row, NUM_CLASSES) for row in logits.reshape(-1, NUM_CLASSES + 1)) / 6
    values = {}
    for w in (0.1, 0.2):
        losses = _criterion(**{"MODEL.OCZ.LOSS.NO_OBJECT_WEIGHT": w})(outputs, targets)
        values[w] = losses["loss_cand_ce"]
        torch.testing.assert_close(values[w], torch.tensor(w * mean_ce))
    torch.testing.assert_close(values[0.2], 2 * values[0.1])


def test_candidate_no_object_normaliser_counts_matched_queries():
    # Image 0: two pseudo-masks (candidates 2 and 3 matched); image 1: none. The weighted sum of
    # the four no-object terms is divided by all six candidate queries.
    outputs, target = _constant_case((-1.0, 1.5, 0.3))
    outputs = {k: v.expand(2, *v.shape[1:]).clone() for k, v in outputs.items()}
    outputs["pred_logits"][1, NUM_SEEN:] = CAND_LOGITS.flip(0)
    empty = dict(target)
    empty["candidates"] = {
        "masks": torch.zeros(0, H, W),
        "embeds": torch.zeros(0, 2),
        "valid": target["candidates"]["valid"],
    }
    w = 0.1
    losses = _criterion(**{"MODEL.OCZ.LOSS.NO_OBJECT_WEIGHT": w})(outputs, [target, empty])
    logits = outputs["pred_logits"]
    no_object = [logits[0, 4]] + [logits[1, q] for q in range(NUM_SEEN, NUM_QUERIES)]
    expected = sum(w * _ce(row, NUM_CLASSES) for row in no_object) / 6
    torch.testing.assert_close(losses["loss_cand_ce"], torch.tensor(expected))


# ---------------------------------------------------------------- the groups never cross


def test_groups_never_cross_with_hand_values(monkeypatch):
    # Ground truth: a "top" mask (rows 0-1) of class 1; pseudo-mask: a "left" region (columns
    # 0-1) with embedding e. Seen queries 0-1 predict LEFT with embedding e; candidates 2-3
    # predict TOP with class 1: every cross assignment is cheaper than the in-group one.
    _every_valid_pixel(monkeypatch)
    num_queries = 4
    top, left = torch.zeros(H, W), torch.zeros(H, W)
    top[:2], left[:, :2] = 1.0, 1.0
    e = torch.tensor([1.0, 0.0])
    # Seen query 0 (softer mask, a little class 1) is the cheaper seen query for the ground
    # truth; candidate 3 (cos 0.6 against 0) the cheaper candidate for the region.
    masks = torch.stack([left * 4 - 2, left * 6 - 3, top * 6 - 3, top * 5 - 2.5])
    logits = torch.tensor(
        [
            [0.0, 0.5, 0.0, 0.0],
            [0.0, 0.0, 0.0, 0.0],
            [0.0, 6.0, 0.0, 0.0],  # candidates: sure of class 1
            [0.0, 6.0, 0.0, 0.0],
        ]
    )
    embeds = torch.stack([e, e, torch.tensor([0.0, 1.0]), torch.tensor([0.6, 0.8])])
    outputs = {"pred_logits": logits[None], "pred_masks": masks[None], "pred_embeds": embeds[None]}
    seen_valid = torch.ones(H, W, dtype=torch.bool)
    seen_valid[3] = False
    cand_valid = torch.ones(H, W, dtype=torch.bool)
    cand_valid[:, 3] = False
    target = {
        "labels": torch.tensor([1]),
        "masks": top[None],
        "valid": seen_valid,
        "candidates": {"masks": left[None], "embeds": e[None], "valid": cand_valid},
    }
    criterion = build_criterion(
        _cfg(**{"MODEL.OCZ.DECODER.NUM_QUERIES": num_queries, "MODEL.OCZ.SPLIT.NUM_CANDIDATES": 2})
    )
    # The premise: across groups the ground truth is cheaper for a candidate and the region for
    # a seen query.
    one = {k: v[0] for k, v in outputs.items()}
    gt_cost = criterion.seen.matcher._cost_matrix(one, target)[:, 0]
    region_cost = criterion.candidate.matcher._cost_matrix(one, target["candidates"])[:, 0]
    assert gt_cost[2:].max() < gt_cost[:2].min() and region_cost[:2].max() < region_cost[2:].min()

    losses = criterion(outputs, [target])
    w = criterion.seen.no_object_weight
    # Seen group: ground truth -> query 0 (class 1), query 1 no-object; weighted mean.
    seen_ce = (_ce(logits[0], 1) + w * _ce(logits[1], NUM_CLASSES)) / (1 + w)
    seen_mask, seen_dice = _hand_mask_losses(masks[0], top, seen_valid)
    torch.testing.assert_close(losses["loss_ce"], torch.tensor(seen_ce))
    torch.testing.assert_close(losses["loss_mask"], torch.tensor(seen_mask))
    torch.testing.assert_close(losses["loss_dice"], torch.tensor(seen_dice))
    # Candidate group: the region -> query 3 (cos 0.6 beats 0), query 2 no-object over 2 queries.
    cand_mask, cand_dice = _hand_mask_losses(masks[3], left, cand_valid)
    torch.testing.assert_close(losses["loss_cand_mask"], torch.tensor(cand_mask))
    torch.testing.assert_close(losses["loss_cand_dice"], torch.tensor(cand_dice))
    torch.testing.assert_close(losses["loss_cand_embed"], torch.tensor(1 - 0.6))
    torch.testing.assert_close(
        losses["loss_cand_ce"], torch.tensor(w * _ce(logits[2], NUM_CLASSES) / 2)
    )
