"""The real-benchmark prepare scripts on tiny raw fixtures written here in the raw formats.

Each fixture mimics its download: VOC palette PNGs and SBD ``.mat`` files, COCO-Stuff
``stuffthingmaps`` PNGs, PASCAL-Context ``LabelMap`` ``.mat`` files with ``labels.txt``, ADE20K
annotation PNGs. Outputs are compared pixel by pixel with an independent expectation.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.io import savemat

from ocz_d2.data.prepare import (
    PrepareError,
    format_summary,
    prepare_ade20k,
    prepare_coco_stuff,
    prepare_context,
    prepare_voc,
)
from ocz_d2.data.prepare.common import split_classes

H, W = 6, 8


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _write_jpg(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_rng(seed).integers(0, 255, (H, W, 3), dtype=np.uint8)).save(path)


def _write_png(path: Path, label: np.ndarray, palette: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(label.astype(np.uint8), mode="L")
    if palette:
        im = im.convert("P")
        im.putpalette([v for i in range(256) for v in (i, (7 * i) % 256, (13 * i) % 256)])
    im.save(path)


def _write_list(path: Path, ids) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{i}\n" for i in ids))


def _read(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.mode == "L"
        return np.asarray(im)


# ---------------------------------------------------------------- VOC 2012 + SBD


def _voc_raw(tmp: Path) -> tuple[Path, Path, dict[str, np.ndarray], dict[str, str]]:
    """VOC ids a1, a2 (train), v1, v2 (val) with palette PNGs; SBD train a1, s1, v1, val s2.

    Returns roots, the raw label each output must come from, and its source kind."""
    voc = tmp / "VOCdevkit" / "VOC2012"
    sbd = tmp / "benchmark_RELEASE" / "dataset"
    raw: dict[str, np.ndarray] = {}
    source: dict[str, str] = {}
    values = np.array([0, 1, 5, 15, 20, 255])  # background, classes, boundary
    for n, i in enumerate(["a1", "a2", "v1", "v2", "s1", "s2"]):
        _write_jpg(voc / "JPEGImages" / f"{i}.jpg", n)
        png = _rng(10 + n).choice(values, size=(H, W))
        mat = _rng(20 + n).integers(0, 21, size=(H, W)).astype(np.uint8)  # SBD: 0..20
        if not i.startswith("s"):
            _write_png(voc / "SegmentationClass" / f"{i}.png", png, palette=True)
            raw[i], source[i] = png, "png"
        if i in ("a1", "s1", "v1", "s2"):
            (sbd / "cls").mkdir(parents=True, exist_ok=True)
            gt = {"Segmentation": mat, "Boundaries": np.zeros(1), "CategoriesPresent": np.ones(1)}
            savemat(sbd / "cls" / f"{i}.mat", {"GTcls": gt})
            if i.startswith("s"):
                raw[i], source[i] = mat, "mat"
    _write_list(voc / "ImageSets" / "Segmentation" / "train.txt", ["a1", "a2"])
    _write_list(voc / "ImageSets" / "Segmentation" / "val.txt", ["v1", "v2"])
    _write_list(sbd / "train.txt", ["a1", "s1", "v1"])
    _write_list(sbd / "val.txt", ["s2"])
    return voc, sbd, raw, source


def _voc_expected(raw: np.ndarray) -> np.ndarray:
    out = np.full(raw.shape, 255, dtype=np.uint8)
    for k in range(1, 21):
        out[raw == k] = k - 1
    return out


def test_prepare_voc_pixels_splits_and_summary(tmp_path):
    voc, sbd, raw, source = _voc_raw(tmp_path / "raw")
    out = tmp_path / "ocz_voc2012"
    result = prepare_voc(voc, sbd, out, check_counts=False, progress=False)
    assert result.counts == {"train": 4, "val": 2}
    assert sorted(p.stem for p in (out / "labels" / "train").iterdir()) == ["a1", "a2", "s1", "s2"]
    assert sorted(p.stem for p in (out / "labels" / "val").iterdir()) == ["v1", "v2"]
    expected_hist = np.zeros(20, dtype=np.int64)
    for split, ids in (("train", ["a1", "a2", "s1", "s2"]), ("val", ["v1", "v2"])):
        for i in ids:
            got = _read(out / "labels" / split / f"{i}.png")
            want = _voc_expected(raw[i])
            np.testing.assert_array_equal(got, want, err_msg=f"{i} ({source[i]})")
            expected_hist += np.bincount(want[want < 255], minlength=20)
            image = out / "images" / split / f"{i}.jpg"
            assert image.is_symlink() and image.resolve() == (voc / "JPEGImages" / f"{i}.jpg")
    # a1 has both a VOC PNG and an SBD .mat: the PNG wins (they differ, so this is checked).
    assert source["a1"] == "png"
    np.testing.assert_array_equal(result.pixel_counts, expected_hist)
    assert (out / "prepare_complete.json").is_file()
    summary = format_summary(result)
    assert "per-class pixel counts" in summary and "tvmonitor" in summary


def test_prepare_voc_input_errors(tmp_path):
    voc, sbd, _, _ = _voc_raw(tmp_path / "raw")
    out = tmp_path / "out"
    with pytest.raises(PrepareError, match=r"missing folder: .*nowhere"):
        prepare_voc(tmp_path / "nowhere", sbd, out, check_counts=False, progress=False)
    # The parent (VOCdevkit) instead of VOC2012: a wrong layout, with the path to pass.
    with pytest.raises(PrepareError, match=r"wrong layout: .*try --voc .*VOC2012"):
        prepare_voc(voc.parent, sbd, out, check_counts=False, progress=False)
    # The protocol's counts are checked by default.
    with pytest.raises(PrepareError, match=r"wrong count: train .* has 4 images, .* 10582"):
        prepare_voc(voc, sbd, out, progress=False)
    # A listed image or label missing: a partial download, with how many.
    (voc / "JPEGImages" / "s2.jpg").unlink()
    with pytest.raises(PrepareError, match=r"partial download: 1 of 6 images .*s2\.jpg"):
        prepare_voc(voc, sbd, out, check_counts=False, progress=False)
    (sbd / "cls" / "s1.mat").unlink()
    with pytest.raises(PrepareError, match=r"partial download: 1 of 2 SBD labels"):
        prepare_voc(voc, sbd, out, check_counts=False, progress=False)
    assert not out.exists()  # inputs are checked before anything is written


def test_prepare_is_resumable_without_half_written_files(tmp_path):
    voc, sbd, raw, _ = _voc_raw(tmp_path / "raw")
    out = tmp_path / "ocz_voc2012"
    prepare_voc(voc, sbd, out, check_counts=False, progress=False)
    kept = out / "labels" / "train" / "a2.png"
    before = kept.stat().st_mtime_ns
    # An interrupted run: one label never written, a temporary file left behind, no record.
    (out / "labels" / "train" / "s1.png").unlink()
    (out / "images" / "train" / "s1.jpg").unlink()
    leftovers = [
        out / "labels" / "train" / n for n in (".tmp-k3x_9q2a-s2.png", "s2.png.ocz-tmp1.png")
    ]
    for leftover in leftovers:  # today's temporary name, and that of earlier versions
        leftover.write_bytes(b"half a png")
    (out / "prepare_complete.json").unlink()
    result = prepare_voc(voc, sbd, out, check_counts=False, progress=False)
    assert result.written == 1
    assert kept.stat().st_mtime_ns == before
    assert not any(p.exists() for p in leftovers)
    np.testing.assert_array_equal(
        _read(out / "labels" / "train" / "s1.png"), _voc_expected(raw["s1"])
    )
    assert (out / "prepare_complete.json").is_file()
    # Outputs are re-validated: a corrupt finished label is reported, not silently kept.
    _write_png(kept, np.full((H, W), 37))
    with pytest.raises(PrepareError, match=r"a2\.png: values \[37\] are out of range"):
        prepare_voc(voc, sbd, out, check_counts=False, progress=False)


# ---------------------------------------------------------------- COCO-Stuff


UNUSED = {11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90}


def _coco_expected(raw: np.ndarray) -> np.ndarray:
    out = np.full(raw.shape, 255, dtype=np.uint8)
    k = 0
    for v in range(182):
        if v in UNUSED:
            continue
        out[raw == v] = k
        k += 1
    assert k == 171
    return out


def test_prepare_coco_stuff_maps_182_ids_to_171_classes(tmp_path):
    root = tmp_path / "coco"
    raw = {}
    every = np.array(list(range(256)), dtype=np.uint8)  # every value once, incl. unused and 255
    for n, (split, i) in enumerate([("train2017", "000000000009"), ("val2017", "000000000139")]):
        (root / split).mkdir(parents=True)
        label = np.resize(np.roll(every, 7 * n), (16, 16))
        Image.fromarray(_rng(n).integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(
            root / split / f"{i}.jpg"
        )
        _write_png(root / "stuffthingmaps_trainval2017" / split / f"{i}.png", label)
        raw[i] = label
    out = tmp_path / "ocz_coco_stuff"
    result = prepare_coco_stuff(root, out, check_counts=False, progress=False)
    assert result.counts == {"train": 1, "val": 1}
    classes, _ = split_classes("coco_stuff.yaml")
    for split, i in (("train", "000000000009"), ("val", "000000000139")):
        got = _read(out / "labels" / split / f"{i}.png")
        np.testing.assert_array_equal(got, _coco_expected(raw[i]))
        # COCO category ids 21 (cow) and 172 (wall-concrete) are stored as 20 and 171.
        assert classes[int(got[raw[i] == 20][0])] == "cow"
        assert classes[int(got[raw[i] == 171][0])] == "wall-concrete"
        assert classes[int(got[raw[i] == 0][0])] == "person"
        assert classes[int(got[raw[i] == 181][0])] == "wood"
    assert (result.pixel_counts == 2).all()  # every used id once per image
    with pytest.raises(PrepareError, match=r"missing folder: .*stuffthingmaps"):
        prepare_coco_stuff(root, out, stuffthingmaps=tmp_path / "stuffthingmaps", progress=False)


# ---------------------------------------------------------------- PASCAL Context-59


def test_prepare_context59_from_labelmap_mat_files(tmp_path):
    voc = tmp_path / "VOCdevkit" / "VOC2010"
    ctx = tmp_path / "pascal_context"
    classes, _ = split_classes("context59_zs3.yaml")
    # 459 raw labels; the 59 sit at scattered ids, the rest are fillers.
    raw_ids = _rng(0).permutation(np.arange(1, 460))[:59]
    names = {int(r): c for r, c in zip(raw_ids, classes)}
    ctx.mkdir(parents=True)
    (ctx / "labels.txt").write_text(
        "".join(f"{i}: {names.get(i, f'filler{i}')}\n" for i in range(1, 460))
    )
    ids = {"train": ["2008_000002", "2008_000003"], "val": ["2008_000007"]}
    raw = {}
    for n, i in enumerate(ids["train"] + ids["val"]):
        _write_jpg(voc / "JPEGImages" / f"{i}.jpg", n)
        label = _rng(n).integers(0, 460, size=(H, W)).astype(np.uint16)
        label[0, :8] = raw_ids[n * 8 : n * 8 + 8]  # some of the 59 in every image
        (ctx / "trainval").mkdir(exist_ok=True)
        savemat(ctx / "trainval" / f"{i}.mat", {"LabelMap": label})
        raw[i] = label
    for split in ids:
        _write_list(voc / "ImageSets" / "Main" / f"{split}.txt", ids[split])
    out = tmp_path / "ocz_context59"
    result = prepare_context(voc, ctx, out, check_counts=False, progress=False)
    assert result.counts == {"train": 2, "val": 1}
    for split in ids:
        for i in ids[split]:
            want = np.full((H, W), 255, dtype=np.uint8)
            for r, c in names.items():
                want[raw[i] == r] = classes.index(c)
            np.testing.assert_array_equal(_read(out / "labels" / split / f"{i}.png"), want)
    # mmseg's converted PNGs of the same images (0 = background, k + 1 = class k) give the same
    # labels.
    for split in ids:
        _write_list(voc / "ImageSets" / "SegmentationContext" / f"{split}.txt", ids[split])
        for i in ids[split]:
            want = _read(out / "labels" / split / f"{i}.png")
            _write_png(
                voc / "SegmentationClassContext" / f"{i}.png", np.where(want == 255, 0, want + 1)
            )
    out2 = tmp_path / "ocz_context59_mmseg"
    prepare_context(
        voc, tmp_path / "unused", out2, source="mmseg", check_counts=False, progress=False
    )
    for split in ids:
        for i in ids[split]:
            np.testing.assert_array_equal(
                _read(out2 / "labels" / split / f"{i}.png"),
                _read(out / "labels" / split / f"{i}.png"),
            )
    with pytest.raises(PrepareError, match=r"wrong count: train .* has 2 images, .* 4996"):
        prepare_context(voc, tmp_path / "unused", out2, source="mmseg", progress=False)
    _write_png(voc / "SegmentationClassContext" / "2008_000007.png", np.full((H, W), 60))
    (out2 / "labels" / "val" / "2008_000007.png").unlink()
    with pytest.raises(PrepareError, match=r"raw label values 60\.\.60 are outside .* 0\.\.59"):
        prepare_context(
            voc, tmp_path / "unused", out2, source="mmseg", check_counts=False, progress=False
        )
    # labels.txt without one of the 59 names: named in the error.
    (ctx / "labels.txt").write_text("1: accordion\n2: aeroplane\n")
    with pytest.raises(PrepareError, match=r"lacks the Context-59 classes \['bag'"):
        prepare_context(voc, ctx, out, check_counts=False, progress=False)


# ---------------------------------------------------------------- ADE20K-150


def _ade_raw(root: Path, n_train: int = 3) -> dict[str, np.ndarray]:
    raw = {}
    for split, n in (("training", n_train), ("validation", 1)):
        for j in range(n):
            i = f"ADE_{split[:5]}_{j:08d}"
            _write_jpg(root / "images" / split / f"{i}.jpg", j)
            label = _rng(j).integers(0, 151, size=(H, W))
            _write_png(root / "annotations" / split / f"{i}.png", label)
            raw[i] = label
    return raw


@pytest.mark.slow
def test_prepare_ade20k_parallel_and_range_check(tmp_path):
    root = tmp_path / "ADEChallengeData2016"
    raw = _ade_raw(root)
    out = tmp_path / "ocz_ade150"
    result = prepare_ade20k(root, out, workers=2, check_counts=False, progress=False)
    assert result.counts == {"train": 3, "val": 1}
    for i, label in raw.items():
        split = "train" if "train" in i else "val"
        want = np.where(label == 0, 255, label - 1).astype(np.uint8)
        np.testing.assert_array_equal(_read(out / "labels" / split / f"{i}.png"), want)
    classes, _ = split_classes("ade150.yaml")
    assert len(classes) == 150 and classes[0] == "wall" and classes[-1] == "flag"
    # A value outside 0..150 is not ADE's format.
    bad = np.full((H, W), 151)
    _write_png(root / "annotations" / "validation" / "ADE_valid_00000000.png", bad)
    os.remove(out / "labels" / "val" / "ADE_valid_00000000.png")
    with pytest.raises(PrepareError, match=r"raw label values 151\.\.151 are outside .* 0\.\.150"):
        prepare_ade20k(root, out, check_counts=False, progress=False)
    # Annotations without their images: a partial download.
    (root / "images" / "training" / "ADE_train_00000001.jpg").unlink()
    with pytest.raises(PrepareError, match=r"partial download: .*2 images for 3 labels"):
        prepare_ade20k(root, out, check_counts=False, progress=False)


def test_prepare_cli_prints_summary_and_errors(tmp_path):
    """The command line of datasets/prepare_ade20k.py (which prints the text, to stderr when
    the status is not 0)."""
    from ocz_d2.data.prepare.ade20k import cli

    root = tmp_path / "ADEChallengeData2016"
    _ade_raw(root, n_train=1)
    out = tmp_path / "ocz_ade150"
    common = ["--out", str(out), "--workers", "1", "--no-progress"]
    code, text = cli(["--ade", str(root), *common])
    assert code == 1 and "wrong count" in text
    code, text = cli(["--ade", str(root), "--no-count-check", *common])
    assert code == 0 and "train: 1 images" in text and "149 flag" in text
    code, text = cli(["--ade", str(tmp_path / "none"), "--no-count-check", *common])
    assert code == 1 and "missing folder" in text


def test_prepared_voc_loads_through_the_package_split_file(tmp_path):
    """The prepare script's output is exactly what the registered split file expects."""
    from detectron2.data import DatasetCatalog

    from ocz_d2.data import register_split_file
    from ocz_d2.data.prepare.common import SPLITS_DIR

    voc, sbd, _, _ = _voc_raw(tmp_path / "raw")
    prepare_voc(voc, sbd, tmp_path / "ocz_voc2012", check_counts=False, progress=False)
    names = register_split_file(SPLITS_DIR / "voc.yaml", root=tmp_path, dataset="test_voc_e2e")
    assert names == ["ocz_test_voc_e2e_train", "ocz_test_voc_e2e_val"]
    train = DatasetCatalog.get(names[0])
    assert sorted(Path(d["file_name"]).stem for d in train) == ["a1", "a2", "s1", "s2"]
    assert all(Path(d["sem_seg_file_name"]).stem == Path(d["file_name"]).stem for d in train)
    assert len(DatasetCatalog.get(names[1])) == 2
