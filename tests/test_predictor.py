"""ZeroShotPredictor and Vocabulary: any image, any class names, on a tiny random model.

The model is conftest's ``spread_checkpoint`` (random, with heads scaled so that several classes
win somewhere: relabelling and areas are tested on multi-class segmentations). Class names come
from the benchmark's attribute embedding file (``MODEL.OCZ.TEXT.EMBEDDINGS_FILE``: orthonormal
hue and texture vectors), or from the random tiny text tower where only the embedding arithmetic
matters.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model
from PIL import Image

from ocz_d2.config import load_config
from ocz_d2.data import ZeroShotSemSegDatasetMapper
from ocz_d2.engine import ZeroShotPredictor
from ocz_d2.modeling.text import Vocabulary, embed_vocabulary
from ocz_d2.utils.errors import CheckpointError, DataError

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "synthetic" / "ocz_tiny_attr.yaml"


def close(actual, expected) -> None:
    """Equal up to float rounding, relatively (scores can be ~1e-6 where no mask is on); numpy
    arrays or tensors."""
    torch.testing.assert_close(
        torch.as_tensor(actual), torch.as_tensor(expected), rtol=1e-5, atol=1e-9
    )


def bench_image(data, index: int = 0) -> np.ndarray:
    files = sorted((Path(data.root) / "images" / "test").glob("*.png"))
    return np.asarray(Image.open(files[index]).convert("RGB"))


@pytest.fixture(scope="module")
def setup(synthetic_benchmark, spread_checkpoint):
    """(cfg, the spread model loaded from its checkpoint, the benchmark)."""
    config, opts, weights = spread_checkpoint
    cfg = load_config(config, opts)
    return cfg, ZeroShotPredictor(cfg, weights=weights).model, synthetic_benchmark


def _predictor(setup, **kwargs) -> ZeroShotPredictor:
    cfg, model, _ = setup
    return ZeroShotPredictor(cfg, model=copy.deepcopy(model), **kwargs)


# ---------------------------------------------------------------------- vocabulary
def test_vocabulary_parsing_and_errors(tmp_path):
    vocab = Vocabulary.from_text(" cat , sofa|couch ,, dog ")
    assert vocab.classes == (("cat",), ("sofa", "couch"), ("dog",))
    assert vocab.names == ("cat", "sofa", "dog")
    file = tmp_path / "vocab.txt"
    file.write_text("# my classes\ncat\n\nsofa | couch\nsign, road\n")
    assert Vocabulary.from_file(file).classes == (("cat",), ("sofa", "couch"), ("sign, road",))
    with pytest.raises(ValueError, match="empty"):
        Vocabulary.from_text(" , ")
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    with pytest.raises(ValueError, match="holds no class name"):
        Vocabulary.from_file(tmp_path / "empty.txt")
    with pytest.raises(ValueError, match="'Cat' is given in classes 1 and 3"):
        Vocabulary.from_text("cat, dog, Cat")
    with pytest.raises(ValueError, match="'couch' is given in classes 1 and 2"):
        Vocabulary.from_text("sofa|couch, couch")
    with pytest.raises(ValueError, match="twice in class 1"):
        Vocabulary.from_text("sofa|sofa")
    with pytest.raises(ValueError, match="empty name or synonym"):
        Vocabulary.from_text("sofa|, cat")


def test_synonyms_are_averaged(setup, synthetic_benchmark):
    """A class "a|b" is the renormalised mean of a's and b's embeddings, through the file and
    through the text tower."""
    a, b, c = synthetic_benchmark.classes[:3]
    embedder = setup[1].text_embedder
    got = embed_vocabulary(embedder, Vocabulary.parse([f"{a}|{b}", c]))
    rows = embedder.get([a, b, c], cache=False)
    assert torch.allclose(got[0], F.normalize(rows[0] + rows[1], dim=0), atol=1e-6)
    assert torch.allclose(got[1], rows[2], atol=1e-6)
    assert not torch.allclose(got[0], rows[0], atol=1e-3)  # the synonym changed the class

    opts = synthetic_benchmark.predictor_overrides(**{"MODEL.OCZ.TEXT.EMBEDDINGS_FILE": ""})
    cfg = load_config(CONFIG, opts)
    torch.manual_seed(0)
    tower = build_model(cfg).text_embedder
    got = embed_vocabulary(tower, Vocabulary.from_text("sofa|couch|settee, cat"))
    single = [tower.get([n], cache=False)[0] for n in ("sofa", "couch", "settee", "cat")]
    mean = F.normalize(sum(single[:3]) / 3, dim=0)
    assert torch.allclose(got[0], mean, atol=1e-5)
    assert torch.allclose(got[1], single[3], atol=1e-5)
    assert torch.allclose(got.norm(dim=1), torch.ones(2), atol=1e-5)


# ---------------------------------------------------------------------- predictions
def test_result_fields_agree(setup):
    predictor = _predictor(setup)
    data = setup[2]
    image = bench_image(data)
    names = list(data.classes)
    result = predictor(image, names)
    assert result.labels.shape == image.shape[:2] and result.labels.dtype == np.int64
    # One kind of array: every field is a numpy array (scores too, float32).
    for field in ("labels", "scores", "areas", "class_scores", "calibrated"):
        assert isinstance(getattr(result, field), np.ndarray), field
    assert result.scores.dtype == np.float32
    assert result.scores.shape == (len(names), *image.shape[:2])
    assert np.array_equal(result.labels, result.scores.argmax(0))
    assert np.array_equal(result.areas, np.bincount(result.labels.ravel(), minlength=len(names)))
    assert len(result.present) >= 3, "the spread model should use several classes"
    for k in range(len(names)):
        if result.areas[k]:
            mean = result.scores[k][result.labels == k].mean()
            assert result.class_scores[k] == pytest.approx(mean, rel=1e-5)
        else:
            assert np.isnan(result.class_scores[k])
    # A path and a PIL image give the same as the array.
    path = sorted((Path(data.root) / "images" / "test").glob("*.png"))[0]
    assert np.array_equal(predictor(path, names).labels, result.labels)
    assert np.array_equal(predictor(Image.fromarray(image), names).labels, result.labels)


def test_vocabulary_order_is_only_a_relabelling(setup):
    predictor = _predictor(setup)
    data = setup[2]
    image = bench_image(data, 1)
    names = list(data.classes)
    perm = np.random.default_rng(0).permutation(len(names))
    base = predictor(image, names)
    shuffled = predictor(image, [names[i] for i in perm])
    assert len(base.present) >= 3
    # shuffled class j is base class perm[j]; scores are tiny where every mask is off, so
    # they are compared relatively
    close(shuffled.scores, base.scores[perm])
    top2 = np.sort(base.scores, axis=0)[::-1][:2]
    clear = (top2[0] - top2[1]) > 1e-3 * top2[0]  # pixels not decided by rounding
    assert clear.mean() > 0.99
    assert np.array_equal(perm[shuffled.labels][clear], base.labels[clear])


def test_slide_equals_whole_when_one_window_fits(setup):
    data = setup[2]
    image = bench_image(data, 2)  # image_size x image_size, within the 128 x 128 window
    names = list(data.classes)
    whole = _predictor(setup, mode="whole")(image, names)
    slide = _predictor(setup, mode="slide")(image, names)
    assert slide.scores.shape == whole.scores.shape
    close(slide.scores, whole.scores)
    assert np.array_equal(slide.labels, whole.labels)


def test_slide_covers_large_images(setup):
    """An image larger than the window: several windows, outputs at the input's size."""
    cfg, model, data = setup
    cfg = cfg.clone()
    cfg.merge_from_list(["MODEL.OCZ.TEST.WINDOW_SIZE", "(32, 32)"])
    cfg.merge_from_list(["MODEL.OCZ.TEST.WINDOW_STRIDE", "(24, 24)"])
    predictor = ZeroShotPredictor(cfg, model=copy.deepcopy(model), mode="slide")
    calls = []  # windows per decoder forward
    predictor.model.transformer_decoder.register_forward_hook(
        lambda module, args, out: calls.append(out["pred_logits"].shape[0])
    )
    image = np.asarray(Image.fromarray(bench_image(data)).resize((96, 80)))
    result = predictor(image, list(data.classes[:4]))
    assert result.labels.shape == (80, 96)
    # resized to shortest side 64 -> 64 x 77: windows at y in {0, 24, 32}, x in {0, 24, 45},
    # all nine in one forward (MODEL.OCZ.TEST.SLIDE_BATCH 0)
    assert calls == [9]
    assert set(np.unique(result.labels)) <= {0, 1, 2, 3}


def _decoder_batches(predictor: ZeroShotPredictor) -> list[int]:
    """A list that records the batch size of every decoder forward of ``predictor``'s model."""
    calls: list[int] = []
    predictor.model.transformer_decoder.register_forward_hook(
        lambda module, args, out: calls.append(out["pred_logits"].shape[0])
    )
    return calls


def _assert_same_result(batched, alone, exact: bool) -> None:
    """Element by element: with a float64 model (``exact``) every field is identical; in float32
    a batched matrix product rounds differently, so scores agree to 1e-4 of their largest value
    and labels wherever that cannot decide a pixel."""
    assert batched.labels.shape == alone.labels.shape
    if exact:
        assert np.array_equal(batched.scores, alone.scores)
        assert np.array_equal(batched.labels, alone.labels)
        assert np.array_equal(batched.areas, alone.areas)
        assert np.array_equal(batched.class_scores, alone.class_scores, equal_nan=True)
        return
    scale = np.abs(alone.scores).max()
    np.testing.assert_allclose(batched.scores, alone.scores, rtol=0, atol=1e-4 * scale)
    top2 = np.sort(alone.scores, axis=0)[::-1][:2]
    clear = (top2[0] - top2[1]) > 2e-4 * scale  # no score moved by 1e-4 can flip these
    assert clear.mean() > 0.9
    assert np.array_equal(batched.labels[clear], alone.labels[clear])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("mode", ["whole", "slide"])
def test_batched_forward_equals_one_image_at_a_time(setup, mode, dtype):
    """Five images, four of one size: one forward for the four (in slide mode: for all their
    windows), one for the fifth; each result equals the image's prediction alone (identical in
    float64, where no rounding differs between a batched and a single product)."""
    cfg, model, data = setup
    cfg = cfg.clone()
    # 64 px images: windows of 48 at stride 32 -> 4 windows per image.
    cfg.merge_from_list(["MODEL.OCZ.TEST.WINDOW_SIZE", "(48, 48)"])
    cfg.merge_from_list(["MODEL.OCZ.TEST.WINDOW_STRIDE", "(32, 32)"])
    names = list(data.classes)
    images = [bench_image(data, i) for i in range(4)] + [bench_image(data, 1)[:40, :56]]
    model = copy.deepcopy(model).to(dtype)
    batched = ZeroShotPredictor(cfg, model=copy.deepcopy(model), mode=mode, batch_size=5)
    calls = _decoder_batches(batched)
    results = batched.predict(images, names)
    # the fifth is resized to 64 x 90: windows at x in {0, 32, 42}, y = 0, 16
    assert calls == ([4, 1] if mode == "whole" else [16, 6])
    single = ZeroShotPredictor(cfg, model=copy.deepcopy(model), mode=mode, batch_size=1)
    single_calls = _decoder_batches(single)
    for image, result in zip(images, results):
        alone = single(image, names)
        assert result.labels.shape == image.shape[:2]
        _assert_same_result(result, alone, exact=dtype == torch.float64)
    assert single_calls == ([1] * 5 if mode == "whole" else [4] * 4 + [6])
    assert len(results[0].present) >= 3  # a multi-class segmentation was compared


def test_batched_forward_with_the_online_guide(synthetic_benchmark):
    """Object prompts with the online guide (CLIP features clustered per image): an image's
    regions, hence its prediction, do not depend on the other images of its batch."""
    opts = synthetic_benchmark.predictor_overrides(
        **{
            "MODEL.OCZ.OBJECTS.NUM": 3, "MODEL.OCZ.OBJECTS.PROMPTS": True,
            "MODEL.OCZ.GUIDE.SOURCE": "clip", "MODEL.OCZ.GUIDE.SEEDING": "kmeans++",
            "MODEL.OCZ.GUIDE.KMEANS_ITERS": 2, "MODEL.OCZ.ORA.NUM_ROUNDS": 1,
            "MODEL.OCZ.ORA.OBJECT_INIT": "prompts",
        }
    )  # fmt: skip
    torch.manual_seed(0)
    predictor = ZeroShotPredictor(load_config(CONFIG, opts), allow_untrained=True, batch_size=3)
    predictor.model.double()  # identical results expected, not merely close
    names = list(synthetic_benchmark.classes)
    images = [bench_image(synthetic_benchmark, i) for i in (0, 1, 2)]
    calls = _decoder_batches(predictor)
    batched = predictor.predict(images, names)
    assert calls == [3]
    regions = predictor.model.online_regions(
        [torch.as_tensor(x.transpose(2, 0, 1).copy()) for x in images]
    )
    for i, (image, result) in enumerate(zip(images, batched)):
        alone = predictor.predict([image], names)[0]
        _assert_same_result(result, alone, exact=True)
        one = predictor.model.online_regions([torch.as_tensor(image.transpose(2, 0, 1).copy())])
        assert torch.equal(regions[i], one[0])


def test_cache_is_bounded_lru(setup):
    """Many vocabularies: at most cache_size kept, least recently used dropped first, nothing
    kept by the text embedder's own (unbounded) cache."""
    predictor = _predictor(setup, cache_size=2)
    embedder = predictor.model.text_embedder
    computed = []
    original = embedder.get

    def counting_get(names, *args, **kwargs):
        computed.append(tuple(names))
        return original(names, *args, **kwargs)

    embedder.get = counting_get
    kept = len(embedder._cache)
    image = bench_image(setup[2])[:32, :32]
    classes = setup[2].classes
    vocabularies = [list(classes[i : i + 3]) for i in range(6)]
    for vocab in vocabularies:
        predictor.embeddings(vocab)
        assert predictor.cached_vocabularies() <= 2
    assert len(computed) == 6 and len(embedder._cache) == kept
    predictor(image, vocabularies[5])  # most recent: a hit
    predictor(image, vocabularies[4])  # second most recent: a hit, now most recent
    assert len(computed) == 6
    predictor.embeddings(vocabularies[0])  # evicted long ago: recomputed, drops vocabularies[5]
    assert len(computed) == 7
    predictor.embeddings(vocabularies[4])  # still cached
    assert len(computed) == 7
    predictor.embeddings(vocabularies[5])
    assert len(computed) == 8 and predictor.cached_vocabularies() == 2
    assert len(embedder._cache) == kept
    off = _predictor(setup, cache_size=0)
    off.embeddings(vocabularies[0])
    assert off.cached_vocabularies() == 0


def test_dataset_calibration(setup):
    """With a dataset's calibration the predictor reproduces its evaluation; user classes named
    like its seen classes are lowered by gamma, the others untouched."""
    cfg, model, data = setup
    gamma = 0.3
    calibrated = _predictor(setup, calibration=data.val_name, gamma=gamma)
    plain = _predictor(setup)
    record = DatasetCatalog.get(data.val_name)[0]
    reference = copy.deepcopy(model)
    reference.calibration = gamma
    sample = ZeroShotSemSegDatasetMapper(cfg, False)(record)
    with torch.no_grad():
        expected = reference([sample])[0]["sem_seg"]
    got = calibrated(record["file_name"])  # no vocabulary: the dataset's classes
    assert got.vocabulary.names == tuple(data.classes)
    close(got.scores, expected)
    assert sorted(got.calibrated.tolist()) == sorted(data.seen_ids)

    seen = [data.classes[i] for i in data.seen_ids[:2]]
    unseen = [data.classes[i] for i in data.unseen_ids[:2]]
    names = [unseen[0], seen[0], f"{unseen[1]}|{seen[1]}"]  # any synonym being seen counts
    image = bench_image(data)
    a, b = calibrated(image, names), plain(image, names)
    assert a.calibrated.tolist() == [1, 2]
    close(a.scores[0], b.scores[0])
    close(a.scores[1:], b.scores[1:] - gamma)


def test_predictor_errors(setup, tmp_path):
    cfg, _, data = setup
    predictor = _predictor(setup)
    image = bench_image(data)
    with pytest.raises(ValueError, match="empty"):
        predictor(image, [])
    with pytest.raises(ValueError, match="given in classes 1 and 2"):
        predictor(image, [data.classes[0], data.classes[0]])
    with pytest.raises(ValueError, match="no vocabulary"):
        predictor(image)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot read image .*bad.png"):
        predictor(bad, list(data.classes))
    with pytest.raises(ValueError, match="cannot read image .*absent.png: no such file"):
        predictor(tmp_path / "absent.png", list(data.classes))
    with pytest.raises(ValueError, match="uint8"):
        predictor(image.astype(np.float32) / 255, list(data.classes))
    sample = predictor._sample(image)  # the meta-architecture's check of given embeddings
    sample.update(class_names=["a", "b"], class_embeddings=torch.zeros(3, 64))
    with pytest.raises(ValueError, match="one embedding row per class name"):
        predictor.model([sample])
    with pytest.raises(ValueError, match="MODEL.WEIGHTS is empty"):
        ZeroShotPredictor(cfg)
    with pytest.raises(FileNotFoundError, match="absent.pth"):
        ZeroShotPredictor(cfg, weights=str(tmp_path / "absent.pth"))
    with pytest.raises(ValueError, match="not a registered zero-shot split"):
        ZeroShotPredictor(cfg, model=setup[1], calibration="ocz_no_such_split")
    with pytest.raises(ValueError, match="mode"):
        ZeroShotPredictor(cfg, model=setup[1], mode="tiles")


def test_empty_image_and_unreadable_checkpoints_are_named(setup, spread_checkpoint, tmp_path):
    """A zero-byte image is called empty; a truncated, empty or garbage checkpoint gives one
    error naming the file, its size and the likely cause (not torch's traceback)."""
    cfg, _, data = setup
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match=r"cannot read image .*empty\.png: the file is empty"):
        _predictor(setup)(empty, list(data.classes))
    whole = Path(spread_checkpoint[2]).read_bytes()
    cases = {
        "truncated.pth": (whole[: len(whole) // 3], f"{len(whole) // 3:,} bytes"),
        "zero.pth": (b"", "empty \\(0 bytes\\)"),
        "garbage.pth": (b"not a checkpoint" * 64, f"{16 * 64:,} bytes"),
    }
    for name, (content, size) in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(CheckpointError) as info:
            ZeroShotPredictor(cfg, weights=str(path))
        message = str(info.value)
        assert message.startswith(f"cannot read checkpoint {path}"), message
        assert re.search(size, message) and "interrupted download or copy" in message, message


def test_weights_are_loaded(setup, spread_checkpoint):
    """Built from cfg and weights: the checkpoint's model, not a fresh random one."""
    cfg, _, data = setup
    image, names = bench_image(data), list(data.classes)
    loaded = ZeroShotPredictor(cfg, weights=spread_checkpoint[2])
    close(loaded(image, names).scores, _predictor(setup)(image, names).scores)
    torch.manual_seed(0)
    fresh = ZeroShotPredictor(cfg, allow_untrained=True)  # same seed, heads not scaled
    assert not np.allclose(fresh(image, names).scores, loaded(image, names).scores)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_matches_cpu(setup):
    data = setup[2]
    image, names = bench_image(data), list(data.classes)
    cpu = _predictor(setup)(image, names)
    gpu = ZeroShotPredictor(setup[0], model=copy.deepcopy(setup[1]).cuda(), device="cuda")
    result = gpu(image, names)
    assert isinstance(result.scores, np.ndarray)
    assert np.allclose(result.scores, cpu.scores, atol=1e-3)
