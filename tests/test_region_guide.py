"""The region guide (:class:`RegionGuide`), injected into the meta-architecture: built from the
config, nothing in the checkpoint (the SSL model is built on first use and kept out of the module
tree), object maps or online clustering, and its errors."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from detectron2.modeling import build_model

from ocz_d2.config import load_config
from ocz_d2.modeling.backbone.ssl_guide import SSLGuide
from ocz_d2.modeling.clustering import NO_REGION
from ocz_d2.modeling.region_guide import GUIDE_SOURCES, RegionGuide

REPO = Path(__file__).resolve().parents[1]
OCZSS = REPO / "configs" / "synthetic" / "ocz_tiny_oczss.yaml"
NO_DATA = ["DATASETS.TRAIN", "()", "DATASETS.TEST", "()", "DATASETS.VAL", "()"]
SSL = [
    "MODEL.OCZ.GUIDE.SOURCE", "ssl", "MODEL.OCZ.GUIDE.SSL_MODEL", "vit_tiny_patch16_224",
    "MODEL.OCZ.GUIDE.PRETRAINED", "False", "MODEL.OCZ.CLIP.WEIGHTS", "",
    "MODEL.OCZ.DECODER.DEC_LAYERS", "1",
]  # fmt: skip


def test_guide_from_config():
    cfg = load_config(OCZSS, NO_DATA)
    guide = RegionGuide(cfg)
    assert (guide.source, guide.num_regions) == ("clip", cfg.MODEL.OCZ.OBJECTS.NUM)
    assert (guide.seeding, guide.kmeans_iters, guide.seed) == ("farthest", 3, 0)
    assert guide.ssl_kwargs["model_name"] == cfg.MODEL.OCZ.GUIDE.SSL_MODEL
    assert not list(guide.parameters()) and not list(guide.buffers())
    assert GUIDE_SOURCES == ("ssl", "clip", "oracle")
    cfg.MODEL.OCZ.GUIDE.SOURCE = "dino"
    with pytest.raises(ValueError, match=r"GUIDE.SOURCE='dino': use one of"):
        RegionGuide(cfg)
    with pytest.raises(ValueError, match=r"GUIDE.SOURCE='dino': use \("):
        RegionGuide(num_regions=3, source="dino")


def test_guide_is_injected_and_adds_no_checkpoint_keys():
    """The model's guide is a RegionGuide submodule without state; the SSL model it builds on
    first use stays out of the state dict (checkpoints keep their keys)."""
    cfg = load_config(OCZSS, NO_DATA + SSL)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    assert isinstance(model.guide, RegionGuide) and model.guide.source == "ssl"
    keys = list(model.state_dict())
    assert not any(k.startswith("guide.") for k in keys)
    assert not model.guide._ssl_model
    image = torch.randint(0, 255, (3, 48, 64), dtype=torch.uint8)
    regions = model.online_regions([image])
    assert regions.shape == (1, 4, 4)  # padded to 64x64 (size divisibility 32)
    assert (regions[0, 3] == NO_REGION).all() and (regions[0, :3] >= 0).all()
    assert isinstance(model.guide.ssl_model(), SSLGuide)
    assert list(model.state_dict()) == keys
    assert not any(isinstance(m, SSLGuide) for m in model.modules())
    # Without object prompts there is no guide.
    cfg = load_config(OCZSS, NO_DATA + SSL + ["MODEL.OCZ.OBJECTS.PROMPTS", "False"])
    cfg.MODEL.OCZ.ORA.OBJECT_INIT = "random"
    assert build_model(cfg).guide is None


def test_object_maps_and_their_errors():
    backbone = SimpleNamespace(patch_size=4)
    guide = RegionGuide(num_regions=3, source="oracle")
    images = torch.zeros(2, 3, 8, 8)
    mask = torch.ones(2, 8, 8, dtype=torch.bool)
    mask[1, 4:] = False  # the second image's lower half is padding
    maps = [torch.zeros(8, 8, dtype=torch.long), torch.full((4, 8), 2)]
    regions = guide(backbone, images, [None, None], maps, 255, mask)
    assert regions.tolist() == [[[0, 0], [0, 0]], [[2, 2], [NO_REGION, NO_REGION]]]
    with pytest.raises(ValueError, match="mixes images with and without object maps"):
        guide(backbone, images, [None, None], [maps[0], None], 255, mask)
    with pytest.raises(ValueError, match="'oracle' but the images have no object map"):
        guide(backbone, images, [None, None], [None, None], 255, mask)
