"""Training targets (ocz_d2/modeling/targets.py) on hand-made samples, without a model: the
ground truth in the training vocabulary with padding and ignore pixels, and self-training's
pseudo-labels. (Through the model: tests/test_model.py, test_split_matching.py, test_padding.py.)"""

from __future__ import annotations

import pytest
import torch
from detectron2.structures import Instances
from detectron2.utils.events import EventStorage

from ocz_d2.modeling.targets import SPLIT_TARGETS, add_pseudo_labels, prepare_targets

CPU = torch.device("cpu")


def _sample(sem_seg: torch.Tensor, classes: list[int], unseen: torch.Tensor | None = None):
    inst = Instances(tuple(sem_seg.shape))
    inst.gt_classes = torch.tensor(classes, dtype=torch.long)
    inst.gt_masks = (
        torch.stack([sem_seg == c for c in classes])
        if classes
        else torch.zeros((0, *sem_seg.shape), dtype=torch.bool)
    )
    x = {"instances": inst, "sem_seg": sem_seg, "file_name": "a.png"}
    if unseen is not None:
        x["unseen_mask"] = unseen
    return x


def test_prepare_targets_maps_classes_pads_and_marks_ignore():
    sem_seg = torch.tensor([[3, 3, 255], [5, 255, 255]])
    x = _sample(sem_seg, [3, 5], unseen=torch.tensor([[False, False, True], [False, False, False]]))
    image_mask = torch.zeros(1, 2, 4, dtype=torch.bool)
    image_mask[0, :, :3] = True  # one column of padding
    (t,) = prepare_targets([x], image_mask, torch.tensor([1, 3, 5]), 255, CPU)
    assert t["labels"].tolist() == [1, 2]
    assert t["masks"].shape == (2, 2, 4) and t["masks"][:, :, 3].sum() == 0
    assert t["masks"][0].tolist() == [[1, 1, 0, 0], [0, 0, 0, 0]]
    assert t["valid"].tolist() == [[True, True, False, False], [True, False, False, False]]
    assert t["unlabeled"].tolist() == [[False, False, True, False], [False, True, True, False]]
    assert t["unseen"].tolist() == [[False, False, True, False], [False, False, False, False]]
    assert int(t["area"]) == 6
    with pytest.raises(ValueError, match=r"a.png: target classes \[3, 5\] are not all in the "):
        prepare_targets([x], image_mask, torch.tensor([1, 3]), 255, CPU)


def test_add_pseudo_labels_labels_confident_unseen_pixels_only():
    sem_seg = torch.tensor([[0, 255], [255, 255]])
    unseen = torch.tensor([[False, True], [True, False]])
    targets = prepare_targets(
        [_sample(sem_seg, [0], unseen)], torch.ones(1, 2, 2, dtype=torch.bool),
        torch.arange(3), 255, CPU,
    )  # fmt: skip
    # One query, sure of class 2 (unseen), covering the whole image.
    outputs = {
        "pred_logits": torch.tensor([[[-20.0, -20.0, 20.0, -20.0]]]),
        "pred_masks": torch.full((1, 1, 2, 2), 20.0),
    }
    with EventStorage() as storage:
        add_pseudo_labels(targets, outputs, torch.tensor([0, 1]), threshold=0.5)
        assert storage.history("self_training/pseudo_labelled_fraction").latest() == 1.0
    (t,) = targets
    assert t["labels"].tolist() == [0, 2]
    assert t["masks"][1].tolist() == [[0, 1], [1, 0]]
    assert t["valid"].tolist() == [[True, True], [True, False]]
    assert t["unlabeled"].tolist() == [[False, False], [False, True]]
    # Below the threshold nothing is labelled.
    targets = prepare_targets(
        [_sample(sem_seg, [0], unseen)], torch.ones(1, 2, 2, dtype=torch.bool),
        torch.arange(3), 255, CPU,
    )  # fmt: skip
    add_pseudo_labels(targets, outputs, torch.tensor([0, 1]), threshold=1.5)
    assert targets[0]["labels"].tolist() == [0]
    assert SPLIT_TARGETS == ("prompted", "plain")
