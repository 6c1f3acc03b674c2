"""Constants shared by the data side and the model side of ocz_d2 (the sample dict's keys, the
ignore label, the zero-shot settings).

A leaf module: it imports nothing from ocz_d2, so any module may import it without an import
cycle. The modules that use these names re-export them (e.g. ``ocz_d2.data.IGNORE_LABEL``).
"""

from __future__ import annotations

__all__ = [
    "EVALUATOR_TYPE",
    "IGNORE_LABEL",
    "OBJECT_MAP_KEY",
    "PADDING_MASK_KEY",
    "UNSEEN_MASK_KEY",
    "ZERO_SHOT_SETTINGS",
]

#: Label value of pixels that no loss or metric counts.
IGNORE_LABEL = 255
#: ``evaluator_type`` written into the metadata of every zero-shot split.
EVALUATOR_TYPE = "ocz_zero_shot_sem_seg"

#: Values of ``cfg.INPUT.ZERO_SHOT_SETTING``. In both, training labels of unseen classes become
#: ignore. Inductive: nothing else is known about those pixels. Transductive (ZegCLIP/OTSeg): the
#: mapper also says which pixels belong to *some* unseen class (:data:`UNSEEN_MASK_KEY`), without
#: saying which one; self-training labels exactly those pixels.
ZERO_SHOT_SETTINGS = ("inductive", "transductive")

#: Training-sample key: bool [H, W], True on the padding the mapper added (not image). Padding is
#: never an "unannotated" pixel: the model excludes it from pseudo-masks, self-training, the
#: guide's regions and ORA's attention.
PADDING_MASK_KEY = "padding_mask"
#: Training-sample key (transductive setting only): bool [H, W], True where the ground truth is an
#: unseen class (whose label is ignore in "sem_seg").
UNSEEN_MASK_KEY = "unseen_mask"
#: Key of object maps in ``extra_label_roots`` and in the mapper's output.
OBJECT_MAP_KEY = "object_map"
