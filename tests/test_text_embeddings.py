"""TextEmbedder: CLIP text tower with templates (tiny random CLIP) and .npz files."""

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from detectron2.config import get_cfg
from detectron2.data import MetadataCatalog

from ocz_d2.config import add_ocz_config
from ocz_d2.modeling.backbone import register_tiny_clip_configs
from ocz_d2.modeling.text import TEMPLATE_SETS, TextEmbedder, clean_class_name, get_templates

TINY = "OCZ-Tiny-ViT"
EMBED_DIM = 64
NAMES = ["cat", "dog", "traffic_light", "wall-other-merged", "potted plant"]


@pytest.fixture(scope="module")
def clip_model():
    register_tiny_clip_configs()
    torch.manual_seed(0)
    return open_clip.create_model(TINY, pretrained=None).eval()


def write_npz(path, classes, embeddings):
    np.savez(path, classes=np.array(classes), embeddings=np.asarray(embeddings, dtype=np.float32))
    return str(path)


def random_unit_rows(k, d, seed=0):
    rows = torch.randn(k, d, generator=torch.Generator().manual_seed(seed))
    return F.normalize(rows, dim=-1)


def test_single_template_matches_manual_encoding(clip_model):
    embedder = TextEmbedder(clip_model=clip_model, model_name=TINY, templates="single")
    out = embedder.get(NAMES)
    assert out.shape == (len(NAMES), EMBED_DIM) and embedder.dim == EMBED_DIM
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(len(NAMES)))

    tokenizer = open_clip.get_tokenizer(TINY)
    prompts = [f"a photo of a {clean_class_name(n)}." for n in NAMES]
    assert prompts[2] == "a photo of a traffic light." and prompts[3] == "a photo of a wall."
    with torch.no_grad():
        ref = clip_model.encode_text(tokenizer(prompts), normalize=True)
    torch.testing.assert_close(out, ref)


def test_template_ensemble_average(clip_model):
    embedder = TextEmbedder(clip_model=clip_model, model_name=TINY, templates="imagenet")
    out = embedder.get(["cat", "dog"])
    templates = TEMPLATE_SETS["imagenet"]
    assert 10 <= len(templates) <= 20
    tokenizer = open_clip.get_tokenizer(TINY)
    with torch.no_grad():
        per = clip_model.encode_text(tokenizer([t.format("cat") for t in templates]), True)
    torch.testing.assert_close(out[0], F.normalize(per.mean(0), dim=0))
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(2))


def test_chunking_gives_same_result(clip_model):
    names = [f"class_{i}" for i in range(7)]
    one_chunk = TextEmbedder(
        clip_model=clip_model, model_name=TINY, templates="imagenet", chunk_size=10_000
    ).get(names)
    chunked = TextEmbedder(
        clip_model=clip_model, model_name=TINY, templates="imagenet", chunk_size=5
    ).get(names)
    torch.testing.assert_close(chunked, one_chunk, rtol=1e-5, atol=1e-6)


def test_cache_hit_and_device_moves(clip_model):
    embedder = TextEmbedder(clip_model=clip_model, model_name=TINY)
    first = embedder.get(NAMES)
    assert embedder.get(list(NAMES)) is first
    assert embedder.get(NAMES[:2]) is not first
    assert list(embedder.state_dict()) == []  # neither the cache nor the CLIP weights
    assert list(embedder.parameters()) == []

    embedder.to(torch.float64)  # the cache follows module conversions like a buffer
    moved = embedder.get(NAMES)
    assert moved.dtype == torch.float64
    torch.testing.assert_close(moved, first.double())
    embedder.clear_cache()
    assert embedder.get(NAMES) is not moved


def test_file_rows_reordered_to_dataset_order(tmp_path):
    file_classes = ["dog", "cat", "bird"]
    table = random_unit_rows(3, 8)
    path = write_npz(tmp_path / "emb.npz", file_classes, table)
    embedder = TextEmbedder()
    out = embedder.get(["cat", "bird", "dog"], embeddings_file=path)
    torch.testing.assert_close(out, table[[1, 2, 0]])

    # Through the dataset's metadata.
    name = "ocz_test_text_embeddings_split"
    MetadataCatalog.get(name).set(class_embeddings=path)
    try:
        via_meta = embedder.get(["bird", "cat", "dog"], dataset_name=name)
    finally:
        MetadataCatalog.remove(name)
    torch.testing.assert_close(via_meta, table[[2, 1, 0]])


def test_file_rows_renormalised(tmp_path):
    path = write_npz(tmp_path / "emb.npz", ["a", "b"], [[3.0, 4.0], [0.0, 2.0]])
    out = TextEmbedder().get(["a", "b"], embeddings_file=path)
    torch.testing.assert_close(out, torch.tensor([[0.6, 0.8], [0.0, 1.0]]))


def test_dataset_file_mismatch_names_classes(tmp_path):
    path = write_npz(tmp_path / "emb.npz", ["cat", "dog", "zebra"], random_unit_rows(3, 8))
    with pytest.raises(ValueError) as info:
        TextEmbedder().get(["cat", "dog", "horse"], dataset_name="my_split", embeddings_file=path)
    message = str(info.value)
    assert "'horse'" in message and "'zebra'" in message and "my_split" in message
    assert "class_embeddings" in message and "MODEL.OCZ.TEXT.EMBEDDINGS_FILE" in message
    # A dataset file with extra classes is also a mismatch.
    with pytest.raises(ValueError, match="'zebra'"):
        TextEmbedder().get(["cat", "dog"], embeddings_file=path)


def test_global_file_may_cover_several_datasets(tmp_path):
    table = random_unit_rows(4, 16)
    path = write_npz(tmp_path / "all.npz", ["a", "b", "c", "d"], table)
    embedder = TextEmbedder(embeddings_file=path)
    assert embedder.dim == 16
    torch.testing.assert_close(embedder.get(["d", "b"]), table[[3, 1]])
    with pytest.raises(ValueError, match=r"missing from the file: \['e'\]") as info:
        embedder.get(["a", "e"])
    assert "MODEL.OCZ.TEXT.EMBEDDINGS_FILE" in str(info.value)


def test_dimension_checks(tmp_path, clip_model):
    path = write_npz(tmp_path / "small.npz", ["cat"], random_unit_rows(1, 8))
    embedder = TextEmbedder(clip_model=clip_model, model_name=TINY)
    with pytest.raises(ValueError, match="D=8, the model expects D=64"):
        embedder.get(["cat"], embeddings_file=path)
    with pytest.raises(ValueError, match="disagree"):
        TextEmbedder(clip_model=clip_model, model_name=TINY, embeddings_file=path)
    with pytest.raises(ValueError, match="disagree"):
        TextEmbedder(clip_model=clip_model, model_name=TINY, dim=32)


def test_missing_sources_and_files(tmp_path):
    with pytest.raises(RuntimeError, match="No class embeddings"):
        TextEmbedder().get(["cat"], dataset_name="unknown_split")
    with pytest.raises(FileNotFoundError, match="MODEL.OCZ.TEXT.EMBEDDINGS_FILE"):
        TextEmbedder(embeddings_file=str(tmp_path / "absent.npz"))
    with pytest.raises(FileNotFoundError, match="class_embeddings"):
        TextEmbedder().get(["cat"], embeddings_file=str(tmp_path / "absent.npz"))


def test_from_config(clip_model):
    cfg = get_cfg()
    add_ocz_config(cfg)
    cfg.MODEL.OCZ.CLIP.MODEL_NAME = TINY
    cfg.MODEL.OCZ.TEXT.TEMPLATES = "imagenet"
    cfg.MODEL.OCZ.TEXT.CHUNK_SIZE = 3
    embedder = TextEmbedder(cfg, clip_model=clip_model)
    assert embedder.chunk_size == 3 and embedder.templates == TEMPLATE_SETS["imagenet"]
    assert embedder.dim == EMBED_DIM and embedder.clip_model is clip_model


def test_templates_and_name_cleaning():
    assert get_templates("single") == ("a photo of a {}.",)
    assert get_templates(["{} here", "a {}"]) == ("{} here", "a {}")
    with pytest.raises(ValueError, match="TEMPLATES"):
        get_templates("fancy")
    with pytest.raises(ValueError, match="exactly one"):
        get_templates(["no slot"])
    assert clean_class_name("traffic_light") == "traffic light"
    assert clean_class_name("wall-other-merged") == "wall"
    assert clean_class_name("t-shirt") == "t-shirt"
    assert clean_class_name(" potted  plant ") == "potted plant"
