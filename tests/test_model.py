"""The meta-architecture on CPU with the tiny CLIP config: build, train step, inference, errors."""

from pathlib import Path

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model
from detectron2.structures import Instances
from detectron2.utils.events import EventStorage

from ocz_d2 import add_ocz_config
from ocz_d2.data import ZeroShotSemSegDatasetMapper
from ocz_d2.modeling import (
    CLIPPromptBackbone,
    OCZeroShotSegmentor,
    SimplePyramidPixelDecoder,
    TextEmbedder,
    ZeroShotMaskDecoder,
)
from ocz_d2.modeling.criterion import SetCriterion
from ocz_d2.modeling.matcher import HungarianMatcher
from ocz_d2.modeling.meta_arch import calibrate, sliding_windows

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "synthetic" / "ocz_tiny_attr.yaml"


def tiny_cfg(data, **overrides):
    cfg = get_cfg()
    add_ocz_config(cfg)
    cfg.merge_from_file(str(TINY))
    size = data.image_size
    cfg.merge_from_list(
        [
            "DATASETS.TRAIN", (data.train_name,),
            "DATASETS.TEST", (data.val_name,),
            "INPUT.RESIZE_TARGET", (size, size),
            "INPUT.CROP.SIZE", (size, size),
            "INPUT.MIN_SIZE_TEST", size,
            "MODEL.OCZ.CLIP.MODEL_NAME", "OCZ-Tiny-ViT",
            "MODEL.OCZ.DECODER.DEC_LAYERS", 2,
            "MODEL.OCZ.LOSS.TRAIN_NUM_POINTS", 256,
        ]
    )  # fmt: skip
    for k, v in overrides.items():
        cfg.merge_from_list([k, v])
    return cfg


@pytest.fixture
def model_and_data(synthetic_benchmark):
    torch.manual_seed(0)
    cfg = tiny_cfg(synthetic_benchmark)
    return build_model(cfg), cfg, synthetic_benchmark


def _batch(cfg, name, is_train, n=2):
    mapper = ZeroShotSemSegDatasetMapper(cfg, is_train)
    return [mapper(d) for d in DatasetCatalog.get(name)[:n]]


def test_build_from_config_freezes_clip(model_and_data):
    model, _, _ = model_and_data
    assert isinstance(model, OCZeroShotSegmentor)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "backbone.prompts" in trainable
    assert not any(n.startswith("backbone.clip_model") for n in trainable)
    assert any(n.startswith("transformer_decoder.") for n in trainable)
    model.train()
    assert not model.backbone.clip_model.training  # frozen CLIP stays in eval mode


def test_train_step_with_all_ignore_image(model_and_data):
    model, cfg, data = model_and_data
    batch = _batch(cfg, data.train_name, True)
    empty = batch[1]
    empty["sem_seg"] = torch.full_like(empty["sem_seg"], 255)
    h, w = empty["sem_seg"].shape
    inst = Instances((h, w))
    inst.gt_classes = torch.zeros(0, dtype=torch.long)
    inst.gt_masks = torch.zeros((0, h, w), dtype=torch.bool)
    empty["instances"] = inst
    model.train()
    with EventStorage():
        losses = model(batch)
    assert {"loss_ce", "loss_mask", "loss_dice", "loss_ce_0", "loss_dice_1"} <= set(losses)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    prompts_grad = model.backbone.prompts.grad
    assert prompts_grad is not None and prompts_grad.abs().sum() > 0
    assert model.transformer_decoder.query_feat.weight.grad.abs().sum() > 0


def test_train_batch_rejects_unseen_targets(model_and_data):
    model, cfg, data = model_and_data
    batch = _batch(cfg, data.train_name, True, n=1)
    h, w = batch[0]["sem_seg"].shape
    inst = Instances((h, w))
    inst.gt_classes = torch.tensor([data.unseen_ids[0]])
    inst.gt_masks = torch.ones((1, h, w), dtype=torch.bool)
    batch[0]["instances"] = inst
    model.train()
    with EventStorage(), pytest.raises(ValueError, match="training vocabulary"):
        model(batch)


def test_inference_shape_and_calibration(model_and_data):
    model, cfg, data = model_and_data
    sample = _batch(cfg, data.val_name, False, n=1)[0]
    sample["height"], sample["width"] = 50, 70  # output follows the requested size
    model.eval()
    model.calibration = 0.0
    with torch.no_grad():
        raw = model([sample])[0]["sem_seg"]
        model.calibration = 0.25
        cal = model([sample])[0]["sem_seg"]
    assert raw.shape == (len(data.classes), 50, 70)
    seen, unseen = list(data.seen_ids), list(data.unseen_ids)
    torch.testing.assert_close(cal[seen], raw[seen] - 0.25)
    torch.testing.assert_close(cal[unseen], raw[unseen])
    # scores are sums over queries of probability x sigmoid: non-negative before calibration
    assert raw.min() >= 0


def test_transductive_setting_has_no_calibration_and_full_vocabulary(synthetic_benchmark):
    cfg = tiny_cfg(synthetic_benchmark, **{"INPUT.ZERO_SHOT_SETTING": "transductive"})
    model = build_model(cfg)
    ids, text, _ = model.vocabulary({"dataset_name": synthetic_benchmark.train_name}, True)
    assert ids.tolist() == list(range(len(synthetic_benchmark.classes)))
    ids, text, _ = OCZeroShotSegmentor.vocabulary(
        build_model(tiny_cfg(synthetic_benchmark)),
        {"dataset_name": synthetic_benchmark.train_name},
        True,
    )
    assert ids.tolist() == list(synthetic_benchmark.seen_ids)
    assert text.shape == (len(ids), 64)


def test_calibrate_helper():
    scores = torch.ones(3, 2, 2)
    out = calibrate(scores, torch.tensor([0, 2]), 0.1)
    assert torch.allclose(out[0], torch.full((2, 2), 0.9))
    assert torch.equal(out[1], scores[1])
    assert torch.equal(scores, torch.ones(3, 2, 2))  # not in place


def test_sliding_windows_cover_the_image():
    wins = sliding_windows(100, 130, (64, 64), (48, 48))
    cover = np.zeros((100, 130), dtype=int)
    for y, x in wins:
        assert y + 64 <= 100 and x + 64 <= 130
        cover[y : y + 64, x : x + 64] += 1
    assert cover.min() >= 1
    assert sliding_windows(30, 40, (64, 64), (48, 48)) == [(0, 0)]


def test_slide_with_one_window_equals_whole(model_and_data):
    model, cfg, data = model_and_data
    sample = _batch(cfg, data.val_name, False, n=1)[0]
    model.eval()
    with torch.no_grad():
        whole = model([sample])[0]["sem_seg"]
        model.test_mode = "slide"
        model.window_size = tuple(sample["image"].shape[-2:])
        slide = model([sample])[0]["sem_seg"]
    torch.testing.assert_close(whole, slide)


def test_open_vocabulary_inference(model_and_data):
    model, cfg, data = model_and_data
    sample = _batch(cfg, data.val_name, False, n=1)[0]
    # names not in the embedding file: the tiny CLIP text tower encodes them
    model.embeddings_file = None
    sample = {k: v for k, v in sample.items() if k != "dataset_name"}
    sample["class_names"] = ["cat", "road", "sky"]
    model.eval()
    with torch.no_grad():
        out = model([sample])[0]["sem_seg"]
    assert out.shape[0] == 3


def test_build_without_cfg(synthetic_benchmark):
    backbone = CLIPPromptBackbone(model_name="OCZ-Tiny-ViT", num_prompts=2, out_layers=(1, 3))
    decoder = SimplePyramidPixelDecoder(
        backbone.output_shape(),
        conv_dim=32,
        mask_dim=32,
        norm="",
        decoder_strides=(32, 16, 8),
        mask_stride=4,
    )
    text = TextEmbedder(clip_model=backbone.clip_model, model_name="OCZ-Tiny-ViT")
    queries = ZeroShotMaskDecoder(
        in_channels=32, mask_dim=32, text_dim=text.dim, hidden_dim=32, num_queries=5,
        nheads=2, dim_feedforward=64, dec_layers=1,
    )  # fmt: skip
    criterion = SetCriterion(
        matcher=HungarianMatcher(num_points=64),
        weight_dict={"loss_ce": 1.0, "loss_mask": 1.0, "loss_dice": 1.0},
        num_points=64,
    )
    model = OCZeroShotSegmentor(
        backbone=backbone,
        pixel_decoder=decoder,
        transformer_decoder=queries,
        criterion=criterion,
        text_embedder=text,
        pixel_mean=backbone.pixel_mean,
        pixel_std=backbone.pixel_std,
        size_divisibility=32,
    ).eval()
    image = torch.randint(0, 255, (3, 40, 56), dtype=torch.uint8)
    with torch.no_grad():
        out = model([{"image": image, "class_names": ["a", "b"], "height": 40, "width": 56}])
    assert out[0]["sem_seg"].shape == (2, 40, 56)


def test_bad_config_values_are_clear_errors(synthetic_benchmark, tmp_path):
    data = synthetic_benchmark
    with pytest.raises(ValueError, match="OCZ-Tiny-ViT"):  # lists the available names
        build_model(tiny_cfg(data, **{"MODEL.OCZ.CLIP.MODEL_NAME": "ViT-Tiny-Typo"}))
    with pytest.raises(FileNotFoundError, match="MODEL.OCZ.CLIP.WEIGHTS"):
        build_model(tiny_cfg(data, **{"MODEL.OCZ.CLIP.WEIGHTS": str(tmp_path / "none.pt")}))
    bad = tmp_path / "emb.npz"
    names = np.array(["cat", "dog"])
    np.savez(bad, classes=names, embeddings=np.eye(2, 64, dtype=np.float32))
    model = build_model(tiny_cfg(data, **{"MODEL.OCZ.TEXT.EMBEDDINGS_FILE": str(bad)}))
    sample = {"dataset_name": data.val_name}
    with pytest.raises((ValueError, KeyError), match="orange"):  # names the missing classes
        model.vocabulary(sample, training=False)
    with pytest.raises(ValueError, match="TEST.MODE"):
        build_model(tiny_cfg(data, **{"MODEL.OCZ.TEST.MODE": "tiles"}))
