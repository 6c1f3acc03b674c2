"""The synthetic compositional benchmark: determinism, Latin square, factorised embeddings."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from ocz_d2.data import load_class_embeddings
from ocz_d2.miniature import synthetic
from ocz_d2.miniature.synthetic import (
    HUES,
    SYNTHETIC_CLASSES,
    SYNTHETIC_UNSEEN,
    TEXTURES,
    UNSEEN_CELLS,
    default_synthetic_root,
    ensure_pretraining_set,
    ensure_synthetic_benchmark,
    generate_synthetic_benchmark,
    render_synthetic_sample,
    synthetic_caption,
    synthetic_class_embeddings,
)
from tools import prepare_synthetic

TINY = {
    "num_train": 3,
    "num_val": 2,
    "num_test": 2,
    "num_pretrain": 4,
    "num_zeroshot_per_class": 1,
    "image_size": 48,
}


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_same_seed_gives_identical_bytes_in_any_number_of_processes(tmp_path):
    a = generate_synthetic_benchmark(tmp_path / "a" / "ocz_synth", seed=3, workers=1, **TINY)
    b = generate_synthetic_benchmark(tmp_path / "b" / "ocz_synth", seed=3, workers=3, **TINY)
    files_a, files_b = _files(a.root), _files(b.root)
    # images and labels of 3 splits, 3 caption files, embeddings, 2 split files, marker (the
    # pretraining set and the zero-shot images are rendered on first use)
    assert len(files_a) == 2 * (3 + 2 + 2) + 3 + 1 + 2 + 1
    assert files_a == files_b
    ensure_pretraining_set(a.root, workers=1)
    ensure_pretraining_set(b.root, workers=3)
    pretrain_a, pretrain_b = _files(a.root / "pretrain"), _files(b.root / "pretrain")
    assert len(pretrain_a) == TINY["num_pretrain"] + 2  # images, captions.csv, marker
    assert pretrain_a == pretrain_b
    zeroshot_a = _files(a.root / "zeroshot")
    assert len(zeroshot_a) == 16 + 1  # one image per class, labels.csv
    assert zeroshot_a == _files(b.root / "zeroshot")
    c = generate_synthetic_benchmark(tmp_path / "c" / "ocz_synth", seed=4, **TINY)
    files_c = _files(c.root)
    assert files_c["images/train/00000.png"] != files_a["images/train/00000.png"]
    assert files_c["class_embeddings.npz"] != files_a["class_embeddings.npz"]
    # Image i depends on (seed, split, i) only.
    d = generate_synthetic_benchmark(tmp_path / "d" / "ocz_synth", seed=3, **{**TINY, "num_val": 5})
    files_d = _files(d.root)
    assert all(files_d[k] == v for k, v in files_a.items() if k.startswith(("images", "labels")))


def test_latin_square_split():
    assert len(SYNTHETIC_CLASSES) == 16 and len(set(SYNTHETIC_CLASSES)) == 16
    assert SYNTHETIC_CLASSES[4 * 2 + 1] == "blue striped"
    unseen_ids = sorted(SYNTHETIC_CLASSES.index(c) for c in SYNTHETIC_UNSEEN)
    assert unseen_ids == [1, 7, 8, 14]
    assert sorted({h for h, _ in UNSEEN_CELLS}) == [0, 1, 2, 3]  # one per hue
    assert sorted({t for _, t in UNSEEN_CELLS}) == [0, 1, 2, 3]  # one per texture
    seen = [c for c in SYNTHETIC_CLASSES if c not in SYNTHETIC_UNSEEN]
    for hue in HUES:
        assert sum(c.split()[0] == hue for c in seen) == 3
    for texture in TEXTURES:
        assert sum(c.split()[1] == texture for c in seen) == 3


def test_embeddings_are_factorised(tmp_path):
    info = generate_synthetic_benchmark(tmp_path / "ocz_synth", embedding_dim=32, **TINY)
    classes, emb = load_class_embeddings(info.class_embeddings)
    assert classes == list(SYNTHETIC_CLASSES) and emb.shape == (16, 32)
    assert emb.dtype == np.float32
    with np.load(info.class_embeddings, allow_pickle=False) as f:
        hue_vecs, tex_vecs = f["hue_vectors"], f["texture_vectors"]
    attrs = np.concatenate([hue_vecs, tex_vecs]).astype(np.float64)
    np.testing.assert_allclose(attrs @ attrs.T, np.eye(8), atol=1e-6)
    for i, name in enumerate(SYNTHETIC_CLASSES):
        hue, texture = name.split()
        h, t = list(HUES).index(hue), TEXTURES.index(texture)
        expected = (hue_vecs[h] + tex_vecs[t]) / np.sqrt(2)
        np.testing.assert_allclose(emb[i], expected, atol=1e-6)
    # Cosine similarity: 1 for the same class, 1/2 when one attribute is shared, 0 otherwise.
    cos = emb.astype(np.float64) @ emb.T.astype(np.float64)
    for i, a in enumerate(SYNTHETIC_CLASSES):
        for j, b in enumerate(SYNTHETIC_CLASSES):
            shared = sum(x == y for x, y in zip(a.split(), b.split()))
            assert cos[i, j] == pytest.approx(shared / 2, abs=1e-6)
    # Analogy: an unseen class is exactly reachable from seen ones.
    idx = {c: i for i, c in enumerate(SYNTHETIC_CLASSES)}
    analogy = emb[idx["orange plain"]] + emb[idx["green striped"]] - emb[idx["green plain"]]
    np.testing.assert_allclose(analogy, emb[idx["orange striped"]], atol=1e-6)
    with pytest.raises(ValueError, match="at least 8"):
        synthetic_class_embeddings(dim=7)


def test_rendered_content():
    hues = list(HUES.values())
    dark_fraction = {t: [] for t in TEXTURES}
    for i in range(12):
        scene = render_synthetic_sample(np.random.default_rng([0, 0, i]), 128)
        image, label = scene.image, scene.label
        assert image.shape == (128, 128, 3) and image.dtype == np.uint8
        assert label.shape == (128, 128) and label.dtype == np.uint8
        assert (label == 255).mean() > 0.2  # background
        values = set(np.unique(label).tolist()) - {255}
        assert values and values <= set(range(16))
        hsv = cv2.cvtColor(image.astype(np.float32) / 255, cv2.COLOR_RGB2HSV)
        # The background has a low saturation, objects a high one.
        assert np.median(hsv[..., 1][label == 255]) < 0.2
        for cls in values:
            region = label == cls
            if region.sum() < 150:
                continue  # a mostly occluded object
            hue_idx, tex_idx = divmod(cls, 4)
            bright = region & (hsv[..., 2] > 0.55)
            diff = np.abs(np.mod(hsv[..., 0][bright] - hues[hue_idx] + 180, 360) - 180)
            assert np.median(diff) < 12, (i, cls)
            dark_fraction[TEXTURES[tex_idx]].append((hsv[..., 2][region] < 0.5).mean())
    means = {t: np.mean(v) for t, v in dark_fraction.items()}
    assert all(dark_fraction.values()), means
    assert means["plain"] < 0.05
    assert 0.1 < means["dotted"] < 0.4
    assert 0.35 < means["striped"] < 0.65 and 0.35 < means["checkered"] < 0.65


def test_complete_folders_are_reused_and_broken_ones_regenerated(tmp_path):
    root = tmp_path / "ocz_synthetic"
    info = generate_synthetic_benchmark(root, **TINY)
    assert info.generated and info.dataset == "synthetic"
    marker = json.loads((root / "generation_complete.json").read_text())
    assert marker["num_train"] == 3 and marker["seed"] == 0
    original = _files(root)
    # Complete: reused without writing.
    (root / "images" / "train" / "00000.png").write_bytes(b"edited")
    assert not generate_synthetic_benchmark(root, **TINY).generated
    assert (root / "images" / "train" / "00000.png").read_bytes() == b"edited"
    # Half-written (no marker): regenerated.
    (root / "generation_complete.json").unlink()
    assert generate_synthetic_benchmark(root, **TINY).generated
    assert _files(root) == original
    # Other arguments: regenerated, stale images removed; user files kept.
    (root / "notes.txt").write_text("mine")
    generate_synthetic_benchmark(root, **{**TINY, "num_train": 2})
    assert not (root / "images" / "train" / "00002.png").exists()
    assert (root / "notes.txt").read_text() == "mine"
    assert generate_synthetic_benchmark(root, force=True, **{**TINY, "num_train": 2}).generated
    label = Image.open(root / "labels" / "val" / "00001.png")
    assert label.mode == "L" and label.size == (48, 48)
    with pytest.raises(ValueError, match="image_size >= 16"):
        generate_synthetic_benchmark(root, image_size=8)


def test_prepare_script(tmp_path, capsys):
    root = tmp_path / "ocz_prep"
    argv = ["--root", str(root), "--num-train", "4", "--num-val", "2", "--num-test", "2"]
    argv += ["--num-pretrain", "4", "--image-size", "32", "--no-clip"]
    assert prepare_synthetic.main(argv) == 0
    out = capsys.readouterr().out
    assert "train: 4/4 images" in out and "val: 2/2 images" in out
    assert "16 classes (4 unseen" in out and f"DETECTRON2_DATASETS={tmp_path}" in out
    assert len(list((root / "images" / "train").glob("*.png"))) == 4
    assert not (root / "pretrain" / "captions.csv").exists()  # only when pretraining needs it
    assert prepare_synthetic.main(argv + ["--pretraining-set"]) == 0
    out = capsys.readouterr().out
    assert "Already complete" in out and "pretrain: 4/4 images" in out
    assert len(list((root / "pretrain" / "images").glob("*.png"))) == 4


def test_ensure_synthetic_benchmark_uses_detectron2_datasets(tmp_path, monkeypatch):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    assert default_synthetic_root() == tmp_path / "ocz_synthetic"
    info = ensure_synthetic_benchmark(**TINY)
    assert info.root == tmp_path / "ocz_synthetic" and info.generated
    assert (info.root / "generation_complete.json").is_file()
    again = ensure_synthetic_benchmark(**TINY)
    assert again.root == info.root and not again.generated  # reused


# Independent re-derivation of the caption grammar: how a phrase can name (hue, texture).
_TEXTURE_WORDS = {
    "plain": r"(?:plain|no pattern|a plain surface|a uniform colour)",
    "striped": r"(?:striped|stripes|a striped pattern|thin stripes)",
    "dotted": r"(?:dotted|dots|polka dots|a dotted pattern)",
    "checkered": r"(?:checkered|checks|a checkerboard pattern|a checkered pattern)",
}


def _names_class(caption: str, cls: int) -> bool:
    hue, texture = SYNTHETIC_CLASSES[cls].split(" ")
    tex = _TEXTURE_WORDS[texture]
    patterns = [
        rf"\b{hue} {texture} \w+",
        rf"\b{texture} {hue} \w+",
        rf"\b{hue} \w+ with {tex}\b",
        rf"\bthat is {hue} and {texture}\b",
    ]
    return any(re.search(p, caption) for p in patterns)


def test_captions_name_the_visible_objects():
    for i in range(20):
        scene = render_synthetic_sample(np.random.default_rng([0, 0, i]), 128)
        visible = scene.visible_objects()
        caption = synthetic_caption(np.random.default_rng([0, 0, i, 1]), visible)
        # Each object phrase holds exactly one hue word.
        hue_words = re.findall(r"\b(?:orange|green|blue|magenta)\b", caption)
        assert len(hue_words) == len(visible), caption
        for cls, _ in visible:
            assert _names_class(caption, cls), (caption, SYNTHETIC_CLASSES[cls])
        # Objects hidden below the area threshold are not named.
        hidden = [c for c, _, area in scene.objects if area < 0.01 * 128 * 128]
        assert all(c in [v for v, _ in visible] or not _names_class(caption, c) for c in hidden)
    assert synthetic_caption(np.random.default_rng(0), []) == "a grey textured background"


def test_caption_wording_varies():
    rng = np.random.default_rng(0)
    captions = {synthetic_caption(rng, [(1, "star")]) for _ in range(200)}
    assert len(captions) > 30  # word order, nouns, frames and "with ..." forms vary
    assert all(_names_class(c, 1) for c in captions)
    two = [synthetic_caption(rng, [(1, "star"), (8, "ellipse")]) for _ in range(50)]
    firsts = {c.find("orange") < c.find("blue") for c in two}
    assert firsts == {True, False}  # both orders occur


def test_caption_files_and_pretraining_set(tmp_path):
    info = generate_synthetic_benchmark(
        tmp_path / "ocz_synth", **{**TINY, "num_pretrain": 120, "image_size": 64}
    )
    for folder in ("pretrain", "zeroshot"):  # rendered on first use only
        assert not any((info.root / folder / "images").iterdir())
    assert ensure_pretraining_set(info.root) == info.pretrain_captions
    with info.pretrain_captions.open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 120 and set(rows[0]) == {"filepath", "caption"}
    assert all((info.pretrain_captions.parent / r["filepath"]).is_file() for r in rows)
    named = {c for r in rows for c in range(16) if _names_class(r["caption"], c)}
    assert named == set(range(16))  # unseen classes included: CLIP "has seen" every class
    with info.captions("val").open() as f:
        val_rows = list(csv.DictReader(f))
    assert [r["filepath"] for r in val_rows] == ["images/val/00000.png", "images/val/00001.png"]
    # A segmentation caption names exactly the classes of the label map's large regions.
    label = np.asarray(Image.open(info.root / "labels" / "val" / "00000.png"))
    for cls in np.unique(label[label != 255]):
        if (label == cls).mean() > 0.05:
            assert _names_class(val_rows[0]["caption"], int(cls)), val_rows[0]["caption"]
    with info.zeroshot_labels.open() as f:
        zs = list(csv.DictReader(f))
    assert [r["label"] for r in zs] == list(SYNTHETIC_CLASSES)
    image = np.asarray(Image.open(info.zeroshot_labels.parent / zs[0]["filepath"]))
    assert image.shape == (64, 64, 3)


def test_object_view_keeps_one_object_on_clips_mean_colour():
    mean = np.array(synthetic._CLIP_MEAN_RGB)
    for i in range(20):
        scene = render_synthetic_sample(np.random.default_rng(i), 64, 2, 2)
        view = synthetic._object_view(scene, np.random.default_rng([i, 1]))
        if view is None:  # no object covers 1% of the image: nothing to show
            assert not scene.visible_objects()
            continue
        image, named = view
        kept = (image != mean).any(-1)
        (k,) = np.unique(scene.instance[kept])  # the kept pixels belong to one object...
        assert np.array_equal(image[kept], scene.image[kept])  # ...unchanged,
        assert (kept == (scene.instance == k)).mean() > 0.99  # all of it (bar mean-coloured px)
        cls, kind, area = scene.objects[k]
        assert named == [(cls, kind)] and area >= 0.01 * 64 * 64
        assert (image[scene.instance != k] == mean).all()


def test_pretraining_set_shows_some_scenes_as_object_views(tmp_path):
    info = generate_synthetic_benchmark(tmp_path / "s", **{**TINY, "num_pretrain": 120})
    with ensure_pretraining_set(info.root).open() as f:
        rows = list(csv.DictReader(f))
    mean = np.array(synthetic._CLIP_MEAN_RGB)
    views = 0
    for r in rows:
        image = np.asarray(Image.open(info.root / "pretrain" / r["filepath"]))
        flat = (image == mean).all(-1).mean()
        if flat > 0.3:  # an object view: only CLIP's mean colour around one object
            views += 1
            named = [c for c in range(16) if _names_class(r["caption"], c)]
            assert len(named) == 1, r["caption"]
        else:  # a rendered scene: its textured background has no flat area
            assert flat < 0.01
    # Half of the scenes at the benchmark's scale (half of the set): about a quarter.
    assert 15 <= views <= 45, views


def test_pretraining_set_is_reused_and_rendered_again_when_stale(tmp_path):
    kwargs = {**TINY, "num_pretrain": 6}
    info = generate_synthetic_benchmark(tmp_path / "a" / "ocz_synth", **kwargs)
    csv_path = ensure_pretraining_set(info.root)
    first = _files(info.root / "pretrain")
    stamp = csv_path.stat().st_mtime_ns
    assert ensure_pretraining_set(info.root) == csv_path
    assert csv_path.stat().st_mtime_ns == stamp  # reused, not rendered again
    # The same bytes as in another folder generated with the same settings.
    other = generate_synthetic_benchmark(tmp_path / "b" / "ocz_synth", **kwargs)
    ensure_pretraining_set(other.root)
    assert _files(other.root / "pretrain") == first
    # A set left by other settings (or half-written: no record) is rendered again.
    (info.root / "pretrain" / "images" / "00000.png").write_bytes(b"stale")
    (info.root / "pretrain" / "generation_complete.json").write_text("{}")
    ensure_pretraining_set(info.root)
    assert _files(info.root / "pretrain") == first
    # Regenerating the benchmark clears its pretraining set with the rest.
    generate_synthetic_benchmark(info.root, force=True, **kwargs)
    assert not any((info.root / "pretrain" / "images").iterdir())
    with pytest.raises(FileNotFoundError, match="prepare_synthetic"):
        ensure_pretraining_set(tmp_path / "missing")
