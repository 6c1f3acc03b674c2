"""Tiny CLIP pretraining on image-caption CSVs: loss, determinism, resume, cache, errors."""

from __future__ import annotations

import csv
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from ocz_d2.miniature.clip_pretrain import (
    ClipPretrainConfig,
    contrastive_loss,
    ensure_pretrained_clip,
    load_image_caption_csv,
    load_labelled_images,
    pretrain_clip,
    zero_shot_accuracy,
)
from ocz_d2.miniature.synthetic import ensure_pretraining_set
from ocz_d2.modeling.backbone.clip_prompt import create_clip_model

TINY = ClipPretrainConfig(steps=4, batch_size=4, lr=1e-3, warmup_steps=1, checkpoint_period=2)


def _write_csv(path, rows, header=("filepath", "caption")):
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def caption_csv(synthetic_benchmark):
    # The tiny benchmark's pretraining set: 16 image-caption pairs of 64 px (decoded to 128).
    return ensure_pretraining_set(synthetic_benchmark.root)


def test_contrastive_loss_counts_identical_captions_as_positives():
    emb = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]), dim=1)
    scale = torch.tensor(10.0)
    ids = torch.tensor([0, 0, 1])
    # Rows 0 and 1 are the same caption: with them as positives the optimum is reached.
    loss_multi = contrastive_loss(emb, emb, scale, ids)
    loss_plain = contrastive_loss(emb, emb, scale, None)
    # Hand-computed: row 0 logits [10, 10, 0]; target [.5, .5, 0] -> -log(e^10 / (2 e^10 + 1)).
    expected_row = -math.log(math.exp(10) / (2 * math.exp(10) + 1))
    expected = (2 * expected_row + -math.log(math.exp(10) / (math.exp(10) + 2))) / 3
    assert loss_multi.item() == pytest.approx(expected, rel=1e-5)
    # InfoNCE treats row 1 as a negative of row 0: same value here (symmetric), but its gradient
    # pushes identical captions apart, the multi-positive one does not.
    assert loss_plain.item() == pytest.approx(expected, rel=1e-5)
    a = emb.clone().requires_grad_(True)
    contrastive_loss(a, emb, scale, ids).backward()
    assert torch.allclose(a.grad[0], a.grad[1])


@pytest.mark.parametrize("patch_dropout", [0.0, 0.5])
def test_pretraining_is_deterministic_and_resumes_exactly(caption_csv, tmp_path, patch_dropout):
    data = load_image_caption_csv(caption_csv, 128)
    tiny = replace(TINY, patch_dropout=patch_dropout)
    assert data.images.shape == (16, 3, 128, 128) and data.images.dtype == torch.uint8
    full = pretrain_clip(data, tiny, tmp_path / "full", progress=False)
    # Interrupted after 2 steps (the state is saved every 2), then resumed.
    pretrain_clip(data, replace(tiny, steps=2), tmp_path / "cut", progress=False)
    state = torch.load(tmp_path / "cut" / "pretrain_state.pt", weights_only=True)
    assert state["step"] == 2
    # Resuming with other settings is refused; the same settings continue at step 2.
    state["config"] = {**state["config"], "steps": 4}
    torch.save(state, tmp_path / "cut" / "pretrain_state.pt")
    resumed = pretrain_clip(data, tiny, tmp_path / "cut", progress=False)
    for (k, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)
    fresh = create_clip_model("OCZ-Tiny-ViT").state_dict()
    assert not torch.equal(fresh["visual.conv1.weight"], full.state_dict()["visual.conv1.weight"])
    with pytest.raises(ValueError, match="other settings"):
        pretrain_clip(data, replace(tiny, lr=5e-4), tmp_path / "cut", progress=False)
    # Patch dropout is for training only: the returned model sees every patch.
    assert isinstance(full.visual.patch_dropout, torch.nn.Identity)
    if patch_dropout:  # and it changes what is learned
        plain = pretrain_clip(data, TINY, tmp_path / "p", progress=False)
        key = "visual.conv1.weight"
        assert not torch.equal(plain.state_dict()[key], full.state_dict()[key])


def test_cache_reuses_and_rebuilds_corrupt_files(caption_csv, synthetic_benchmark, tmp_path):
    eval_csv = synthetic_benchmark.root / "zeroshot" / "labels.csv"
    kwargs = dict(eval_csv=eval_csv, class_names=synthetic_benchmark.classes, progress=False)
    cfg = replace(TINY, steps=1)
    weights, record = ensure_pretrained_clip(caption_csv, cfg, tmp_path, **kwargs)
    assert set(record["zero_shot"]) == {"per_class", "seen", "unseen", "overall"}
    assert record["threads"] == torch.get_num_threads()  # weights depend on it
    stamp = weights.stat().st_mtime_ns
    again, _ = ensure_pretrained_clip(caption_csv, cfg, tmp_path, **kwargs)
    assert again == weights and weights.stat().st_mtime_ns == stamp  # reused, not retrained
    # Other settings: another cache entry.
    other, _ = ensure_pretrained_clip(caption_csv, replace(cfg, seed=1), tmp_path, **kwargs)
    assert other.parent != weights.parent
    # A truncated weights file no longer matches its manifest: rebuilt to the same bytes.
    good = weights.read_bytes()
    weights.write_bytes(good[:100])
    rebuilt, _ = ensure_pretrained_clip(caption_csv, cfg, tmp_path, **kwargs)
    assert rebuilt.read_bytes() == good
    # A corrupt training state is discarded and training starts again.
    (weights.parent / "manifest.json").unlink()
    (weights.parent / "pretrain_state.pt").write_bytes(b"garbage")
    rebuilt, _ = ensure_pretrained_clip(caption_csv, cfg, tmp_path, **kwargs)
    assert rebuilt.read_bytes() == good


def test_cache_key_of_generated_data_renders_it_only_on_a_miss(caption_csv, tmp_path):
    # csv_path as a function: the key comes from data_key, and the function (rendering the
    # images) runs only when the weights are not cached.
    calls = []

    def make_csv():
        calls.append(1)
        return caption_csv

    cfg = replace(TINY, steps=1)
    data_key = {"generator": {"seed": 0}}
    weights, _ = ensure_pretrained_clip(make_csv, cfg, tmp_path, data_key=data_key, progress=False)
    again, _ = ensure_pretrained_clip(make_csv, cfg, tmp_path, data_key=data_key, progress=False)
    assert again == weights and len(calls) == 1
    # Another data_key is other data: another entry, rendered again.
    other, _ = ensure_pretrained_clip(
        make_csv, cfg, tmp_path, data_key={"generator": {"seed": 1}}, progress=False
    )
    assert other.parent != weights.parent and len(calls) == 2
    # The CSV's bytes key a plain path: not the same entry as the data_key one.
    by_file, _ = ensure_pretrained_clip(caption_csv, cfg, tmp_path, progress=False)
    assert by_file.parent != weights.parent
    with pytest.raises(ValueError, match="data_key"):
        ensure_pretrained_clip(make_csv, cfg, tmp_path, progress=False)


def test_written_weights_load_through_the_config(caption_csv, tmp_path, monkeypatch):
    from detectron2.config import get_cfg

    from ocz_d2 import add_ocz_config
    from ocz_d2.modeling.backbone.clip_prompt import CLIPPromptBackbone

    weights, _ = ensure_pretrained_clip(
        caption_csv, replace(TINY, steps=1), tmp_path, progress=False
    )
    trained = torch.load(weights, weights_only=True)
    cfg = get_cfg()
    add_ocz_config(cfg)
    cfg.MODEL.OCZ.CLIP.MODEL_NAME = "OCZ-Tiny-ViT"
    cfg.MODEL.OCZ.CLIP.OUT_LAYERS = [1, 3]
    # A relative path is found under DETECTRON2_DATASETS.
    monkeypatch.setenv("DETECTRON2_DATASETS", str(weights.parent.parent))
    monkeypatch.chdir(tmp_path.parent)
    cfg.MODEL.OCZ.CLIP.WEIGHTS = f"{weights.parent.name}/weights.pt"
    backbone = CLIPPromptBackbone(cfg)
    torch.testing.assert_close(
        backbone.clip_model.visual.conv1.weight, trained["visual.conv1.weight"]
    )
    text = backbone.text_encoder().token_embedding.weight
    torch.testing.assert_close(text, trained["token_embedding.weight"])
    cfg.MODEL.OCZ.CLIP.WEIGHTS = "nowhere/tiny_clip.pt"
    with pytest.raises(FileNotFoundError, match="prepare_synthetic.py"):
        CLIPPromptBackbone(cfg)


def test_zero_shot_accuracy_is_per_class(tmp_path):
    torch.manual_seed(0)
    model = create_clip_model("OCZ-Tiny-ViT").eval()
    images = torch.randint(0, 255, (6, 3, 128, 128), dtype=torch.uint8)
    names = ["orange plain", "blue dotted", "green striped"]
    with torch.no_grad():
        img = torch.nn.functional.normalize(
            model.encode_image((images.float() / 255 - 0.45) / 0.27), dim=-1
        )
    assert img.shape == (6, 64)
    labels = [names[i % 3] for i in range(6)]
    acc = zero_shot_accuracy(
        model, "OCZ-Tiny-ViT", images, labels, names, unseen=["blue dotted"], templates="single"
    )
    # Accuracy per class is a multiple of 50% (2 images each); the groups average them.
    assert all(v in (0.0, 50.0, 100.0) for v in acc["per_class"].values())
    assert acc["unseen"] == acc["per_class"]["blue dotted"]
    seen = [acc["per_class"][n] for n in ("orange plain", "green striped")]
    assert acc["seen"] == pytest.approx(np.mean(seen))
    with pytest.raises(ValueError, match="not among the class names"):
        zero_shot_accuracy(model, "OCZ-Tiny-ViT", images, ["purple"] * 6, names)


def test_csv_errors_say_what_is_wrong(tmp_path):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_image_caption_csv(tmp_path / "none.csv", 16)
    bad_cols = _write_csv(tmp_path / "cols.csv", [["a.png", "x"]], header=("image", "text"))
    with pytest.raises(ValueError, match=r"no column\(s\) \['filepath', 'caption'\].*--img-key"):
        load_image_caption_csv(bad_cols, 16)
    assert load_image_caption_csv(bad_cols, 16, img_key="image", caption_key="text").captions == [
        "x"
    ]
    missing = _write_csv(tmp_path / "missing.csv", [["a.png", "x"], ["b.png", "y"]])
    with pytest.raises(FileNotFoundError, match=r"1 image\(s\).*b\.png"):
        load_image_caption_csv(missing, 16)
    empty = _write_csv(tmp_path / "empty.csv", [["a.png", "x"], ["a.png", "  "]])
    with pytest.raises(ValueError, match=r"empty captions on line\(s\) \[3\]"):
        load_image_caption_csv(empty, 16)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    broken = _write_csv(tmp_path / "broken.csv", [["broken.png", "x"]])
    with pytest.raises(OSError, match="Cannot read image .*broken.png"):
        load_image_caption_csv(broken, 16)
    tabbed = tmp_path / "tabbed.tsv"
    tabbed.write_text("filepath\tlabel\na.png\torange plain\n")
    images, labels = load_labelled_images(tabbed, 16, separator="\t")
    assert images.shape == (1, 3, 16, 16) and labels == ["orange plain"]
