"""Crop padding is not image: the mapper records it, and pseudo-masks, their areas, self-training,
the guide's regions (online and precomputed alike) and split matching's targets leave it out.
Transductive training knows where the unseen objects are, not which class they are."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage
from PIL import Image

from ocz_d2 import add_ocz_config
from ocz_d2.data import ZeroShotSemSegDatasetMapper
from ocz_d2.modeling.clustering import NO_REGION
from ocz_d2.modeling.padding import batch_image_mask, image_patches

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "synthetic" / "ocz_tiny_attr.yaml"
# 64-px images scaled to 40 px (2.5 patches of 16) in a 64-px crop: 24 px of padding at the bottom
# and right, and a column and row of patches that are half image, half padding.
PADDED = {"INPUT.RESIZE_SCALE": "(0.625,0.625)", "INPUT.FLIP_PROB": 0.0}
SPLIT = {
    "MODEL.OCZ.DECODER.NUM_QUERIES": 6,
    "MODEL.OCZ.SPLIT.NUM_CANDIDATES": 2,
    "MODEL.OCZ.SPLIT.NUM_REGIONS": 3,
    "MODEL.OCZ.SPLIT.MIN_AREA": 0.0,
}


def _cfg(data, **overrides):
    cfg = get_cfg()
    add_ocz_config(cfg)
    cfg.merge_from_file(str(TINY))
    extra = {"MODEL.OCZ.LOSS.TRAIN_NUM_POINTS": 64, **PADDED, **overrides}
    cfg.merge_from_list(data.tiny_run_overrides(**extra))
    return cfg


def _batch(cfg, data, n=2):
    mapper = ZeroShotSemSegDatasetMapper(cfg, True)
    return [mapper(d) for d in DatasetCatalog.get(data.train_name)[:n]]


def _capture_targets(model) -> list:
    """The targets of every criterion call of ``model``, in order."""
    captured = []
    real = model.criterion.forward
    model.criterion.forward = lambda o, t: captured.append(t) or real(o, t)
    return captured


def _resized_label(d, size):
    label = Image.open(d["sem_seg_file_name"]).resize((size, size), Image.NEAREST)
    return torch.from_numpy(np.asarray(label).astype(np.int64))


def test_mapper_records_padding_and_hides_unseen_classes(synthetic_benchmark):
    data = synthetic_benchmark
    unseen = torch.tensor(data.unseen_ids)
    dicts = DatasetCatalog.get(data.train_name)[:3]
    for setting in ("inductive", "transductive"):
        cfg = _cfg(data, **{"INPUT.ZERO_SHOT_SETTING": setting})
        for d, x in zip(dicts, _batch(cfg, data, n=3)):
            assert x["image"].shape == (3, 64, 64)
            pad = torch.ones(64, 64, dtype=torch.bool)
            pad[:40, :40] = False
            assert torch.equal(x["padding_mask"], pad)
            assert (x["image"][:, pad] == 0).all() and (x["sem_seg"][pad] == 255).all()
            raw = _resized_label(d, 40)
            is_unseen = torch.isin(raw, unseen)
            assert (x["sem_seg"][:40, :40][is_unseen] == 255).all()
            if setting == "inductive":
                assert "unseen_mask" not in x  # nothing about unseen pixels is known
            else:
                want = torch.zeros(64, 64, dtype=torch.bool)
                want[:40, :40] = is_unseen
                assert torch.equal(x["unseen_mask"], want)
    assert is_unseen.any()


def test_image_masks_and_patches():
    samples = [
        {"image": torch.zeros(3, 40, 48)},
        {"image": torch.zeros(3, 64, 64), "padding_mask": torch.zeros(64, 64, dtype=torch.bool)},
    ]
    samples[1]["padding_mask"][40:] = True  # the mapper padded 24 rows
    mask = batch_image_mask(samples, (64, 64), "cpu")
    assert mask[0, :40, :48].all() and mask[0].sum() == 40 * 48
    assert mask[1, :40].all() and not mask[1, 40:].any()
    patches = image_patches(mask, 16)
    # Rows of patches 0-1 are image, row 2 is half image (not counted), row 3 padding.
    assert patches[0, :2, :3].all() and not patches[0, 2:].any() and not patches[0, :, 3].any()
    assert patches[1, :2].all() and not patches[1, 2:].any()


def test_split_targets_and_areas_leave_padding_out(synthetic_benchmark):
    data = synthetic_benchmark
    cfg = _cfg(data, **SPLIT)
    torch.manual_seed(0)
    model = build_model(cfg).train()
    batch = _batch(cfg, data)
    captured = _capture_targets(model)
    with EventStorage():
        model(batch)
    (targets,) = captured
    for x, t in zip(batch, targets):
        pad = x["padding_mask"]
        assert int(t["area"]) == 40 * 40  # the image's pixels, not the crop's
        assert not t["unlabeled"][pad].any()
        assert torch.equal(t["unlabeled"], (x["sem_seg"] == 255) & ~pad)
        cand = t["candidates"]["masks"].bool()
        assert len(cand) > 0 and not cand[:, pad].any()


def test_online_and_precomputed_guides_agree_on_padded_crops(synthetic_benchmark):
    """Both paths give NO_REGION exactly on the patches that are not mostly image; before, the
    online guide clustered the padding into regions."""
    data = synthetic_benchmark
    objects = {
        "MODEL.OCZ.OBJECTS.NUM": 3,
        "MODEL.OCZ.ORA.NUM_ROUNDS": 1,
        "MODEL.OCZ.ORA.NHEADS": 4,
    }
    for guide in (
        {"MODEL.OCZ.GUIDE.SOURCE": "clip"},
        {
            "MODEL.OCZ.GUIDE.SOURCE": "ssl",
            "MODEL.OCZ.GUIDE.SSL_MODEL": "vit_tiny_patch16_224",
            "MODEL.OCZ.GUIDE.PRETRAINED": False,
        },
    ):
        cfg = _cfg(data, **objects, **guide)
        torch.manual_seed(0)
        model = build_model(cfg).train()
        batch = _batch(cfg, data)
        images = model._normalize(batch).tensor
        mask = batch_image_mask(batch, images.shape[-2:], model.device)
        raw = [x["image"] for x in batch]
        online = model.guide(model.backbone, images, raw, [None, None], 255, mask)
        # An object map as the precompute tool writes it (a region for every image pixel),
        # padded by the mapper with the ignore value.
        maps = []
        for x in batch:
            m = torch.randint(0, 3, x["sem_seg"].shape, generator=torch.Generator().manual_seed(0))
            maps.append(m.masked_fill(x["padding_mask"], 255))
        stored = model.guide(model.backbone, images, raw, maps, 255, mask)
        expected = ~image_patches(mask, 16)
        assert expected.any()
        assert torch.equal(online == NO_REGION, expected)
        assert torch.equal(stored == NO_REGION, expected)


def test_prompt_free_targets_stay_fixed_while_prompts_train(synthetic_benchmark):
    """TARGET_FEATURES "plain": pseudo-masks and region embeddings from a frozen prompt-free
    CLIP pass, unchanged when the prompts change; "prompted" targets move with them."""
    data = synthetic_benchmark
    results = {}
    for source in ("plain", "prompted"):
        cfg = _cfg(data, **SPLIT, **{"MODEL.OCZ.SPLIT.TARGET_FEATURES": source})
        torch.manual_seed(0)
        model = build_model(cfg).train()
        batch = _batch(cfg, data)
        captured = _capture_targets(model)
        with EventStorage():
            model(batch)
            with torch.no_grad():
                model.backbone.visual_prompts.add_(torch.randn_like(model.backbone.visual_prompts))
            model(batch)
        before, after = (t[0]["candidates"] for t in captured)
        results[source] = (before, after)
        if source == "plain":
            # The embeddings are CLIP's own (no prompt in the pass) for the first region.
            images = model._normalize(batch).tensor
            plain = model.backbone.plain_forward(images)
            grid = plain["dense"].shape[-2:]
            region = torch.nn.functional.avg_pool2d(before["masks"][None, :1], 16)[0] > 0
            want = model.backbone.region_embeddings(
                plain["last_input"][:1], region.reshape(1, 1, *grid), prompted=False
            )
            torch.testing.assert_close(before["embeds"][:1], want[0].float())
    before, after = results["plain"]
    assert torch.equal(before["masks"], after["masks"])
    torch.testing.assert_close(before["embeds"], after["embeds"])
    before, after = results["prompted"]
    assert before["embeds"].shape != after["embeds"].shape or not torch.allclose(
        before["embeds"], after["embeds"]
    )
