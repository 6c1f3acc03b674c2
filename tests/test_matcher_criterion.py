"""Point sampling, Hungarian matcher and set criterion."""

import math
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from detectron2.config import get_cfg

from ocz_d2 import add_ocz_config
from ocz_d2.modeling.criterion import SetCriterion, dice_loss, pixel_text_loss, sigmoid_ce_loss
from ocz_d2.modeling.matcher import HungarianMatcher, batch_dice_cost, batch_sigmoid_ce_cost
from ocz_d2.modeling.point_utils import (
    point_sample,
    sample_uncertain_points,
    sample_valid_points,
    uniform_valid_points,
)

WEIGHTS = {"loss_ce": 2.0, "loss_mask": 5.0, "loss_dice": 5.0}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _to_pixels(coords, height, width):
    """Pixel (row, col) whose centre a coordinate is, asserting it is a centre."""
    cols = coords[..., 0] * width - 0.5
    rows = coords[..., 1] * height - 0.5
    torch.testing.assert_close(cols, cols.round(), atol=1e-4, rtol=0)
    torch.testing.assert_close(rows, rows.round(), atol=1e-4, rtol=0)
    return rows.round().long(), cols.round().long()


def _random_targets(num_targets, size, ignore_fraction=0.3, num_classes=5):
    """Disjoint target masks from a random label map with some ignore pixels."""
    height, width = size
    labels = torch.randperm(num_classes)[:num_targets]
    label_map = labels[torch.randint(num_targets, (height, width))] if num_targets else None
    valid = torch.rand(height, width) > ignore_fraction
    if num_targets == 0:
        masks = torch.zeros(0, height, width, dtype=torch.bool)
    else:
        masks = torch.stack([(label_map == c) & valid for c in labels])
    return {"labels": labels, "masks": masks, "valid": valid}


def _perfect_outputs(targets, num_queries, num_classes, assignment, size):
    """Predictions where query assignment[b][t] reproduces target t of image b exactly."""
    batch = len(targets)
    logits = torch.full((batch, num_queries, num_classes + 1), -10.0)
    logits[..., -1] = 10.0  # unmatched queries: confident no-object
    masks = torch.full((batch, num_queries, *size), -10.0)
    for b, target in enumerate(targets):
        for t, q in enumerate(assignment[b]):
            logits[b, q] = -10.0
            logits[b, q, target["labels"][t]] = 10.0
            masks[b, q] = torch.where(target["masks"][t], 10.0, -10.0)
    return {"pred_logits": logits, "pred_masks": masks}


# ---------------------------------------------------------------- point sampling


def test_point_sample_exact_at_pixel_centres_and_bilinear_between():
    features = torch.arange(6, dtype=torch.float32).view(1, 1, 2, 3)  # [[0, 1, 2], [3, 4, 5]]
    coords = torch.tensor(
        [
            [
                [0.5 / 3, 0.5 / 2],  # centre of (0, 0)
                [2.5 / 3, 0.5 / 2],  # centre of (0, 2)
                [1.5 / 3, 1.5 / 2],  # centre of (1, 1)
                [1.0 / 3, 0.5 / 2],  # halfway between (0, 0) and (0, 1)
                [1.5 / 3, 0.5],  # halfway between (0, 1) and (1, 1)
            ]
        ]
    )
    out = point_sample(features, coords)
    assert out.shape == (1, 1, 5)
    torch.testing.assert_close(out[0, 0], torch.tensor([0.0, 2.0, 4.0, 0.5, 2.5]))


def test_point_sample_of_upsampled_prediction_matches_interpolate():
    pred = torch.randn(2, 3, 4, 5)
    up = F.interpolate(pred, size=(8, 10), mode="bilinear", align_corners=False)
    rows, cols = torch.randint(8, (7,)), torch.randint(10, (7,))
    coords = torch.stack([(cols + 0.5) / 10, (rows + 0.5) / 8], dim=1)
    sampled = point_sample(pred, coords.expand(2, -1, -1))
    torch.testing.assert_close(sampled, up[:, :, rows, cols])


def test_sample_valid_points_never_hits_ignore_pixels():
    valid = torch.rand(9, 13) > 0.6
    coords = sample_valid_points(valid, 5000)
    assert coords.shape == (5000, 2) and coords.dtype == torch.float32
    rows, cols = _to_pixels(coords, 9, 13)
    assert valid[rows, cols].all()
    # Uniform over valid pixels: with 5000 draws every valid pixel appears.
    hit = torch.zeros_like(valid)
    hit[rows, cols] = True
    assert torch.equal(hit, valid)
    assert sample_valid_points(torch.zeros(4, 4, dtype=torch.bool), 10).shape == (0, 2)


def test_sample_valid_points_reproducible_with_generator():
    valid = torch.rand(6, 6) > 0.5
    a = sample_valid_points(valid, 20, generator=torch.Generator().manual_seed(3))
    b = sample_valid_points(valid, 20, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_sample_uncertain_points_prefers_uncertain_valid_pixels():
    valid = torch.ones(8, 8, dtype=torch.bool)
    valid[:, :2] = False  # ignore columns 0-1 (their logits are the most uncertain)
    logits = torch.full((3, 8, 8), 20.0)
    logits[:, :, :2] = 0.0  # uncertain but ignored
    logits[:, :4, 2:] = 0.1  # uncertain and valid: rows 0-3, cols 2-7
    coords = sample_uncertain_points(logits, valid, 40, 3.0, 0.5)
    assert coords.shape == (3, 40, 2)
    rows, cols = _to_pixels(coords, 8, 8)
    assert valid[rows, cols].all()
    # The 20 importance-sampled points come from the uncertain valid region.
    assert (rows[:, :20] < 4).all()
    empty = sample_uncertain_points(logits, torch.zeros(8, 8, dtype=torch.bool), 40, 3.0, 0.5)
    assert empty.shape == (3, 0, 2)


def test_sample_uncertain_points_per_image_valid_grids():
    # Two images: image 0 may use only the left half, image 1 only the top half. Masks 0 and 2
    # belong to image 1, mask 1 to image 0; each mask's points must lie in its own image's grid,
    # its uncertain points where its own logits are uncertain.
    valid = torch.zeros(2, 8, 8, dtype=torch.bool)
    valid[0, :, :4] = True
    valid[1, :4, :] = True
    logits = torch.full((3, 8, 8), 20.0)
    logits[1, :, 2] = 0.0  # image 0's mask: uncertain on column 2
    logits[[0, 2], 1, :] = 0.0  # image 1's masks: uncertain on row 1
    image_index = torch.tensor([1, 0, 1])
    coords = sample_uncertain_points(logits, valid, 40, 3.0, 0.5, image_index=image_index)
    assert coords.shape == (3, 40, 2)
    rows, cols = _to_pixels(coords, 8, 8)
    assert valid[image_index[:, None].expand(-1, 40), rows, cols].all()
    assert (cols[1] < 4).all() and (rows[[0, 2]] < 4).all()
    # The 20 importance-sampled points of each mask: its own uncertain pixels.
    assert (cols[1, :20] == 2).all() and (rows[[0, 2], :20] == 1).all()
    # Every valid pixel of an image can be drawn (uniform part, many draws).
    many = sample_uncertain_points(logits, valid, 4000, 1.0, 0.0, image_index=image_index)
    rows, cols = _to_pixels(many, 8, 8)
    assert len(set(zip(rows[1].tolist(), cols[1].tolist()))) == 32
    # A mask of an image without a valid pixel cannot be sampled: a clear error.
    valid[0] = False
    with pytest.raises(ValueError, match="without a valid pixel"):
        sample_uncertain_points(logits, valid, 40, 3.0, 0.5, image_index=image_index)
    with pytest.raises(ValueError, match="image_index"):
        sample_uncertain_points(logits, valid, 40, 3.0, 0.5)


# ---------------------------------------------------------------- matcher


def test_pairwise_costs_hand_values():
    logits = torch.tensor([[0.0, 0.0], [10.0, -10.0]])
    targets = torch.tensor([[1.0, 0.0]])
    bce = batch_sigmoid_ce_cost(logits, targets)
    assert bce.shape == (2, 1)
    torch.testing.assert_close(bce[0, 0], torch.tensor(math.log(2)))
    torch.testing.assert_close(bce[1, 0], F.softplus(torch.tensor(-10.0)))
    dice = batch_dice_cost(logits, targets)
    # p = (0.5, 0.5): 1 - (2 * 0.5 + 1) / (1 + 1 + 1) = 1/3.
    torch.testing.assert_close(dice[0, 0], torch.tensor(1 / 3))
    assert dice[1, 0] < 1e-3


def test_pairwise_bce_equals_elementwise_bce():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn((5, 40), generator=gen) * 4
    targets = torch.rand((3, 40), generator=gen)
    targets[0] = targets[0].round()  # a binary target beside soft ones
    expected = torch.stack(
        [
            torch.stack(
                [F.binary_cross_entropy_with_logits(logits[q], targets[t]) for t in range(3)]
            )
            for q in range(5)
        ]
    )
    torch.testing.assert_close(batch_sigmoid_ce_cost(logits, targets), expected)


def test_matcher_identity_recovers_true_assignment():
    targets = [_random_targets(3, (12, 16)), _random_targets(2, (12, 16))]
    truth = [[4, 0, 2], [1, 5]]
    outputs = _perfect_outputs(targets, 6, 5, truth, (12, 16))
    # Make the unmatched queries plausible competitors: random masks, uniform classes.
    for b, used in enumerate(truth):
        for q in set(range(6)) - set(used):
            outputs["pred_masks"][b, q] = torch.randn(12, 16)
            outputs["pred_logits"][b, q] = 0.0
    matcher = HungarianMatcher(cost_class=2.0, cost_mask=5.0, cost_dice=5.0, num_points=200)
    indices = matcher(outputs, targets)
    for (query_idx, target_idx), true in zip(indices, truth):
        assert query_idx.dtype == torch.int64 and target_idx.dtype == torch.int64
        assert dict(zip(target_idx.tolist(), query_idx.tolist())) == dict(enumerate(true))


def test_matcher_class_cost_alone_decides_when_masks_tie():
    targets = [_random_targets(3, (6, 6))]
    logits = torch.zeros(1, 4, 6)
    for t, q in enumerate([3, 1, 0]):
        logits[0, q, targets[0]["labels"][t]] = 5.0
    outputs = {"pred_logits": logits, "pred_masks": torch.zeros(1, 4, 6, 6)}
    ((query_idx, target_idx),) = HungarianMatcher(num_points=50)(outputs, targets)
    assert dict(zip(target_idx.tolist(), query_idx.tolist())) == {0: 3, 1: 1, 2: 0}


def test_matcher_permuting_targets_permutes_assignment():
    size = (10, 10)
    target = _random_targets(4, size)
    outputs = {"pred_logits": torch.randn(1, 7, 6), "pred_masks": torch.randn(1, 7, *size)}
    matcher = HungarianMatcher(cost_class=1.0, cost_mask=1.0, cost_dice=1.0, num_points=500)
    torch.manual_seed(5)
    ((q1, t1),) = matcher(outputs, [target])
    perm = torch.tensor([2, 0, 3, 1])
    permuted = {"labels": target["labels"][perm], "masks": target["masks"][perm]}
    permuted["valid"] = target["valid"]
    torch.manual_seed(5)  # same sampled points
    ((q2, t2),) = matcher(outputs, [permuted])
    first = dict(zip(t1.tolist(), q1.tolist()))  # original target -> query
    second = dict(zip(perm[t2].tolist(), q2.tolist()))
    assert first == second


def test_matcher_no_targets_gives_empty_indices():
    outputs = {"pred_logits": torch.randn(2, 5, 4), "pred_masks": torch.randn(2, 5, 6, 6)}
    empty = {
        "labels": torch.zeros(0, dtype=torch.int64),
        "masks": torch.zeros(0, 6, 6),
        "valid": torch.zeros(6, 6, dtype=torch.bool),
    }
    indices = HungarianMatcher(num_points=20)(outputs, [empty, _random_targets(2, (6, 6), 0.0, 3)])
    assert indices[0][0].shape == (0,) and indices[0][0].dtype == torch.int64
    assert indices[0][1].shape == (0,) and indices[0][1].dtype == torch.int64
    assert len(indices[1][0]) == 2


def test_matcher_perfect_match_costs_less_than_wrong_match():
    target = _random_targets(2, (8, 8), ignore_fraction=0.2)
    outputs = _perfect_outputs([target], 2, 5, [[0, 1]], (8, 8))
    matcher = HungarianMatcher(cost_class=2.0, cost_mask=5.0, cost_dice=5.0, num_points=100)
    pred = {"pred_logits": outputs["pred_logits"][0], "pred_masks": outputs["pred_masks"][0]}
    cost = matcher._cost_matrix(pred, target)
    assert cost.shape == (2, 2)
    assert cost[0, 0] < cost[0, 1] and cost[1, 1] < cost[1, 0]
    assert cost.diagonal().sum() < cost.fliplr().diagonal().sum()


def test_matcher_ignores_predictions_on_ignore_pixels():
    valid = torch.zeros(10, 10, dtype=torch.bool)
    valid[:, :5] = True  # right half is ignore
    mask = torch.zeros(10, 10, dtype=torch.bool)
    mask[:5, :5] = True
    target = {"labels": torch.tensor([1]), "masks": mask[None], "valid": valid}
    # Query 0: exact on valid pixels, foreground on every ignore pixel.
    # Query 1: misses 5 of the 25 target pixels, background on ignore pixels.
    masks = torch.full((1, 2, 10, 10), -10.0)
    masks[0, 0][mask | ~valid] = 10.0
    masks[0, 1][mask] = 10.0
    masks[0, 1, 4, :5] = -10.0
    outputs = {"pred_logits": torch.zeros(1, 2, 4), "pred_masks": masks}
    ((query_idx, target_idx),) = HungarianMatcher(num_points=400)(outputs, [target])
    # Counting ignore pixels as background would pick query 1.
    assert query_idx.tolist() == [0] and target_idx.tolist() == [0]


def test_matcher_query_subset_and_non_finite_costs():
    target = _random_targets(2, (8, 8))
    outputs = _perfect_outputs([target], 6, 5, [[4, 5]], (8, 8))
    outputs["pred_masks"][0, 3] = float("inf")
    outputs["pred_logits"][0, 2, 0] = float("inf")
    matcher = HungarianMatcher(num_points=50)
    ((query_idx, target_idx),) = matcher(outputs, [target], query_indices=torch.tensor([1, 3, 5]))
    assert set(query_idx.tolist()) <= {1, 3, 5} and len(query_idx) == 2
    assert dict(zip(target_idx.tolist(), query_idx.tolist()))[1] == 5
    ((query_idx, _),) = matcher(outputs, [target])  # inf and NaN costs do not break scipy
    assert sorted(query_idx.tolist()) == [4, 5]


def test_matcher_rejects_labels_outside_vocabulary_and_has_repr():
    target = _random_targets(1, (4, 4))
    target["labels"] = torch.tensor([255])
    outputs = {"pred_logits": torch.randn(1, 3, 4), "pred_masks": torch.randn(1, 3, 4, 4)}
    with pytest.raises(ValueError, match="vocabulary"):
        HungarianMatcher()(outputs, [target])
    text = repr(HungarianMatcher(cost_class=2.0, cost_mask=5.0, cost_dice=4.0, num_points=7))
    assert "cost_class=2.0" in text and "cost_dice=4.0" in text and "num_points=7" in text


# ---------------------------------------------------------------- criterion


def _criterion(num_aux=0, num_points=256, **kwargs):
    matcher = HungarianMatcher(cost_class=2.0, cost_mask=5.0, cost_dice=5.0, num_points=num_points)
    return SetCriterion(
        matcher=matcher,
        weight_dict=WEIGHTS,
        num_points=num_points,
        num_aux_layers=num_aux,
        **kwargs,
    )


def _total(criterion, losses):
    return sum(v * criterion.weight_dict[k] for k, v in losses.items())


def test_criterion_perfect_predictions_beat_wrong_ones():
    size = (12, 12)
    targets = [_random_targets(3, size), _random_targets(2, size)]
    perfect = _perfect_outputs(targets, 5, 5, [[0, 1, 2], [3, 4]], size)
    wrong = {
        "pred_logits": perfect["pred_logits"].roll(1, dims=-1),
        "pred_masks": -perfect["pred_masks"],
    }
    criterion = _criterion()
    good, bad = criterion(perfect, targets), criterion(wrong, targets)
    assert set(good) == {"loss_ce", "loss_mask", "loss_dice"}
    for key in good:
        assert good[key] < bad[key], key
    assert good["loss_ce"] < 1e-3 and good["loss_mask"] < 1e-3 and good["loss_dice"] < 1e-2


def test_criterion_all_ignore_image_is_finite_with_gradients():
    size = (8, 8)
    empty = {
        "labels": torch.zeros(0, dtype=torch.int64),
        "masks": torch.zeros(0, *size, dtype=torch.bool),
        "valid": torch.zeros(size, dtype=torch.bool),
    }
    logits = torch.randn(1, 4, 6, requires_grad=True)
    masks = torch.randn(1, 4, *size, requires_grad=True)
    aux = [{"pred_logits": logits * 2, "pred_masks": masks * 2}]
    criterion = _criterion(num_aux=1)
    losses = criterion({"pred_logits": logits, "pred_masks": masks, "aux_outputs": aux}, [empty])
    assert set(losses) == set(criterion.weight_dict)
    for key, value in losses.items():
        assert torch.isfinite(value), key
        assert value.requires_grad, key
    assert losses["loss_mask"] == 0 and losses["loss_dice"] == 0
    # Class loss: every query targets no-object (index K = 5).
    expected = F.cross_entropy(logits[0].detach(), torch.full((4,), 5))
    torch.testing.assert_close(losses["loss_ce"], expected)
    _total(criterion, losses).backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    assert masks.grad is not None and torch.isfinite(masks.grad).all()


def test_criterion_ignore_pixels_have_no_effect():
    size = (10, 14)
    targets = [_random_targets(3, size, ignore_fraction=0.4), _random_targets(2, size, 0.4)]
    outputs = {"pred_logits": torch.randn(2, 5, 6), "pred_masks": torch.randn(2, 5, *size)}
    changed = {k: v.clone() for k, v in outputs.items()}
    for b, target in enumerate(targets):
        changed["pred_masks"][b][:, ~target["valid"]] = torch.randn(
            5, int((~target["valid"]).sum())
        )
    criterion = _criterion(num_points=64)
    torch.manual_seed(11)
    before = criterion(outputs, targets)
    torch.manual_seed(11)
    after = criterion(changed, targets)
    for key in before:
        assert torch.equal(before[key], after[key]), key
    # Sanity: the same change on valid pixels does change the mask loss.
    moved = {k: v.clone() for k, v in outputs.items()}
    moved["pred_masks"] += 3.0
    torch.manual_seed(11)
    assert not torch.equal(criterion(moved, targets)["loss_mask"], before["loss_mask"])


def test_criterion_normalises_by_number_of_masks():
    size = (6, 6)
    targets = [_random_targets(2, size, 0.0), _random_targets(1, size, 0.0)]
    outputs = {"pred_logits": torch.randn(2, 4, 6), "pred_masks": torch.zeros(2, 4, *size)}
    losses = _criterion(num_points=32)(outputs, targets)
    # Zero logits: BCE = log 2 at every point, for each of the 3 matched masks, over 3 masks.
    torch.testing.assert_close(losses["loss_mask"], torch.tensor(math.log(2)))


def test_criterion_aux_keys_and_weight_dict():
    size = (8, 8)
    targets = [_random_targets(2, size)]
    # Every prediction is perfect for a different assignment: low losses everywhere prove that
    # each auxiliary prediction is matched on its own.
    outputs = _perfect_outputs(targets, 4, 5, [[0, 1]], size)
    outputs["aux_outputs"] = [
        _perfect_outputs(targets, 4, 5, assignment, size)
        for assignment in ([[1, 2]], [[3, 0]], [[2, 3]])
    ]
    criterion = _criterion(num_aux=3, num_points=32)
    losses = criterion(outputs, targets)
    expected = {f"{k}{s}" for k in WEIGHTS for s in ["", "_0", "_1", "_2"]}
    assert set(losses) == expected == set(criterion.weight_dict)
    assert criterion.weight_dict["loss_dice_2"] == 5.0 and criterion.weight_dict["loss_ce_0"] == 2.0
    for key, value in losses.items():
        assert value < 1e-2, key
    with pytest.raises(ValueError, match="auxiliary"):
        criterion(
            {"pred_logits": outputs["pred_logits"], "pred_masks": outputs["pred_masks"]}, targets
        )
    # The number of auxiliary layers can also come from the suffixed weight keys.
    inferred = SetCriterion(
        matcher=criterion.matcher, weight_dict=dict(criterion.weight_dict), num_points=32
    )
    assert inferred.num_aux_layers == 3
    assert set(inferred(outputs, targets)) == expected
    with pytest.raises(ValueError, match="suffixes"):
        SetCriterion(matcher=criterion.matcher, weight_dict={**WEIGHTS, "loss_ce_1": 1.0})


@pytest.mark.parametrize("num_classes", [3, 7])
def test_criterion_no_object_weight_sized_per_vocabulary(num_classes):
    size = (6, 6)
    targets = [_random_targets(2, size, num_classes=num_classes)]
    outputs = {
        "pred_logits": torch.randn(1, 5, num_classes + 1),
        "pred_masks": torch.randn(1, 5, *size),
    }
    criterion = _criterion(num_points=32, no_object_weight=0.1)
    torch.manual_seed(0)  # the criterion's matcher then samples the same points
    ((query_idx, target_idx),) = criterion.matcher(outputs, targets)
    torch.manual_seed(0)
    losses = criterion(outputs, targets)
    target_classes = torch.full((5,), num_classes)
    target_classes[query_idx] = targets[0]["labels"][target_idx]
    weight = torch.ones(num_classes + 1)
    weight[-1] = 0.1
    expected = F.cross_entropy(outputs["pred_logits"][0], target_classes, weight=weight)
    torch.testing.assert_close(losses["loss_ce"], expected)


def test_criterion_query_subset_restricts_losses():
    size = (8, 8)
    targets = [_random_targets(2, size)]
    outputs = _perfect_outputs(targets, 6, 5, [[1, 2]], size)
    subset = torch.tensor([0, 1, 2])
    losses = _criterion(num_points=32)(outputs, targets, query_indices=subset)
    # Perfect on the subset: queries outside it (3-5) do not count.
    outputs["pred_logits"][0, 3:] = torch.randn(3, 6)
    losses2 = _criterion(num_points=32)(outputs, targets, query_indices=subset)
    torch.testing.assert_close(losses["loss_ce"], losses2["loss_ce"])
    assert losses["loss_ce"] < 1e-3


def test_loss_helpers_empty_and_values():
    empty = torch.zeros(0, 5, requires_grad=True)
    assert sigmoid_ce_loss(empty, empty.detach()) == 0 and dice_loss(empty, empty.detach()) == 0
    logits = torch.zeros(2, 4)
    targets = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(sigmoid_ce_loss(logits, targets), torch.tensor(2 * math.log(2)))
    # p = 0.5 everywhere: 1 - (2*1 + 1) / (2 + 2 + 1) = 0.4 and 1 - (2*0.5 + 1)/(2 + 1 + 1) = 0.5.
    torch.testing.assert_close(dice_loss(logits, targets), torch.tensor(0.9))


def test_criterion_from_config():
    cfg = get_cfg()
    add_ocz_config(cfg)
    cfg.MODEL.OCZ.DECODER.DEC_LAYERS = 2
    criterion = SetCriterion(cfg)
    assert criterion.num_aux_layers == 2
    assert criterion.weight_dict["loss_ce_1"] == cfg.MODEL.OCZ.LOSS.CLASS_WEIGHT
    assert criterion.matcher.num_points == cfg.MODEL.OCZ.LOSS.TRAIN_NUM_POINTS
    cfg.MODEL.OCZ.LOSS.DEEP_SUPERVISION = False
    assert set(SetCriterion(cfg).weight_dict) == {"loss_ce", "loss_mask", "loss_dice"}
    assert "SetCriterion" in repr(criterion) and "HungarianMatcher" in repr(criterion)


def test_unmatched_queries_on_ignore_pixels_get_no_class_loss_when_asked():
    size = (8, 8)
    valid = torch.ones(size, dtype=torch.bool)
    valid[:, 4:] = False  # right half: ignore (e.g. an unseen object)
    target = {
        "labels": torch.tensor([2]),
        "masks": torch.zeros(1, *size, dtype=torch.bool),
        "valid": valid,
    }
    target["masks"][0, :, :2] = True
    masks = torch.full((1, 3, *size), -10.0)
    masks[0, 0, :, :2] = 10.0  # query 0: the target
    masks[0, 1, :, 5:] = 10.0  # query 1: on ignore pixels
    masks[0, 2, :, 2:4] = 10.0  # query 2: on labelled pixels that are no target
    logits = torch.randn(1, 3, 6)
    outputs = {"pred_logits": logits, "pred_masks": masks}

    default = _criterion()(outputs, [target])["loss_ce"]
    free = _criterion(no_object_on_ignore=False)(outputs, [target])["loss_ce"]
    weight = torch.tensor([1.0] * 5 + [0.1])
    expected_default = F.cross_entropy(logits[0], torch.tensor([2, 5, 5]), weight=weight)
    expected_free = F.cross_entropy(logits[0], torch.tensor([2, -100, 5]), weight=weight)
    torch.testing.assert_close(default, expected_default)
    torch.testing.assert_close(free, expected_free)


# ---------------------------------------------------------------- two ranks (gloo on CPU)


def _two_image_batch(first_masks: int):
    """Outputs and targets of two images with ``first_masks`` (0 or 1) and 1 + that masks, free
    of randomness: every predicted mask is constant and every target covers all valid pixels,
    so the sampled points do not change any loss."""
    size = (6, 8)
    valid = [torch.ones(size, dtype=torch.bool), torch.ones(size, dtype=torch.bool)]
    valid[0][:, -1] = False
    valid[1][0] = False
    targets = [
        {
            "labels": torch.tensor([1])[:first_masks],
            "masks": valid[0][None].clone()[:first_masks],
            "valid": valid[0],
        },
        {
            "labels": torch.tensor([0, 2])[: 1 + first_masks],
            "masks": valid[1].expand(1 + first_masks, *size),
            "valid": valid[1],
        },
    ]
    logits = torch.linspace(-2.0, 2.0, 2 * 4 * 4).reshape(2, 4, 4).sin() * 3
    levels = torch.tensor([[2.0, -1.0, 0.5, -3.0], [1.0, 0.0, -2.0, 3.0]])
    masks = levels[:, :, None, None].expand(2, 4, *size).clone()
    return {"pred_logits": logits, "pred_masks": masks}, targets


def _criterion_on_rank(rank, world_size, init_file, out_dir, first_masks):
    """Rank ``rank`` computes the losses of image ``rank`` of :func:`_two_image_batch`."""
    torch.set_num_threads(1)  # a forked child must not reuse the parent's OpenMP pool
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    try:
        outputs, targets = _two_image_batch(first_masks)
        mine = {k: v[rank : rank + 1] for k, v in outputs.items()}
        losses = _criterion(num_points=32)(mine, targets[rank : rank + 1])
        torch.save({k: v.detach() for k, v in losses.items()}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="gloo multi-process test runs on Linux")
@pytest.mark.parametrize("first_masks", [1, 0])  # 3 masks; 1 mask (fewer than the ranks)
def test_criterion_losses_under_two_ranks_equal_one_process(tmp_path, first_masks):
    # fork: the children inherit the imported modules (spawn would import them again, ~10 s)
    mp.start_processes(
        _criterion_on_rank,
        args=(2, str(tmp_path / "init"), str(tmp_path), first_masks),
        nprocs=2,
        start_method="fork",
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    outputs, targets = _two_image_batch(first_masks)
    criterion = _criterion(num_points=32)
    together = criterion(outputs, targets)
    # Mask losses are normalised by the masks of the whole batch (all-reduced): the mean over
    # ranks, as DDP averages gradients, equals one process on the whole batch.
    for key in ("loss_mask", "loss_dice"):
        torch.testing.assert_close((ranks[0][key] + ranks[1][key]) / 2, together[key])
    # The class loss is a mean over each rank's own queries.
    for r in range(2):
        alone = criterion({k: v[r : r + 1] for k, v in outputs.items()}, targets[r : r + 1])
        torch.testing.assert_close(ranks[r]["loss_ce"], alone["loss_ce"])
    assert together["loss_mask"] > 0 and together["loss_dice"] > 0


def test_pixel_text_loss_is_the_cross_entropy_of_annotated_pixels():
    torch.manual_seed(0)
    logits = torch.randn(1, 3, 4, 4)
    masks = torch.zeros(2, 4, 4)
    masks[0, :2] = 1  # top half: class 2
    masks[1, 2:, :2] = 1  # bottom-left: class 0
    valid = torch.ones(4, 4, dtype=torch.bool)
    valid[0, 0] = False  # an ignore pixel inside the first mask
    target = {"labels": torch.tensor([2, 0]), "masks": masks, "valid": valid}
    # Same size: no resampling; hand-built reference over the 7 + 4 annotated pixels.
    picked = [logits[0, :, y, x].log_softmax(0)[2] for y in range(2) for x in range(4)][1:]
    picked += [logits[0, :, y, x].log_softmax(0)[0] for y in (2, 3) for x in (0, 1)]
    expected = -torch.stack(picked).mean()
    torch.testing.assert_close(pixel_text_loss(logits, [target]), expected)
    # A label outside the vocabulary (e.g. a candidate's) and unannotated pixels take no part.
    none = {"labels": torch.tensor([5]), "masks": masks[:1], "valid": valid}
    zero = pixel_text_loss(logits.requires_grad_(True), [none])
    assert zero.item() == 0.0 and zero.requires_grad


def test_criterion_rejects_targets_of_different_sizes_in_one_batch():
    targets = [_random_targets(2, (8, 8)), _random_targets(2, (8, 10))]
    outputs = {"pred_logits": torch.randn(2, 4, 6), "pred_masks": torch.randn(2, 4, 8, 8)}
    with pytest.raises(ValueError, match="share their"):
        _criterion(num_points=16)(outputs, targets)


def test_pixel_text_loss_on_points_estimates_the_dense_loss_without_bias():
    """Points drawn over the annotated pixels only, the logits sampled as the upsampled map has
    them: the mean over many draws is the dense loss (one image; with several, each image's
    mean counts equally)."""
    torch.manual_seed(0)
    logits = torch.randn(1, 3, 4, 4)  # upsampled x2 to the 8x8 label grid
    masks = torch.zeros(2, 8, 8)
    masks[0, :3] = 1
    masks[1, 5:, 2:6] = 1
    valid = torch.ones(8, 8, dtype=torch.bool)
    valid[0, :4] = False
    target = {"labels": torch.tensor([2, 0]), "masks": masks, "valid": valid}
    dense = pixel_text_loss(logits, [target])
    torch.manual_seed(1)
    estimates = torch.stack([pixel_text_loss(logits, [target], 64) for _ in range(400)])
    assert abs(estimates.mean().item() - dense.item()) < 0.02 * dense.item()
    assert estimates.std() > 0  # really sampled
    # A point never lands outside the annotated pixels: with one annotated pixel every draw is
    # that pixel's loss.
    one = torch.zeros(1, 8, 8)
    one[0, 6, 1] = 1
    single = {"labels": torch.tensor([1]), "masks": one, "valid": valid}
    torch.testing.assert_close(
        pixel_text_loss(logits, [single], 5), pixel_text_loss(logits, [single])
    )
    # An image with no annotated pixel takes no part; none at all gives a zero in the graph.
    empty = {"labels": torch.tensor([5]), "masks": masks[:1], "valid": valid}
    torch.testing.assert_close(
        pixel_text_loss(logits.expand(2, -1, -1, -1), [single, empty], 5),
        pixel_text_loss(logits, [single]),
    )
    zero = pixel_text_loss(logits.requires_grad_(True), [empty], 5)
    assert zero.item() == 0.0 and zero.requires_grad


def test_uniform_valid_points_index_the_batch_valid_pixels():
    """Hand-built: image 0 has True pixels (row 1, col 2) and (row 3, col 0) of a 4x4 grid,
    image 1 only (row 0, col 3), image 2 none."""
    valid = torch.zeros(3, 4, 4, dtype=torch.bool)
    valid[0, 1, 2] = valid[0, 3, 0] = valid[1, 0, 3] = True
    coords, index, counts = uniform_valid_points(valid, 50, torch.Generator().manual_seed(0))
    assert counts.tolist() == [2, 1, 0] and coords.shape == (3, 50, 2)
    assert set(index[0].tolist()) == {0, 1}  # both pixels of image 0 drawn, nothing else
    assert index[1].tolist() == [2] * 50
    centres = {0: (2.5 / 4, 1.5 / 4), 1: (0.5 / 4, 3.5 / 4), 2: (3.5 / 4, 0.5 / 4)}
    for b in range(2):
        for i, (x, y) in zip(index[b].tolist(), coords[b].tolist(), strict=True):
            assert (x, y) == pytest.approx(centres[i])
