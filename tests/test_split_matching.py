"""Split matching, pseudo-masks, region embeddings, MFE and transductive self-training."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from ocz_d2 import add_ocz_config
from ocz_d2.data import ZeroShotSemSegDatasetMapper
from ocz_d2.modeling.backbone import CLIPPromptBackbone
from ocz_d2.modeling.criterion import SetCriterion, SplitCriterion, build_criterion
from ocz_d2.modeling.matcher import (
    HungarianMatcher,
    embedding_class_cost,
    solve_assignments,
)
from ocz_d2.modeling.pixel_decoder.mfe import MultiScaleFeatureEnhancement
from ocz_d2.modeling.pseudo_masks import (
    PseudoMaskGenerator,
    pixel_class_probabilities,
    pseudo_label,
)

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "synthetic" / "ocz_tiny_attr.yaml"


# ---------------------------------------------------------------------- pseudo-masks
def _unlabeled_case(seed=0):
    gen = torch.Generator().manual_seed(seed)
    b, gh, gw, p = 3, 6, 5, 4
    dense = torch.randn(b, 8, gh, gw, generator=gen)
    unlabeled = torch.rand(b, gh * p, gw * p, generator=gen) > 0.4
    unlabeled[1] = False  # an image without a single ignore pixel
    unlabeled[2, :, 12:] = False  # padding on the right of the last image
    area = torch.tensor([gh * gw * p * p, gh * gw * p * p, gh * p * 12])
    return dense, unlabeled, area


def test_pseudo_masks_never_cover_an_annotated_pixel():
    dense, unlabeled, area = _unlabeled_case()
    gen = PseudoMaskGenerator(num_regions=4, min_area=0.05, kmeans_iters=2, seed=3)
    masks, patch_masks = gen(dense, unlabeled, area)
    assert [len(m) for m in masks][1] == 0  # nothing unannotated, nothing proposed
    assert len(masks[0]) > 0 and len(masks[2]) > 0
    for m, p, u, a in zip(masks, patch_masks, unlabeled, area):
        assert m.dtype == torch.bool and m.shape[1:] == u.shape
        assert not (m & ~u).any()  # only ever on ignore pixels
        assert (m.sum(0) <= 1).all()  # disjoint
        assert (m.flatten(1).sum(1) >= 0.05 * a).all()  # small regions dropped
        assert p.shape == (len(m), 6, 5) and p.flatten(1).any(1).all()
    # Deterministic given the seed; the seed matters.
    again, _ = gen(dense, unlabeled, area)
    assert all(torch.equal(x, y) for x, y in zip(masks, again))
    other, _ = PseudoMaskGenerator(num_regions=4, min_area=0.05, kmeans_iters=0, seed=4)(
        dense, unlabeled, area
    )
    assert any(len(x) != len(y) or not torch.equal(x, y) for x, y in zip(masks, other))


def test_pseudo_masks_follow_the_features():
    # Two feature clusters (left/right halves) over a fully unannotated image: two regions.
    dense = torch.zeros(1, 2, 4, 4)
    dense[0, 0, :, :2] = 1.0
    dense[0, 1, :, 2:] = 1.0
    unlabeled = torch.ones(1, 8, 8, dtype=torch.bool)
    unlabeled[0, :, 3] = False  # an annotated column inside the left half
    masks, _ = PseudoMaskGenerator(num_regions=2, min_area=0.0)(
        dense, unlabeled, torch.tensor([64])
    )
    halves = sorted(masks[0], key=lambda m: int(m.nonzero()[0, 1]))
    expected_left = torch.zeros(8, 8, dtype=torch.bool)
    expected_left[:, :4] = True
    expected_left[:, 3] = False
    assert torch.equal(halves[0], expected_left)
    assert torch.equal(halves[1], ~expected_left & unlabeled[0] & (torch.arange(8) >= 4))


# ---------------------------------------------------------------------- region embeddings
@pytest.mark.parametrize("num_objects", [0, 2])
def test_region_embedding_of_the_whole_image_is_the_cls_embedding(num_objects):
    torch.manual_seed(0)
    backbone = CLIPPromptBackbone(
        model_name="OCZ-Tiny-ViT", num_prompts=2, num_objects=num_objects, out_layers=(1, 3)
    ).eval()
    x = torch.randn(2, 3, 64, 48)
    regions = torch.randint(0, 2, (2, 4, 3))
    with torch.no_grad():
        out = backbone(x, regions) if num_objects else backbone(x)
        masks = torch.zeros(2, 2, 4, 3, dtype=torch.bool)
        masks[:, 0] = True  # the whole image
        masks[:, 1, :2] = True  # the top half
        emb = backbone.region_embeddings(out["last_input"], masks)
    assert emb.shape == (2, 2, out["cls"].shape[-1])
    torch.testing.assert_close(emb[:, 0], out["cls"], atol=1e-6, rtol=1e-5)
    assert (emb[:, 1] - out["cls"]).abs().max() > 1e-3  # a part is not the whole
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2, 2))


# ---------------------------------------------------------------------- split matching
def _criteria(num_aux=0):
    seen = SetCriterion(
        matcher=HungarianMatcher(cost_class=2.0, cost_mask=5.0, cost_dice=5.0, num_points=64),
        weight_dict={"loss_ce": 2.0, "loss_mask": 5.0, "loss_dice": 5.0},
        num_points=64,
        num_aux_layers=num_aux,
    )
    candidate = SetCriterion(
        matcher=HungarianMatcher(
            cost_class=2.0, cost_mask=5.0, cost_dice=5.0, num_points=64,
            class_cost=embedding_class_cost,
        ),
        weight_dict={"loss_ce": 2.0, "loss_mask": 5.0, "loss_dice": 5.0, "loss_embed": 2.0},
        losses=("no_object", "masks", "embeddings"),
        num_points=64,
        num_aux_layers=num_aux,
    )  # fmt: skip
    return seen, candidate


def _half_masks(size=8):
    top = torch.zeros(size, size)
    top[: size // 2] = 1
    left = torch.zeros(size, size)
    left[:, : size // 2] = 1
    return top, left


def test_split_matching_never_crosses_groups_even_when_crossing_is_cheaper():
    # Ground truth: a "top" mask of class 0. Pseudo-mask: a "left" region with embedding e.
    # The seen queries (0, 1) predict the LEFT mask and the candidate queries (2, 3) the TOP
    # mask with class 0 and embedding e: every cross assignment is cheaper than the in-group one.
    top, left = _half_masks()
    e = torch.nn.functional.normalize(torch.tensor([1.0, 0.0, 0.0]), dim=0)
    logit = 20.0
    pred_masks = torch.stack([left, left, top, top]) * 2 * logit - logit
    pred_logits = torch.full((4, 3), -logit)  # K = 2 classes + no-object
    pred_logits[:, 0] = logit
    pred_embeds = torch.stack([-e, -e, e, e])
    outputs = {
        "pred_logits": pred_logits[None],
        "pred_masks": pred_masks[None],
        "pred_embeds": pred_embeds[None],
    }
    target = {
        "labels": torch.tensor([0]),
        "masks": top[None],
        "valid": torch.ones(8, 8, dtype=torch.bool),
        "candidates": {
            "masks": left[None],
            "embeds": e[None],
            "valid": torch.ones(8, 8, dtype=torch.bool),
        },
    }
    # One matcher over all queries and both kinds of target would cross (the premise).
    plain = HungarianMatcher(cost_class=2.0, cost_mask=5.0, cost_dice=5.0, num_points=64)
    cost_gt = plain._cost_matrix({k: v[0] for k, v in outputs.items()}, target)[:, 0]
    assert cost_gt[2:].max() < cost_gt[:2].min()  # the GT is cheaper for the candidates

    seen, candidate = _criteria()
    calls = {}
    for name, crit in (("seen", seen), ("candidate", candidate)):
        real = crit.matcher.match_sets

        def spy(sets, targets, query_indices=None, _real=real, _name=name):
            result = _real(sets, targets, query_indices)
            calls[_name] = (sets[0]["pred_masks"].shape[1], targets, result)
            return result

        crit.matcher.match_sets = spy
    torch.manual_seed(0)
    losses = SplitCriterion(seen, candidate, num_seen=2)(outputs, [target])
    n_seen, seen_targets, seen_result = calls["seen"]
    n_cand, cand_targets, cand_result = calls["candidate"]
    # Each group sees only its own queries and its own targets.
    assert n_seen == 2 and n_cand == 2
    assert torch.equal(seen_targets[0]["masks"], top[None])
    assert torch.equal(cand_targets[0]["masks"], left[None])
    assert len(seen_result[0][0][0]) == 1 and len(cand_result[0][0][0]) == 1
    # Hence the in-group pairs are bad fits: the seen mask loss is large (left vs top) ...
    assert losses["loss_mask"] > 1.0 and losses["loss_cand_mask"] > 1.0
    # ... and the candidate's embedding loss is 0 (its embedding is e), the keys distinct.
    assert losses["loss_cand_embed"].abs() < 1e-6
    assert {"loss_ce", "loss_cand_ce", "loss_dice", "loss_cand_dice"} <= set(losses)


def _random_outputs(batch=2, queries=5, classes=3, size=8, aux=2, dim=4, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def one():
        return {
            "pred_logits": torch.randn(batch, queries, classes + 1, generator=gen),
            "pred_masks": torch.randn(batch, queries, size, size, generator=gen),
            "pred_embeds": torch.nn.functional.normalize(
                torch.randn(batch, queries, dim, generator=gen), dim=-1
            ),
        }

    out = one()
    out["aux_outputs"] = [one() for _ in range(aux)]
    return out


def _random_targets(batch=2, classes=3, size=8, seed=1):
    gen = torch.Generator().manual_seed(seed)
    targets = []
    for b in range(batch):
        n = b + 1
        targets.append(
            {
                "labels": torch.randint(0, classes, (n,), generator=gen),
                "masks": (torch.rand(n, size, size, generator=gen) > 0.5).float(),
                "valid": torch.rand(size, size, generator=gen) > 0.2,
            }
        )
    return targets


def test_no_candidate_queries_gives_standard_matching_losses_exactly():
    outputs, targets = _random_outputs(), _random_targets()
    seen, candidate = _criteria(num_aux=2)
    torch.manual_seed(0)
    split = SplitCriterion(seen, candidate, num_seen=5)(outputs, targets)
    torch.manual_seed(0)
    standard = seen(outputs, targets)
    assert split.keys() == standard.keys() and len(standard) == 9
    for k in standard:
        assert torch.equal(split[k], standard[k]), k
    # With candidates the seen group's losses differ (fewer queries): the check can fail.
    for t in targets:
        t["candidates"] = {"masks": t["masks"][:1], "embeds": torch.eye(4)[:1]}
    torch.manual_seed(0)
    with_candidates = SplitCriterion(seen, candidate, num_seen=3)(outputs, targets)
    assert not torch.equal(with_candidates["loss_ce"], standard["loss_ce"])
    assert "loss_cand_embed_1" in with_candidates


def test_matching_of_all_sets_is_one_assignment_per_image_and_set(monkeypatch):
    import ocz_d2.modeling.matcher as matcher_module
    from ocz_d2.modeling.point_utils import valid_pixel_centres

    # Every valid pixel as a point: costs no longer depend on the draws, so matching the sets
    # together (one shared draw per image) must equal matching each set alone.
    monkeypatch.setattr(
        matcher_module, "sample_valid_points", lambda valid, n: valid_pixel_centres(valid)
    )
    outputs, targets = _random_outputs(), _random_targets()
    matcher = HungarianMatcher(num_points=64)
    sets = [outputs] + outputs["aux_outputs"]
    together = matcher.match_sets(sets, targets, torch.tensor([0, 2, 4]))
    for s, got in zip(sets, together):
        alone = matcher(s, targets, torch.tensor([0, 2, 4]))
        for (r1, c1), (r2, c2) in zip(got, alone):
            assert torch.equal(r1, r2) and torch.equal(c1, c2)
            assert set(r1.tolist()) <= {0, 2, 4}
    assert any(not torch.equal(a[1], b[1]) for a, b in zip(together[0], together[1])) or any(
        not torch.equal(a[0], b[0]) for a, b in zip(together[0], together[1])
    )
    # solve_assignments: non-finite costs, empty matrices, one transfer for all.
    solved = solve_assignments([torch.tensor([[1.0, float("nan")], [0.0, 2.0]]), torch.zeros(3, 0)])
    assert solved[0][0].tolist() == [0, 1] and solved[0][1].tolist() == [0, 1]
    assert solved[1][0].numel() == 0


def test_embedding_cost_refuses_mismatched_widths():
    pred = {"pred_embeds": torch.randn(3, 4)}
    with pytest.raises(ValueError, match="joint space"):
        embedding_class_cost(pred, {"embeds": torch.randn(2, 5)})


# ---------------------------------------------------------------------- MFE
def test_mfe_starts_as_identity_and_learns_context():
    torch.manual_seed(0)
    mfe = MultiScaleFeatureEnhancement(4, rates=(1, 2), num_levels=2)
    levels = [torch.randn(2, 4, 6, 6), torch.randn(2, 4, 3, 3)]
    out = mfe(levels)
    assert all(torch.equal(a, b) for a, b in zip(out, levels))
    sum(o.square().sum() for o in mfe(levels)).backward()
    assert all(a.mix.weight.grad.abs().sum() > 0 for a in mfe.aggregate)
    torch.nn.init.normal_(mfe.aggregate[1].mix.weight)
    out = mfe(levels)
    assert torch.equal(out[0], levels[0]) and not torch.allclose(out[1], levels[1])
    with pytest.raises(ValueError, match="levels"):
        mfe(levels[:1])


# ---------------------------------------------------------------------- pseudo-labels
def test_pseudo_labels_only_on_ignore_pixels_and_only_unseen_classes():
    gen = torch.Generator().manual_seed(0)
    scores = torch.rand(5, 6, 6, generator=gen)
    unlabeled = torch.rand(6, 6, generator=gen) > 0.5
    unseen = torch.tensor([1, 3])
    labels = pseudo_label(scores, unlabeled, unseen, threshold=0.0)
    assert torch.equal(labels >= 0, unlabeled)  # threshold 0: every ignore pixel, no other
    assert set(labels[labels >= 0].tolist()) <= {1, 3}
    best = torch.where(scores[1] >= scores[3], 1, 3)
    assert torch.equal(labels[unlabeled], best[unlabeled])  # argmax over the unseen classes
    # The threshold is on the chosen class's score.
    strict = pseudo_label(scores, unlabeled, unseen, threshold=0.6)
    assert torch.equal(strict >= 0, unlabeled & (scores[unseen].max(0).values >= 0.6))
    assert (strict >= 0).any() and ((strict < 0) & unlabeled).any()
    assert (pseudo_label(scores, unlabeled, unseen[:0], 0.0) < 0).all()


# ---------------------------------------------------------------------- model-level
def _cfg(data, **overrides):
    cfg = get_cfg()
    add_ocz_config(cfg)
    cfg.merge_from_file(str(TINY))
    cfg.merge_from_list(data.tiny_run_overrides(**{"MODEL.OCZ.LOSS.TRAIN_NUM_POINTS": 64}))
    for k, v in overrides.items():
        cfg.merge_from_list([k, v])
    return cfg


SPLIT = {
    "MODEL.OCZ.DECODER.NUM_QUERIES": 6,
    "MODEL.OCZ.SPLIT.NUM_CANDIDATES": 2,
    "MODEL.OCZ.SPLIT.NUM_REGIONS": 3,
    "MODEL.OCZ.MFE.ENABLED": True,
}


def _train_batch(cfg, data, n=2):
    mapper = ZeroShotSemSegDatasetMapper(cfg, True)
    return [mapper(d) for d in DatasetCatalog.get(data.train_name)[:n]]


def test_split_matching_model_trains_both_groups(synthetic_benchmark):
    data = synthetic_benchmark
    cfg = _cfg(data, **SPLIT)
    torch.manual_seed(0)
    model = build_model(cfg).train()
    assert isinstance(model.criterion, SplitCriterion) and model.criterion.num_seen == 4
    assert model.pixel_decoder.mfe is not None
    batch = _train_batch(cfg, data)
    with EventStorage():
        losses = model(batch)
    assert {"loss_cand_ce", "loss_cand_mask", "loss_cand_dice", "loss_cand_embed"} <= set(losses)
    assert "loss_cand_embed_0" in losses  # deep supervision
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    grad = model.transformer_decoder.query_feat.weight.grad
    assert grad[:4].abs().sum() > 0 and grad[4:].abs().sum() > 0
    assert all(p.grad is None for p in model.backbone.clip_model.parameters())


def test_split_config_errors_are_explained(synthetic_benchmark, tmp_path):
    data = synthetic_benchmark
    with pytest.raises(ValueError, match="NUM_CANDIDATES"):
        build_criterion(_cfg(data, **{**SPLIT, "MODEL.OCZ.SPLIT.NUM_CANDIDATES": 6}))
    # Class embeddings (e.g. an embedding file) of another width than CLIP's image embeddings.
    model = build_model(_cfg(data, **SPLIT))  # the same width builds
    width = model.backbone.clip_model.visual.proj.shape[-1]
    wide = tmp_path / "wide_embeddings.npz"
    rows = torch.randn(len(data.classes), width + 1, generator=torch.Generator().manual_seed(0))
    np.savez(wide, classes=np.array(data.classes), embeddings=rows.numpy())
    with pytest.raises(ValueError, match=f"width {width + 1}.*width {width}"):
        build_model(_cfg(data, **SPLIT, **{"MODEL.OCZ.TEXT.EMBEDDINGS_FILE": str(wide)}))


def test_self_training_starts_at_its_iteration(synthetic_benchmark):
    data = synthetic_benchmark
    cfg = _cfg(
        data,
        **SPLIT,
        **{
            "INPUT.ZERO_SHOT_SETTING": "transductive",
            "MODEL.OCZ.SELF_TRAINING.START_ITER": 5,
            "MODEL.OCZ.SELF_TRAINING.THRESHOLD": 0.0,
        },
    )
    torch.manual_seed(0)
    model = build_model(cfg).train()
    meta = MetadataCatalog.get(data.train_name)
    num_classes, seen = len(meta.stuff_classes), list(meta.seen_classes)
    batch = _train_batch(cfg, data)
    with pytest.raises(RuntimeError, match="EventStorage"):
        model(batch)
    captured = []
    real = model.criterion.forward
    model.criterion.forward = lambda o, t: captured.append((o, t)) or real(o, t)
    with EventStorage(start_iter=4):
        assert not model.self_training_active()
        model(batch)
    outputs, targets = captured[-1]
    assert outputs["pred_logits"].shape[-1] == len(seen) + 1  # inductive: seen vocabulary
    with EventStorage(start_iter=5) as storage:
        assert model.self_training_active()
        model(batch)
        # Threshold 0: every unseen-class pixel is pseudo-labelled, and the log says so.
        assert storage.history("self_training/pseudo_labelled_fraction").latest() == 1.0
        # The ignore pixels that remain (background, boundaries) still give the candidates
        # pseudo-masks (the old protocol labelled every ignore pixel and left them none).
        assert storage.history("split/pseudo_masks_per_image").latest() > 0
    outputs, targets = captured[-1]
    assert outputs["pred_logits"].shape[-1] == num_classes + 1  # unseen names join
    unseen_vocab = set(range(num_classes)) - set(seen)
    ignore = 255
    added = 0
    for x, t in zip(batch, targets):
        n_gt = len(x["instances"].gt_classes)
        new_labels, new_masks = t["labels"][n_gt:], t["masks"][n_gt:]
        added += len(new_labels)
        assert set(new_labels.tolist()) <= unseen_vocab
        h, w = x["sem_seg"].shape
        unseen_pixels = torch.zeros_like(t["valid"])
        unseen_pixels[:h, :w] = x["unseen_mask"]
        assert (x["sem_seg"][x["unseen_mask"]] == ignore).all()  # hidden in the label
        # Threshold 0: exactly the unseen-class pixels got a pseudo-label (ZegCLIP's rule):
        # never background, boundaries or padding.
        assert torch.equal(new_masks.bool().any(0), unseen_pixels)
        left = torch.zeros_like(t["valid"])
        left[:h, :w] = (x["sem_seg"] == ignore) & ~x["unseen_mask"] & ~x["padding_mask"]
        assert torch.equal(t["unlabeled"], left)
        covered = t["candidates"]["masks"].bool().any(0)
        assert not (covered & ~left).any()  # candidates only on what remains
    assert added > 0
    # Inference: no calibration in the transductive setting.
    assert model.zero_shot_setting == "transductive"


def test_pixel_class_probabilities_are_a_distribution_with_no_object():
    gen = torch.Generator().manual_seed(0)
    logits, masks = torch.randn(4, 6, generator=gen), torch.randn(4, 5, 5, generator=gen)
    probs = pixel_class_probabilities(logits, masks)
    assert probs.shape == (5, 5, 5) and (probs >= 0).all() and (probs.sum(0) < 1).all()
    # One query dominating a pixel: its class distribution.
    masks[0, 2, 2], masks[1:, 2, 2] = 30.0, -30.0
    torch.testing.assert_close(
        pixel_class_probabilities(logits, masks)[:, 2, 2], logits[0].softmax(-1)[:-1]
    )
