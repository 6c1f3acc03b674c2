"""ZegFormer in the framework: the focal loss and cost against hand computations, the segment
classification head's logits (fixed scale, unnormalised background) against a hand computation,
the FPN pixel decoder and DETR query decoder, the ResNet backbone's initial weights (a local
file, a missing one, a wrong one), a model whose ResNet trains while its CLIP stays frozen, CLIP's
own normalisation on the segment route, and the miniature config through tools/train_net.py
(training, then --eval-only with the ensemble switched on from the command line)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from detectron2.data import DatasetCatalog
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_backbone, build_model
from detectron2.utils.events import EventStorage

from ocz_d2.config import load_config
from ocz_d2.data import ZeroShotSemSegDatasetMapper
from ocz_d2.engine.cli import check_run_inputs
from ocz_d2.engine.optimizer import build_optimizer
from ocz_d2.modeling import CLIPPromptBackbone
from ocz_d2.modeling.criterion import SetCriterion, sigmoid_ce_loss, sigmoid_focal_loss
from ocz_d2.modeling.matcher import HungarianMatcher, batch_sigmoid_focal_cost
from ocz_d2.modeling.pixel_decoder import MaskFormerPixelDecoder
from ocz_d2.modeling.transformer_decoder import SegmentClassHead, ZegFormerDecoder
from ocz_d2.utils.errors import MissingFileError

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "synthetic" / "zegformer_tiny.yaml"
TRAIN_NET = REPO / "tools" / "train_net.py"
METRICS = "zero_shot_sem_seg_metrics.json"


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# ---------------------------------------------------------------------- focal loss and cost
def test_focal_loss_against_a_hand_computation():
    logits = torch.tensor([[2.0, -1.0], [0.5, 0.5]])
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    alpha, gamma = 0.25, 2.0

    def focal(x: float, t: float) -> float:
        p = _sigmoid(x)
        if t == 1.0:  # -log p, weighted by alpha (1 - p)^gamma
            return alpha * (1 - p) ** gamma * -math.log(p)
        return (1 - alpha) * p**gamma * -math.log(1 - p)

    # Mean over each row's points, summed over the rows (the masks).
    expected = (focal(2.0, 1.0) + focal(-1.0, 0.0)) / 2 + (focal(0.5, 0.0) + focal(0.5, 1.0)) / 2
    got = sigmoid_focal_loss(logits, targets, alpha, gamma)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(0.0087222 + 0.1499760, rel=1e-5)  # the numbers themselves
    # gamma 0 and no alpha weighting: plain BCE.
    plain = sigmoid_focal_loss(logits, targets, alpha=-1, gamma=0.0)
    torch.testing.assert_close(plain, sigmoid_ce_loss(logits, targets))
    # Pairwise cost of every (prediction, target) pair = the loss of that pair.
    cost = batch_sigmoid_focal_cost(logits, targets, alpha, gamma)
    for q in range(2):
        for t in range(2):
            pair = sigmoid_focal_loss(logits[q : q + 1], targets[t : t + 1], alpha, gamma)
            assert cost[q, t].item() == pytest.approx(pair.item(), rel=1e-6)


def test_criterion_with_focal_mask_loss_on_a_constant_mask():
    """One query predicting logit 2 everywhere, one target covering every valid pixel: every
    sampled point gives the same focal loss, so the criterion's value is exact."""
    x = 2.0
    matcher = HungarianMatcher(cost_class=1.0, cost_mask=20.0, cost_dice=1.0, mask_cost="focal")
    criterion = SetCriterion(
        matcher=matcher,
        weight_dict={"loss_ce": 1.0, "loss_mask": 20.0, "loss_dice": 1.0},
        num_points=64,
        num_aux_layers=0,
        mask_loss="focal",
    )
    valid = torch.ones(8, 8, dtype=torch.bool)
    valid[:, :2] = False  # ignore pixels are never sampled (their target is 0 here)
    target = {"labels": torch.tensor([0]), "masks": valid[None].clone(), "valid": valid}
    outputs = {"pred_logits": torch.zeros(1, 1, 3), "pred_masks": torch.full((1, 1, 8, 8), x)}
    losses = criterion(outputs, [target])
    p = _sigmoid(x)
    assert losses["loss_mask"].item() == pytest.approx(0.25 * (1 - p) ** 2 * -math.log(p), rel=1e-5)
    with pytest.raises(ValueError, match="MODEL.OCZ.LOSS.MASK_LOSS"):
        SetCriterion(
            matcher=matcher, weight_dict={"loss_ce": 1.0}, losses=("labels",), mask_loss="l1"
        )


# ---------------------------------------------------------------------- the segment head
def test_segment_head_logits_against_a_hand_computation():
    head = SegmentClassHead(hidden_dim=2, text_dim=2, logit_scale=100.0)
    with torch.no_grad():
        head.proj.weight.copy_(torch.eye(2))
        head.proj.bias.zero_()
        head.no_object_embed.copy_(torch.tensor([[0.3, 0.4]]))  # length 0.5, kept so
    text = torch.tensor([[2.0, 0.0], [0.0, 1.0]])  # normalised inside: e_x, e_y
    query = torch.tensor([[3.0, 4.0]], requires_grad=True)  # projected and normalised: (0.6, 0.8)
    logits, embeds = head(query, text)
    torch.testing.assert_close(embeds, torch.tensor([[0.6, 0.8]]))
    # Classes: 100 * cos; background: 100 * (0.6 * 0.3 + 0.8 * 0.4) = 50 (normalised it would
    # be 100).
    torch.testing.assert_close(logits, torch.tensor([[60.0, 80.0, 50.0]]))
    logits[0, -1].backward()
    assert head.no_object_embed.grad is not None and head.no_object_embed.grad.abs().sum() > 0
    # The scale is fixed: no parameter besides the projection and the background.
    names = {n for n, _ in head.named_parameters()}
    assert names == {"proj.weight", "proj.bias", "no_object_embed"}
    with pytest.raises(ValueError, match="LOGIT_SCALE"):
        SegmentClassHead(2, 2, logit_scale=0.0)


def test_zegformer_decoder_predicts_after_every_layer():
    torch.manual_seed(0)
    decoder = ZegFormerDecoder(
        in_channels=32, mask_dim=16, text_dim=8, hidden_dim=16, num_queries=5, nheads=2,
        dim_feedforward=32, dec_layers=3,
    )  # fmt: skip
    res5 = torch.randn(2, 32, 3, 4)
    mask_features = torch.randn(2, 16, 12, 16)
    text = torch.randn(7, 8)
    out = decoder([res5], mask_features, text)
    assert out["pred_logits"].shape == (2, 5, 8) and out["pred_masks"].shape == (2, 5, 12, 16)
    assert out["pred_embeds"].shape == (2, 5, 8)
    assert len(out["aux_outputs"]) == decoder.num_aux_outputs == 2
    torch.testing.assert_close(out["pred_embeds"].norm(dim=-1), torch.ones(2, 5))
    # The logits are the head's on the normalised queries: class columns within +-100.
    assert out["pred_logits"][..., :-1].abs().max() <= 100.0 + 1e-4
    with pytest.raises(ValueError, match="one feature map"):
        decoder([res5, res5], mask_features, text)


def test_maskformer_pixel_decoder_shapes_and_errors():
    shapes = {f"res{i}": ShapeSpec(channels=8 * 2**i, stride=2**i) for i in (2, 3, 4, 5)}
    torch.manual_seed(0)
    decoder = MaskFormerPixelDecoder(shapes, conv_dim=32, mask_dim=16, norm="GN")
    assert decoder.decoder_in_channels == 256 and decoder.mask_stride == 4
    features = {
        k: torch.randn(2, s.channels, 64 // s.stride, 96 // s.stride) for k, s in shapes.items()
    }
    mask_features, multi = decoder(features)
    assert mask_features.shape == (2, 16, 16, 24)
    assert len(multi) == 1 and multi[0] is features["res5"]  # the decoder attends to res5 as is
    with pytest.raises(ValueError, match="TRANSFORMER_IN_FEATURE"):
        MaskFormerPixelDecoder(shapes, conv_dim=32, mask_dim=16, transformer_in_feature="res6")


# ---------------------------------------------------------------------- the model
def _cfg(data, **extra):
    """The miniature config on the test benchmark, with a random tiny CLIP."""
    opts = {"MODEL.OCZ.CLIP.WEIGHTS": "", "DATASETS.VAL": "()", **extra}
    return load_config(CONFIG, data.tiny_run_overrides(**opts))


def _train_batch(cfg, data, n=2):
    mapper = ZeroShotSemSegDatasetMapper(cfg, True)
    return [mapper(d) for d in DatasetCatalog.get(data.train_name)[:n]]


def test_resnet_trains_while_clip_stays_frozen(synthetic_benchmark):
    data = synthetic_benchmark
    cfg = _cfg(data)
    torch.manual_seed(0)
    model = build_model(cfg)
    assert type(model.backbone).__name__ == "ResNet"
    assert isinstance(model.clip_tower, CLIPPromptBackbone) and model.clip_tower.num_prompts == 0
    assert isinstance(model.transformer_decoder, ZegFormerDecoder)
    batch = _train_batch(cfg, data)
    batch[1]["sem_seg"][:] = 255  # an image whose label is all ignore
    model.train()
    assert not model.clip_tower.clip_model.training  # frozen CLIP stays in eval mode
    with EventStorage(0):
        losses = model(batch)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    backbone = dict(model.backbone.named_parameters())
    assert backbone and all(p.requires_grad for p in backbone.values())
    no_grad = [n for n, p in backbone.items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad, no_grad
    clip = list(model.clip_tower.parameters())
    assert clip and all(not p.requires_grad and p.grad is None for p in clip)
    assert model.transformer_decoder.class_head.no_object_embed.grad is not None
    # The optimiser: every trainable parameter, the ResNet at the backbone multiplier, no CLIP.
    optimizer = build_optimizer(cfg, model)
    params = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    assert all(id(p) not in params for p in clip)
    base = cfg.SOLVER.BASE_LR
    assert all(params[id(p)] == base * cfg.SOLVER.BACKBONE_MULTIPLIER for p in backbone.values())


def test_segment_route_sees_clips_normalisation(synthetic_benchmark):
    """The ResNet takes ImageNet's normalisation, the CLIP beside it its own: the segment
    classifier gets the image renormalised for CLIP."""
    data = synthetic_benchmark
    cfg = _cfg(data, **{"MODEL.OCZ.SEGMENT_CLIP.ENABLED": True})
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    sample = ZeroShotSemSegDatasetMapper(cfg, False)(DatasetCatalog.get(data.val_name)[0])
    seen = []
    handle = model.segment_classifier.register_forward_pre_hook(
        lambda module, args: seen.append(args)
    )
    with torch.no_grad():
        scores = model([sample])[0]["sem_seg"]
    handle.remove()
    assert torch.isfinite(scores).all() and scores.shape[0] == len(data.classes)
    owner, images = seen[0][0], seen[0][1]
    assert owner is model.clip_tower
    clip = model.clip_tower
    mean = torch.tensor(clip.pixel_mean).view(3, 1, 1)
    std = torch.tensor(clip.pixel_std).view(3, 1, 1)
    expected = (sample["image"].float() - mean) / std
    torch.testing.assert_close(images[0], expected, atol=1e-4, rtol=1e-5)


def _write_resnet_weights(cfg, path: Path) -> dict:
    torch.manual_seed(123)
    backbone = build_backbone(cfg)
    torch.save({"model": backbone.state_dict()}, path)
    return backbone.state_dict()


def test_resnet_weights_from_a_local_file(synthetic_benchmark, tmp_path, monkeypatch):
    data = synthetic_benchmark
    cfg = _cfg(data)
    folder = tmp_path / "weights_root"
    folder.mkdir()
    saved = _write_resnet_weights(cfg, folder / "tiny_resnet.pth")
    # A relative name is looked up under $DETECTRON2_DATASETS (as the CLIP weights are).
    monkeypatch.setenv("DETECTRON2_DATASETS", str(folder))
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    model = build_model(_cfg(data, **{"MODEL.OCZ.RESNET.WEIGHTS": "tiny_resnet.pth"}))
    state = model.backbone.state_dict()
    assert all(torch.equal(state[k], v) for k, v in saved.items())
    torch.manual_seed(0)
    random = build_model(cfg).backbone.state_dict()
    assert not torch.equal(random["res2.0.conv1.weight"], saved["res2.0.conv1.weight"])


def test_missing_or_wrong_resnet_weights_give_clear_errors(synthetic_benchmark, tmp_path):
    data = synthetic_benchmark
    missing = str(tmp_path / "R-101.pkl")
    cfg = _cfg(data, **{"MODEL.OCZ.RESNET.WEIGHTS": missing})
    with pytest.raises(FileNotFoundError, match=r"MODEL\.OCZ\.RESNET\.WEIGHTS.*does not exist"):
        build_model(cfg)
    # train_net checks it before building anything, as a user error.
    with pytest.raises(MissingFileError, match=r"MODEL\.OCZ\.RESNET\.WEIGHTS.*convert-torchvision"):
        check_run_inputs(cfg, train=True)
    # A file of another model: none of the ResNet's tensors is in it.
    other = tmp_path / "other.pth"
    torch.save({"model": {"head.weight": torch.zeros(2, 2)}}, other)
    with pytest.raises(ValueError, match="none of the backbone's"):
        build_model(_cfg(data, **{"MODEL.OCZ.RESNET.WEIGHTS": str(other)}))
    # The key initialises a CNN only.
    clip_cfg = load_config(
        REPO / "configs" / "synthetic" / "ocz_tiny_attr.yaml",
        data.tiny_run_overrides(**{"MODEL.OCZ.RESNET.WEIGHTS": str(other)}),
    )
    with pytest.raises(ValueError, match="CLIPPromptBackbone"):
        build_model(clip_cfg)


# ---------------------------------------------------------------------- tools/train_net.py
@pytest.mark.slow
def test_zegformer_tiny_trains_and_evaluates_with_the_ensemble(synthetic_benchmark, tmp_path):
    """The miniature config trains a few iterations and evaluates through train_net; its
    checkpoint evaluates with the ensemble switched on by a command-line key."""
    data = synthetic_benchmark
    env = dict(os.environ, DETECTRON2_DATASETS=str(Path(data.root).parent), OMP_NUM_THREADS="1")
    env["CUDA_VISIBLE_DEVICES"] = ""

    def run(out: Path, *args: str, **extra) -> dict:
        opts = data.tiny_run_overrides(
            OUTPUT_DIR=out, **{"MODEL.OCZ.CLIP.WEIGHTS": "", "DATASETS.VAL": "()", **extra}
        )
        cmd = [sys.executable, str(TRAIN_NET), "--config-file", str(CONFIG), *args, *opts]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return json.loads((out / "inference" / data.val_name / METRICS).read_text())

    trained = run(tmp_path / "train", **{"SOLVER.MAX_ITER": 3, "SOLVER.CHECKPOINT_PERIOD": 10})
    weights = tmp_path / "train" / "model_final.pth"
    assert weights.is_file()
    state = torch.load(weights, map_location="cpu", weights_only=False)["model"]
    assert any(k.startswith("backbone.res5.") for k in state)  # the ResNet trains: saved
    plain = run(tmp_path / "eval", "--eval-only", **{"MODEL.WEIGHTS": weights})
    assert plain == trained  # the checkpoint holds the trained model
    on = {"MODEL.WEIGHTS": weights, "MODEL.OCZ.SEGMENT_CLIP.ENABLED": True}
    ensemble = run(tmp_path / "ensemble", "--eval-only", **on)
    for key in ("mIoU", "mIoU-seen", "mIoU-unseen", "hIoU"):
        assert math.isfinite(ensemble[key]) and 0 <= ensemble[key] <= 100, key
    log = (tmp_path / "ensemble" / "log.txt").read_text()
    assert "SegmentCLIPClassifier" in log  # the model as built, with the classifier
