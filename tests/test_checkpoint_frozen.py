"""Checkpoints leave out the frozen CLIP weights that the model rebuilds from their source, record
what they expect, check that record on load, and older full checkpoints still load."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from detectron2.modeling import build_model

from ocz_d2.config import load_config
from ocz_d2.engine import AtomicCheckpointer
from ocz_d2.engine.checkpoint import FROZEN_RECORD_KEY

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "synthetic" / "ocz_tiny_attr.yaml"


@pytest.fixture(scope="module")
def clip_files(tmp_path_factory):
    """Two local CLIP weight files of the tiny architecture (seeds 0 and 1)."""
    from ocz_d2.modeling.backbone.clip_prompt import create_clip_model

    folder = tmp_path_factory.mktemp("clip_weights")
    files = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        path = folder / f"tiny_clip_{seed}.pt"
        torch.save(create_clip_model("OCZ-Tiny-ViT").state_dict(), path)
        files.append(str(path))
    return files


def _model(data, clip_weights: str, seed: int):
    # The trainable parts' initial weights follow SEED (each part has its own random stream).
    opts = data.predictor_overrides(**{"MODEL.OCZ.CLIP.WEIGHTS": clip_weights, "SEED": seed})
    return build_model(load_config(CONFIG, opts)).eval()


def _equal_states(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_checkpoint_leaves_out_frozen_clip_and_restores_the_model(
    synthetic_benchmark, clip_files, tmp_path
):
    data = synthetic_benchmark
    trained = _model(data, clip_files[0], seed=0)
    AtomicCheckpointer(trained, save_dir=str(tmp_path / "slim")).save("model_final")
    AtomicCheckpointer(trained, save_dir=str(tmp_path / "full"), save_frozen=True).save(
        "model_final"
    )
    slim_file, full_file = tmp_path / "slim/model_final.pth", tmp_path / "full/model_final.pth"
    slim = torch.load(slim_file, map_location="cpu", weights_only=True)
    assert not [k for k in slim["model"] if k.startswith("backbone.clip_model.")]
    (record,) = slim[FROZEN_RECORD_KEY]
    assert record["module"] == "backbone" and record["prefix"] == "backbone.clip_model."
    assert record["source"]["weights"] == "tiny_clip_0.pt"
    assert record["source"]["model_name"] == "OCZ-Tiny-ViT"
    frozen = sum(p.numel() for p in trained.backbone.clip_model.parameters())
    assert record["numel"] == frozen
    trainable = sum(p.numel() for p in trained.parameters() if p.requires_grad)
    assert sum(v.numel() for v in slim["model"].values()) == trainable
    # Smaller by at least the frozen float32 bytes.
    assert os.path.getsize(full_file) - os.path.getsize(slim_file) >= 4 * frozen * 0.99

    # Another model (other random heads, same CLIP source) becomes the trained one.
    fresh = _model(data, clip_files[0], seed=1)
    assert not _equal_states(fresh, trained)
    AtomicCheckpointer(fresh).load(str(slim_file))
    assert _equal_states(fresh, trained)
    image = torch.randint(0, 255, (3, data.image_size, data.image_size), dtype=torch.uint8)
    with torch.no_grad():
        a = trained([{"image": image, "dataset_name": data.val_name}])[0]["sem_seg"]
        b = fresh([{"image": image, "dataset_name": data.val_name}])[0]["sem_seg"]
    assert torch.equal(a, b)


def test_load_checks_the_frozen_record(synthetic_benchmark, clip_files, tmp_path):
    data = synthetic_benchmark
    trained = _model(data, clip_files[0], seed=0)
    AtomicCheckpointer(trained, save_dir=str(tmp_path)).save("model_final")
    path = str(tmp_path / "model_final.pth")
    other_clip = _model(data, clip_files[1], seed=0)
    with pytest.raises(ValueError, match=r"frozen weights differ .*tiny_clip_0\.pt.*tiny_clip_1"):
        AtomicCheckpointer(other_clip).load(path)
    random_clip = _model(data, "", seed=0)  # nothing to rebuild the left-out weights from
    with pytest.raises(ValueError, match=r"no rebuildable frozen weights"):
        AtomicCheckpointer(random_clip).load(path)


def test_full_checkpoints_still_load(synthetic_benchmark, clip_files, tmp_path):
    """An older checkpoint (the whole state dict, no record) loads as before, and a model whose
    CLIP is random keeps its CLIP in the checkpoint (nothing could rebuild it)."""
    data = synthetic_benchmark
    trained = _model(data, clip_files[0], seed=0)
    torch.save({"model": trained.state_dict(), "iteration": 7}, tmp_path / "old.pth")
    fresh = _model(data, clip_files[1], seed=1)
    extra = AtomicCheckpointer(fresh).load(str(tmp_path / "old.pth"))
    assert extra["iteration"] == 7 and _equal_states(fresh, trained)

    random_clip = _model(data, "", seed=0)
    AtomicCheckpointer(random_clip, save_dir=str(tmp_path / "r")).save("model_final")
    saved = torch.load(tmp_path / "r/model_final.pth", map_location="cpu", weights_only=True)
    assert saved[FROZEN_RECORD_KEY] == []
    assert any(k.startswith("backbone.clip_model.") for k in saved["model"])
    other = _model(data, "", seed=3)
    AtomicCheckpointer(other).load(str(tmp_path / "r/model_final.pth"))
    assert _equal_states(other, random_clip)
