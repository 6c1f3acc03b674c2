"""Which pixels and patches of a padded batch hold image.

Training crops are padded by the dataset mapper (to the crop size) and batches by ``ImageList``
(to a common, divisible size). Padding is not an unannotated part of the image: it must never be
clustered into a pseudo-mask, pseudo-labelled, given an object region, or attended to by ORA.
Every part of the model reads the same two masks defined here, so they all agree on it.

Padding is always at the bottom and right (the mapper's and ``ImageList``'s convention).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..constants import PADDING_MASK_KEY

__all__ = ["PATCH_VALID_KEY", "batch_image_mask", "image_patches"]

#: Key of the backbone feature dict under which the meta-architecture passes the bool
#: [B, gh, gw] image patches (:func:`image_patches`) to the pixel decoder.
PATCH_VALID_KEY = "patch_valid"


def batch_image_mask(
    samples: list[dict], padded_hw: tuple[int, int], device: torch.device | str
) -> torch.Tensor:
    """Image pixels of a padded batch.

    Args:
        samples: the batch's sample dicts: "image" [3, h, w], and optionally "padding_mask"
            (bool [h, w], True on the padding the mapper added).
        padded_hw: (H, W) of the padded batch (H >= h, W >= w).
        device: where the mask lives.

    Returns:
        bool [B, H, W]: True on image pixels, False on the mapper's and the batch's padding.
    """
    mask = torch.zeros((len(samples), *padded_hw), dtype=torch.bool, device=device)
    for i, x in enumerate(samples):
        h, w = x["image"].shape[-2:]
        padding = x.get(PADDING_MASK_KEY)
        if padding is None:
            mask[i, :h, :w] = True
        else:
            if tuple(padding.shape) != (h, w):
                raise ValueError(
                    f"a sample's padding_mask is {tuple(padding.shape)} but its image is "
                    f"{(h, w)}: they must match (the ocz_d2 mapper writes both)"
                )
            mask[i, :h, :w] = ~padding.to(device=device, dtype=torch.bool)
    return mask


def image_patches(image_mask: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Patches that hold image: more than half of their pixels are image pixels.

    With bottom/right padding such a patch has its centre pixel in the image, so any guide whose
    cell under that centre holds an image pixel gives it a region (the online and the
    precomputed guide paths then agree on which patches have none).

    Args:
        image_mask: bool [B, H, W] image pixels; H, W multiples of ``patch_size``.
        patch_size: p.

    Returns:
        bool [B, H/p, W/p].
    """
    h, w = image_mask.shape[-2:]
    if h % patch_size or w % patch_size:
        raise ValueError(f"image mask {h}x{w} is not a multiple of the patch size {patch_size}")
    share = F.avg_pool2d(image_mask[:, None].float(), patch_size)[:, 0]
    return share > 0.5
