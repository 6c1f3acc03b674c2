"""Training targets of the meta-architecture: the ground-truth masks of a batch in the training
vocabulary, and what joins them: transductive self-training's pseudo-labels of unseen classes and
split matching's candidates (pseudo-masks of the ignore pixels, :mod:`.pseudo_masks`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from detectron2.utils.events import get_event_storage
from torch import nn

from ..constants import UNSEEN_MASK_KEY
from .pseudo_masks import PseudoMaskGenerator, pixel_class_probabilities, pseudo_label

__all__ = ["SPLIT_TARGETS", "add_candidates", "add_pseudo_labels", "prepare_targets"]

#: Where split matching's pseudo-masks and region embeddings come from (``add_candidates``).
SPLIT_TARGETS = ("prompted", "plain")


def prepare_targets(
    batched_inputs: list[dict],
    image_mask: torch.Tensor,
    class_ids: torch.Tensor,
    ignore_label: int,
    device: torch.device,
) -> list[dict]:
    """Per image: vocabulary labels, binary masks and the valid (non-ignore) region, padded.

    Args:
        batched_inputs: training samples with "instances" and "sem_seg" (and, transductive,
            "unseen_mask").
        image_mask: bool [B, H, W] image pixels of the padded batch (:func:`batch_image_mask`).
        class_ids: int64 [K'] dataset class indices of the training vocabulary.
        ignore_label: the "sem_seg" value of pixels outside every target (dataset metadata).
        device: the model's device.

    Returns:
        One dict per image: "labels" int64 [T] vocabulary indices, "masks" float [T, H, W],
        "valid" bool [H, W] (annotated pixels), "unlabeled" bool [H, W] (ignore pixels of the
        image; never padding), "unseen" bool [H, W] (transductive: pixels of some unseen
        class, all False otherwise) and "area" (the image's pixel count, padding excluded).
    """
    num_classes = int(class_ids.max().item()) + 1 if class_ids.numel() else 0
    to_vocab = torch.full((max(num_classes, 1),), -1, dtype=torch.long, device=device)
    to_vocab[class_ids] = torch.arange(len(class_ids), device=device)
    h_pad, w_pad = image_mask.shape[-2:]
    targets = []
    for x, in_image in zip(batched_inputs, image_mask):
        inst = x["instances"].to(device)
        gt_classes = inst.gt_classes
        masks = inst.gt_masks
        masks = masks.tensor if hasattr(masks, "tensor") else masks
        if gt_classes.numel() and (
            gt_classes.max() >= len(to_vocab) or (to_vocab[gt_classes] < 0).any()
        ):
            raise ValueError(
                f"{x.get('file_name', 'a sample')}: target classes {gt_classes.tolist()} "
                f"are not all in the training vocabulary {class_ids.tolist()}; unseen "
                f"classes must be ignore ({ignore_label}) in inductive training"
            )
        sem_seg = x["sem_seg"].to(device)
        h, w = sem_seg.shape
        padded = masks.new_zeros((masks.shape[0], h_pad, w_pad), dtype=torch.float32)
        padded[:, :h, :w] = masks.float()
        valid = torch.zeros((h_pad, w_pad), dtype=torch.bool, device=device)
        valid[:h, :w] = sem_seg != ignore_label
        unlabeled = torch.zeros_like(valid)
        unlabeled[:h, :w] = sem_seg == ignore_label
        unlabeled &= in_image
        unseen = torch.zeros_like(valid)
        if x.get(UNSEEN_MASK_KEY) is not None:
            unseen[:h, :w] = x[UNSEEN_MASK_KEY].to(device)
            unseen &= in_image
        labels = to_vocab[gt_classes] if gt_classes.numel() else gt_classes
        targets.append(
            {"labels": labels, "masks": padded, "valid": valid, "unlabeled": unlabeled,
             "unseen": unseen, "area": in_image.sum()}
        )  # fmt: skip
    return targets


@torch.no_grad()
def add_pseudo_labels(
    targets: list[dict], outputs: dict, seen_vocab: torch.Tensor, threshold: float
) -> None:
    """Self-training (ZegCLIP/OTSeg): pixels whose ground truth is an unseen class (the
    mapper's "unseen_mask": where, not which) get the unseen class of highest probability in
    this step's prediction, if it reaches ``threshold`` (:func:`pixel_class_probabilities`,
    :func:`pseudo_label`); they become one target mask per unseen class present, join "valid"
    and leave "unlabeled". Background, boundaries and padding stay ignored.

    Args:
        targets: :func:`prepare_targets`'s, updated in place.
        outputs: the decoder's "pred_logits" [B, Q, K+1] and "pred_masks" [B, Q, h, w] over
            the full vocabulary (seen and unseen).
        seen_vocab: int64 vocabulary indices of the seen classes.
        threshold: ``MODEL.OCZ.SELF_TRAINING.THRESHOLD``.
    """
    device = outputs["pred_logits"].device
    num_classes = outputs["pred_logits"].shape[-1] - 1
    is_seen = torch.zeros(num_classes, dtype=torch.bool, device=device)
    is_seen[seen_vocab.to(device)] = True
    unseen = torch.nonzero(~is_seen).squeeze(1)
    size = targets[0]["valid"].shape
    masks = F.interpolate(
        outputs["pred_masks"].detach().float(), size=size, mode="bilinear", align_corners=False
    )
    logits = outputs["pred_logits"].detach().float()
    labelled = candidates = 0  # pixel counts, kept on the device until the one log below
    for target, lg, mk in zip(targets, logits, masks):
        candidates = candidates + target["unseen"].sum()
        labels = pseudo_label(
            pixel_class_probabilities(lg, mk), target["unseen"], unseen, threshold
        )
        present = torch.unique(labels)
        present = present[present >= 0]
        new = (labels[None] == present[:, None, None]).float()
        target["labels"] = torch.cat([target["labels"], present])
        target["masks"] = torch.cat([target["masks"], new])
        target["valid"] = target["valid"] | (labels >= 0)
        target["unlabeled"] = target["unlabeled"] & (labels < 0)
        labelled = labelled + (labels >= 0).sum()
    fraction = float(labelled) / max(float(candidates), 1.0)
    _put_scalar("self_training/pseudo_labelled_fraction", fraction)


@torch.no_grad()
def add_candidates(
    targets: list[dict],
    features: dict,
    images: torch.Tensor,
    backbone: nn.Module,
    pseudo_masker: PseudoMaskGenerator,
    split_targets: str = "prompted",
) -> None:
    """Split matching: each target gets "candidates", the pseudo-masks of its unlabeled
    pixels with their region embeddings, defined on the annotated and pseudo-masked pixels.

    The features they come from are the prompted pass's (``features``), which move as the
    prompts train, or a frozen prompt-free pass over ``images`` (fixed targets), as
    ``split_targets`` says.

    Args:
        targets: :func:`prepare_targets`'s (after any pseudo-labels), updated in place.
        features: the backbone's outputs of this step ("dense", "cls", "last_input").
        images: [B, 3, H, W] the normalised, padded batch (for the prompt-free pass).
        backbone: the CLIP backbone (``plain_forward``, ``region_embeddings``).
        pseudo_masker: clusters the unlabeled pixels into pseudo-masks.
        split_targets: one of :data:`SPLIT_TARGETS`.
    """
    device = images.device
    prompted = split_targets == "prompted"
    source = features if prompted else backbone.plain_forward(images)
    unlabeled = torch.stack([t["unlabeled"] for t in targets])
    areas = torch.stack([torch.as_tensor(t["area"], device=device) for t in targets])
    masks, patch_masks = pseudo_masker(source["dense"].detach(), unlabeled, areas)
    most = max(len(m) for m in masks)
    dim = source["cls"].shape[-1]
    embeds = source["cls"].new_zeros((len(targets), most, dim))
    if most:
        grid = patch_masks[0].shape[-2:]
        padded = torch.zeros((len(targets), most, *grid), dtype=torch.bool, device=device)
        for b, p in enumerate(patch_masks):
            padded[b, : len(p)] = p
        embeds = backbone.region_embeddings(
            source["last_input"].detach(), padded, prompted=prompted
        )
    _put_scalar("split/pseudo_masks_per_image", sum(len(m) for m in masks) / len(masks))
    for b, (target, m) in enumerate(zip(targets, masks)):
        covered = m.any(0) if len(m) else torch.zeros_like(target["valid"])
        target["candidates"] = {
            "masks": m.float(),
            "embeds": embeds[b, : len(m)].float(),
            "valid": target["valid"] | covered,
        }


def _put_scalar(name: str, value: float) -> None:
    """Log a training scalar to Detectron2's event storage, if there is one."""
    try:
        get_event_storage().put_scalar(name, value)
    except AssertionError:  # no storage: called outside a trainer
        pass
