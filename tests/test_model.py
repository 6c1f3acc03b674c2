"""The meta-architecture on CPU with the tiny CLIP config: build, train step, inference, errors."""

from pathlib import Path

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling import build_model
from detectron2.structures import Instances
from detectron2.utils.events import EventStorage
from PIL import Image

from ocz_d2 import add_ocz_config
from ocz_d2.data import (
    ZeroShotSemSegDatasetMapper,
    register_zero_shot_split,
    unregister_zero_shot_split,
)
from ocz_d2.modeling import (
    CLIPPromptBackbone,
    OCZeroShotSegmentor,
    SimplePyramidPixelDecoder,
    TextEmbedder,
    ZeroShotMaskDecoder,
)
from ocz_d2.modeling.criterion import SetCriterion
from ocz_d2.modeling.matcher import HungarianMatcher
from ocz_d2.modeling.meta_arch import calibrate, semantic_inference, sliding_windows
from tools import train_net

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
    assert "backbone.visual_prompts" in trainable
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
    prompts_grad = model.backbone.visual_prompts.grad
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

    sample = _batch(cfg, synthetic_benchmark.val_name, False, n=1)[0]
    model.eval()
    with torch.no_grad():
        model.calibration = 0.0
        raw = model([sample])[0]["sem_seg"]
        model.calibration = 0.25
        transductive = model([sample])[0]["sem_seg"]
    torch.testing.assert_close(transductive, raw, rtol=0, atol=0)


def test_query_predicting_no_object_contributes_nothing():
    masks = torch.full((2, 3, 4), 10.0)  # both queries cover every pixel
    # query 0 is confident no-object (last column); query 1 predicts class 0 of 2
    logits = torch.tensor([[0.0, 0.0, 40.0], [2.0, 0.0, -40.0]])
    scores = semantic_inference(logits, masks)
    torch.testing.assert_close(scores, semantic_inference(logits[1:], masks[1:]))
    expected = torch.softmax(torch.tensor([2.0, 0.0]), 0) * torch.sigmoid(torch.tensor(10.0))
    torch.testing.assert_close(scores[:, 0, 0], expected)


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


def test_open_vocabulary_inference(model_and_data):
    model, cfg, data = model_and_data
    sample = _batch(cfg, data.val_name, False, n=1)[0]
    # names not in the embedding file: the tiny CLIP text tower encodes them
    sample = {k: v for k, v in sample.items() if k != "dataset_name"}
    names = ["cat", "road", "sky"]
    model.eval()
    with torch.no_grad():
        ids, text, seen = model.vocabulary({**sample, "class_names": names}, training=False)
        out = model([{**sample, "class_names": names}])[0]["sem_seg"]
        reversed_out = model([{**sample, "class_names": names[::-1]}])[0]["sem_seg"]
        model.calibration = 0.0
        uncalibrated = model([{**sample, "class_names": names}])[0]["sem_seg"]
    assert out.shape == (3, sample["height"], sample["width"])
    assert seen.numel() == 0 and ids.tolist() == [0, 1, 2]  # nothing is seen
    tower = model.text_embedder.clip_model.encode_text(
        model.text_embedder._tokenize([f"a photo of a {n}." for n in names]), normalize=True
    )
    torch.testing.assert_close(text, tower)  # the text tower's embeddings of these names
    # channel k is the k-th name, whatever the order
    torch.testing.assert_close(reversed_out, out.flip(0))
    # no calibration with a free vocabulary, though the model calibrates its datasets
    assert model.zero_shot_setting == "inductive"
    torch.testing.assert_close(uncalibrated, out, rtol=0, atol=0)
    assert out.min() >= 0


def test_slide_averages_overlapping_windows(model_and_data):
    """Slide mode, through the model's forward, against the hand-computed average of whole-mode
    predictions on each window: 48x48 windows at stride 16 on a 64x64 image are the four corners
    (0, 0), (0, 16), (16, 0), (16, 16), so a pixel is covered by 1, 2 or 4 windows."""
    model, cfg, data = model_and_data
    sample = _batch(cfg, data.val_name, False, n=1)[0]
    assert tuple(sample["image"].shape[-2:]) == (64, 64) and "object_map" not in sample
    model.eval()
    model.calibration = 0.0
    with torch.no_grad():
        windows = {}
        for y, x in [(0, 0), (0, 16), (16, 0), (16, 16)]:
            crop = sample["image"][:, y : y + 48, x : x + 48]
            windows[y, x] = model([{**sample, "image": crop, "height": 48, "width": 48}])[0]
        model.test_mode, model.window_size, model.window_stride = "slide", (48, 48), (16, 16)
        model.slide_batch = 1  # one window per forward, like the whole-mode calls above
        slide = model([{**sample, "height": 64, "width": 64}])[0]["sem_seg"]
    w = {k: v["sem_seg"] for k, v in windows.items()}
    assert slide.shape == (w[0, 0].shape[0], 64, 64)
    close = torch.testing.assert_close
    close(slide[:, :16, :16], w[0, 0][:, :16, :16])  # one window
    close(slide[:, 48:, 48:], w[16, 16][:, 32:, 32:])
    close(slide[:, :16, 16:48], (w[0, 0][:, :16, 16:] + w[0, 16][:, :16, :32]) / 2)  # two
    close(slide[:, 16:48, :16], (w[0, 0][:, 16:, :16] + w[16, 0][:, :32, :16]) / 2)
    four = w[0, 0][:, 16:, 16:] + w[0, 16][:, 16:, :32] + w[16, 0][:, :32, 16:]
    close(slide[:, 16:48, 16:48], (four + w[16, 16][:, :32, :32]) / 4)  # four


def test_batched_slide_windows_equal_one_window_at_a_time(model_and_data):
    """All windows of an image in one forward (SLIDE_BATCH 0), in chunks (3), or one by one (1)
    give the same scores; the windows form a 2-D grid here (4 windows, overlaps in x and y)."""
    model, cfg, data = model_and_data
    sample = _batch(cfg, data.val_name, False, n=1)[0]
    image = (sample["image"].float() - model.pixel_mean) / model.pixel_std
    model.eval()
    saved = model.window_size, model.window_stride, model.slide_batch
    model.window_size, model.window_stride = (40, 40), (24, 24)
    assert len(sliding_windows(*image.shape[-2:], model.window_size, model.window_stride)) == 4
    out = {}
    try:
        with torch.no_grad():
            _, text, _ = model.vocabulary(sample, training=False)
            for n in (1, 3, 0):
                model.slide_batch = n
                out[n] = model._slide_scores(image[None], text)[0]
    finally:
        model.window_size, model.window_stride, model.slide_batch = saved
    torch.testing.assert_close(out[0], out[1], rtol=0, atol=1e-5)
    torch.testing.assert_close(out[3], out[1], rtol=0, atol=1e-5)
    assert out[0].shape == (text.shape[0], *image.shape[-2:])


def test_training_batch_mixing_datasets_is_an_error(model_and_data):
    model, cfg, data = model_and_data
    batch = _batch(cfg, data.train_name, True)
    batch[1]["dataset_name"] = data.val_name
    model.train()
    with EventStorage(), pytest.raises(ValueError, match="mixes datasets"):
        model(batch)


@pytest.fixture
def small_vocabulary_split(synthetic_benchmark, tmp_path):
    """The val images of the benchmark with 6 of its classes (others ignore), no embedding file:
    another vocabulary, encoded by the text tower."""
    data = synthetic_benchmark
    keep = list(data.seen_ids[:4]) + list(data.unseen_ids[:2])
    table = np.full(256, 255, dtype=np.uint8)
    table[keep] = np.arange(len(keep))
    labels = tmp_path / "labels"
    labels.mkdir()
    records = DatasetCatalog.get(data.val_name)
    for d in records:
        label = np.asarray(Image.open(d["sem_seg_file_name"]))
        Image.fromarray(table[label]).save(labels / Path(d["sem_seg_file_name"]).name)
    classes = [data.classes[i] for i in keep]
    name = register_zero_shot_split(
        "test_small_vocabulary",
        image_root=str(Path(records[0]["file_name"]).parent),
        label_root=str(labels),
        classes=classes,
        unseen=classes[4:],
    )
    yield name
    unregister_zero_shot_split(name)


def test_one_evaluation_over_two_vocabularies(
    synthetic_benchmark, small_vocabulary_split, tmp_path
):
    data = synthetic_benchmark
    cfg = tiny_cfg(data, **{"DATASETS.TEST": (data.val_name, small_vocabulary_split)})
    cfg.OUTPUT_DIR = str(tmp_path / "out")
    cfg.DATALOADER.NUM_WORKERS = 0
    model = build_model(cfg).eval()
    results = train_net.Trainer.test(cfg, model)
    for name in (data.val_name, small_vocabulary_split):
        classes = MetadataCatalog.get(name).stuff_classes
        metrics = results[name]["sem_seg"]
        assert sorted(k[4:] for k in metrics if k.startswith("IoU-")) == sorted(classes)
        assert 0 <= metrics["mIoU"] <= 100
    assert len(MetadataCatalog.get(small_vocabulary_split).stuff_classes) == 6


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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_amp_train_step_and_inference(synthetic_benchmark):
    """The AMP path (as AMPTrainer runs it) on GPU: finite fp16 losses and gradients, and GPU
    inference under autocast agreeing with CPU fp32 inference."""
    data = synthetic_benchmark
    torch.manual_seed(0)
    cfg = tiny_cfg(data, **{"MODEL.DEVICE": "cuda", "SOLVER.AMP.ENABLED": True})
    model = build_model(cfg)
    assert model.device.type == "cuda"
    model.train()
    scaler = torch.amp.GradScaler("cuda")
    with EventStorage(), torch.autocast("cuda", dtype=torch.float16):
        losses = model(_batch(cfg, data.train_name, True))
    total = sum(losses.values())
    assert torch.isfinite(total)
    scaler.scale(total).backward()
    grad = model.backbone.visual_prompts.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0

    sample = _batch(cfg, data.val_name, False, n=1)[0]
    model.eval()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
        gpu = model([sample])[0]["sem_seg"].float().cpu()
    with torch.no_grad():
        cpu = model.to("cpu")([sample])[0]["sem_seg"]
    assert gpu.shape == cpu.shape
    torch.testing.assert_close(gpu, cpu, atol=2e-2, rtol=2e-2)
