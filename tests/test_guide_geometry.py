"""Guides with another patch grid: regions move from the guide's grid to CLIP's by geometry (each
CLIP patch takes the guide cell under its centre), and one clustering case where k-means
refinement changes the Voronoi cells."""

import math

import pytest
import torch
import torch.nn.functional as F

from ocz_d2.modeling.backbone.ssl_guide import SSLGuide
from ocz_d2.modeling.clustering import (
    NO_REGION,
    cells_with_image,
    cluster_feature_map,
    resample_regions,
    voronoi_cluster,
)


def _coded(h: int, w: int) -> torch.Tensor:
    """A [1, h, w] region map whose value names its cell: 100 * row + column."""
    return (100 * torch.arange(h)[:, None] + torch.arange(w)[None, :])[None]


def _old_nearest(regions: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
    """The former resampling: stretch one grid onto the other (nearest interpolation)."""
    return F.interpolate(regions[:, None].float(), size=grid_hw, mode="nearest")[:, 0].long()


def _expected(rows: list[int], cols: list[int]) -> torch.Tensor:
    return (100 * torch.tensor(rows)[:, None] + torch.tensor(cols)[None, :])[None]


# ---------------------------------------------------------------------- resample_regions
def test_dinov2_b14_grid_onto_clip_b16():
    # DINOv2-B/14 pads a 512-px image to 518: 37x37 cells of 14 px; CLIP B/16: 32x32 of 16 px.
    # CLIP row i has its centre at 16 i + 8 px, in guide row floor((16 i + 8) / 14).
    regions = _coded(37, 37)
    out = resample_regions(regions, (32, 32), src_stride=(14, 14), dst_stride=16)
    cells = [(16 * i + 8) // 14 for i in range(32)]
    assert cells[:8] == [0, 1, 2, 4, 5, 6, 7, 8] and cells[-1] == 36  # by hand: 56 / 14 = 4
    assert torch.equal(out, _expected(cells, cells))
    # The old stretch (37 cells over 32) takes row floor(37 i / 32): 13 of 32 rows and columns
    # get the neighbouring cell.
    old = _old_nearest(regions, (32, 32))
    wrong = [i for i in range(32) if old[0, i, 0] != out[0, i, 0]]
    assert wrong == [3, 4, 5, 6, 10, 11, 12, 17, 18, 19, 24, 25, 31]
    assert old[0, 3, 0] == 300 and out[0, 3, 0] == 400


def test_dino_b8_grid_onto_clip_b16():
    # DINO-B/8: 64x64 cells of 8 px; CLIP patch i (centre 16 i + 8) lies in guide cell 2 i + 1.
    regions = _coded(64, 64)
    out = resample_regions(regions, (32, 32), src_stride=8, dst_stride=16)
    cells = [2 * i + 1 for i in range(32)]
    assert torch.equal(out, _expected(cells, cells))
    # The stretch took cell 2 i, the top-left of the 2x2 block instead of the one under the centre.
    evens = [2 * i for i in range(32)]
    assert torch.equal(_old_nearest(regions, (32, 32)), _expected(evens, evens))


def test_equal_geometry_is_the_identity():
    g = torch.Generator().manual_seed(0)
    regions = torch.randint(-1, 5, (2, 5, 7), generator=g)
    for stride in (16, 14, 16 * 512 / 224):  # integer, and fractional strides
        out = resample_regions(regions, (5, 7), src_stride=stride, dst_stride=(stride, stride))
        assert torch.equal(out, regions) and torch.equal(out, _old_nearest(regions, (5, 7)))
    # Clustering on CLIP's own grid ('clip' guide) keeps the Voronoi result as it is.
    feats = torch.randn(2, 8, 5, 7, generator=g)
    direct = voronoi_cluster(feats.flatten(2).transpose(1, 2), 3, iters=2, seed=1).view(2, 5, 7)
    regions = cluster_feature_map(
        feats, 3, (5, 7), stride=16, patch_size=16, seeding="farthest", iters=2, seed=1
    )
    assert torch.equal(regions, direct)
    # ... and so does the image mask: the same cells as the old nearest sampling of pixels.
    pixels = torch.zeros(2, 80, 112, dtype=torch.bool)
    pixels[0], pixels[1, :70, :50] = True, True
    old = _old_nearest(pixels.long(), (5, 7)).bool()
    assert torch.equal(cells_with_image(pixels, (5, 7), 16), old)
    assert torch.equal(cells_with_image(pixels, (5, 7), (16, 16)), old)


def test_guide_that_resizes_its_input():
    # A /16 guide with input_size 224 on a 512-px image: 14x14 cells of 16 / (224 / 512) px.
    # CLIP row i (centre 16 i + 8) is in guide row floor((16 i + 8) * (224 / 512) / 16)
    # = floor(7 (2 i + 1) / 32).
    regions = _coded(14, 14)
    stride = 16 / (224 / 512)
    out = resample_regions(regions, (32, 32), src_stride=(stride, stride), dst_stride=16)
    cells = [7 * (2 * i + 1) // 32 for i in range(32)]
    assert cells[:6] == [0, 0, 1, 1, 1, 2] and cells[-1] == 13  # by hand: 7 * 5 / 32 = 1.09
    assert torch.equal(out, _expected(cells, cells))
    assert cells != [14 * i // 32 for i in range(32)]  # the stretch: [0, 0, 0, 1, ...]
    # The guide reports that stride, per axis: a 512x300 image becomes 224 x round(131.25) = 131.
    guide = SSLGuide("vit_tiny_patch16_224", pretrained=False, input_size=224)
    feats, got = guide.features(torch.rand(1, 3, 512, 512) * 255)
    assert feats.shape[-2:] == (14, 14) and got == pytest.approx((stride, stride))
    feats, got = guide.features(torch.rand(1, 3, 512, 300) * 255)
    assert feats.shape[-2:] == (14, math.ceil(131 / 16))
    assert got == pytest.approx((16 * 512 / 224, 16 * 300 / 131))
    # Without input_size the cells are the patches.
    plain = SSLGuide("vit_tiny_patch16_224", pretrained=False)
    feats, got = plain.features(torch.rand(1, 3, 50, 33) * 255)
    assert feats.shape[-2:] == (4, 3) and got == (16.0, 16.0)


def test_padding_cells_get_no_region():
    # A 500x300 image in a 512x512 batch, DINOv2-B/14 geometry. Guide cell r holds image when it
    # starts inside it: 14 r < 500, rows 0..35 (row 36 covers 504..517, padding only), and
    # 14 c < 300, columns 0..21.
    pixels = torch.zeros(1, 512, 512, dtype=torch.bool)
    pixels[0, :500, :300] = True
    valid = cells_with_image(pixels, (37, 37), 14)
    assert valid[0, :, 0].nonzero().flatten().tolist() == list(range(36))
    assert valid[0, 0].nonzero().flatten().tolist() == list(range(22))
    # The old nearest sampling of the pixel mask read row 36 at pixel floor(36 * 512 / 37) = 498,
    # inside the image, and so let a padding-only cell into the clustering.
    assert _old_nearest(pixels.long(), (37, 37))[0, 36, 0] == 1
    # On CLIP's grid NO_REGION falls exactly on the patches whose centre is padding: rows with
    # 16 i + 8 >= 500 (i = 31) and columns with 16 j + 8 >= 300 (j >= 19).
    feats = torch.randn(1, 8, 37, 37, generator=torch.Generator().manual_seed(0))
    regions = cluster_feature_map(
        feats, 3, (32, 32), stride=14, patch_size=16, seeding="farthest", iters=1, seed=0,
        valid=valid,
    )  # fmt: skip
    inside = torch.zeros(1, 32, 32, dtype=torch.bool)
    inside[0, :31, :19] = True
    assert torch.equal(regions != NO_REGION, inside)


def test_ssl_guide_with_patch_14_end_to_end():
    torch.manual_seed(0)
    images = torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(1)) * 255
    guide = SSLGuide("vit_small_patch14_dinov2", pretrained=False, num_regions=3, seed=2)
    # The guide pads 64x96 to 70x98: 5x7 cells of 14 px. CLIP patch 16: a 4x6 grid, centres at
    # 8, 24, 40, 56, 72, 88 px, in guide cells 0, 1, 2, 4 (56 / 14 = 4), 5, 6.
    feats, stride = guide.features(images)
    assert feats.shape[-2:] == (5, 7) and stride == (14.0, 14.0)
    regions = guide(images, (4, 6))
    assert regions.shape == (2, 4, 6) and regions.dtype == torch.int64
    flat = feats.flatten(2).transpose(1, 2)
    fine = voronoi_cluster(flat, 3, seeding="farthest", iters=3, seed=2).view(2, 5, 7)
    assert torch.equal(regions, fine[:, [0, 1, 2, 4]][:, :, [0, 1, 2, 4, 5, 6]])
    assert not torch.equal(regions, _old_nearest(fine, (4, 6)))  # the stretch differs here
    # With input_size 48 the guide sees 32x48 (padded 42x56): 3x4 cells of 28 input px; CLIP
    # centres 8, 24, 40, 56 (, 72, 88) px lie in cells 0, 0, 1, 2 (, 2, 3).
    small = SSLGuide("vit_small_patch14_dinov2", pretrained=False, num_regions=3, input_size=48)
    feats, stride = small.features(images)
    assert feats.shape[-2:] == (3, 4) and stride == (28.0, 28.0)
    fine = voronoi_cluster(feats.flatten(2).transpose(1, 2), 3, iters=3).view(2, 3, 4)
    assert torch.equal(small(images, (4, 6)), fine[:, [0, 0, 1, 2]][:, :, [0, 0, 1, 2, 2, 3]])


# ---------------------------------------------------------------------- clustering
def _first_draw(n: int, seed: int) -> int:
    """voronoi_cluster's first 'farthest' seed: a uniform draw over the valid patches from
    torch.Generator().manual_seed(seed)."""
    gen = torch.Generator().manual_seed(seed)
    return int(torch.multinomial(torch.ones(1, n), 1, generator=gen))


def test_kmeans_refinement_moves_a_patch_out_of_its_voronoi_cell():
    # Unit vectors at these angles (all within 90 degrees: nearest = smallest angle), with
    # arbitrary lengths, which voronoi_cluster normalises away.
    degrees = torch.tensor([0.0, 42.0, 48.0, 50.0, 52.0, 90.0])
    lengths = torch.tensor([1.0, 3.0, 0.5, 2.0, 5.0, 1.5])
    rad = torch.deg2rad(degrees)
    feats = (torch.stack([rad.cos(), rad.sin()], -1) * lengths[:, None])[None]  # [1, 6, 2]
    # Pick a seed whose first draw is patch 0 (0 deg); the farthest patch from it is 90 deg.
    seed = next(s for s in range(100) if _first_draw(6, s) == 0)
    # Voronoi cells of the seeds 0 and 90 deg: border at 45 deg, so 42 stays with 0.
    voronoi = voronoi_cluster(feats, 2, seeding="farthest", iters=0, seed=seed)
    assert voronoi.tolist() == [[0, 0, 1, 1, 1, 1]]
    # One k-means step: centroid of {0, 42} at 21 deg; of {48, 50, 52, 90} at
    # 50 + atan(sin 40 / (1 + 2 cos 2 + cos 40)) = 59.7 deg (48 and 52 are symmetric about 50).
    # New border (21 + 59.7) / 2 = 40.3 deg: 42 moves to the second region.
    refined = voronoi_cluster(feats, 2, seeding="farthest", iters=1, seed=seed)
    assert refined.tolist() == [[0, 1, 1, 1, 1, 1]]
    # A fixed point: centroids 0 and about 57 deg, border about 28 deg.
    assert torch.equal(voronoi_cluster(feats, 2, seeding="farthest", iters=3, seed=seed), refined)
