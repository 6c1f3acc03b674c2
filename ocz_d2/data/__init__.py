"""Zero-shot data: split registration, split files, the dataset mapper, the resumable training
loader, the batched test loader, object maps. (The synthetic benchmark's generator is
:mod:`ocz_d2.miniature`.)

Importing this package registers the builtin splits (``ocz_synthetic_{train,val,test}`` and
``ocz_synthetic_attr_{train,val,test}``) and the real benchmarks (``ocz_voc_*``,
``ocz_coco_stuff_*``, ``ocz_context59_{zs3,cascade}_*``, ``ocz_ade150_*``,
``ocz_{voc,context59}_all_val``) lazily, with roots under ``$DETECTRON2_DATASETS``.
"""

from ..constants import EVALUATOR_TYPE, IGNORE_LABEL, ZERO_SHOT_SETTINGS
from . import builtin as _builtin
from .augmentations import (
    PhotometricDistortionTransform,
    RandomPhotometricDistortion,
    RandomResizeScale,
    build_zero_shot_augmentations,
)
from .builtin import (
    SYNTHETIC_ATTR_SPLIT_FILE,
    SYNTHETIC_SPLIT_FILE,
    register_all_benchmarks,
    register_all_synthetic,
)
from .captions import CaptionDatasetMapper, is_caption_split, register_caption_split
from .dataset_mapper import ZeroShotSemSegDatasetMapper, read_label_map
from .register_zero_shot import (
    check_datasets,
    datasets_root,
    ignore_label_of,
    is_zero_shot_split,
    load_class_embeddings,
    register_zero_shot_split,
    resolve_unseen,
    unregister_zero_shot_split,
)
from .split_file import load_split_file, register_split_file, register_split_files_from_config
from .test_loader import build_zero_shot_test_loader
from .train_loader import ResumableTrainLoader, build_resumable_train_loader

_builtin.register_all_synthetic()
_builtin.register_all_benchmarks()
_builtin.register_all_captions()

__all__ = [
    "CaptionDatasetMapper",
    "is_caption_split",
    "register_caption_split",
    "EVALUATOR_TYPE",
    "IGNORE_LABEL",
    "PhotometricDistortionTransform",
    "ResumableTrainLoader",
    "RandomPhotometricDistortion",
    "RandomResizeScale",
    "SYNTHETIC_ATTR_SPLIT_FILE",
    "SYNTHETIC_SPLIT_FILE",
    "ZERO_SHOT_SETTINGS",
    "ZeroShotSemSegDatasetMapper",
    "build_resumable_train_loader",
    "build_zero_shot_test_loader",
    "build_zero_shot_augmentations",
    "check_datasets",
    "datasets_root",
    "ignore_label_of",
    "is_zero_shot_split",
    "load_class_embeddings",
    "load_split_file",
    "read_label_map",
    "register_all_benchmarks",
    "register_all_synthetic",
    "register_split_file",
    "register_split_files_from_config",
    "register_zero_shot_split",
    "resolve_unseen",
    "unregister_zero_shot_split",
]
