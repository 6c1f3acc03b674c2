"""Test-time CLIP classification of segments (ocz_d2/modeling/segment_classifier.py): boxes and
crops on constructed masks, the empty-mask fallbacks, CLIP's mean outside the mask in the crop
that CLIP sees, the ensemble against hand computations, the region route against CLIP's own CLS
embedding, and both routes end to end through the meta-architecture (inference, slide mode, an
eval-only run of a checkpoint trained without the classifier)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog, build_detection_test_loader
from detectron2.evaluation import inference_on_dataset
from detectron2.modeling import build_model
from PIL import Image
from torchvision.ops import roi_align

from ocz_d2.config import load_config
from ocz_d2.data import ZeroShotSemSegDatasetMapper
from ocz_d2.engine import AtomicCheckpointer
from ocz_d2.evaluation import ZeroShotSemSegEvaluator
from ocz_d2.evaluation.segment_accuracy import ground_truth_segment_accuracy
from ocz_d2.modeling import CLIPPromptBackbone
from ocz_d2.modeling.segment_classifier import (
    ENSEMBLE_SEEN_KEY,
    SegmentCLIPClassifier,
    binarize_masks,
    crop_segments,
    ensemble_probabilities,
    mask_boxes,
    segment_patches,
)
from tools import segment_clip_accuracy as accuracy_tool

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "synthetic" / "ocz_tiny_attr.yaml"
ON = "MODEL.OCZ.SEGMENT_CLIP.ENABLED"
ROUTE = "MODEL.OCZ.SEGMENT_CLIP.ROUTE"


def _l_shape() -> torch.Tensor:
    """bool [1, 10, 12]: an L in rows 2..6, columns 3..8 (box x 3..9, y 2..7)."""
    mask = torch.zeros(1, 10, 12, dtype=torch.bool)
    mask[0, 2:7, 3:5] = True  # the upright
    mask[0, 5:7, 3:9] = True  # the foot
    return mask


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    return CLIPPromptBackbone(model_name="OCZ-Tiny-ViT", num_prompts=2, out_layers=(1, 3)).eval()


# ---------------------------------------------------------------------- boxes and crops
def test_box_and_crop_of_a_constructed_mask():
    mask = _l_shape()
    assert binarize_masks(torch.tensor([-0.1, 0.0, 0.1])).tolist() == [False, False, True]
    assert mask_boxes(mask).tolist() == [[3.0, 2.0, 9.0, 7.0]]  # exclusive right / bottom edges
    image = torch.randn(3, 10, 12)
    box = image[:, 2:7, 3:9]
    # At the box's own size every output pixel samples one input pixel centre: exact.
    crop = crop_segments(image, mask, (5, 6), "crop")
    torch.testing.assert_close(crop[0], box, atol=0, rtol=0)
    cropmask = crop_segments(image, mask, (5, 6), "cropmask")
    torch.testing.assert_close(cropmask[0], box * mask[0, 2:7, 3:9], atol=0, rtol=0)
    masked = crop_segments(image, mask, (10, 12), "mask")  # the masked whole image
    torch.testing.assert_close(masked[0], image * mask[0], atol=0, rtol=0)
    assert crop_segments(image, mask, (16, 20), "cropmask").shape == (1, 3, 16, 20)
    with pytest.raises(ValueError, match="STYLE"):
        crop_segments(image, mask, (5, 6), "box")


def test_empty_mask_falls_back_to_the_whole_image():
    masks = torch.cat([torch.zeros(1, 10, 12, dtype=torch.bool), _l_shape()])
    assert mask_boxes(masks)[0].tolist() == [0.0, 0.0, 12.0, 10.0]
    image = torch.randn(3, 10, 12)
    for style in ("cropmask", "crop", "mask"):
        crops = crop_segments(image, masks, (10, 12), style)
        torch.testing.assert_close(crops[0], image, atol=0, rtol=0)  # unmasked, uncropped
    # Region route: every patch holding image pixels (10 x 12 at p=4: a 3 x 3 grid).
    patches = segment_patches(masks[None], 4)
    assert patches.shape == (1, 2, 3, 3) and patches[0, 0].all()


def test_segment_patches_coverage_rule():
    masks = torch.zeros(1, 3, 8, 6, dtype=torch.bool)  # p=4: grid 2 x 2, right column 2 px wide
    masks[0, 0, :2, :4] = True  # half of patch (0, 0): chosen
    masks[0, 0, 4:5, :4] = True  # a quarter of patch (1, 0): not chosen
    masks[0, 0, 4:8, 4:5] = True  # half of patch (1, 1)'s 8 image pixels (2 are padding): chosen
    masks[0, 1, 0, 0] = True  # reaches half nowhere: every patch it touches
    masks[0, 1, 7, 5] = True
    patches = segment_patches(masks, 4)
    assert patches[0, 0].tolist() == [[True, False], [False, True]]
    assert patches[0, 1].tolist() == [[True, False], [False, True]]
    assert patches[0, 2].all()  # empty: the whole image


def test_outside_the_mask_clip_sees_its_mean_colour(backbone):
    """The crop fed to CLIP is 0 (CLIP's mean colour after normalisation) wherever all of its
    samples fall outside the mask, and CLIP gets its own input size."""
    visual = backbone.clip_model.visual
    fed = []
    handle = visual.register_forward_pre_hook(lambda module, args: fed.append(args[0]))
    torch.manual_seed(1)
    image = torch.randn(1, 3, 48, 64)
    logits = torch.full((1, 2, 48, 64), -5.0)
    yy, xx = torch.meshgrid(torch.arange(48), torch.arange(64), indexing="ij")
    logits[0, 0][(xx >= 10) & (yy >= 5) & (xx - 10 <= yy - 5) & (yy < 40)] = 5.0  # a triangle
    pred_logits = torch.randn(1, 2, 4)
    text = torch.nn.functional.normalize(torch.randn(3, visual.output_dim), dim=-1)
    classifier = SegmentCLIPClassifier(route="crop", style="cropmask")
    try:
        with torch.no_grad():
            probs = classifier(backbone, image, pred_logits, logits, text, torch.tensor([0]))
    finally:
        handle.remove()
    assert probs.shape == (1, 2, 3) and len(fed) == 1  # both segments in one CLIP batch
    crops = fed[0]
    assert crops.shape == (2, 3, *visual.image_size)
    mask = binarize_masks(logits[0, :1])
    box = mask_boxes(mask)
    assert box.tolist() == [[10.0, 5.0, 45.0, 40.0]]
    rois = torch.cat([torch.zeros(1, 1), box], dim=1)
    coverage = roi_align(mask[None].float(), rois, visual.image_size, aligned=True)[0, 0]
    outside = coverage == 0
    assert outside.float().mean() > 0.3  # a triangle leaves much of its box outside
    assert (crops[0][:, outside] == 0).all()
    unmasked = roi_align(image, rois, visual.image_size, aligned=True)[0]
    inside = coverage == 1
    torch.testing.assert_close(crops[0][:, inside], unmasked[:, inside])
    # The second query's mask is empty: CLIP sees the whole image, unmasked.
    whole = roi_align(image, torch.tensor([[0.0, 0, 0, 64, 48]]), visual.image_size, aligned=True)
    torch.testing.assert_close(crops[1], whole[0])


# ---------------------------------------------------------------------- the ensemble
def _softmax(values):
    exps = [math.exp(v) for v in values]
    return [e / sum(exps) for e in exps]


def test_ensemble_against_a_hand_computation():
    dec = [1.0, 0.0, -1.0, 0.5]  # K = 3 classes + no-object
    clip = [2.0, 1.0, 0.0]
    p_dec = _softmax(dec)[:3]
    p_clip = _softmax(clip + [0.5])[:3]  # the decoder's no-object logit joins CLIP's logits
    decoder_logits, clip_logits = torch.tensor([dec]), torch.tensor([clip])

    def ours(seen, lam, seen_mean=False):
        out = ensemble_probabilities(
            decoder_logits, clip_logits, torch.tensor(seen, dtype=torch.long), lam, seen_mean
        )
        return out[0].tolist()

    lam = 2 / 3
    want = [p_dec[0] ** lam * p_clip[0] ** (1 - lam)]  # class 0 seen
    want += [p_dec[k] ** (1 - lam) * p_clip[k] ** lam for k in (1, 2)]  # classes 1, 2 unseen
    assert ours([0], lam) == pytest.approx(want, rel=1e-6)
    # Lambda honoured: 1 keeps the decoder on seen classes and CLIP on unseen ones; 0 swaps.
    assert ours([0], 1.0) == pytest.approx([p_dec[0], p_clip[1], p_clip[2]], rel=1e-6)
    assert ours([0], 0.0) == pytest.approx([p_clip[0], p_dec[1], p_dec[2]], rel=1e-6)
    assert ours([0], 0.8)[1] == pytest.approx(p_dec[1] ** 0.2 * p_clip[1] ** 0.8, rel=1e-6)
    # Seen mean: CLIP's seen-class probabilities become their mean over the seen classes.
    mean = (p_clip[0] + p_clip[1]) / 2
    want = [p_dec[k] ** lam * mean ** (1 - lam) for k in (0, 1)]
    want += [p_dec[2] ** (1 - lam) * p_clip[2] ** lam]
    assert ours([0, 1], lam, seen_mean=True) == pytest.approx(want, rel=1e-6)
    assert ours([], lam, seen_mean=True) == ours([], lam)  # no seen class: nothing to average
    # An open vocabulary (no seen class) is ZegFormer's all-classes p_dec^(1/3) * p_clip^(2/3).
    want = [p_dec[k] ** (1 / 3) * p_clip[k] ** (2 / 3) for k in range(3)]
    assert ours([], 2 / 3) == pytest.approx(want, rel=1e-6)
    with pytest.raises(ValueError, match="no-object column"):
        ensemble_probabilities(decoder_logits, decoder_logits, torch.tensor([0]))


def test_skipped_queries_keep_the_decoder_distribution(backbone):
    torch.manual_seed(2)
    image = torch.randn(1, 3, 32, 32)
    masks = torch.randn(1, 2, 32, 32)
    pred_logits = torch.tensor([[[3.0, 0.0, 0.0, -2.0], [0.0, 0.0, 0.0, 4.0]]])  # q1: no-object
    text = torch.nn.functional.normalize(torch.randn(3, 64), dim=-1)
    seen = torch.tensor([0])
    for route in ("region", "crop"):
        with torch.no_grad():
            full = SegmentCLIPClassifier(route=route)(
                backbone, image, pred_logits, masks, text, seen
            )
            skipping = SegmentCLIPClassifier(route=route, skip_no_object=0.5)(
                backbone, image, pred_logits, masks, text, seen
            )
        torch.testing.assert_close(skipping[0, 0], full[0, 0])
        torch.testing.assert_close(skipping[0, 1], pred_logits[0, 1].softmax(-1)[:3])
        assert not torch.allclose(full[0, 1], skipping[0, 1])


# ---------------------------------------------------------------------- the region route
def test_region_route_on_the_whole_image_is_clips_cls_embedding(backbone):
    torch.manual_seed(3)
    x = torch.randn(2, 3, 64, 48)
    masks = torch.zeros(2, 3, 64, 48, dtype=torch.bool)
    masks[:, 0] = True  # the whole image
    masks[:, 2, :32] = True  # the top half
    with torch.no_grad():
        embeds = SegmentCLIPClassifier.region_embeddings(backbone, x, masks)
        cls = backbone.plain_forward(x)["cls"]
    assert embeds.shape == (2, 3, cls.shape[-1])
    torch.testing.assert_close(embeds[:, 0], cls, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(embeds[:, 1], cls, atol=1e-6, rtol=1e-5)  # empty: whole image
    assert (embeds[:, 2] - cls).abs().max() > 1e-3


def test_bad_settings_name_the_key(backbone):
    with pytest.raises(ValueError, match="SEGMENT_CLIP.ROUTE"):
        SegmentCLIPClassifier(route="boxes")
    with pytest.raises(ValueError, match="SEGMENT_CLIP.LAMBDA"):
        SegmentCLIPClassifier(ensemble_lambda=1.5)
    with pytest.raises(ValueError, match="width 64.*width 32"):
        SegmentCLIPClassifier().check_backbone(backbone, 32)


# ---------------------------------------------------------------------- through the model
def _cfg(data, **extra):
    return load_config(TINY, data.tiny_run_overrides(**extra))


def _samples(cfg, name, n=2):
    mapper = ZeroShotSemSegDatasetMapper(cfg, False)
    return [mapper(d) for d in DatasetCatalog.get(name)[:n]]


@pytest.fixture(scope="module")
def models(synthetic_benchmark):
    """The tiny model without the classifier and with each route (same weights)."""
    data = synthetic_benchmark
    built = {}
    for route in ("off", "region", "crop"):
        extra = {} if route == "off" else {ON: True, ROUTE: route}
        torch.manual_seed(0)
        built[route] = build_model(_cfg(data, **extra)).eval()
    return built


def test_each_route_through_the_model(models, synthetic_benchmark):
    data = synthetic_benchmark
    off = models["off"]
    assert off.segment_classifier is None
    sample = _samples(_cfg(data), data.val_name, n=1)[0]
    with torch.no_grad():
        base = off([sample])[0]["sem_seg"]
    num_classes = len(data.classes)
    for route in ("region", "crop"):
        model = models[route]
        assert model.segment_classifier.route == route
        # No parameter, no buffer: checkpoints are the same with the switch on.
        on_state, off_state = model.state_dict(), off.state_dict()
        assert on_state.keys() == off_state.keys()
        assert all(torch.equal(on_state[k], off_state[k]) for k in off_state)
        with torch.no_grad():
            scores = model([sample])[0]["sem_seg"]
        assert scores.shape == base.shape == (num_classes, *sample["image"].shape[-2:])
        assert torch.isfinite(scores).all()
        assert not torch.allclose(scores, base)


def test_seen_classes_and_slide_mode_reach_the_classifier(models, synthetic_benchmark):
    data = synthetic_benchmark
    model = models["region"]
    sample = _samples(_cfg(data), data.val_name, n=1)[0]
    calls = []

    def spy(module, args):
        calls.append(args[-1].tolist())  # seen

    handle = model.segment_classifier.register_forward_pre_hook(spy)
    names = {"class_names": list(data.classes[:5])}
    try:
        with torch.no_grad():
            model([sample])
            model([{**sample, **names}])
            model([{**sample, **names, ENSEMBLE_SEEN_KEY: [1, 3]}])
            model.test_mode, model.window_size, model.window_stride = "slide", (48, 48), (32, 32)
            slide = model([sample])[0]["sem_seg"]
    finally:
        handle.remove()
        model.test_mode = "whole"
    assert calls[0] == sorted(MetadataCatalog.get(data.val_name).seen_classes)
    assert calls[1] == [] and calls[2] == [1, 3]
    assert len(calls) == 4  # slide mode: one call per batch of windows
    assert slide.shape == (len(data.classes), *sample["image"].shape[-2:])


def test_skip_every_query_gives_the_model_without_the_classifier(models, synthetic_benchmark):
    data = synthetic_benchmark
    sample = _samples(_cfg(data), data.val_name, n=1)[0]
    model = models["crop"]
    model.segment_classifier.skip_no_object = 1e-9  # every query's no-object prob is above it
    try:
        with torch.no_grad():
            skipped = model([sample])[0]["sem_seg"]
            base = models["off"]([sample])[0]["sem_seg"]
    finally:
        model.segment_classifier.skip_no_object = 0.0
    torch.testing.assert_close(skipped, base)


def test_eval_only_run_with_the_switch_on(spread_checkpoint, synthetic_benchmark):
    """A checkpoint trained without the classifier, evaluated with it switched on from the
    command line (as `train_net.py --eval-only ... MODEL.OCZ.SEGMENT_CLIP.ENABLED True`)."""
    data = synthetic_benchmark
    config, opts, weights = spread_checkpoint
    opts = [*opts, "DATASETS.TEST", f"('{data.val_name}',)", ON, "True", ROUTE, "crop"]
    opts += ["MODEL.OCZ.SEGMENT_CLIP.SEEN_MEAN", "True"]
    cfg = load_config(config, opts)
    model = build_model(cfg)
    AtomicCheckpointer(model).load(weights)
    calls = []
    model.segment_classifier.register_forward_hook(lambda m, a, out: calls.append(out.shape))
    dataset = DatasetCatalog.get(data.val_name)  # 4 images, an unseen class among them
    loader = build_detection_test_loader(dataset, mapper=ZeroShotSemSegDatasetMapper(cfg, False))
    results = inference_on_dataset(model, loader, ZeroShotSemSegEvaluator(data.val_name))
    assert len(calls) == len(dataset) and calls[0][-1] == len(data.classes)
    for key in ("mIoU", "mIoU-seen", "mIoU-unseen", "hIoU"):
        value = results["sem_seg"][key]
        assert math.isfinite(value) and 0 <= value <= 100, key


# ---------------------------------------------------------------------- ground-truth segments
def test_ground_truth_segment_accuracy_counts_and_a_hand_classified_image(
    models, synthetic_benchmark, tmp_path, capsys, monkeypatch
):
    data = synthetic_benchmark
    monkeypatch.setenv("DETECTRON2_DATASETS", str(Path(data.root).parent))
    model = models["off"]  # the routes need no trained weights and no switch
    results = ground_truth_segment_accuracy(model, data.val_name, "RGB", max_images=3)
    assert set(results) == {"region", "crop/cropmask", "crop/crop", "crop/mask"}
    # One segment per class present in an image (ignore pixels are none).
    meta = MetadataCatalog.get(data.val_name)
    unseen = set(meta.unseen_classes)
    pairs = []
    for i, d in enumerate(DatasetCatalog.get(data.val_name)[:3]):
        label = np.asarray(Image.open(d["sem_seg_file_name"]))
        pairs += [(i, int(k)) for k in np.unique(label) if k < len(data.classes)]
    for r in results.values():
        assert [(i, t) for i, t, _ in r["predictions"]] == pairs
        assert r["segments"] == len(pairs) == r["seen_segments"] + r["unseen_segments"]
        assert r["unseen_segments"] == sum(t in unseen for _, t in pairs)
        right = sum(t == p for _, t, p in r["predictions"])
        assert r["all"] == pytest.approx(100.0 * right / len(pairs))
        # Per class: the segments of that true class, and how many of them CLIP got right.
        for k in {t for _, t in pairs}:
            mine = [(t, p) for _, t, p in r["predictions"] if t == k]
            entry = r["per_class"][data.classes[k]]
            assert entry["segments"] == len(mine)
            right = sum(t == p for t, p in mine)
            assert entry["accuracy"] == pytest.approx(100.0 * right / len(mine))
        assert len(r["per_class"]) == len({t for _, t in pairs})
    # Image 0 by hand, crop route with STYLE mask: CLIP-normalised pixels, each class's masked
    # whole image through the image tower, the nearest class embedding.
    d = DatasetCatalog.get(data.val_name)[0]
    label = torch.as_tensor(np.asarray(Image.open(d["sem_seg_file_name"])).astype(np.int64))
    rgb = torch.as_tensor(np.asarray(Image.open(d["file_name"]).convert("RGB")).copy())
    raw = rgb.permute(2, 0, 1).float()
    mean, std = model.clip_pixel_stats or (model.pixel_mean, model.pixel_std)
    present = [k for k in label.unique().tolist() if k < len(data.classes)]
    masks = torch.stack([label == k for k in present])
    visual = model.clip_model_owner.clip_model.visual
    with torch.no_grad():
        crops = crop_segments((raw - mean) / std, masks, tuple(visual.image_size), "mask")
        embeds = torch.nn.functional.normalize(visual(crops), dim=-1)
        text = model.text_embedder(list(data.classes), data.val_name)
    hand = (embeds @ text.t()).argmax(-1).tolist()
    ours = [p for i, _, p in results["crop/mask"]["predictions"] if i == 0]
    assert ours == hand
    # The tool: the same table, a JSON file; a bad argument stops it before any work.
    out = tmp_path / "acc.json"
    argv = ["--config-file", str(TINY), "--dataset", data.val_name, "--max-images", "3"]
    tool_argv = [*argv, "--per-class", "--output", str(out), *data.tiny_run_overrides()]
    assert accuracy_tool.main(tool_argv) == 0
    saved = json.loads(out.read_text())["variants"]
    assert saved["crop/mask"]["all"] == pytest.approx(results["crop/mask"]["all"])
    printed = capsys.readouterr().out
    assert "| crop/mask |" in printed
    # --per-class: one row per class with a segment, its accuracy under each route.
    cls = data.classes[pairs[0][1]]
    row = next(line for line in printed.splitlines() if line.startswith(f"| {cls} |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2] == str(results["region"]["per_class"][cls]["segments"])
    expected = [f"{results[n]['per_class'][cls]['accuracy']:.1f}" for n in results]
    assert cells[3:] == expected
    assert accuracy_tool.main([*argv[:4], "--max-images", "0"]) == 2
    assert "--max-images 0" in capsys.readouterr().err
