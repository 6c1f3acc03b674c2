"""Point sampling for the matcher and the mask losses.

Costs and losses are computed on a few thousand points per mask instead of full-resolution masks
(memory). Every point lies at the centre of a *valid* (not ignore, not padding) pixel of the label
grid, so that ignore pixels never enter a cost or a loss, and so that sampling a label map at a
point with bilinear interpolation returns exactly that pixel's value (nearest-consistent).

Coordinates are normalised ``(x, y)`` in ``[0, 1]``: pixel ``(row i, col j)`` of an ``H x W`` grid
has its centre at ``((j + 0.5) / W, (i + 0.5) / H)``. This is the convention of
``F.grid_sample(..., align_corners=False)`` and of ``F.interpolate(..., align_corners=False)``, so
a prediction at a coarser resolution is sampled where its upsampled version would be.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "point_sample",
    "sample_uncertain_points",
    "sample_valid_points",
    "uniform_valid_points",
    "valid_pixel_centres",
]


def point_sample(features: torch.Tensor, coords: torch.Tensor, **kwargs) -> torch.Tensor:
    """Sample ``features`` bilinearly at normalised point coordinates.

    Args:
        features: [N, C, H, W] feature maps.
        coords: [N, P, 2] point coordinates ``(x, y)`` in ``[0, 1]`` (0 and 1 are the outer edges
            of the first and last pixel).
        **kwargs: passed to ``F.grid_sample``; defaults ``mode="bilinear"``,
            ``align_corners=False`` and ``padding_mode="border"`` (near the edges a coarser map
            is extended, not faded towards 0, exactly as ``F.interpolate`` upsamples it).

    Returns:
        [N, C, P] sampled values.
    """
    if features.dim() != 4 or coords.dim() != 3 or coords.shape[-1] != 2:
        raise ValueError(
            "point_sample expects features [N, C, H, W] and coords [N, P, 2]; got "
            f"{tuple(features.shape)} and {tuple(coords.shape)}."
        )
    kwargs.setdefault("align_corners", False)
    kwargs.setdefault("padding_mode", "border")
    grid = (2.0 * coords - 1.0).to(features.dtype).unsqueeze(2)  # [N, P, 1, 2] in [-1, 1]
    return F.grid_sample(features, grid, **kwargs).squeeze(3)


def valid_pixel_centres(valid: torch.Tensor) -> torch.Tensor:
    """[n, 2] normalised ``(x, y)`` centres of the True pixels of ``valid`` [H, W], each once in
    row-major order: the points :func:`sample_valid_points` draws from (all of them make exact,
    dense costs and losses)."""
    return _valid_centres_per_image(valid.unsqueeze(0))[0]


def sample_valid_points(
    valid: torch.Tensor, num_points: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Draw points uniformly (i.i.d., with replacement) over the valid pixels of a grid.

    Args:
        valid: [H, W] bool, True where a pixel may be used (not ignore, not padding).
        num_points: number of points P to draw.
        generator: optional ``torch.Generator`` on ``valid.device`` for reproducible draws.

    Returns:
        [P, 2] float32 ``(x, y)`` pixel-centre coordinates in ``[0, 1]`` on ``valid.device``;
        [0, 2] when ``valid`` has no True pixel.
    """
    if valid.dim() != 2:
        raise ValueError(f"valid must be a [H, W] mask, got shape {tuple(valid.shape)}.")
    centres = valid_pixel_centres(valid.bool())
    if centres.shape[0] == 0 or num_points <= 0:
        return centres.new_zeros((0, 2))
    # With replacement: an unbiased uniform estimate whatever the number of valid pixels, and
    # cheaper than a permutation of a large grid.
    idx = torch.randint(centres.shape[0], (num_points,), generator=generator, device=centres.device)
    return centres[idx]


def _valid_centres_per_image(valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The valid pixel centres of a batch of grids ``valid`` [B, H, W]: ([n, 2] normalised
    ``(x, y)``, image by image in row-major order; [B] how many each image has)."""
    _, height, width = valid.shape
    images, rows, cols = torch.nonzero(valid, as_tuple=True)
    xs = (cols.to(torch.float32) + 0.5) / width
    ys = (rows.to(torch.float32) + 0.5) / height
    counts = torch.bincount(images, minlength=valid.shape[0])
    return torch.stack([xs, ys], dim=1), counts


def _draw_indices(
    first: torch.Tensor, count: torch.Tensor, num: int, generator: torch.Generator | None
) -> torch.Tensor:
    """[N, num] indices drawn uniformly (with replacement) from ``first + 0..count - 1`` per
    row (``first``, ``count``: int64 [N, 1]); a row with ``count`` 0 gets ``first - 1``."""
    u = torch.rand((first.shape[0], num), generator=generator, device=first.device)
    # floor(u * n) is uniform over 0..n-1; the minimum guards float rounding up to n.
    return first + torch.minimum((u * count).long(), count - 1)


def uniform_valid_points(
    valid: torch.Tensor, num_points: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw ``num_points`` pixels per image uniformly (with replacement) over the True pixels of
    ``valid`` [B, H, W], which must hold at least one.

    Returns:
        (coords float32 [B, P, 2] normalised ``(x, y)`` pixel centres; index int64 [B, P] of
        each point among the True pixels of the batch, image by image in row-major order, as
        ``tensor[valid]`` lists them; counts int64 [B] of True pixels per image). The rows of an
        image without a True pixel hold arbitrary pixels of the others: mask them by ``counts``.
    """
    centres, counts = _valid_centres_per_image(valid)
    first = (counts.cumsum(0) - counts)[:, None]
    index = _draw_indices(first, counts[:, None], num_points, generator)
    index = index.clamp(0, centres.shape[0] - 1)
    return centres[index], index, counts


def sample_uncertain_points(
    mask_logits: torch.Tensor,
    valid: torch.Tensor | None,
    num_points: int,
    oversample_ratio: float,
    importance_sample_ratio: float,
    generator: torch.Generator | None = None,
    image_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """Choose points per mask, favouring uncertain predictions, among valid pixels only.

    For each mask, ``ceil(P * oversample_ratio)`` candidate points are drawn uniformly over the
    valid pixels of its image; the ``int(P * importance_sample_ratio)`` candidates whose logits
    are closest to 0 are kept, and the remaining points are drawn uniformly over the valid
    pixels again (as in PointRend / Mask2Former training, but never from ignore pixels). All
    masks are sampled together, whichever image they belong to.

    Args:
        mask_logits: [N, h, w] predicted mask logits (any resolution; sampled bilinearly).
        valid: bool label-grid mask of usable pixels: [H, W], shared by all masks, or
            [B, H, W], one per image, with ``image_index``; None: every pixel of the
            ``mask_logits`` grid is valid. Points are centres of pixels of this grid.
        num_points: points per mask P.
        oversample_ratio: candidates per point, >= 1.
        importance_sample_ratio: fraction of the points chosen by uncertainty, in [0, 1].
        generator: optional ``torch.Generator`` for reproducible draws.
        image_index: int64 [N], the image (index into ``valid`` [B, H, W]) of each mask.

    Returns:
        [N, P, 2] float32 ``(x, y)`` coordinates in ``[0, 1]`` (no gradient);
        [N, 0, 2] when no image has a valid pixel.

    Raises:
        ValueError: when some masks' images have valid pixels and others' have none (drop the
            masks of the empty images first: no point of theirs can be drawn).
    """
    if oversample_ratio < 1:
        raise ValueError(f"oversample_ratio must be >= 1, got {oversample_ratio}.")
    if not 0.0 <= importance_sample_ratio <= 1.0:
        raise ValueError(
            f"importance_sample_ratio must be in [0, 1], got {importance_sample_ratio}."
        )
    if mask_logits.dim() != 3:
        raise ValueError(f"mask_logits must be [N, h, w], got {tuple(mask_logits.shape)}.")
    num_masks = mask_logits.shape[0]
    device = mask_logits.device
    if valid is None:
        valid = torch.ones(mask_logits.shape[-2:], dtype=torch.bool, device=device)
    if valid.dim() == 2:
        valid = valid.unsqueeze(0)
        image_index = torch.zeros(num_masks, dtype=torch.long, device=device)
    elif valid.dim() != 3 or image_index is None or image_index.shape != (num_masks,):
        raise ValueError(
            "sample_uncertain_points: valid must be [H, W], or [B, H, W] with image_index [N] "
            f"(one image per mask); got valid {tuple(valid.shape)} and image_index "
            f"{None if image_index is None else tuple(image_index.shape)} for {num_masks} masks."
        )
    num_uncertain = int(num_points * importance_sample_ratio)
    num_random = num_points - num_uncertain
    num_candidates = max(math.ceil(num_points * oversample_ratio), num_uncertain)

    with torch.no_grad():
        centres, counts = _valid_centres_per_image(valid.bool())
        if centres.shape[0] == 0 or num_masks == 0 or num_points <= 0:
            return centres.new_zeros((num_masks, 0, 2))
        image_index = image_index.to(counts.device)
        per_mask = counts[image_index][:, None]  # [N, 1] valid pixels of each mask's image
        if (per_mask == 0).any():
            raise ValueError(
                "sample_uncertain_points: some masks belong to images without a valid pixel; "
                "leave those masks out (they have no point to be sampled at)."
            )
        first = (counts.cumsum(0) - counts)[image_index][:, None]

        def draw(count: int) -> torch.Tensor:
            return centres[_draw_indices(first, per_mask, count, generator)]  # [N, count, 2]

        parts = []
        if num_uncertain > 0:
            candidates = draw(num_candidates)
            logits = point_sample(mask_logits.detach().float().unsqueeze(1), candidates)
            uncertainty = -logits.squeeze(1).abs()  # [N, num_candidates]
            top = uncertainty.topk(num_uncertain, dim=1).indices
            parts.append(torch.gather(candidates, 1, top.unsqueeze(-1).expand(-1, -1, 2)))
        if num_random > 0:
            parts.append(draw(num_random))
        return torch.cat(parts, dim=1)
