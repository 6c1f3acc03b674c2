"""Random model inputs shaped like the dataset mapper's outputs (:func:`synthetic_inputs`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from detectron2.data import MetadataCatalog

from ..constants import OBJECT_MAP_KEY
from ..data.dataset_mapper import ZeroShotSemSegDatasetMapper
from ..data.register_zero_shot import ignore_label_of

__all__ = ["synthetic_inputs", "without_object_maps"]


def _blocky(
    num_images: int, size: int, values: torch.Tensor, cells: int, generator: torch.Generator
) -> torch.Tensor:
    """int64 [N, size, size] maps of ``cells x cells`` blocks, each a random entry of ``values``."""
    idx = torch.randint(0, len(values), (num_images, 1, cells, cells), generator=generator)
    grid = values[idx].float()
    return F.interpolate(grid, size=(size, size), mode="nearest")[:, 0].long()


def synthetic_inputs(
    dataset_name: str,
    num_images: int,
    size: int,
    *,
    training: bool,
    num_objects: int = 0,
    seed: int = 0,
) -> list[dict]:
    """Random model inputs shaped like :class:`~ocz_d2.data.ZeroShotSemSegDatasetMapper`'s.

    Each dict has "image" (uint8 [3, size, size]), "height", "width", "dataset_name" and, when
    ``num_objects > 0``, an object map (int64 [size, size], regions ``0 .. n_o - 1`` in blocks);
    in training also "sem_seg" (int64 [size, size]: seen classes and the ignore label in blocks)
    and "instances" (one mask per class present, as the mapper builds them).

    Args:
        dataset_name: a registered zero-shot dataset (its metadata gives the classes, the seen
            ones and the ignore label; its files need not exist).
        num_images: N.
        size: image side.
        training: add the training targets.
        num_objects: n_o of the model's object prompts (0: no object map).
        seed: the inputs are a function of it.
    """
    meta = MetadataCatalog.get(dataset_name)
    classes = meta.get("stuff_classes", None)
    if not classes:
        raise ValueError(
            f"dataset {dataset_name!r} has no classes in its metadata: register it (a split file "
            "in DATASETS.SPLIT_FILES) or name a registered one in DATASETS.TRAIN"
        )
    ignore = ignore_label_of(dataset_name)
    seen = list(meta.get("seen_classes", range(len(classes))))
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (num_images, 3, size, size), generator=g, dtype=torch.uint8)
    labels = _blocky(num_images, size, torch.tensor([*seen, ignore]), 4, g)
    maps = None
    if num_objects:
        maps = _blocky(num_images, size, torch.arange(num_objects), 3, g)
    samples = []
    for i in range(num_images):
        sample = {"image": images[i], "height": size, "width": size, "dataset_name": dataset_name}
        if maps is not None:
            sample[OBJECT_MAP_KEY] = maps[i]
        if training:
            sample["sem_seg"] = labels[i]
            # The mapper's own construction of the targets.
            sample["instances"] = ZeroShotSemSegDatasetMapper._instances(labels[i], ignore)
        samples.append(sample)
    return samples


def without_object_maps(samples: list[dict]) -> list[dict]:
    """The samples without their object maps (what the online guide runs on)."""
    return [{k: v for k, v in s.items() if k != OBJECT_MAP_KEY} for s in samples]
