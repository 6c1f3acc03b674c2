"""OC-ZSS parts: Voronoi clustering, object prompts and their mask, ORA, granular attention,
object maps (mapper, records, the precompute tool, the oracle) and the disabled-is-baseline rule."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage
from PIL import Image

from ocz_d2 import add_ocz_config
from ocz_d2.data import ZeroShotSemSegDatasetMapper, register_split_file
from ocz_d2.data.object_maps import (
    RECORD_NAME,
    check_object_map_records,
    guide_record,
    write_record,
)
from ocz_d2.miniature.synthetic import write_oracle_object_maps
from ocz_d2.modeling.backbone import CLIPPromptBackbone
from ocz_d2.modeling.backbone.object_prompts import ObjectPrompts
from ocz_d2.modeling.backbone.ssl_guide import SSLGuide
from ocz_d2.modeling.clustering import NO_REGION, label_map_to_grid, voronoi_cluster
from ocz_d2.modeling.pixel_decoder.ora import GranularExtractor, ObjectRefinementAttention
from ocz_d2.utils.io import file_sha256
from tools import precompute_object_maps

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "synthetic" / "ocz_tiny_attr.yaml"


# ---------------------------------------------------------------------- clustering
def _blobs(seed=0, b=3, n=60, k=4, c=16):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(b, k, c, generator=g) * 4
    labels = torch.randint(0, k, (b, n), generator=g)
    labels[:, :k] = torch.arange(k)  # every cluster present
    feats = centers.gather(1, labels[..., None].expand(-1, -1, c))
    return feats + 0.05 * torch.randn(b, n, c, generator=g), labels


def _same_partition(a: torch.Tensor, b: torch.Tensor) -> bool:
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


@pytest.mark.parametrize("seeding", ["farthest", "kmeans++"])
@pytest.mark.parametrize("iters", [0, 3])
def test_voronoi_recovers_known_clusters(seeding, iters):
    feats, labels = _blobs()
    regions = voronoi_cluster(feats, 4, seeding=seeding, iters=iters, seed=0)
    assert regions.shape == labels.shape and regions.dtype == torch.int64
    for b in range(feats.shape[0]):
        assert _same_partition(regions[b], labels[b])


def test_voronoi_never_leaves_a_region_empty():
    # Identical features: every distance ties, and still each of the k regions gets a patch.
    feats = torch.ones(2, 10, 8)
    for seeding in ("farthest", "kmeans++"):
        for iters in (0, 2):
            regions = voronoi_cluster(feats, 4, seeding=seeding, iters=iters, seed=3)
            for b in range(2):
                assert set(regions[b].tolist()) == {0, 1, 2, 3}
    # Two real clusters asked for 5 regions: k-means would empty some; none may be.
    feats, _ = _blobs(k=2)
    regions = voronoi_cluster(feats, 5, iters=5, seed=0)
    for b in range(feats.shape[0]):
        assert set(regions[b].tolist()) == set(range(5))


def test_voronoi_is_deterministic_and_respects_validity():
    feats = torch.randn(2, 40, 8, generator=torch.Generator().manual_seed(1))
    a = voronoi_cluster(feats, 5, seeding="kmeans++", iters=2, seed=7)
    b = voronoi_cluster(feats, 5, seeding="kmeans++", iters=2, seed=7)
    assert torch.equal(a, b)
    others = [voronoi_cluster(feats, 5, seeding="kmeans++", iters=0, seed=s) for s in range(6)]
    assert any(not torch.equal(others[0], o) for o in others[1:])  # the seed matters
    valid = torch.ones(2, 40, dtype=torch.bool)
    valid[:, 30:] = False
    r = voronoi_cluster(feats, 5, seed=0, valid=valid)
    assert (r[:, 30:] == NO_REGION).all()
    assert all(set(r[i, :30].tolist()) == set(range(5)) for i in range(2))
    with pytest.raises(ValueError, match="valid patches"):
        voronoi_cluster(feats, 41)
    with pytest.raises(ValueError, match="SEEDING"):
        voronoi_cluster(feats, 3, seeding="random")


@pytest.mark.parametrize("seeding", ["farthest", "kmeans++"])
def test_voronoi_per_image_draws_do_not_depend_on_the_batch(seeding):
    """per_image: each image's regions are the ones it gets alone (the object guide); the shared
    generator of the pseudo-masks draws row after row, so later rows depend on earlier ones."""
    feats = torch.randn(4, 40, 8, generator=torch.Generator().manual_seed(2))
    together = voronoi_cluster(feats, 5, seeding=seeding, iters=1, seed=3, per_image=True)
    for i in range(4):
        alone = voronoi_cluster(feats[i : i + 1], 5, seeding=seeding, iters=1, seed=3)
        assert torch.equal(together[i], alone[0])
    # the same image twice in a batch: per image, the same regions; shared draws differ
    twice = feats[:1].expand(6, -1, -1)
    same = voronoi_cluster(twice, 5, seeding=seeding, iters=1, seed=3, per_image=True)
    assert (same == together[0]).all()
    shared = voronoi_cluster(twice, 5, seeding=seeding, iters=1, seed=3)
    assert any(not torch.equal(shared[0], row) for row in shared[1:])


def test_label_map_to_grid_majority_vote_and_padding():
    m = torch.full((1, 4, 6), 255)
    m[0, :2, :2] = torch.tensor([[0, 1], [1, 1]])  # patch (0, 0): region 1 wins 3 to 1
    m[0, :2, 2:4] = torch.tensor([[2, 2], [255, 255]])  # patch (0, 1): half padding -> 2
    grid = label_map_to_grid(m, 2, num_regions=3)
    assert grid.tolist() == [[[1, 2, NO_REGION], [NO_REGION, NO_REGION, NO_REGION]]]
    with pytest.raises(ValueError, match=r"outside \[0, 2\)"):
        label_map_to_grid(m, 2, num_regions=2)


# ---------------------------------------------------------------------- object prompts
def test_object_prompt_mask_entry_by_entry():
    # Grid 2x2, one visual prompt, two object prompts: sequence
    # 0 CLS | 1..4 patches p0..p3 | 5 visual prompt | 6 object 0 | 7 object 1.
    prompts = ObjectPrompts(num_layers=1, num_objects=2, width=4, patch_size=2)
    layout = {
        "cls": slice(0, 1),
        "patch": slice(1, 5),
        "prompt": slice(5, 6),
        "extra": slice(6, 8),
    }
    regions = torch.tensor([[[0, 1], [1, NO_REGION]]])  # p0 in 0, p1 and p2 in 1, p3 in none
    blocked = prompts.attention_mask(regions, layout)[0]
    o, x = 0, 1  # open, blocked
    expected = [
        # CLS p0 p1 p2 p3 vp o0 o1     (keys)
        [o, o, o, o, o, o, x, x],  # CLS
        [o, o, o, o, o, o, o, x],  # p0 (region 0) sees object 0
        [o, o, o, o, o, o, x, o],  # p1 (region 1) sees object 1
        [o, o, o, o, o, o, x, o],  # p2 (region 1)
        [o, o, o, o, o, o, x, x],  # p3 (no region) sees no object prompt
        [o, o, o, o, o, o, x, x],  # visual prompt
        [x, o, x, x, x, x, o, x],  # object 0: its patches and itself
        [x, x, o, o, x, x, x, o],  # object 1
    ]
    assert blocked.int().tolist() == expected
    with pytest.raises(ValueError, match="outside"):
        prompts.attention_mask(torch.tensor([[[0, 2], [1, 1]]]), layout)


def _backbone(num_objects, seed=0):
    torch.manual_seed(seed)
    return CLIPPromptBackbone(
        model_name="OCZ-Tiny-ViT", num_prompts=2, num_objects=num_objects, out_layers=(1, 3)
    ).eval()


def test_object_prompts_see_only_their_region_and_hide_when_unassigned():
    plain, with_objects = _backbone(0), _backbone(3)
    # Same CLIP and visual prompts (object prompts are created after them).
    torch.testing.assert_close(plain.visual_prompts, with_objects.visual_prompts)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    none = torch.full((2, 4, 4), NO_REGION)
    with torch.no_grad():
        ref = plain(x)
        out = with_objects(x, none)
    # No patch in any region: the prompts are invisible, everything else is the plain output
    # (up to float rounding: the attention runs over more, fully masked, tokens).
    for key in ("res1", "res3", "patch", "dense", "cls"):
        torch.testing.assert_close(out[key], ref[key], rtol=0, atol=1e-5, msg=key)
    assert out["objects"].shape == (2, 3, 128)
    # Prompt 2 owns no patch: it sees only itself, so its output ignores the image.
    regions = torch.zeros(2, 4, 4, dtype=torch.long)
    regions[:, 2:] = 1
    y = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = with_objects(x, regions), with_objects(y, regions)
    assert torch.allclose(a["objects"][:, 2], b["objects"][:, 2])
    assert not torch.allclose(a["objects"][:, 0], b["objects"][:, 0])
    # Patches of region 1 see prompt 1: the prompts change what the assigned patches become.
    assert not torch.allclose(a["patch"], ref["patch"])
    with pytest.raises(ValueError, match="pass the regions"):
        with_objects(x)
    with pytest.raises(ValueError, match="no object prompts"):
        plain(x, regions)


def test_object_prompts_get_gradients():
    backbone = _backbone(2).train()
    regions = torch.tensor([[[0, 0, 1, 1]] * 4])
    out = backbone(torch.randn(1, 3, 64, 64), regions)
    (out["objects"].sum() + out["patch"].sum()).backward()
    grad = backbone.object_prompts.embeddings.grad
    assert grad is not None and (grad.abs().sum(dim=(1, 2)) > 0).all()  # every layer


def test_old_checkpoint_with_prompts_key_loads():
    new = _backbone(0, seed=1)
    state = new.state_dict()
    old_state = type(state)(
        (("prompts" if k == "visual_prompts" else k), v) for k, v in state.items()
    )
    old_state._metadata = {k: dict(v) for k, v in state._metadata.items()}
    old_state._metadata[""]["version"] = 1
    target = _backbone(0, seed=2)
    assert not torch.equal(target.visual_prompts, new.visual_prompts)
    target.load_state_dict(old_state)  # strict
    assert torch.equal(target.visual_prompts, new.visual_prompts)


# ---------------------------------------------------------------------- ORA and granular
@pytest.mark.parametrize("granular", [False, True])
@pytest.mark.parametrize("given_objects", [False, True])
def test_ora_shapes_and_gradients(granular, given_objects):
    torch.manual_seed(0)
    ora = ObjectRefinementAttention(
        32,
        num_rounds=2,
        num_heads=4,
        num_objects=0 if given_objects else 3,
        granular_rates=(1, 2) if granular else None,
    )
    pf = torch.randn(2, 32, 5, 6, requires_grad=True)
    of = torch.randn(2, 3, 32, requires_grad=True) if given_objects else None
    out = ora(pf, of)
    assert out.shape == pf.shape
    assert not torch.allclose(out, pf)
    out.square().mean().backward()
    missing = [n for n, p in ora.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    assert not missing
    assert pf.grad.abs().sum() > 0
    if given_objects:
        assert of.grad.abs().sum() > 0
    assert (ora.obj_k.granular is not None) == granular


def test_ora_objects_change_the_refinement():
    torch.manual_seed(0)
    ora = ObjectRefinementAttention(16, num_rounds=1, num_heads=2, granular_rates=None)
    pf = torch.randn(1, 16, 3, 3)
    a = ora(pf, torch.randn(1, 2, 16))
    b = ora(pf, torch.randn(1, 2, 16))
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match="no object features"):
        ora(pf)


@pytest.mark.parametrize("granular", [False, True])
def test_narrow_ora_starts_as_identity_then_learns(granular):
    """ORA at a width below the backbone's: projected in, change projected back and added; the
    zero-initialised exit makes it the identity at first, and one step makes it refine."""
    torch.manual_seed(0)
    ora = ObjectRefinementAttention(
        24, dim=8, num_rounds=2, num_heads=2, granular_rates=(1, 2) if granular else None
    )
    full = ObjectRefinementAttention(
        24, num_rounds=2, num_heads=2, granular_rates=(1, 2) if granular else None
    )
    assert ora.dim == 8 and ora.channels == 24 and full.dim == 24 and full.patch_in is None
    # Every inner projection is dim x dim: the narrow one has (8/24)^2 of their weights.
    inner = ("obj_", "patch_q", "patch_k", "patch_v", "patch_out", "patch_gru", "patch_norm")
    n_inner = sum(p.numel() for n, p in ora.named_parameters() if n.startswith(inner))
    n_full = sum(p.numel() for n, p in full.named_parameters() if n.startswith(inner))
    assert n_inner < n_full / 5
    pf = torch.randn(2, 24, 4, 5)
    of = torch.randn(2, 3, 24)
    assert torch.equal(ora(pf, of), pf)
    optimizer = torch.optim.SGD(ora.parameters(), lr=0.1)
    target = torch.randn_like(pf)
    for _ in range(2):
        optimizer.zero_grad()
        (ora(pf, of) - target).square().mean().backward()
        optimizer.step()
    out = ora(pf, of)
    assert not torch.allclose(out, pf)
    # After the exit has learned, every part (entry, stages, GRUs) gets a gradient.
    optimizer.zero_grad()
    (out - target).square().mean().backward()
    missing = [n for n, p in ora.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    assert not missing
    # The objects matter through the entry projection.
    assert not torch.allclose(ora(pf, of), ora(pf, torch.randn(2, 3, 24)))


def test_ora_width_errors_name_the_key():
    with pytest.raises(ValueError, match="MODEL.OCZ.ORA.NHEADS=3 must divide ORA's width 8"):
        ObjectRefinementAttention(24, dim=8, num_heads=3)
    with pytest.raises(ValueError, match="MODEL.OCZ.ORA.DIM must be >= 0"):
        ObjectRefinementAttention(24, dim=-8, num_heads=2)
    ora = ObjectRefinementAttention(24, dim=8, num_heads=2, granular_rates=None)
    with pytest.raises(ValueError, match="built for 24-channel patch features"):
        ora(torch.randn(1, 16, 2, 2), torch.randn(1, 2, 16))


def test_granular_extractor_receptive_fields():
    torch.manual_seed(0)
    g = GranularExtractor(4, rates=(1, 3))
    x = torch.zeros(1, 4, 9, 9, requires_grad=True)
    out = g(x)
    assert out.shape == x.shape
    out[0, :, 4, 4].sum().backward()
    touched = x.grad[0].abs().sum(0) > 0
    # Pool branch: every position; rates 1 and 3 also weigh their taps, not just the pool.
    assert touched.all()
    with pytest.raises(ValueError, match="GRANULAR_RATES"):
        GranularExtractor(4, rates=(0,))


# ---------------------------------------------------------------------- model-level
def tiny_cfg(data, **overrides):
    cfg = get_cfg()
    add_ocz_config(cfg)
    cfg.merge_from_file(str(TINY))
    size = data.image_size
    opts = [
        "DATASETS.TRAIN", (data.train_name,),
        "DATASETS.TEST", (data.val_name,),
        "INPUT.RESIZE_TARGET", (size, size),
        "INPUT.CROP.SIZE", (size, size),
        "INPUT.MIN_SIZE_TEST", size,
        "MODEL.OCZ.DECODER.DEC_LAYERS", 1,
        "MODEL.OCZ.LOSS.TRAIN_NUM_POINTS", 128,
        "MODEL.OCZ.ORA.NHEADS", 4,
    ]  # fmt: skip
    for k, v in overrides.items():
        opts += [k, v]
    cfg.merge_from_list(opts)
    return cfg


def _outputs(cfg, batch):
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad():
        return model, [o["sem_seg"] for o in model(batch)]


def test_disabled_components_leave_the_baseline_unchanged(synthetic_benchmark):
    data = synthetic_benchmark
    base_cfg = tiny_cfg(data)
    batch = [
        ZeroShotSemSegDatasetMapper(base_cfg, False)(d)
        for d in DatasetCatalog.get(data.val_name)[:2]
    ]
    base_model, base = _outputs(base_cfg, batch)
    disabled = {
        # n_o = 0: no object prompts and no objects, whatever else is set.
        "objects off": {"MODEL.OCZ.OBJECTS.NUM": 0, "MODEL.OCZ.GUIDE.SOURCE": "clip"},
        # S = 0: no ORA, also not its granular attention.
        "ora off": {"MODEL.OCZ.ORA.NUM_ROUNDS": 0, "MODEL.OCZ.ORA.GRANULAR": True},
    }
    for name, opts in disabled.items():
        model, out = _outputs(tiny_cfg(data, **opts), batch)
        assert model.state_dict().keys() == base_model.state_dict().keys(), name
        for a, b in zip(out, base):
            assert torch.equal(a, b), name
    # And an enabled part does change the output (the comparison can fail). A full-width ORA:
    # a narrow one starts as the identity, and the other parts start from the same weights.
    _, on = _outputs(
        tiny_cfg(data, **{"MODEL.OCZ.OBJECTS.NUM": 2, "MODEL.OCZ.OBJECTS.PROMPTS": False,
                          "MODEL.OCZ.ORA.NUM_ROUNDS": 1, "MODEL.OCZ.ORA.OBJECT_INIT": "random",
                          "MODEL.OCZ.ORA.DIM": 0}),
        batch,
    )  # fmt: skip
    assert not torch.equal(on[0], base[0])


def test_shared_parts_start_from_the_same_weights_with_or_without_a_component(
    synthetic_benchmark,
):
    """Each part is built from its own random stream (cfg.SEED and its name): adding ORA or MFE
    leaves every other weight as it was, so a paired comparison measures the component; another
    SEED gives other weights."""
    data = synthetic_benchmark
    base = build_model(tiny_cfg(data)).state_dict()
    for extra in (
        {"MODEL.OCZ.OBJECTS.NUM": 2, "MODEL.OCZ.OBJECTS.PROMPTS": False,
         "MODEL.OCZ.ORA.NUM_ROUNDS": 1, "MODEL.OCZ.ORA.OBJECT_INIT": "random"},
        {"MODEL.OCZ.MFE.ENABLED": True},
    ):  # fmt: skip
        torch.manual_seed(123)  # the global RNG's state does not matter
        other = build_model(tiny_cfg(data, **extra)).state_dict()
        assert set(other) > set(base)
        for k, v in base.items():
            assert torch.equal(v, other[k]), k
    reseeded = build_model(tiny_cfg(data, SEED=5)).state_dict()
    assert not torch.equal(reseeded["backbone.visual_prompts"], base["backbone.visual_prompts"])
    key = "transformer_decoder.query_feat.weight"
    assert not torch.equal(reseeded[key], base[key])


def test_ora_config_mismatches_are_explained(synthetic_benchmark):
    cfg = tiny_cfg(synthetic_benchmark, **{"MODEL.OCZ.ORA.NUM_ROUNDS": 2})
    with pytest.raises(ValueError, match="OBJECTS.NUM"):
        build_model(cfg)
    cfg = tiny_cfg(
        synthetic_benchmark,
        **{"MODEL.OCZ.ORA.NUM_ROUNDS": 2, "MODEL.OCZ.OBJECTS.NUM": 2,
           "MODEL.OCZ.ORA.OBJECT_INIT": "random"},
    )  # fmt: skip
    with pytest.raises(ValueError, match="PROMPTS"):
        build_model(cfg)


def _ssl_cfg(data, **extra):
    return tiny_cfg(
        data,
        **{
            "MODEL.OCZ.OBJECTS.NUM": 3,
            "MODEL.OCZ.ORA.NUM_ROUNDS": 1,
            "MODEL.OCZ.ORA.GRANULAR": True,
            "MODEL.OCZ.ORA.GRANULAR_RATES": [1, 2],
            "MODEL.OCZ.GUIDE.SOURCE": "ssl",
            "MODEL.OCZ.GUIDE.SSL_MODEL": "vit_tiny_patch16_224",
            "MODEL.OCZ.GUIDE.PRETRAINED": False,
            **extra,
        },
    )


def test_training_with_object_maps_never_runs_the_ssl_model(synthetic_benchmark, monkeypatch):
    data = synthetic_benchmark
    cfg = _ssl_cfg(data)
    torch.manual_seed(0)
    model = build_model(cfg).train()
    batch = [
        ZeroShotSemSegDatasetMapper(cfg, True)(d) for d in DatasetCatalog.get(data.train_name)[:2]
    ]
    calls = []
    real = SSLGuide.features
    monkeypatch.setattr(SSLGuide, "features", lambda self, x: calls.append(1) or real(self, x))
    # Without object maps the guide runs online (built on first use) ...
    with EventStorage():
        losses = model(batch)
    assert calls and model.guide._ssl_model
    sum(losses.values()).backward()
    assert model.backbone.object_prompts.embeddings.grad.abs().sum() > 0
    # ... with object maps it never runs, and is never even built.
    torch.manual_seed(0)
    model = build_model(cfg).train()
    calls.clear()
    for x in batch:
        x["object_map"] = torch.randint(0, 3, x["sem_seg"].shape)
    with EventStorage():
        model(batch)
    assert not calls and not model.guide._ssl_model
    # Inference on an image without an object map computes its regions online.
    model.eval()
    sample = ZeroShotSemSegDatasetMapper(cfg, False)(DatasetCatalog.get(data.val_name)[0])
    with torch.no_grad():
        scores = model([sample])[0]["sem_seg"]
    assert calls and scores.shape == (len(data.classes), data.image_size, data.image_size)


def test_precompute_tool_maps_match_online_regions(
    synthetic_benchmark_factory, tmp_path, monkeypatch
):
    data = synthetic_benchmark_factory("omaps", num_train=4, num_val=2, num_test=2)
    monkeypatch.setenv("DETECTRON2_DATASETS", str(data.root.parent))
    opts = [
        "MODEL.OCZ.OBJECTS.NUM", "3", "MODEL.OCZ.ORA.NUM_ROUNDS", "1", "MODEL.OCZ.ORA.NHEADS", "4",
        "MODEL.OCZ.GUIDE.SOURCE", "clip", "MODEL.OCZ.GUIDE.KMEANS_ITERS", "2",
        "DATASETS.TRAIN", "()", "DATASETS.TEST", "()", "SEED", "0",
    ]  # fmt: skip
    argv = ["--config-file", str(TINY), "--split-file", str(data.split_file), "--name", "c"]
    torch.manual_seed(0)
    assert precompute_object_maps.main(["--splits", "train", "val"] + argv + opts) == 0
    folder = data.root / "object_maps" / "c" / "train"
    record = json.loads((folder / RECORD_NAME).read_text())
    assert record["source"] == "clip" and record["num_objects"] == 3
    maps = sorted(folder.glob("*.png"))
    assert len(maps) == data.num_train
    split_file = data.split_file.with_name(f"{data.split_file.stem}_objects_c.yaml")
    names = register_split_file(split_file)
    assert names == ["ocz_test_omaps_attr_objects_c_train", "ocz_test_omaps_attr_objects_c_val"]

    # The stored maps are what the model computes online (same CLIP: random, seeded the same).
    cfg = tiny_cfg(data, **dict(zip(opts[::2], opts[1::2])))
    cfg.merge_from_list(["DATASETS.TRAIN", (names[0],), "DATASETS.TEST", (names[1],)])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    sample = ZeroShotSemSegDatasetMapper(cfg, False)(DatasetCatalog.get(names[0])[0])
    assert sample["object_map"].shape == sample["sem_seg"].shape
    online = model.online_regions([sample["image"]])
    stored = label_map_to_grid(sample["object_map"][None], 16, 3)
    assert torch.equal(online, stored)

    # A record from another guide is refused, naming what differs.
    write_record(folder, {**record, "num_objects": 4})
    with pytest.raises(ValueError, match="num_objects: maps 4, config 3"):
        check_object_map_records(cfg, [names[0]])
    write_record(folder, record)
    check_object_map_records(cfg, [names[0]])
    assert guide_record(cfg) == {k: record[k] for k in guide_record(cfg)}


def test_object_maps_stay_aligned_through_augmentation(synthetic_benchmark, tmp_path):
    """Crop, flip, resize and padding move the object map exactly like the image."""
    data = synthetic_benchmark
    cfg = tiny_cfg(data)
    cfg.merge_from_list(["INPUT.RESIZE_SCALE", (0.5, 1.5), "INPUT.FLIP_PROB", 0.5])
    mapper = ZeroShotSemSegDatasetMapper(cfg, True)
    size = data.image_size
    # The image encodes its region: 16x16-pixel blocks, region r painted with grey level 40 r + 20.
    yy, xx = np.mgrid[0:size, 0:size]
    region = ((yy // 16) + 2 * (xx // 16)) % 6
    image = np.repeat((40 * region + 20).astype(np.uint8)[..., None], 3, axis=2)
    Image.fromarray(image).save(tmp_path / "img.png")
    Image.fromarray(region.astype(np.uint8)).save(tmp_path / "obj.png")
    label = np.full((size, size), 255, np.uint8)
    label[: size // 2] = data.seen_ids[0]
    Image.fromarray(label).save(tmp_path / "lab.png")
    record = {
        "file_name": str(tmp_path / "img.png"),
        "sem_seg_file_name": str(tmp_path / "lab.png"),
        "object_map_file_name": str(tmp_path / "obj.png"),
        "height": size,
        "width": size,
        "dataset_name": data.train_name,
    }
    padded_seen, misaligned = False, []
    for seed in range(12):
        np.random.seed(seed)  # noqa: NPY002 (Detectron2 augmentations draw from it)
        out = mapper(dict(record))
        img, omap = out["image"][0].numpy().astype(int), out["object_map"].numpy()
        assert img.shape == omap.shape
        pad = omap == 255
        padded_seen |= bool(pad.any())
        assert (img[pad] == 0).all()  # padding: black image, no region
        inside = ~pad
        decoded = np.clip(np.rint((img[inside] - 20) / 40), 0, 5)
        # Bilinear resizing blends the image at block borders only.
        assert (decoded == omap[inside]).mean() > 0.9
        # The check can fail: a map flipped without its image would not pass it.
        misaligned.append((decoded == omap[:, ::-1][inside]).mean())
    assert padded_seen and min(misaligned) < 0.6


def test_oracle_maps_are_the_true_instances(synthetic_benchmark_factory):
    data = synthetic_benchmark_factory("oracle", num_train=3, num_val=2, num_test=2)
    split_file = write_oracle_object_maps(data.root, num_objects=6, split_file=data.split_file)
    names = register_split_file(split_file, root=data.root.parent)
    assert names[0] == "ocz_test_oracle_attr_objects_oracle_train"
    for d in DatasetCatalog.get(names[0]):
        omap = np.asarray(Image.open(d["object_map_file_name"]))
        label = np.asarray(Image.open(d["sem_seg_file_name"]))
        assert ((omap == 0) == (label == 255)).all()  # background <-> no class
        for r in set(np.unique(omap)) - {0}:  # each instance has one class
            assert len(np.unique(label[omap == r])) == 1
        assert omap.max() <= 5
    record = json.loads((data.root / "object_maps" / "oracle" / "train" / RECORD_NAME).read_text())
    assert record == {"source": "oracle", "num_objects": 6}
    with pytest.raises(ValueError, match="n_o >= 6"):
        write_oracle_object_maps(data.root, num_objects=4)


VOC_LADDER = [
    "ablation/baseline_vitb16_bs16_20k.yaml",
    "ablation/ora_vitb16_bs16_20k.yaml",
    "ablation/objects_vitb16_bs16_20k.yaml",
    "oczss_vitb16_bs16_20k.yaml",
    "ablation/oczss_split_vitb16_bs16_20k.yaml",
    "ablation/oczss_split_vitb16_bs16_20k_transductive.yaml",
]


@pytest.mark.parametrize("config", VOC_LADDER)
def test_paper_scale_voc_ladder_builds_and_trains_a_step(config, synthetic_benchmark):
    """The VOC configs as written (ORA width, heads, rates, n_o), with a tiny CLIP and a random
    tiny SSL ViT instead of ViT-B/16 and DINO (no download), and the test data."""
    from ocz_d2.config import load_config

    data = synthetic_benchmark
    size = data.image_size
    cfg = load_config(
        REPO / "configs" / "voc" / config,
        [
            "DATASETS.TRAIN", f"('{data.train_name}',)",
            "DATASETS.TEST", f"('{data.val_name}',)",
            "MODEL.DEVICE", "cpu",
            "MODEL.OCZ.CLIP.MODEL_NAME", "OCZ-Tiny-ViT",
            "MODEL.OCZ.CLIP.PRETRAINED", "",
            "MODEL.OCZ.CLIP.OUT_LAYERS", "[1, 3]",
            "MODEL.SEM_SEG_HEAD.IN_FEATURES", "['res1', 'res3']",
            "MODEL.OCZ.GUIDE.SSL_MODEL", "vit_tiny_patch16_224",
            "MODEL.OCZ.GUIDE.PRETRAINED", "False",
            "MODEL.OCZ.DECODER.DEC_LAYERS", "1",
            "MODEL.OCZ.LOSS.TRAIN_NUM_POINTS", "128",
            "INPUT.CROP.SIZE", f"({size}, {size})",
            "INPUT.RESIZE_TARGET", f"({size}, {size})",
        ],
    )  # fmt: skip
    torch.manual_seed(0)
    model = build_model(cfg).train()
    if config != VOC_LADDER[0]:
        ora = model.pixel_decoder.refiner
        assert ora.num_rounds == 4 and ora.num_heads == 8
        assert ora.dim == 256 and ora.channels == model.backbone.width
        assert ora.granular == (config not in VOC_LADDER[1:3])
    split = config.startswith("ablation/oczss_split")
    assert (model.pseudo_masker is not None) == split
    assert (model.pixel_decoder.mfe is not None) == split
    assert model.num_objects == (6 if config in VOC_LADDER[2:] else 0)
    mapper = ZeroShotSemSegDatasetMapper(cfg, True)
    batch = [mapper(d) for d in DatasetCatalog.get(data.train_name)[:2]]
    with EventStorage():
        losses = model(batch)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()


def test_old_full_model_checkpoint_loads_through_detectron2(synthetic_benchmark, tmp_path):
    from detectron2.checkpoint import DetectionCheckpointer

    cfg = tiny_cfg(synthetic_benchmark)
    torch.manual_seed(0)
    source = build_model(cfg)
    old = {
        ("backbone.prompts" if k == "backbone.visual_prompts" else k): v
        for k, v in source.state_dict().items()
    }
    assert "backbone.prompts" in old
    torch.save({"model": old, "iteration": 7}, tmp_path / "old.pth")
    cfg.SEED = cfg.SEED + 1  # other initial weights
    target = build_model(cfg)
    assert not torch.equal(target.backbone.visual_prompts, source.backbone.visual_prompts)
    DetectionCheckpointer(target).load(str(tmp_path / "old.pth"))
    assert torch.equal(target.backbone.visual_prompts, source.backbone.visual_prompts)


def test_ssl_guide_local_weights_normalisation_and_grid_resampling(tmp_path, monkeypatch):
    torch.manual_seed(0)
    random_guide = SSLGuide("vit_tiny_patch16_224", pretrained=False, num_regions=3, seed=5)
    path = tmp_path / "vit_tiny.pth"
    torch.save(random_guide.model.state_dict(), path)
    local = SSLGuide("vit_tiny_patch16_224", weights=str(path), num_regions=3)
    for a, b in zip(random_guide.model.state_dict().values(), local.model.state_dict().values()):
        assert torch.equal(a, b)
    # A relative path is also looked up under $DETECTRON2_DATASETS (data-derived weights).
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    monkeypatch.chdir(tmp_path.parent)
    relative = SSLGuide("vit_tiny_patch16_224", weights="vit_tiny.pth", num_regions=3)
    assert torch.equal(relative.model.pos_embed, random_guide.model.pos_embed)
    # Seeded random weights: the same guide in every run, without touching the global RNG.
    state = torch.random.get_rng_state()
    again = SSLGuide("vit_tiny_patch16_224", pretrained=False, num_regions=3, seed=5)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(again.model.patch_embed.proj.weight, local.model.patch_embed.proj.weight)
    # Raw 0..255 input, normalised with the model's own statistics (0.5 / 0.5 for this timm
    # model; CLIP's differ), not CLIP's normalised tensor.
    torch.testing.assert_close(local.pixel_mean.flatten(), torch.full((3,), 127.5))
    torch.testing.assert_close(local.pixel_std.flatten(), torch.full((3,), 127.5))
    images = torch.rand(2, 3, 64, 96) * 255
    feats, stride = local.features(images)
    assert feats.shape == (2, 192, 4, 6) and stride == (16.0, 16.0)
    # SSL grid 4x6 (patch 16) onto a CLIP grid of patch 8: 8x12, each SSL cell a 2x2 block.
    regions = local(images, (8, 12))
    coarse = local(images, (4, 6))
    assert regions.shape == (2, 8, 12)
    assert torch.equal(regions, coarse.repeat_interleave(2, 1).repeat_interleave(2, 2))
    with pytest.raises(FileNotFoundError, match="GUIDE.WEIGHTS"):
        SSLGuide("vit_tiny_patch16_224", weights=str(tmp_path / "missing.pth"))
    with pytest.raises(ValueError, match="Unknown timm model"):
        SSLGuide("not_a_vit_name")


def test_learning_rate_groups_of_the_new_parts(synthetic_benchmark):
    from ocz_d2.engine.optimizer import build_param_groups

    torch.manual_seed(0)
    model = build_model(_ssl_cfg(synthetic_benchmark))
    groups = build_param_groups(
        model, base_lr=1.0, weight_decay=0.0, weight_decay_norm=0.0, weight_decay_embed=0.0,
        backbone_multiplier=0.5, head_multiplier=10.0,
    )  # fmt: skip
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    names = dict(model.named_parameters())
    assert lr_of[id(names["backbone.object_prompts.embeddings"])] == 0.5
    ora = [n for n in names if n.startswith("pixel_decoder.refiner.")]
    assert any(".granular." in n for n in ora)
    assert all(lr_of[id(names[n])] == 10.0 for n in ora)
    # The SSL guide is not a parameter of the model (frozen, built on demand, not checkpointed).
    assert not any("ssl" in n for n in model.state_dict())


def test_guide_record_resolves_the_weights_as_the_guide_does(
    synthetic_benchmark, tmp_path, monkeypatch
):
    """A relative MODEL.OCZ.GUIDE.WEIGHTS is looked up under $DETECTRON2_DATASETS, as the guide
    loads it, and recorded by the file's content."""
    data = synthetic_benchmark
    weights = tmp_path / "data" / "vit.pt"
    weights.parent.mkdir()
    torch.save(SSLGuide("vit_tiny_patch16_224", pretrained=False).model.state_dict(), weights)
    monkeypatch.setenv("DETECTRON2_DATASETS", str(weights.parent))
    monkeypatch.chdir(tmp_path)
    relative = guide_record(_ssl_cfg(data, **{"MODEL.OCZ.GUIDE.WEIGHTS": "vit.pt"}))
    absolute = guide_record(_ssl_cfg(data, **{"MODEL.OCZ.GUIDE.WEIGHTS": str(weights)}))
    assert relative == absolute
    assert relative["ssl_weights"] == "sha256:" + file_sha256(str(weights))[:16]
    with pytest.raises(FileNotFoundError, match="MODEL.OCZ.GUIDE.WEIGHTS='missing.pt'"):
        guide_record(_ssl_cfg(data, **{"MODEL.OCZ.GUIDE.WEIGHTS": "missing.pt"}))
