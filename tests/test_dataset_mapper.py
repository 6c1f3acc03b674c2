"""ZeroShotSemSegDatasetMapper and its augmentations, on generated synthetic data."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, build_detection_train_loader
from detectron2.data import transforms as T
from PIL import Image

from ocz_d2.config import add_ocz_config
from ocz_d2.data import (
    PhotometricDistortionTransform,
    RandomPhotometricDistortion,
    RandomResizeScale,
    ZeroShotSemSegDatasetMapper,
    register_zero_shot_split,
    unregister_zero_shot_split,
)


@pytest.fixture
def cfg():
    cfg = get_cfg()
    add_ocz_config(cfg)
    cfg.INPUT.FORMAT = "RGB"
    cfg.INPUT.RESIZE_TARGET = (64, 64)
    cfg.INPUT.RESIZE_SCALE = (0.5, 2.0)
    cfg.INPUT.CROP.ENABLED = True
    cfg.INPUT.CROP.TYPE = "absolute"
    cfg.INPUT.CROP.SIZE = (48, 48)
    cfg.INPUT.SIZE_DIVISIBILITY = 32
    cfg.INPUT.MIN_SIZE_TEST = 96
    cfg.INPUT.MAX_SIZE_TEST = 1000
    return cfg


def _raw(d):
    image = np.asarray(Image.open(d["file_name"]).convert("RGB"))
    label = np.asarray(Image.open(d["sem_seg_file_name"]))
    return image, label


def _unseen_table(unseen_ids):
    table = np.arange(256, dtype=np.int64)
    table[list(unseen_ids)] = 255
    return table


def _dicts_with_unseen(data):
    """Dataset dicts (train and val) whose label has unseen-class pixels."""
    out = []
    for name in (data.train_name, data.val_name):
        for d in DatasetCatalog.get(name):
            if np.isin(_raw(d)[1], data.unseen_ids).any():
                out.append(d)
    assert out, "the tiny benchmark should contain unseen objects"
    return out


def test_from_config_builds_the_training_recipe(cfg):
    mapper = ZeroShotSemSegDatasetMapper(cfg, is_train=True)
    augs = mapper.augmentations.augs
    assert [type(a) for a in augs] == [
        RandomResizeScale,
        T.RandomCrop_CategoryAreaConstraint,
        T.RandomFlip,
        RandomPhotometricDistortion,
    ]
    assert (augs[0].min_scale, augs[0].max_scale, augs[0].target_height) == (0.5, 2.0, 64)
    assert augs[1].single_category_max_area == 0.75 and augs[1].ignored_category == 255
    assert mapper.pad_to_size == (48, 48) and mapper.size_divisibility == 32
    cfg.INPUT.COLOR_AUG = False
    cfg.INPUT.FLIP_PROB = 0.0
    cfg.INPUT.CROP.ENABLED = False
    mapper = ZeroShotSemSegDatasetMapper(cfg, is_train=True)
    assert [type(a) for a in mapper.augmentations.augs] == [RandomResizeScale]
    assert mapper.pad_to_size is None
    test_augs = ZeroShotSemSegDatasetMapper(cfg, is_train=False).augmentations.augs
    assert len(test_augs) == 1 and isinstance(test_augs[0], T.ResizeShortestEdge)
    cfg.INPUT.ZERO_SHOT_SETTING = "oracle"
    with pytest.raises(ValueError, match="ZERO_SHOT_SETTING must be one of"):
        ZeroShotSemSegDatasetMapper(cfg, is_train=True)


def test_training_outputs(cfg, synthetic_benchmark):
    data = synthetic_benchmark
    mapper = ZeroShotSemSegDatasetMapper(cfg, is_train=True)
    np.random.seed(0)  # noqa: NPY002 (Detectron2 augmentations use the global state)
    for d in DatasetCatalog.get(data.train_name):
        out = mapper(d)
        image, sem_seg, inst = out["image"], out["sem_seg"], out["instances"]
        h, w = sem_seg.shape
        assert image.dtype == torch.uint8 and image.shape == (3, h, w)
        assert sem_seg.dtype == torch.int64
        assert h % 32 == 0 and w % 32 == 0 and h >= 48 and w >= 48
        assert (out["height"], out["width"]) == (data.image_size, data.image_size)
        assert out["dataset_name"] == data.train_name and out["file_name"] == d["file_name"]
        assert "sem_seg_file_name" in out
        values = set(sem_seg.unique().tolist())
        assert values <= set(data.seen_ids) | {255}
        # One mask per seen class present, exactly the class's pixels.
        assert inst.image_size == (h, w)
        assert inst.gt_classes.dtype == torch.int64
        assert inst.gt_classes.tolist() == sorted(values - {255})
        assert inst.gt_masks.dtype == torch.bool and inst.gt_masks.shape == (len(inst), h, w)
        for cls, mask in zip(inst.gt_classes, inst.gt_masks):
            assert torch.equal(mask, sem_seg == cls)
        assert "image" not in d and "sem_seg" not in d  # the input dict is not modified


def test_unseen_pixels_are_ignored_in_training_only(synthetic_benchmark):
    data = synthetic_benchmark
    table = _unseen_table(data.unseen_ids)
    train = ZeroShotSemSegDatasetMapper(is_train=True, augmentations=[])
    transductive = ZeroShotSemSegDatasetMapper(
        is_train=True, augmentations=[], zero_shot_setting="transductive"
    )
    test = ZeroShotSemSegDatasetMapper(is_train=False, augmentations=[])
    for d in _dicts_with_unseen(data):
        image, label = _raw(d)
        out = train(d)
        assert torch.equal(out["sem_seg"], torch.from_numpy(table[label]))
        assert torch.equal(out["image"], torch.from_numpy(image.copy()).permute(2, 0, 1))
        assert not set(out["instances"].gt_classes.tolist()) & set(data.unseen_ids)
        assert torch.equal(transductive(d)["sem_seg"], out["sem_seg"])
        out = test(d)
        assert torch.equal(out["sem_seg"], torch.from_numpy(label.astype(np.int64)))
        assert np.isin(out["sem_seg"].numpy(), data.unseen_ids).any()
        assert "instances" not in out


def test_inference_resize_keeps_labels_and_does_not_pad(cfg, synthetic_benchmark):
    d = _dicts_with_unseen(synthetic_benchmark)[0]
    out = ZeroShotSemSegDatasetMapper(cfg, is_train=False)(d)
    assert out["image"].shape == (3, 96, 96) and out["sem_seg"].shape == (96, 96)
    label = Image.open(d["sem_seg_file_name"]).resize((96, 96), Image.NEAREST)
    assert torch.equal(out["sem_seg"], torch.from_numpy(np.asarray(label).astype(np.int64)))
    assert np.isin(out["sem_seg"].numpy(), synthetic_benchmark.unseen_ids).any()
    no_label = {k: v for k, v in d.items() if k != "sem_seg_file_name"}
    out = ZeroShotSemSegDatasetMapper(cfg, is_train=False)(no_label)
    assert "sem_seg" not in out and out["image"].shape == (3, 96, 96)


def test_flip_moves_image_and_label(synthetic_benchmark):
    d = DatasetCatalog.get(synthetic_benchmark.train_name)[0]
    image, label = _raw(d)
    mapper = ZeroShotSemSegDatasetMapper(
        is_train=True, augmentations=[T.RandomFlip(prob=1.0)], size_divisibility=0
    )
    out = mapper(d)
    table = _unseen_table(synthetic_benchmark.unseen_ids)
    assert torch.equal(out["image"], torch.from_numpy(image[:, ::-1].copy()).permute(2, 0, 1))
    assert torch.equal(out["sem_seg"], torch.from_numpy(table[label[:, ::-1]]))


@pytest.fixture
def with_object_maps(synthetic_benchmark, tmp_path):
    """The tiny training split with an object map equal to the label (a copy of its folder)."""
    data = synthetic_benchmark
    objects = tmp_path / "objects"
    shutil.copytree(data.root / "labels" / "train", objects)
    name = register_zero_shot_split(
        "test_mapper_object_maps",
        image_root=data.root / "images" / "train",
        label_root=data.root / "labels" / "train",
        classes=data.classes,
        unseen=data.unseen,
        extra_label_roots={"object_map": objects},
    )
    yield name
    unregister_zero_shot_split(name)


def test_extra_label_map_follows_geometric_transforms(cfg, synthetic_benchmark, with_object_maps):
    cfg.INPUT.FLIP_PROB = 0.5
    cfg.INPUT.RESIZE_SCALE = (0.6, 1.7)
    mapper = ZeroShotSemSegDatasetMapper(cfg, is_train=True)
    table = torch.from_numpy(_unseen_table(synthetic_benchmark.unseen_ids))
    np.random.seed(1)  # noqa: NPY002
    saw_unseen = False
    for d in DatasetCatalog.get(with_object_maps) * 2:
        out = mapper(d)
        object_map = out["object_map"]
        assert object_map.dtype == torch.int64 and object_map.shape == out["sem_seg"].shape
        # The object map is the untouched label: mapping its unseen classes gives sem_seg,
        # also in the padding (255 in both).
        assert torch.equal(table[object_map], out["sem_seg"])
        saw_unseen |= bool(np.isin(object_map.numpy(), synthetic_benchmark.unseen_ids).any())
    assert saw_unseen  # the object map kept unseen classes that sem_seg ignores


def test_padding_values(synthetic_benchmark, with_object_maps):
    d = DatasetCatalog.get(with_object_maps)[0]
    mapper = ZeroShotSemSegDatasetMapper(
        is_train=True, augmentations=[], size_divisibility=48, pad_to_size=(80, 70)
    )
    out = mapper(d)
    assert out["image"].shape == (3, 96, 96)
    for key in ("sem_seg", "object_map"):
        assert (out[key][64:] == 255).all() and (out[key][:, 64:] == 255).all()
    assert (out["image"][:, 64:] == 0).all() and (out["image"][:, :, 64:] == 0).all()
    image, _ = _raw(d)
    assert torch.equal(out["image"][:, :64, :64], torch.from_numpy(image.copy()).permute(2, 0, 1))


def _write_sample(tmp_path, label, image=None):
    h, w = label.shape
    if image is None:
        image = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
    (tmp_path / "im").mkdir(exist_ok=True)
    (tmp_path / "lb").mkdir(exist_ok=True)
    Image.fromarray(image).save(tmp_path / "im" / "a.png")
    Image.fromarray(label).save(tmp_path / "lb" / "a.png")
    return {
        "file_name": str(tmp_path / "im" / "a.png"),
        "sem_seg_file_name": str(tmp_path / "lb" / "a.png"),
        "height": h,
        "width": w,
        "dataset_name": "ocz_test_mapper_toy",
    }


@pytest.fixture
def toy_split(tmp_path):
    """A registered 3-class dataset name for hand-written dataset dicts."""
    name = register_zero_shot_split(
        "test_mapper_toy",
        image_root=tmp_path / "unused",
        label_root=tmp_path / "unused",
        classes=["a", "b", "c"],
        unseen=["c"],
        lazy=True,
    )
    yield name
    unregister_zero_shot_split(name)


def test_all_ignore_sample(cfg, tmp_path, toy_split):
    d = _write_sample(tmp_path, np.full((40, 50), 255, np.uint8))
    out = ZeroShotSemSegDatasetMapper(cfg, is_train=True)(d)
    h, w = out["sem_seg"].shape
    assert (out["sem_seg"] == 255).all()
    assert len(out["instances"]) == 0
    assert out["instances"].gt_masks.shape == (0, h, w)
    assert out["instances"].gt_classes.shape == (0,)
    # Only unseen pixels: all ignore in training too.
    d = _write_sample(tmp_path, np.full((40, 50), 2, np.uint8))
    out = ZeroShotSemSegDatasetMapper(cfg, is_train=True)(d)
    assert (out["sem_seg"] == 255).all() and len(out["instances"]) == 0


def test_label_out_of_range_names_the_file(cfg, tmp_path, toy_split):
    label = np.zeros((20, 20), np.uint8)
    label[3, 4] = 7
    label[5, 5] = 3
    d = _write_sample(tmp_path, label)
    for is_train in (True, False):
        with pytest.raises(ValueError) as e:
            ZeroShotSemSegDatasetMapper(cfg, is_train=is_train)(d)
        assert d["sem_seg_file_name"] in str(e.value)
        assert "values [3, 7] outside [0, 3)" in str(e.value)


def test_unreadable_files(cfg, tmp_path, toy_split):
    d = _write_sample(tmp_path, np.zeros((20, 20), np.uint8))
    mapper = ZeroShotSemSegDatasetMapper(cfg, is_train=True)
    (tmp_path / "bad.png").write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match=r"Cannot read the image .*bad\.png"):
        mapper({**d, "file_name": str(tmp_path / "bad.png")})
    with pytest.raises(ValueError, match=r"Cannot read the image .*missing\.png"):
        mapper({**d, "file_name": str(tmp_path / "missing.png")})
    with pytest.raises(ValueError, match=r"Cannot read the label file .*bad\.png"):
        mapper({**d, "sem_seg_file_name": str(tmp_path / "bad.png")})
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(ValueError, match=r"rgb\.png has mode 'RGB'.*single-channel"):
        mapper({**d, "sem_seg_file_name": str(tmp_path / "rgb.png")})
    Image.fromarray(np.zeros((21, 20), np.uint8)).save(tmp_path / "small.png")
    with pytest.raises(ValueError, match=r"sem_seg map .*small\.png has size \(20, 21\)"):
        mapper({**d, "sem_seg_file_name": str(tmp_path / "small.png")})
    with pytest.raises(ValueError, match="has no zero-shot metadata"):
        mapper({**d, "dataset_name": "ocz_test_not_registered"})
    with pytest.raises(ValueError, match="no 'sem_seg_file_name'"):
        mapper({k: v for k, v in d.items() if k != "sem_seg_file_name"})


def test_palette_and_16_bit_labels(tmp_path, toy_split):
    label = np.array([[0, 1], [2, 255]], np.uint8)
    d = _write_sample(tmp_path, label)
    palette = Image.fromarray(label, mode="P")
    palette.putpalette([v for i in range(256) for v in (i, 255 - i, 0)])
    palette.save(d["sem_seg_file_name"])
    mapper = ZeroShotSemSegDatasetMapper(is_train=False, augmentations=[])
    assert mapper(d)["sem_seg"].tolist() == [[0, 1], [2, 255]]
    Image.fromarray(label.astype(np.uint16)).save(d["sem_seg_file_name"])
    assert mapper(d)["sem_seg"].tolist() == [[0, 1], [2, 255]]
    Image.fromarray(np.array([[0, 300]], np.uint16)).save(tmp_path / "big.png")
    d = _write_sample(tmp_path, np.zeros((1, 2), np.uint8))
    with pytest.raises(ValueError, match=r"big\.png has values in \[0, 300\]"):
        mapper({**d, "sem_seg_file_name": str(tmp_path / "big.png")})


def test_photometric_distortion_transform():
    image = np.array([[[255, 0, 0], [100, 100, 100], [200, 50, 10]]], dtype=np.uint8)
    label = np.array([[1, 2, 3]], dtype=np.uint8)
    identity = PhotometricDistortionTransform()
    assert identity.apply_image(image) is image
    hue = PhotometricDistortionTransform(hue_delta=120.0)
    assert hue.apply_image(image)[0, 0].tolist() == [0, 255, 0]  # red -> green
    assert hue.apply_image(image)[0, 1].tolist() == [100, 100, 100]  # gray has no hue
    bgr = PhotometricDistortionTransform(hue_delta=120.0, image_format="BGR")
    assert bgr.apply_image(image)[0, 0].tolist() == [0, 0, 255]  # BGR blue -> red
    gray = PhotometricDistortionTransform(saturation=0.0).apply_image(image)
    assert gray[0, 0].tolist() == [255, 255, 255] and gray[0, 2].tolist() == [200, 200, 200]
    contrast = PhotometricDistortionTransform(contrast=2.0, brightness_delta=10.0)
    assert contrast.apply_image(image)[0, 1].tolist() == [220, 220, 220]  # (100 + 10) * 2
    assert contrast.apply_image(image)[0, 2].tolist() == [255, 120, 40]
    assert contrast.apply_segmentation(label) is label
    coords = np.array([[1.0, 2.0]])
    assert contrast.apply_coords(coords) is coords
    np.random.seed(0)  # noqa: NPY002 (Detectron2 augmentations use the global state)
    aug = RandomPhotometricDistortion(prob=1.0)
    tfm = aug.get_transform(image)
    assert -32 <= tfm.brightness_delta <= 32 and 0.5 <= tfm.contrast <= 1.5
    assert 0.5 <= tfm.saturation <= 1.5 and -36 <= tfm.hue_delta <= 36
    neutral = RandomPhotometricDistortion(prob=0.0).get_transform(image)
    assert neutral.apply_image(image) is image


def test_random_resize_scale_matches_orientation():
    portrait = np.zeros((100, 50, 3), np.uint8)
    landscape = np.zeros((50, 100, 3), np.uint8)
    aug = RandomResizeScale(1.0, 1.0, 64, 256)
    # mmseg rescale to (256, 64): short side 50 -> 64, long side 100 -> 128 (< 256).
    tfm = aug.get_transform(portrait)
    assert (tfm.new_h, tfm.new_w) == (128, 64)
    tfm = aug.get_transform(landscape)
    assert (tfm.new_h, tfm.new_w) == (64, 128)
    plain = RandomResizeScale(1.0, 1.0, 64, 256, match_orientation=False)
    tfm = plain.get_transform(portrait)  # detectron2's ResizeScale: fit height 100 -> 64
    assert (tfm.new_h, tfm.new_w) == (64, 32)
    double = RandomResizeScale(2.0, 2.0, 64, 256).get_transform(landscape)
    assert (double.new_h, double.new_w) == (128, 256)


def test_train_loader_batches(cfg, synthetic_benchmark):
    cfg.DATASETS.TRAIN = (synthetic_benchmark.train_name,)
    cfg.SOLVER.IMS_PER_BATCH = 2
    cfg.DATALOADER.NUM_WORKERS = 0
    loader = build_detection_train_loader(
        cfg, mapper=ZeroShotSemSegDatasetMapper(cfg, is_train=True)
    )
    batch = next(iter(loader))
    assert len(batch) == 2
    assert all(b["image"].shape[-2:] == b["sem_seg"].shape for b in batch)
