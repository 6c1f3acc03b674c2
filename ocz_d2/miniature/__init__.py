"""The CPU miniature: a synthetic compositional zero-shot benchmark and its tiny CLIP.

- :mod:`~ocz_d2.miniature.synthetic`: the benchmark generator (4 hues x 4 textures, a
  Latin-square unseen split, factorised class embeddings, image-caption pretraining and
  zero-shot check sets, oracle object maps).
- :mod:`~ocz_d2.miniature.clip_pretrain`: contrastive image-caption pretraining of a (tiny)
  open_clip model, cached by a key of everything that changes the weights, and the benchmark's
  own tiny CLIP (:func:`ensure_synthetic_clip`).

``tools/prepare_synthetic.py`` and ``tools/demo.py`` drive both. What stays in the core:
the builtin splits ``ocz_synthetic_*`` are registered by :mod:`ocz_d2.data` on import (like
every builtin split; their split files are ``ocz_d2/data/splits/synthetic*.yaml``), and the tiny
open_clip configs (``OCZ-Tiny-ViT``, ``OCZ-Tiny-ViT-P8``) are part of the backbone's model list
(:mod:`ocz_d2.modeling.backbone`), since tests and random-CLIP configs use them too.
"""

from .clip_pretrain import (
    SYNTHETIC_CLIP_FILE,
    SYNTHETIC_CLIP_PRETRAIN,
    ClipPretrainConfig,
    ImageCaptionData,
    cache_key,
    contrastive_loss,
    csv_identity,
    default_cache_dir,
    ensure_pretrained_clip,
    ensure_synthetic_clip,
    load_image_caption_csv,
    load_labelled_images,
    pretrain_clip,
    save_atomic,
    zero_shot_accuracy,
)
from .synthetic import (
    HUES,
    SYNTHETIC_CLASSES,
    SYNTHETIC_UNSEEN,
    TEXTURES,
    UNSEEN_CELLS,
    SyntheticBenchmark,
    SyntheticScene,
    default_synthetic_root,
    ensure_pretraining_set,
    ensure_synthetic_benchmark,
    generate_synthetic_benchmark,
    generator_marker,
    pretraining_set_record,
    render_synthetic_sample,
    synthetic_caption,
    synthetic_class_embeddings,
    synthetic_split_config,
    write_oracle_object_maps,
)

__all__ = [
    "HUES",
    "SYNTHETIC_CLASSES",
    "SYNTHETIC_CLIP_FILE",
    "SYNTHETIC_CLIP_PRETRAIN",
    "SYNTHETIC_UNSEEN",
    "TEXTURES",
    "UNSEEN_CELLS",
    "ClipPretrainConfig",
    "ImageCaptionData",
    "SyntheticBenchmark",
    "SyntheticScene",
    "cache_key",
    "contrastive_loss",
    "csv_identity",
    "default_cache_dir",
    "default_synthetic_root",
    "ensure_pretrained_clip",
    "ensure_pretraining_set",
    "ensure_synthetic_benchmark",
    "ensure_synthetic_clip",
    "generate_synthetic_benchmark",
    "generator_marker",
    "pretraining_set_record",
    "load_image_caption_csv",
    "load_labelled_images",
    "pretrain_clip",
    "render_synthetic_sample",
    "save_atomic",
    "synthetic_caption",
    "synthetic_class_embeddings",
    "synthetic_split_config",
    "write_oracle_object_maps",
    "zero_shot_accuracy",
]
