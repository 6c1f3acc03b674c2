"""Registration of zero-shot splits: function, YAML split file, builtin splits, errors."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import yaml
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image

from ocz_d2.config import add_ocz_config
from ocz_d2.data import (
    SYNTHETIC_ATTR_SPLIT_FILE,
    SYNTHETIC_SPLIT_FILE,
    is_zero_shot_split,
    load_split_file,
    register_split_file,
    register_split_files_from_config,
    register_zero_shot_split,
    unregister_zero_shot_split,
)
from ocz_d2.miniature import generate_synthetic_benchmark, synthetic_split_config

CLASSES = ["cat", "dog", "car", "tree"]
_counter = itertools.count()


@pytest.fixture
def names():
    """Unique dataset names; every split registered under them is unregistered afterwards."""
    made = []

    def new(stem: str = "reg") -> str:
        made.append(f"ocz_test_reg_{stem}_{next(_counter)}")
        return made[-1]

    yield new
    for name in made:
        for full in [name] + [f"{name}_{s}" for s in ("train", "val")]:
            if is_zero_shot_split(full):
                unregister_zero_shot_split(full)


def _write_split(root: Path, sizes=((20, 30), (24, 16), (10, 10)), image_ext=".png") -> None:
    """A tiny split under root/{images,labels,objects}: image i has size sizes[i] (h, w)."""
    rng = np.random.default_rng(0)
    for sub in ("images", "labels", "objects"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i, (h, w) in enumerate(sizes):
        image = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        Image.fromarray(image).save(root / "images" / f"img{i}{image_ext}")
        label = rng.choice(np.array([0, 1, 2, 3, 255], dtype=np.uint8), size=(h, w))
        Image.fromarray(label).save(root / "labels" / f"img{i}.png")
        Image.fromarray((label % 3).astype(np.uint8)).save(root / "objects" / f"img{i}.png")


def _write_embeddings(path: Path, classes, dim: int = 8) -> None:
    emb = np.random.default_rng(1).standard_normal((len(classes), dim)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    np.savez(path, classes=np.array(classes), embeddings=emb)


@pytest.fixture
def split_dir(tmp_path) -> Path:
    _write_split(tmp_path / "toy")
    _write_embeddings(tmp_path / "toy" / "emb.npz", CLASSES)
    return tmp_path


def _kwargs(root: Path, **over):
    kw = dict(
        image_root=root / "toy" / "images",
        label_root=root / "toy" / "labels",
        classes=CLASSES,
        unseen=["dog"],
        class_embeddings=root / "toy" / "emb.npz",
    )
    kw.update(over)
    return kw


def _meta(name: str) -> dict:
    meta = MetadataCatalog.get(name).as_dict()
    meta.pop("name")
    return meta


def test_function_registration_metadata_and_dicts(split_dir, names):
    name = register_zero_shot_split(
        names()[len("ocz_") :],  # the prefix is added
        extra_label_roots={"object_map": split_dir / "toy" / "objects"},
        **_kwargs(split_dir),
    )
    assert name.startswith("ocz_test_reg_") and is_zero_shot_split(name)
    assert _meta(name) == {
        "stuff_classes": CLASSES,
        "seen_classes": [0, 2, 3],
        "unseen_classes": [1],
        "ignore_label": 255,
        "evaluator_type": "ocz_zero_shot_sem_seg",
        "image_root": str(split_dir / "toy" / "images"),
        "sem_seg_root": str(split_dir / "toy" / "labels"),
        "class_embeddings": str(split_dir / "toy" / "emb.npz"),
        "split_file": None,
        "extra_label_roots": {"object_map": str(split_dir / "toy" / "objects")},
    }
    dicts = DatasetCatalog.get(name)
    assert [(d["image_id"], d["height"], d["width"]) for d in dicts] == [
        ("img0", 20, 30),
        ("img1", 24, 16),
        ("img2", 10, 10),
    ]
    toy = split_dir / "toy"
    assert dicts[1] == {
        "file_name": str(toy / "images" / "img1.png"),
        "sem_seg_file_name": str(toy / "labels" / "img1.png"),
        "object_map_file_name": str(toy / "objects" / "img1.png"),
        "height": 24,
        "width": 16,
        "image_id": "img1",
        "dataset_name": name,
    }


def test_unseen_names_and_indices_are_equivalent(split_dir, names):
    by_name = register_zero_shot_split(names(), **_kwargs(split_dir, unseen=["tree", "dog"]))
    by_index = register_zero_shot_split(names(), **_kwargs(split_dir, unseen=[3, 1]))
    assert _meta(by_name) == _meta(by_index)
    assert _meta(by_name)["unseen_classes"] == [1, 3]
    assert _meta(by_name)["seen_classes"] == [0, 2]


def test_split_file_and_function_give_identical_metadata(split_dir, names, monkeypatch):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(split_dir))
    base = names()
    split_file = split_dir / "toy.yaml"
    split_file.write_text(
        yaml.safe_dump(
            {
                "dataset": base,
                "classes": CLASSES,
                "unseen": ["dog", "car"],
                "class_embeddings": "toy/emb.npz",
                "splits": {
                    "train": {"image_root": "toy/images", "label_root": "toy/labels"},
                    "val": {
                        "image_root": "toy/images",
                        "label_root": "toy/labels",
                        "image_ext": ".png",
                        "extra_label_roots": {"object_map": "toy/objects"},
                    },
                },
            }
        )
    )
    from_file = register_split_file(split_file)
    assert from_file == [f"{base}_train", f"{base}_val"]
    # The same contents through the function, with relative paths (resolved the same way).
    direct = register_zero_shot_split(
        names(),
        image_root="toy/images",
        label_root="toy/labels",
        classes=CLASSES,
        unseen=[1, 2],
        class_embeddings="toy/emb.npz",
        split_file=split_file,
    )
    assert _meta(direct) == _meta(from_file[0])
    assert _meta(direct)["split_file"] == str(split_file)
    for a, b in zip(DatasetCatalog.get(direct), DatasetCatalog.get(from_file[0])):
        assert {**a, "dataset_name": None} == {**b, "dataset_name": None}
    assert "object_map_file_name" in DatasetCatalog.get(from_file[1])[0]
    # Registering the file again is a no-op.
    assert register_split_file(split_file) == from_file


def test_relative_roots_resolve_against_detectron2_datasets(split_dir, names, monkeypatch):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(split_dir / "toy"))
    name = register_zero_shot_split(
        names(), image_root="images", label_root="labels", classes=CLASSES, unseen=[]
    )
    meta = _meta(name)
    assert meta["image_root"] == str(split_dir / "toy" / "images")
    assert meta["unseen_classes"] == [] and meta["seen_classes"] == [0, 1, 2, 3]
    assert meta["class_embeddings"] is None


def test_idempotent_registration(split_dir, names):
    name = names()
    assert register_zero_shot_split(name, **_kwargs(split_dir)) == name
    # Same contents (unseen by index instead of name): a no-op.
    assert register_zero_shot_split(name, **_kwargs(split_dir, unseen=[1])) == name
    with pytest.raises(ValueError, match="already registered with different arguments") as e:
        register_zero_shot_split(name, **_kwargs(split_dir, unseen=["car"]))
    assert "unseen" in str(e.value) and "unregister_zero_shot_split" in str(e.value)
    assert _meta(name)["unseen_classes"] == [1]
    unregister_zero_shot_split(name)
    assert name not in DatasetCatalog.list()
    register_zero_shot_split(name, **_kwargs(split_dir, unseen=["car"]))
    assert _meta(name)["unseen_classes"] == [2]


def test_name_taken_by_other_code(split_dir):
    DatasetCatalog.register("ocz_test_reg_foreign", list)
    try:
        with pytest.raises(ValueError, match="already registered in DatasetCatalog by other"):
            register_zero_shot_split("ocz_test_reg_foreign", **_kwargs(split_dir))
    finally:
        DatasetCatalog.remove("ocz_test_reg_foreign")


@pytest.mark.parametrize(
    "over, messages",
    [
        ({"unseen": ["dgo"]}, ["'dgo' is not one of the 4 class names", "Did you mean ['dog']"]),
        ({"unseen": [4]}, ["unseen index 4 is out of range", "valid indices are 0..3"]),
        ({"unseen": [-1]}, ["unseen index -1 is out of range"]),
        ({"unseen": ["dog", 1]}, ["more than once", "'dog'"]),
        ({"unseen": "dog"}, ["must be a list of class names or indices"]),
        ({"classes": ["cat", "dog", "cat"]}, ["duplicate class names", "'cat' at indices 0 and 2"]),
        ({"classes": []}, ["non-empty list of class names"]),
    ],
)  # fmt: skip
def test_bad_class_arguments(split_dir, names, over, messages):
    with pytest.raises(ValueError) as e:
        register_zero_shot_split(names(), **_kwargs(split_dir, **over))
    for message in messages:
        assert message in str(e.value)


def test_missing_roots(split_dir, names):
    missing = split_dir / "nowhere" / "images"
    with pytest.raises(FileNotFoundError) as e:
        register_zero_shot_split(names(), **_kwargs(split_dir, image_root=missing))
    for message in (str(missing), "does not exist", "DETECTRON2_DATASETS", "prepare_synthetic"):
        assert message in str(e.value)
    with pytest.raises(FileNotFoundError, match="label folder .*nowhere"):
        register_zero_shot_split(names(), **_kwargs(split_dir, label_root=missing))


def test_images_without_labels_and_labels_without_images(split_dir, names):
    toy = split_dir / "toy"
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(toy / "images" / "lonely.png")
    with pytest.raises(ValueError) as e:
        register_zero_shot_split(names(), **_kwargs(split_dir))
    assert "1 of 4 images" in str(e.value) and "have no label" in str(e.value)
    assert "lonely.png" in str(e.value)
    (toy / "images" / "lonely.png").rename(toy / "labels" / "stray.png")
    with pytest.raises(ValueError) as e:
        register_zero_shot_split(names(), **_kwargs(split_dir))
    assert "have no image" in str(e.value) and "stray.png" in str(e.value)
    # An extra label map must cover every image too.
    (toy / "labels" / "stray.png").unlink()
    (toy / "objects" / "img2.png").unlink()
    with pytest.raises(ValueError, match="have no label in .*objects"):
        register_zero_shot_split(
            names(), extra_label_roots={"object_map": toy / "objects"}, **_kwargs(split_dir)
        )


def test_image_extension_detection(split_dir, names, tmp_path):
    _write_split(tmp_path / "jpg", image_ext=".jpg")
    kw = dict(classes=CLASSES, unseen=[0], label_root=tmp_path / "jpg" / "labels")
    name = register_zero_shot_split(names(), image_root=tmp_path / "jpg" / "images", **kw)
    assert DatasetCatalog.get(name)[0]["file_name"].endswith("img0.jpg")
    no_png = r"no image with extension \['.png'\].*found there: \['.jpg'\]"
    with pytest.raises(ValueError, match=no_png):
        register_zero_shot_split(
            names(), image_root=tmp_path / "jpg" / "images", image_ext="png", **kw
        )
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "jpg" / "images" / "img0.png")
    with pytest.raises(ValueError, match="share a name with different extensions"):
        register_zero_shot_split(names(), image_root=tmp_path / "jpg" / "images", **kw)


def test_class_embedding_errors(split_dir, names):
    emb = split_dir / "toy" / "missing.npz"
    with pytest.raises(FileNotFoundError, match="missing.npz does not exist"):
        register_zero_shot_split(names(), **_kwargs(split_dir, class_embeddings=emb))
    _write_embeddings(emb, ["cat", "dog", "bus", "tree"])
    with pytest.raises(ValueError) as e:
        register_zero_shot_split(names(), **_kwargs(split_dir, class_embeddings=emb))
    assert "do not equal the split's 4 classes" in str(e.value)
    assert "missing from the file: ['car']; only in the file: ['bus']" in str(e.value)
    _write_embeddings(emb, ["dog", "cat", "car", "tree"])
    with pytest.raises(ValueError, match="different order .*index 0: file 'dog', split 'cat'"):
        register_zero_shot_split(names(), **_kwargs(split_dir, class_embeddings=emb))
    np.savez(emb, classes=np.array(CLASSES))
    with pytest.raises(ValueError, match=r"lacks the key\(s\) \['embeddings'\]"):
        register_zero_shot_split(names(), **_kwargs(split_dir, class_embeddings=emb))


def test_lazy_registration_defers_checks(tmp_path, names):
    name = register_zero_shot_split(
        names(),
        image_root=tmp_path / "later" / "images",
        label_root=tmp_path / "later" / "labels",
        classes=CLASSES,
        unseen=["tree"],
        class_embeddings=tmp_path / "later" / "emb.npz",
        lazy=True,
    )
    assert _meta(name)["unseen_classes"] == [3]
    with pytest.raises(FileNotFoundError, match="image folder .*later"):
        DatasetCatalog.get(name)
    _write_split(tmp_path / "later")
    with pytest.raises(FileNotFoundError, match="emb.npz does not exist"):
        DatasetCatalog.get(name)
    _write_embeddings(tmp_path / "later" / "emb.npz", CLASSES)
    assert len(DatasetCatalog.get(name)) == 3
    # Class arguments are still checked at once.
    with pytest.raises(ValueError, match="out of range"):
        register_zero_shot_split(names(), **_kwargs(tmp_path, unseen=[9], lazy=True))


def _write_yaml(path: Path, data) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def test_split_file_errors(split_dir, names):
    good = {
        "dataset": names(),
        "classes": CLASSES,
        "unseen": [1],
        "splits": {"train": {"image_root": "toy/images", "label_root": "toy/labels"}},
    }
    path = split_dir / "bad.yaml"
    with pytest.raises(ValueError) as e:
        load_split_file(_write_yaml(path, {**good, "unseen_classes": [1]}))
    assert "unknown key(s) ['unseen_classes']" in str(e.value)
    assert "allowed keys are ['class_embeddings', 'classes', 'dataset', 'splits', 'unseen']" in str(
        e.value
    )
    bad_split = {**good, "splits": {"train": {"image_root": "a", "label_root": "b", "img": 1}}}
    with pytest.raises(ValueError, match=r"split 'train': unknown key\(s\) \['img'\]"):
        load_split_file(_write_yaml(path, bad_split))
    without = {k: v for k, v in good.items() if k != "unseen"}
    with pytest.raises(ValueError, match=r"missing required key\(s\) \['unseen'\]"):
        load_split_file(_write_yaml(path, without))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_split_file(split_dir / "absent.yaml")
    path.write_text("dataset: [unclosed")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_split_file(path)
    # Class errors surface through the file too.
    with pytest.raises(ValueError, match="'dgo' is not one of"):
        register_split_file(_write_yaml(path, {**good, "unseen": ["dgo"]}), root=split_dir)


def test_split_file_overrides(split_dir, names):
    """unseen=[] and splits=[...] register a fully supervised copy of some splits."""
    base = names()
    path = _write_yaml(
        split_dir / "two.yaml",
        {
            "dataset": names(),
            "classes": CLASSES,
            "unseen": ["dog"],
            "splits": {
                "train": {"image_root": "toy/images", "label_root": "toy/labels"},
                "val": {"image_root": "toy/images", "label_root": "toy/labels"},
            },
        },
    )
    got = register_split_file(path, root=split_dir, dataset=base, unseen=[], splits=["val"])
    assert got == [f"{base}_val"] and not is_zero_shot_split(f"{base}_train")
    assert _meta(f"{base}_val")["unseen_classes"] == []
    with pytest.raises(ValueError, match=r"has no splits \['test'\]"):
        register_split_file(path, root=split_dir, dataset=names(), splits=["test"])


def test_split_files_from_config(split_dir, names, monkeypatch):
    base = names()
    path = _write_yaml(
        split_dir / "cfg.yaml",
        {
            "dataset": base,
            "classes": CLASSES,
            "unseen": [],
            "splits": {"val": {"image_root": "toy/images", "label_root": "toy/labels"}},
        },
    )
    cfg = get_cfg()
    add_ocz_config(cfg)
    cfg.DATASETS.SPLIT_FILES = [str(path)]
    monkeypatch.setenv("DETECTRON2_DATASETS", str(split_dir / "empty"))
    with pytest.raises(FileNotFoundError, match="empty/toy/images does not exist"):
        register_split_files_from_config(cfg)
    monkeypatch.setenv("DETECTRON2_DATASETS", str(split_dir))
    assert register_split_files_from_config(cfg) == [f"{base}_val"]
    assert len(DatasetCatalog.get(f"{base}_val")) == 3


def test_builtin_synthetic_splits_match_the_generator(tmp_path, names):
    for prefix, path in (
        ("ocz_synthetic", SYNTHETIC_SPLIT_FILE),
        ("ocz_synthetic_attr", SYNTHETIC_ATTR_SPLIT_FILE),
    ):
        for split in ("train", "val", "test"):
            meta = _meta(f"{prefix}_{split}")
            assert meta["split_file"] == str(path)
            assert meta["unseen_classes"] == [1, 7, 8, 14]
            assert meta["image_root"].endswith(f"ocz_synthetic/images/{split}")
    for split in ("train", "val", "test"):  # the fully supervised copy: same data, no unseen
        supervised, zero_shot = (
            _meta(f"ocz_synthetic_supervised_{split}"),
            _meta(f"ocz_synthetic_{split}"),
        )
        assert supervised["unseen_classes"] == [] and supervised["seen_classes"] == list(range(16))
        assert supervised["stuff_classes"] == zero_shot["stuff_classes"]
        assert supervised["image_root"] == zero_shot["image_root"]
    assert _meta("ocz_synthetic_test")["class_embeddings"] is None  # names through CLIP
    assert _meta("ocz_synthetic_attr_test")["class_embeddings"].endswith("class_embeddings.npz")
    package = yaml.safe_load(SYNTHETIC_SPLIT_FILE.read_text())
    assert package == synthetic_split_config()
    package_attr = yaml.safe_load(SYNTHETIC_ATTR_SPLIT_FILE.read_text())
    assert package_attr == synthetic_split_config("synthetic_attr", with_embeddings=True)
    # What the generator writes for a folder named ocz_synthetic is the package files, and the
    # package files register that folder.
    info = generate_synthetic_benchmark(
        tmp_path / "ocz_synthetic", num_train=2, num_val=1, num_test=1, num_pretrain=1,
        num_zeroshot_per_class=1, image_size=32,
    )  # fmt: skip
    assert yaml.safe_load(info.split_file.read_text()) == package
    assert yaml.safe_load(info.split_file_embeddings.read_text()) == package_attr
    base = names()
    registered = register_split_file(SYNTHETIC_ATTR_SPLIT_FILE, root=tmp_path, dataset=base)
    assert [len(DatasetCatalog.get(n)) for n in registered] == [2, 1, 1]
    assert _meta(registered[0]) == {
        **_meta("ocz_synthetic_attr_train"),
        "image_root": str(tmp_path / "ocz_synthetic" / "images" / "train"),
        "sem_seg_root": str(tmp_path / "ocz_synthetic" / "labels" / "train"),
        "class_embeddings": str(tmp_path / "ocz_synthetic" / "class_embeddings.npz"),
    }
