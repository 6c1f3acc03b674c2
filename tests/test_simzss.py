"""SimZSS: its losses against references computed here, the pooling by hand, the frozen tower,
captions without concepts, dense inference, PAMR, and the tiny model built from its config."""

from __future__ import annotations

import math

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage
from PIL import Image

from ocz_d2.config import load_config
from ocz_d2.data import register_zero_shot_split
from ocz_d2.evaluation.protocol import tune_background_threshold
from ocz_d2.modeling.backbone.vision_tower import TimmVisionTower
from ocz_d2.modeling.simzss import (
    PAMR,
    concept_loss,
    global_infonce,
    pool_visual_concepts,
    text_concepts,
)
from ocz_d2.modeling.text.text_tower import TextTower

# A tiny model: random timm ViT (patch 16, width 192) and the tiny CLIP's text tower.
TINY = [
    "MODEL.META_ARCHITECTURE", "SimZSS",
    "MODEL.DEVICE", "cpu",
    "MODEL.SIMZSS.VISION.SOURCE", "timm",
    "MODEL.SIMZSS.VISION.MODEL_NAME", "vit_tiny_patch16_224",
    "MODEL.SIMZSS.VISION.PRETRAINED", "False",
    "MODEL.SIMZSS.TEXT.MODEL_NAME", "OCZ-Tiny-ViT",
    "DATASETS.TRAIN", "()",
    "DATASETS.TEST", "()",
]  # fmt: skip


def _tiny(*extra) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(load_config(None, [*TINY, *extra]))


def test_pooling_matches_a_hand_computation():
    concept = torch.tensor([[1.0, 0.0]])
    patches = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]])
    out = pool_visual_concepts(concept, patches, torch.tensor([0]), tau=0.1)
    # weights: softmax([1, 0, 0.6] / 0.1) = e^10, e^0, e^6 over their sum
    w = torch.tensor([math.exp(10), 1.0, math.exp(6)])
    w = w / w.sum()
    pooled = (
        w[0] * torch.tensor([1.0, 0])
        + w[1] * torch.tensor([0, 1.0])
        + w[2] * torch.tensor([0.6, 0.8])
    )
    assert torch.allclose(out[0], pooled / pooled.norm(), atol=1e-6)
    # a concept pools its own image only
    two = torch.cat([patches, -patches])
    out2 = pool_visual_concepts(concept.repeat(2, 1), two, torch.tensor([0, 1]), tau=0.1)
    assert torch.allclose(out2[0], out[0], atol=1e-6) and not torch.allclose(out2[1], out[0])


def test_text_concepts_sum_their_tokens():
    tokens = torch.randn(2, 6, 4)
    spans = torch.tensor([[0, 3, 1, 3], [1, 5, 2, 5]])
    got = text_concepts(tokens, spans)
    want = torch.stack([tokens[0, 1:3].sum(0), tokens[1, 2:5].sum(0)])
    assert torch.allclose(got, F.normalize(want, dim=-1), atol=1e-6)
    assert text_concepts(tokens, torch.zeros(0, 4, dtype=torch.long)).shape == (0, 4)


def test_global_infonce_against_a_loop():
    torch.manual_seed(0)
    image, text = F.normalize(torch.randn(5, 8), dim=-1), F.normalize(torch.randn(5, 8), dim=-1)
    scale = torch.tensor(14.0)
    total = 0.0
    for i in range(5):
        row = [math.exp(14.0 * float(image[i] @ text[j])) for j in range(5)]
        col = [math.exp(14.0 * float(image[j] @ text[i])) for j in range(5)]
        total += -math.log(row[i] / sum(row)) - math.log(col[i] / sum(col))
    assert math.isclose(float(global_infonce(image, text, scale)), total / 10, rel_tol=1e-5)


def test_concept_loss_against_a_loop_both_targets():
    torch.manual_seed(1)
    visual = F.normalize(torch.randn(5, 6), dim=-1)
    concepts = F.normalize(torch.randn(5, 6), dim=-1)
    ids = torch.tensor([7, 2, 7, 9, 2])
    classes = [2, 7, 9]  # the batch's concepts, in id order
    weights = {
        c: F.normalize(sum(concepts[i] for i in range(5) if ids[i] == c), dim=0) for c in classes
    }
    scale = 1 / 0.07
    own = argmax = 0.0
    for i in range(5):
        logits = [scale * float(visual[i] @ weights[c]) for c in classes]
        log_norm = math.log(sum(math.exp(v) for v in logits))
        own += log_norm - logits[classes.index(int(ids[i]))]
        argmax += log_norm - max(logits)
    got_own = float(concept_loss(visual, concepts, ids, scale, "own"))
    got_arg = float(concept_loss(visual, concepts, ids, scale, "argmax"))
    assert math.isclose(got_own, own / 5, rel_tol=1e-5)
    assert math.isclose(got_arg, argmax / 5, rel_tol=1e-5)
    with pytest.raises(ValueError, match="CONCEPT_TARGET"):
        concept_loss(visual, concepts, ids, scale, "mean")


def _batch(captions, concepts, size=32):
    gen = torch.Generator().manual_seed(0)
    return [
        {
            "image": torch.randint(0, 256, (3, size, size), generator=gen, dtype=torch.uint8),
            "caption": c,
            "concepts": torch.tensor(k, dtype=torch.long).reshape(-1, 3),
            "dataset_name": "x",
        }
        for c, k in zip(captions, concepts)
    ]


def test_training_step_trains_the_text_tower_only():
    model = _tiny()
    model.train()
    vision_before = {k: v.clone() for k, v in model.vision.state_dict().items()}
    # "red car" = concept 0 at characters 4..11 of the first caption; the second has none.
    batch = _batch(["two red cars", "nothing to see"], [[[0, 4, 11]], []])
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    text_before = model.text.text_projection.weight.clone()
    with EventStorage():
        losses = model(batch)
    assert set(losses) == {"loss_global", "loss_concept"}
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert all(p.grad is None for p in model.vision.parameters())
    assert all(not p.requires_grad for p in model.vision.parameters())
    assert model.text.text_projection.weight.grad.abs().sum() > 0
    opt.step()
    for k, v in model.vision.state_dict().items():
        assert torch.equal(v, vision_before[k]), k
    assert not torch.equal(model.text.text_projection.weight, text_before)
    assert not model.vision.model.training  # frozen: eval mode even in training


def test_the_losses_match_the_parts():
    """The model's losses equal the functions applied to its own towers' outputs."""
    model = _tiny("MODEL.SIMZSS.LOSS.CONCEPT_TARGET", "argmax")
    batch = _batch(["two red cars", "a bus"], [[[0, 4, 11]], [[1, 2, 5]]])
    with EventStorage():
        losses = model(batch)
    images = torch.stack([x["image"] for x in batch]).float()
    cls, patches = model.vision(images)
    text, spans = model.tokenize([x["caption"] for x in batch], [x["concepts"] for x in batch])
    assert spans.tolist() == [[0, 0, 2, 4], [1, 1, 2, 3]]  # "red cars" = 2 tokens, "bus" = 1
    tokens = model.text(text)
    caption = F.normalize(TextTower.end_of_text(tokens, text), dim=-1)
    want = global_infonce(F.normalize(cls, dim=-1), caption, torch.tensor(1 / 0.07))
    assert torch.allclose(losses["loss_global"], want, atol=1e-5)
    concepts = text_concepts(tokens, spans)
    flat = F.normalize(patches.flatten(2).transpose(1, 2), dim=-1)
    visual = pool_visual_concepts(concepts, flat, spans[:, 0], 0.1)
    want = 0.05 * concept_loss(visual, concepts, spans[:, 1], 1 / 0.07, "argmax")
    assert torch.allclose(losses["loss_concept"], want, atol=1e-5)


def test_a_batch_without_concepts_trains_the_global_loss():
    model = _tiny()
    with EventStorage():
        losses = model(_batch(["a tree", "the sky"], [[], []]))
    assert losses["loss_concept"].item() == 0.0 and losses["loss_global"].item() > 0
    sum(losses.values()).backward()  # the zero concept loss still has a graph
    assert model.text.text_projection.weight.grad.abs().sum() > 0


def test_caption_samples_are_required_in_training():
    model = _tiny()
    with EventStorage(), pytest.raises(ValueError, match="caption datasets"):
        model([{"image": torch.zeros(3, 32, 32, dtype=torch.uint8), "dataset_name": "x"}])


def test_dense_inference_whole_slide_background_and_pamr():
    model = _tiny().eval()
    image = torch.randint(0, 256, (3, 40, 56), dtype=torch.uint8)
    names = ["cat", "dog", "background"]
    sample = {"image": image, "class_names": names, "height": 20, "width": 28}
    out = model([sample])[0]["sem_seg"]
    assert out.shape == (3, 20, 28)
    # the scores are cosines of the patches with the names' embeddings, upsampled
    text = model.text_embedder.get(names)
    _, patches = model.vision(F.pad(image[None].float(), (0, 8, 0, 8)))
    cos = torch.einsum("dhw,kd->khw", F.normalize(patches[0], dim=0), text)
    assert out.min() >= cos.min() - 1e-5 and out.max() <= cos.max() + 1e-5
    model.background = "threshold"
    model.background_threshold = 0.123
    out = model([sample])[0]["sem_seg"]
    assert torch.allclose(out[2], torch.full_like(out[2], 0.123))
    model.background, model.test_mode = "none", "slide"
    model.window_size, model.window_stride = (32, 32), (16, 16)
    slid = model([dict(sample, height=40, width=56)])[0]["sem_seg"]
    assert slid.shape == (3, 40, 56) and torch.isfinite(slid).all()
    model.test_mode, model.pamr = "whole", PAMR(2, (1,))
    assert model([sample])[0]["sem_seg"].shape == (3, 20, 28)


def test_pamr_keeps_scores_inside_regions_of_one_colour():
    image = torch.zeros(1, 3, 8, 8)
    image[..., 4:] = 255.0  # left half black, right half white
    scores = torch.zeros(1, 1, 8, 8)
    scores[..., :4] = 1.0
    scores[..., 3, 1] = 0.0  # one wrong pixel inside the black half
    out = PAMR(5, (1,))(image, scores)
    assert out[0, 0, 3, 1] > 0.9  # repaired from its black neighbours
    assert out[0, 0, :, 4:].max() < 1e-3  # nothing leaks across the edge
    weights = PAMR(1, (1, 2)).affinity(image)
    assert weights.shape == (1, 16, 8, 8) and torch.allclose(weights.sum(1), torch.ones(1, 8, 8))
    with pytest.raises(ValueError, match="PAMR"):
        PAMR(0)


def test_timm_tower_from_a_local_file(tmp_path):
    torch.manual_seed(3)
    source = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0)
    path = tmp_path / "vit.pth"
    torch.save(source.state_dict(), path)
    tower = TimmVisionTower("vit_tiny_patch16_224", pretrained=False, weights=str(path))
    for k, v in source.state_dict().items():
        assert torch.equal(tower.model.state_dict()[k], v)
    assert tower.frozen_weights()["source"]["weights"] == "vit.pth"
    assert TimmVisionTower("vit_tiny_patch16_224", pretrained=False).frozen_weights() is None
    with pytest.raises(FileNotFoundError, match="MODEL.SIMZSS.VISION.WEIGHTS"):
        TimmVisionTower("vit_tiny_patch16_224", weights=str(tmp_path / "absent.pth"))
    cls, patches = tower(torch.zeros(2, 3, 32, 48))
    assert cls.shape == (2, 192) and patches.shape == (2, 192, 2, 3)
    with pytest.raises(ValueError, match="multiple of its patch size"):
        tower(torch.zeros(1, 3, 30, 32))


def test_clip_projection_needs_matching_widths():
    with pytest.raises(ValueError, match="does not map to the vision width"):
        TextTower("OCZ-Tiny-ViT", 192, projection="clip")
    tower = TextTower("OCZ-Tiny-ViT", 64, projection="clip")
    assert tower.encode_text(torch.tensor([[49406, 320, 49407, 0]]), normalize=True).shape == (
        1,
        64,
    )


def test_background_threshold_is_chosen_on_val(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "lbl").mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
            tmp_path / "img" / f"{i}.png"
        )
        Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "lbl" / f"{i}.png")
    name = register_zero_shot_split(
        "test_simzss_bg_val",
        image_root=tmp_path / "img",
        label_root=tmp_path / "lbl",
        classes=["background", "thing"],
        unseen=[],
    )
    opts = ["INPUT.MIN_SIZE_TEST", "32", "MODEL.SIMZSS.TEST.BACKGROUND", "threshold"]
    opts += ["DATALOADER.NUM_WORKERS", "0"]
    opts += ["MODEL.SIMZSS.TEST.BACKGROUND_THRESHOLD_GRID", "[-2.0, 1.5, 2.0]"]
    cfg = load_config(None, [*TINY, *opts])
    model = _tiny(*opts).eval()
    # Every pixel is background: any threshold above every cosine (<= 1) is perfect; ties go to
    # the smaller one.
    assert tune_background_threshold(cfg, model, name) == 1.5
    assert model.background_threshold == 1.5
    model.background = "prompt"
    assert tune_background_threshold(cfg, model, name) is None
