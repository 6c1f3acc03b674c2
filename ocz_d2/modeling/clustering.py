"""Regions of images on patch grids: clustering of patch features and moves between grids.

OC-ZSS guides its object prompts with regions found by clustering patch features (a frozen
self-supervised ViT's, :class:`~ocz_d2.modeling.backbone.ssl_guide.SSLGuide`, or CLIP's own).
Its "Voronoi" clustering (:func:`voronoi_cluster`) picks n_o seeds over the L2-normalised
features (farthest-point or k-means++ selection), assigns every patch to its nearest seed (the
Voronoi cells) and optionally refines with a few k-means steps; no region is ever empty. The
same clustering makes the pseudo-masks of unannotated pixels
(:class:`~ocz_d2.modeling.pseudo_masks.PseudoMaskGenerator`), and precomputed object maps become
regions by :func:`label_map_to_grid`.

Regions are label maps over a patch grid, int64 ``[B, gh, gw]`` with values in ``[0, n_o)``, or
``-1`` (:data:`NO_REGION`) for "no region" (padding; such patches see no object prompt).

Grid geometry: the guide's grid need not be CLIP's. A grid is described by its cell size in input
image pixels, ``(stride_h, stride_w)``, anchored at the image's top-left pixel: cell (r, c) covers
rows ``[r * stride_h, (r + 1) * stride_h)`` and columns likewise. DINOv2-B/14 on a 512-px image
pads to 518 px and gives 37x37 cells of 14 px, CLIP ViT-B/16 32x32 cells of 16 px; a guide that
resizes its input by a factor s has cells of ``patch / s`` input pixels. Regions move from the
guide's grid to CLIP's by :func:`resample_regions`: each CLIP patch takes the guide cell under its
centre (a stretch of one grid onto the other would misplace them whenever the extents differ).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "NO_REGION",
    "SEEDINGS",
    "cells_with_image",
    "cluster_feature_map",
    "label_map_to_grid",
    "resample_regions",
    "voronoi_cluster",
]

#: Region value of a patch that belongs to no region (padding, or nothing known).
NO_REGION = -1
#: Seed selection rules of :func:`voronoi_cluster`.
SEEDINGS = ("farthest", "kmeans++")


def voronoi_cluster(
    features: torch.Tensor,
    num_regions: int,
    *,
    seeding: str = "farthest",
    iters: int = 0,
    seed: int = 0,
    valid: torch.Tensor | None = None,
    allow_fewer: bool = False,
    per_image: bool = False,
) -> torch.Tensor:
    """Cluster each image's patch features into ``num_regions`` non-empty regions.

    Batched and vectorised over images; runs on the features' device. Deterministic given
    ``seed`` (random draws come from a CPU generator, so devices agree).

    Args:
        features: [B, N, C] patch features (L2-normalised here; distances are Euclidean on the
            unit sphere, i.e. monotone in cosine similarity).
        num_regions: k, regions per image; at most the number of valid patches of every image.
        seeding: "farthest" (first seed drawn at random, then each next seed is the patch
            farthest from all chosen seeds) or "kmeans++" (next seed drawn with probability
            proportional to the squared distance to the chosen seeds).
        iters: k-means refinement steps after the Voronoi assignment (0: plain Voronoi cells).
        seed: seed of the random draws.
        valid: optional bool [B, N]; invalid patches (padding) are neither seeds nor members and
            get :data:`NO_REGION`.
        allow_fewer: an image with n < k valid patches (even none) gets n regions, 0..n-1, and
            regions n..k-1 stay empty, instead of an error (pseudo-masks of unannotated pixels
            use this: some images have few or none).
        per_image: each image draws from its own generator seeded with ``seed``, so that its
            regions do not depend on the other images of the batch (the object guide: an image
            gets the same regions alone, in a batch, or precomputed); False: one generator for
            the batch, rows drawn together (the pseudo-masks of training).

    Returns:
        int64 [B, N] region index per patch in [0, k), NO_REGION where invalid. Every region has
        at least one patch (with ``allow_fewer``: every region below the image's valid count).
    """
    if seeding not in SEEDINGS:
        raise ValueError(f"MODEL.OCZ.GUIDE.SEEDING={seeding!r}: use one of {SEEDINGS}.")
    if features.dim() != 3:
        raise ValueError(f"voronoi_cluster expects [B, N, C] features, got {tuple(features.shape)}")
    b, n, _ = features.shape
    device = features.device
    if valid is None:
        valid = torch.ones(b, n, dtype=torch.bool, device=device)
    fewest = int(valid.sum(1).min()) if b else n
    if num_regions < 1 or (num_regions > fewest and not allow_fewer):
        raise ValueError(
            f"cannot cluster into {num_regions} regions: an image has {fewest} valid patches. "
            "Lower MODEL.OCZ.OBJECTS.NUM or use larger inputs."
        )
    x = F.normalize(features.float(), dim=-1)
    if per_image:
        gen: torch.Generator | list[torch.Generator] = [
            torch.Generator().manual_seed(int(seed)) for _ in range(b)
        ]
    else:
        gen = torch.Generator().manual_seed(int(seed))
    rows = torch.arange(b, device=device)

    # Seeds: distinct valid patches. `closest` is each patch's squared distance to its nearest
    # chosen seed; chosen and invalid patches are excluded from the next draw.
    # An image without any valid patch draws its (dead) first seed from all patches.
    draw = torch.where(valid.any(1, keepdim=True), valid, torch.ones_like(valid))
    first = _draw(draw.float(), gen).to(device)
    seeds = [first]
    alive = [valid[rows, first]]  # a seed is alive when it is a valid patch
    closest = _sq_dist(x, x[rows, first])
    available = valid.clone()
    available[rows, first] = False
    for _ in range(1, num_regions):
        alive.append(available.any(1))
        score = torch.where(available, closest, torch.full_like(closest, -1.0))
        if seeding == "farthest":
            nxt = score.argmax(1)
        else:
            weight = score.clamp_min(0.0)
            # All-duplicate features give zero weights: fall back to a uniform draw.
            weight = torch.where(weight.sum(1, keepdim=True) > 0, weight, available.float())
            # An image with nothing left draws a dead seed uniformly (masked out below).
            weight = torch.where(alive[-1][:, None], weight, torch.ones_like(weight))
            nxt = _draw(weight, gen).to(device)
        seeds.append(nxt)
        available[rows, nxt] = False
        closest = torch.minimum(closest, _sq_dist(x, x[rows, nxt]))
    seed_idx = torch.stack(seeds, 1)  # [B, k]
    alive = torch.stack(alive, 1)  # [B, k]; all True unless allow_fewer

    centers = x.gather(1, seed_idx[..., None].expand(-1, -1, x.shape[-1]))
    assign = _assign(x, centers, valid, alive)
    # A seed always belongs to its own cell (ties between duplicate features could say otherwise).
    # (Live seeds only: live seeds are distinct valid patches, a dead one may repeat any patch.)
    live_rows, live_j = alive.nonzero(as_tuple=True)
    assign[live_rows, seed_idx[live_rows, live_j]] = live_j
    for _ in range(iters):
        centers = _centroids(x, assign, num_regions, valid)
        assign = _assign(x, centers, valid, alive)
        assign = _fill_empty(x, assign, centers, num_regions, valid, alive)
    return assign


def _draw(weights: torch.Tensor, gen: torch.Generator | list[torch.Generator]) -> torch.Tensor:
    """One index per row of ``weights`` [B, N], drawn in proportion to the weights on the CPU:
    all rows from one generator, or row i from ``gen[i]``. Returns int64 [B] (CPU)."""
    weights = weights.cpu()
    if isinstance(gen, torch.Generator):
        return torch.multinomial(weights, 1, generator=gen).squeeze(1)
    return torch.cat([torch.multinomial(w[None], 1, generator=g)[0] for w, g in zip(weights, gen)])


def _sq_dist(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Squared distances [B, N] of points x [B, N, C] to one point per image c [B, C]."""
    return (x - c[:, None]).pow(2).sum(-1)


def _assign(
    x: torch.Tensor, centers: torch.Tensor, valid: torch.Tensor, alive: torch.Tensor
) -> torch.Tensor:
    dist = torch.cdist(x, centers.to(x.dtype))
    dist = dist.masked_fill(~alive[:, None, :], float("inf"))
    return dist.argmin(-1).masked_fill(~valid, NO_REGION)


def _centroids(x: torch.Tensor, assign: torch.Tensor, k: int, valid: torch.Tensor) -> torch.Tensor:
    onehot = F.one_hot(assign.clamp_min(0), k).to(x.dtype) * valid[..., None].to(x.dtype)
    sums = onehot.transpose(1, 2) @ x  # [B, k, C]
    counts = onehot.sum(1)[..., None].clamp_min(1.0)
    return F.normalize(sums / counts, dim=-1)


def _fill_empty(
    x: torch.Tensor,
    assign: torch.Tensor,
    centers: torch.Tensor,
    k: int,
    valid: torch.Tensor,
    alive: torch.Tensor,
) -> torch.Tensor:
    """Give every empty (live) region the patch worst served by its own region (one with > 1
    member)."""
    for j in range(k):
        counts = F.one_hot(assign.clamp_min(0), k).mul(valid[..., None]).sum(1)  # [B, k]
        empty = (counts[:, j] == 0) & alive[:, j]
        if not empty.any():
            continue
        own = centers.gather(1, assign.clamp_min(0)[..., None].expand(-1, -1, x.shape[-1]))
        dist = (x - own).pow(2).sum(-1)
        movable = valid & (counts.gather(1, assign.clamp_min(0)) > 1)
        dist = torch.where(movable, dist, torch.full_like(dist, -1.0))
        pick = dist.argmax(1)
        rows = torch.nonzero(empty).squeeze(1)
        assign[rows, pick[rows]] = j
    return assign


#: Tolerance, in cells, of the cell look-ups: a point exactly on a cell boundary belongs to the
#: cell below/right of it even when a fractional stride rounds the quotient just under the integer.
_EDGE_TOL = 1e-6


def _pair(x: float | tuple[float, float]) -> tuple[float, float]:
    if isinstance(x, (tuple, list)):
        a, b = x
        return float(a), float(b)
    return float(x), float(x)


def _cell_of(coords: torch.Tensor, stride: float, size: int) -> torch.Tensor:
    """Indices of the cells (of ``stride`` pixels, ``size`` of them) holding pixel coordinates."""
    return torch.floor(coords / stride + _EDGE_TOL).long().clamp_(0, size - 1)


def resample_regions(
    regions: torch.Tensor,
    grid_hw: tuple[int, int],
    *,
    src_stride: float | tuple[float, float],
    dst_stride: float | tuple[float, float],
) -> torch.Tensor:
    """Move region maps to another patch grid by geometry: each destination patch takes the region
    of the source cell under its centre.

    Both grids start at the input image's top-left pixel and are measured in its pixels (see the
    module docstring). Destination patch (i, j) has its centre at ``((i + 0.5) * dst_h,
    (j + 0.5) * dst_w)`` and takes source cell ``(floor(centre_y / src_h), floor(centre_x /
    src_w))``, clamped to the source grid (the grids may end at different places, e.g. when the
    guide pads the image further than CLIP). Equal strides give the identity map.

    Args:
        regions: int [B, h, w] region map on the source grid (NO_REGION values are kept).
        grid_hw: (gh, gw), the destination grid.
        src_stride: source cell size in input pixels, (stride_h, stride_w) or one number for both;
            fractional when the source resized the image (its patch size over the resize factor).
        dst_stride: destination cell size in input pixels (CLIP's patch size), likewise.

    Returns:
        [B, gh, gw], the dtype of ``regions``.
    """
    h, w = regions.shape[-2:]
    (src_h, src_w), (dst_h, dst_w) = _pair(src_stride), _pair(dst_stride)
    # float64: the centres and quotients of realistic grids are exact or far from cell borders.
    centres_y = (torch.arange(grid_hw[0], dtype=torch.float64) + 0.5) * dst_h
    centres_x = (torch.arange(grid_hw[1], dtype=torch.float64) + 0.5) * dst_w
    rows = _cell_of(centres_y, src_h, h).to(regions.device)
    cols = _cell_of(centres_x, src_w, w).to(regions.device)
    return regions.index_select(-2, rows).index_select(-1, cols)


def cells_with_image(
    image_mask: torch.Tensor, grid_hw: tuple[int, int], stride: float | tuple[float, float]
) -> torch.Tensor:
    """Which cells of a grid hold image pixels (the others cover only padding).

    Padding lies at the bottom/right, so a cell holds image iff its first (top-left) pixel
    ``(floor(r * stride_h), floor(c * stride_w))`` is an image pixel; cells starting past the
    mask hold none. Every patch of another grid whose centre pixel is an image pixel then takes
    (by :func:`resample_regions`) a cell that holds image, so it gets a region.

    Args:
        image_mask: bool [B, H, W], True on image pixels.
        grid_hw: (h, w), the grid's size.
        stride: its cell size in input pixels, (stride_h, stride_w) or one number for both.

    Returns:
        bool [B, h, w].
    """
    height, width = image_mask.shape[-2:]
    (sh, sw), device = _pair(stride), image_mask.device
    # The same rounding as _cell_of: a cell starting exactly on a pixel starts on that pixel.
    ys = torch.floor(torch.arange(grid_hw[0], dtype=torch.float64) * sh + _EDGE_TOL * sh).long()
    xs = torch.floor(torch.arange(grid_hw[1], dtype=torch.float64) * sw + _EDGE_TOL * sw).long()
    inside = ((ys < height)[:, None] & (xs < width)[None, :]).to(device)
    ys, xs = ys.clamp_max(height - 1).to(device), xs.clamp_max(width - 1).to(device)
    return image_mask.index_select(-2, ys).index_select(-1, xs) & inside


def label_map_to_grid(
    label_map: torch.Tensor, patch_size: int, num_regions: int, none_value: int = 255
) -> torch.Tensor:
    """Pixel region maps (object maps) to patch-grid regions by majority vote per patch.

    Args:
        label_map: int [B, H, W] region index per pixel, ``none_value`` for no region (padding);
            H and W multiples of ``patch_size``.
        patch_size: p, the patch grid's stride.
        num_regions: n_o; pixel values must lie in [0, n_o) or equal ``none_value``.
        none_value: the "no region" pixel value (the dataset's ignore label).

    Returns:
        int64 [B, H/p, W/p]: the most frequent region of each patch's pixels (ties: the lower
        index), NO_REGION for patches with no region pixel.
    """
    b, h, w = label_map.shape
    if h % patch_size or w % patch_size:
        raise ValueError(f"object map {h}x{w} is not a multiple of the patch size {patch_size}")
    label_map = label_map.long()
    known = label_map != none_value
    bad = known & ((label_map < 0) | (label_map >= num_regions))
    if bad.any():
        raise ValueError(
            f"object map values {sorted(set(label_map[bad].unique().tolist()))[:10]} are outside "
            f"[0, {num_regions}) (MODEL.OCZ.OBJECTS.NUM = {num_regions}): the maps were made for "
            "more regions; recompute them with tools/precompute_object_maps.py or raise "
            "MODEL.OCZ.OBJECTS.NUM."
        )
    onehot = F.one_hot(torch.where(known, label_map, 0), num_regions).float()
    onehot = onehot * known[..., None].float()  # [B, H, W, k]
    votes = F.avg_pool2d(onehot.permute(0, 3, 1, 2), patch_size) * patch_size**2  # [B, k, gh, gw]
    best = votes.argmax(1)
    return torch.where(votes.amax(1) > 0, best, torch.full_like(best, NO_REGION))


def cluster_feature_map(
    feats: torch.Tensor,
    num_regions: int,
    grid_hw: tuple[int, int],
    stride: float | tuple[float, float],
    patch_size: float | tuple[float, float],
    *,
    seeding: str,
    iters: int,
    seed: int,
    valid: torch.Tensor | None = None,
    per_image: bool = False,
) -> torch.Tensor:
    """Cluster a feature map into regions and move them to the CLIP patch grid.

    Args:
        feats: [B, C, h, w] patch features (the guide's grid).
        num_regions: n_o.
        grid_hw: (gh, gw), the CLIP patch grid.
        stride: cell size of ``feats`` in input pixels, (stride_h, stride_w) or one number
            (from :meth:`~ocz_d2.modeling.backbone.ssl_guide.SSLGuide.features`; CLIP's patch
            size for CLIP's own features).
        patch_size: CLIP's patch size in input pixels, (h, w) or one number.
        seeding, iters, seed, per_image: see :func:`voronoi_cluster`.
        valid: optional bool [B, h, w], the cells that hold image (:func:`cells_with_image`);
            the others get NO_REGION.

    Returns:
        int64 [B, gh, gw] (see :func:`resample_regions`).
    """
    b, c, h, w = feats.shape
    regions = voronoi_cluster(
        feats.flatten(2).transpose(1, 2), num_regions, seeding=seeding, iters=iters, seed=seed,
        valid=None if valid is None else valid.reshape(b, h * w), per_image=per_image,
    )  # fmt: skip
    return resample_regions(
        regions.view(b, h, w), grid_hw, src_stride=stride, dst_stride=patch_size
    )
